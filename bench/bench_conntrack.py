"""Benchmark: resolving NAT for records, event subscription (collector/conntrack.py +
collector/natfold.py, what the collector does) against a lookup per record (a ctnetlink GET of
the record's original tuple, IPCTNL_MSG_CT_GET, answered by the kernel), side by side on the same
translated connections. Not a test: it reports ratios, never passes or fails.

The workload: two namespaces joined by a veth; the client's namespace DNATs a "ClusterIP"
(10.252.96.10:80) to the server (10.252.0.2:8080) in its `nat` OUTPUT chain, as kube-proxy does;
`--conns` short TCP connections are made to the ClusterIP. Then, for the same connections:
- events: the subscribed reader's CPU to read and parse every NEW and DESTROY event the workload
  made (it was subscribed before the workload), plus one fold per record (`NatFolder.fold_one`,
  which also builds the rewritten record);
- lookups: one GET per record (request, the kernel's answer, the same parser) and the same
  rewrite of the record. The lookups are made while the entries still exist (a real collector
  building a final record after conntrack dropped the entry would find nothing at all).
Records per connection (`--records`, default 2: an interim and a final; a long connection makes
one per interval) multiply the lookups, not the events. Both must resolve every connection to
the server. Root; the traffic stays inside the two namespaces.
Usage: python bench/bench_conntrack.py [--conns 2000] [--records 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from collector import conntrack  # noqa: E402
from collector.natfold import NatFolder  # noqa: E402
from eastwest.record import Endpoint, FlowRecord, Nat  # noqa: E402

NS_C, NS_S = "ewxct-c", "ewxct-s"
IP_C, IP_S, VIP, VPORT, PORT = "10.252.0.1", "10.252.0.2", "10.252.96.10", 80, 8080
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST = 1
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def setup() -> None:
    teardown()
    sh("ip", "netns", "add", NS_C)
    sh("ip", "netns", "add", NS_S)
    sh("ip", "link", "add", "ewxct0", "type", "veth", "peer", "name", "ewxct1")
    sh("ip", "link", "set", "ewxct0", "netns", NS_C)
    sh("ip", "link", "set", "ewxct1", "netns", NS_S)
    for ns, dev, ip in ((NS_C, "ewxct0", IP_C), (NS_S, "ewxct1", IP_S)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", NS_C, "route", "add", "10.252.96.0/24", "dev", "ewxct0")
    # entries end 1 s after the close, so the workload's DESTROY events are read (and paid) too
    sh("ip", "netns", "exec", NS_C, "sysctl", "-q", "-w",
       "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")
    sh("ip", "netns", "exec", NS_C, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", VIP, "-p",
       "tcp", "--dport", str(VPORT), "-j", "DNAT", "--to-destination", f"{IP_S}:{PORT}")


def teardown() -> None:
    for ns in (NS_C, NS_S):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def workload(n: int) -> list[int]:
    """n connections client -> VIP (answered by the server); their client ports."""
    code = ("import socket,sys\nn=int(sys.argv[1])\nfor _ in range(n):\n"
            f"    s=socket.create_connection(('{VIP}',{VPORT}));print(s.getsockname()[1]);"
            "s.close()\n")
    srv = subprocess.Popen(["ip", "netns", "exec", NS_S, sys.executable, "-c",
                            "import socket\ns=socket.socket();s.setsockopt(1,2,1)\n"
                            f"s.bind(('{IP_S}',{PORT}));s.listen(4096)\nprint('up',flush=True)\n"
                            "while True: s.accept()[0].close()"], stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
    try:
        out = subprocess.run(["ip", "netns", "exec", NS_C, sys.executable, "-c", code, str(n)],
                             check=True, capture_output=True, text=True).stdout
    finally:
        srv.kill()
        srv.wait()
    return [int(x) for x in out.split()]


def _nla(typ: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, typ) + payload + b"\0" * ((4 - n % 4) % 4)


def get_request(seq: int, sport: int) -> bytes:
    """IPCTNL_MSG_CT_GET of the original tuple client:sport -> VIP:80/tcp."""
    nested = 0x8000
    ip = _nla(CTA_IP_V4_SRC, socket.inet_aton(IP_C)) + _nla(CTA_IP_V4_DST, socket.inet_aton(VIP))
    proto = (_nla(conntrack.CTA_PROTO_NUM, bytes([6])) +
             _nla(conntrack.CTA_PROTO_SRC_PORT, struct.pack(">H", sport)) +
             _nla(conntrack.CTA_PROTO_DST_PORT, struct.pack(">H", VPORT)))
    tup = _nla(conntrack.CTA_TUPLE_IP | nested, ip) + _nla(conntrack.CTA_TUPLE_PROTO | nested, proto)
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + _nla(conntrack.CTA_TUPLE_ORIG | nested, tup)
    typ = (conntrack.NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return struct.pack("=IHHII", 16 + len(body), typ, NLM_F_REQUEST, seq, 0) + body


def lookup_socket() -> socket.socket:
    """A plain (unsubscribed) ctnetlink socket in the client's namespace."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{NS_C}", os.O_RDONLY)
    try:
        conntrack._libc.setns(target, conntrack.CLONE_NEWNET)
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, conntrack.NETLINK_NETFILTER)
        s.bind((0, 0))
        conntrack._libc.setns(home, conntrack.CLONE_NEWNET)
    finally:
        os.close(home)
        os.close(target)
    return s


def record(sport: int, n: int) -> FlowRecord:
    t = datetime(2026, 12, 7, tzinfo=UTC)
    return FlowRecord(record_id=f"b:{n}", collector="b", source="socket", start=t,
                      end=t + timedelta(seconds=1), final=False, protocol="tcp", family=4,
                      client=Endpoint(IP_C, sport), server=Endpoint(VIP, VPORT), observer="client")


def lookups(recs: list[FlowRecord]) -> tuple[float, float]:
    """One GET per record and its rewrite: (wall seconds, CPU seconds) for all of them."""
    s = lookup_socket()
    found = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i, r in enumerate(recs):
        s.send(get_request(i + 1, r.client.port))
        data = s.recv(1 << 16)
        for _kind, tr in conntrack.parse(data):
            back = Endpoint(*tr.backend)
            r.replace(server=back, nat=[Nat("dnat", r.server, back, None)])
            found += tr.backend == (IP_S, PORT)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s.close()
    assert found == len(recs), f"lookups resolved {found} of {len(recs)}"
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--records", type=int, default=2, help="records per connection")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    setup()
    try:
        folder = NatFolder([NS_C])  # subscribed before the workload, as a running collector is
        ports = workload(a.conns)
        recs = [record(p, i) for i, p in enumerate(ports) for _ in range(a.records)]
        lookup_s, lookup_cpu = lookups(recs)  # while the entries exist (TIME_WAIT: 1 s here)
        time.sleep(3)  # past the TIME_WAIT timeout: the DESTROY events are queued as well
        t0 = time.process_time()
        folder.drain(datetime.now(UTC))
        events_cpu = time.process_time() - t0
        t0 = time.perf_counter()
        folded = [folder.fold_one(r) for r in recs]
        fold_s = time.perf_counter() - t0
        assert all(r.server == Endpoint(IP_S, PORT) for r in folded), "an event fold missed"
        events = sum(getattr(r, "events", 0) for _, r in folder.readers)
        folder.close()
    finally:
        teardown()
    n = len(recs)
    ev_per_rec = (events_cpu + fold_s) / n
    lk_per_rec = lookup_s / n
    out = {"connections": len(ports), "records": n, "events": events,
           "events_cpu_us_per_event": round(events_cpu / max(events, 1) * 1e6, 2),
           "fold_us_per_record": round(fold_s / n * 1e6, 2),
           "events_us_per_record": round(ev_per_rec * 1e6, 2),
           "lookup_us_per_record": round(lk_per_rec * 1e6, 2),
           "lookup_cpu_us_per_record": round(lookup_cpu / n * 1e6, 2),
           "ratio_lookup_over_events": round(lk_per_rec / ev_per_rec, 1)}
    print(json.dumps(out, indent=2))
    print(f"lookup per record / events: {lk_per_rec / ev_per_rec:.2f}x the time per record")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
