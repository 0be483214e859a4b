"""Benchmark: the socket probes' UDP flows under a storm of small datagrams on unconnected
sockets, side by side with a raw packet count (tcpdump on the sender's veth, libpcap's
TPACKET_V3 ring, `-w /dev/null`). Not a test: it reports ratios, it never passes or fails.

bench/bench_socket_probes.py measures TCP connections (against tcplife); this is the UDP half.
The storm: two namespaces of its own joined by a veth (`ewst-c`, `ewst-s`). In `ewst-c`,
`--senders` processes of each kind, `sendto` (one datagram per call) and `sendmmsg` (64 per
call, each to its own address), each with `--sockets` unconnected sockets sending 16-byte
datagrams round robin to the 16 server ports for `--seconds` (flows = senders x 2 x sockets x
16 per side). In `ewst-s`, one `recvfrom` and one `recvmmsg` receiver (8 ports each). Truth:
each sender's own count of what it sent per (source port, server port), each receiver's of what
it received per (source port, server port) (a receiver that falls behind loses datagrams in its
socket buffer: those never reached the application and are not in its truth).

Phases (each the same storm):
  1. no tool:       datagrams/s the senders make alone;
  2. side by side:  the collector (`--netns ewst-c --netns ewst-s`) and tcpdump (`-Q out` on the
                    sender's veth, `udp`) at once: datagrams each counted, flows the collector
                    got exact per direction and per side against the truth, CPU of each
                    (utime + stime + children, /proc/PID/stat, from ready to exit), and the
                    kernel time of the collector's BPF programs per datagram
                    (`kernel.bpf_stats_enabled`, run_time_ns of its programs, `bpftool prog`);
  3. tcpdump alone, 4. collector alone: datagrams/s with each attached (its cost to the
     senders and receivers, in their system calls and softirqs, as a ratio to phase 1).
`--loopback`: no namespaces, everything on 127.0.78.0/24 of the collector's own namespace
(which it watches, so it also counts whatever else runs there), tcpdump on `lo`.
Root; the traffic stays inside the two namespaces (or loopback). With namespaces, run it under
`flock /tmp/ew-lab.lock`.
Usage: python bench/bench_udp_storm.py [--seconds 10] [--senders 1] [--sockets 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.lab.udp_workload import Batch, libc, recvmmsg, sockaddr  # noqa: E402

NS_C, NS_S = "ewst-c", "ewst-s"
IP_C, IP_S = "10.253.0.1", "10.253.0.2"
PORTS_FROM, PORTS_MMSG = tuple(range(31000, 31008)), tuple(range(31008, 31016))
PORTS = PORTS_FROM + PORTS_MMSG
SIZE, MMSG = 16, 64
TICK = os.sysconf("SC_CLK_TCK")
CLONE_NEWNET = 0x40000000
LOOPBACK = {"on": False}  # --loopback: everything in this namespace, on 127.0.78.0/24
PROG_NAMES = re.compile(r"^(tracepoint__syscalls__sys_(enter|exit)_(send|recv)|raw_tracepoint__sock_)")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check).stdout


def setup() -> tuple[int, int]:
    teardown()
    sh("ip", "netns", "add", NS_C)
    sh("ip", "netns", "add", NS_S)
    sh("ip", "-n", NS_C, "link", "add", "stc", "type", "veth", "peer", "name", "sts", "netns", NS_S)
    for ns, dev, ip in ((NS_C, "stc", IP_C), (NS_S, "sts", IP_S)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    return os.stat(f"/run/netns/{NS_C}").st_ino, os.stat(f"/run/netns/{NS_S}").st_ino


def teardown() -> None:
    for ns in (NS_C, NS_S):
        sh("ip", "netns", "delete", ns, check=False)


def enter(ns: str) -> None:
    if LOOPBACK["on"]:
        return
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ct.get_errno(), f"setns {ns}")
    os.close(fd)


def receiver(mmsg: bool, ready, stop, out) -> None:  # noqa: ANN001 - mp primitives
    """Counts what the application received per (source port, server port) until `stop`,
    then drains what is left and reports."""
    import selectors

    enter(NS_S)
    sel = selectors.DefaultSelector()
    for port in PORTS_MMSG if mmsg else PORTS_FROM:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((IP_S, port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, port)
    counts: dict[tuple[int, int], int] = {}
    rx = Batch.for_receiving(MMSG, 2048)
    ready.set()
    quiet_since = None
    while True:
        events = sel.select(0.2)
        if not events:
            if stop.is_set():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 1.0:
                    break
            continue
        for key, _ in events:
            s, port = key.fileobj, key.data
            while True:
                if mmsg:
                    for i in range(MMSG):
                        rx.msgs[i].msg_hdr.msg_namelen = 128
                    try:
                        got = recvmmsg(s.fileno(), rx, 0, MMSG, 0x40)  # type: ignore[union-attr]
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno == 11:
                            break
                        raise
                    for i in range(got):
                        name = rx.names[i].raw  # type: ignore[union-attr]
                        k = (int.from_bytes(name[2:4], "big"), port)
                        counts[k] = counts.get(k, 0) + 1
                else:
                    try:
                        _, addr = s.recvfrom(2048)  # type: ignore[union-attr]
                    except BlockingIOError:
                        break
                    k = (addr[1], port)
                    counts[k] = counts.get(k, 0) + 1
    out.put(("recv", mmsg, list(counts.items())))


def sender(mmsg: bool, sockets: int, seconds: float, go, out) -> None:  # noqa: ANN001
    enter(NS_C)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
    for s in socks:
        s.bind((IP_C, 0))
    lports = [s.getsockname()[1] for s in socks]
    counts = [[0] * len(PORTS) for _ in socks]
    payload = b"d" * SIZE
    batch = Batch([payload] * MMSG, [sockaddr(socket.AF_INET, IP_S, PORTS[i % len(PORTS)])
                                     for i in range(MMSG)])
    go.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for i, s in enumerate(socks):
            if mmsg:
                sent = libc.sendmmsg(s.fileno(), batch.msgs, MMSG, 0)
                for j in range(max(0, sent)):
                    counts[i][j % len(PORTS)] += 1
            else:
                for j, port in enumerate(PORTS):
                    try:
                        s.sendto(payload, (IP_S, port))
                        counts[i][j] += 1
                    except OSError:  # ENOBUFS under pressure: not sent, not counted
                        pass
    out.put(("sent", mmsg, [((lports[i], PORTS[j]), counts[i][j])
                            for i in range(len(socks)) for j in range(len(PORTS)) if counts[i][j]]))


def storm(a: argparse.Namespace) -> dict:
    """One storm: every sender and receiver; the truths and datagrams/s."""
    q: mp.Queue = mp.Queue()
    stop, go = mp.Event(), mp.Event()
    ready = [mp.Event(), mp.Event()]
    rx = [mp.Process(target=receiver, args=(m, ready[i], stop, q)) for i, m in enumerate((0, 1))]
    tx = [mp.Process(target=sender, args=(m, a.sockets, a.seconds, go, q))
          for m in (0, 1) for _ in range(a.senders)]
    for p in rx + tx:
        p.start()
    for e in ready:
        e.wait(30)
    t0 = time.monotonic()
    go.set()
    results = [q.get() for _ in tx]
    elapsed = time.monotonic() - t0
    stop.set()
    results += [q.get() for _ in rx]
    for p in rx + tx:
        p.join()
    sent: dict[tuple[int, int], int] = {}
    recv: dict[tuple[int, int], int] = {}
    by_call = {"sendto": 0, "sendmmsg": 0, "recvfrom": 0, "recvmmsg": 0}
    for kind, mmsg, items in results:
        for k, n in items:
            (sent if kind == "sent" else recv)[tuple(k)] = n  # type: ignore[index]
            call = ("sendmmsg" if mmsg else "sendto") if kind == "sent" else \
                ("recvmmsg" if mmsg else "recvfrom")
            by_call[call] += n
    total = sum(sent.values())
    return {"sent": sent, "recv": recv, "datagrams": total, "received": sum(recv.values()),
            "by_call": by_call, "per_s": round(total / elapsed)}


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / TICK


def cpu_at_exit(proc: subprocess.Popen) -> float:
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    cpu = cpu_seconds(proc.pid)
    proc.wait()
    return cpu


def prog_stats() -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of the loaded BPF programs that count UDP."""
    out = {}
    for p in json.loads(sh("bpftool", "prog", "show", "--json") or "[]"):
        if PROG_NAMES.match(p.get("name", "")):
            out[p["id"]] = (p["name"], p.get("run_time_ns", 0), p.get("run_cnt", 0))
    return out


def start_collector(out: Path, err: Path) -> subprocess.Popen:
    scope = ["--netns", NS_C] + (["--netns", NS_S] if NS_S != NS_C else [])
    cmd = [sys.executable, "-m", "eastwest", "collector", "--output", str(out), "--no-vxlan",
           *scope, "--interval", "2", "--idle-timeout", "3600", "-v"]
    p = subprocess.Popen(cmd, stderr=err.open("wb"), cwd=REPO)
    deadline = time.monotonic() + 180
    while "socket probes attached" not in err.read_text():
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"collector did not start: {err.read_text()[-2000:]}")
        time.sleep(0.1)
    return p


def start_tcpdump(err: Path) -> subprocess.Popen:
    if LOOPBACK["on"]:  # on lo every packet is seen once
        cmd = ["tcpdump", "-i", "lo", "-n", "-w", "/dev/null",
               f"udp and dst host {IP_S} and dst portrange {PORTS[0]}-{PORTS[-1]}"]
    else:
        cmd = ["ip", "netns", "exec", NS_C, "tcpdump", "-i", "stc", "-Q", "out", "-n",
               "-w", "/dev/null", "udp"]
    p = subprocess.Popen(cmd, stderr=err.open("wb"))
    deadline = time.monotonic() + 30
    while "listening on" not in err.read_text():
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tcpdump did not start: {err.read_text()[-2000:]}")
        time.sleep(0.1)
    return p


def collector_flows(out: Path, ns_c: int, ns_s: int) -> tuple[dict, dict]:
    """(client port, server port) -> datagrams, the collector's latest record of each flow:
    the senders' side (datagrams sent) and the receivers' side (datagrams received)."""
    import msgspec

    dec = msgspec.json.Decoder()
    snd: dict[tuple[int, int], int] = {}
    rcv: dict[tuple[int, int], int] = {}
    with out.open("rb") as f:
        for line in f:
            r = dec.decode(line)
            if r.get("protocol") != "udp":
                continue
            k = (r["client"]["port"], r["server"]["port"])
            if r["netns"] == ns_c and r["observer"] == "client":
                snd[k] = r["packets_c2s"]
            elif r["netns"] == ns_s and r["observer"] == "server":
                rcv[k] = r["packets_c2s"]
    return snd, rcv


def compare(truth: dict, seen: dict) -> dict:
    return {"flows": len(truth), "exact": sum(1 for k, n in truth.items() if seen.get(k) == n),
            "missing": sum(1 for k in truth if k not in seen),
            "datagrams_truth": sum(truth.values()),
            "datagrams_seen": sum(seen.get(k, 0) for k in truth)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--senders", type=int, default=1, help="processes per send call (default 1)")
    ap.add_argument("--sockets", type=int, default=32, help="unconnected sockets per sender")
    ap.add_argument("--loopback", action="store_true",
                    help="no namespaces: senders and receivers on 127.0.78.0/24 of this one")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (eBPF, namespaces)")
    tmp = Path(tempfile.mkdtemp(prefix="ewstorm-"))
    global IP_C, IP_S, NS_C, NS_S
    if a.loopback:
        LOOPBACK["on"] = True
        IP_C, IP_S = "127.0.78.2", "127.0.78.1"
        ns_c = ns_s = os.stat("/proc/self/ns/net").st_ino
        NS_C = NS_S = str(ns_c)
    else:
        ns_c, ns_s = setup()
    old_stats = sh("sysctl", "-n", "kernel.bpf_stats_enabled").strip()
    res: dict = {"loopback": a.loopback, "seconds": a.seconds, "senders_per_call": a.senders, "sockets": a.sockets,
                 "datagram_bytes": SIZE}
    try:
        base = storm(a)
        res["no_tool"] = {k: base[k] for k in ("datagrams", "per_s", "by_call")}

        sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
        col = start_collector(tmp / "c.out", tmp / "c.err")
        ours = {i: v for i, v in prog_stats().items()}
        col_ready = cpu_seconds(col.pid)
        td = start_tcpdump(tmp / "t.err")
        td_ready = cpu_seconds(td.pid)
        both = storm(a)
        time.sleep(3)  # one more interval drain
        after = prog_stats()
        kernel_ns = sum(after[i][1] - ours[i][1] for i in ours if i in after)
        td.send_signal(signal.SIGINT)
        td_cpu = cpu_at_exit(td) - td_ready
        col.send_signal(signal.SIGINT)
        col_cpu = cpu_at_exit(col) - col_ready
        m = re.search(r"(\d+) packets? captured", (tmp / "t.err").read_text())
        dropped = re.search(r"(\d+) packets? dropped by kernel", (tmp / "t.err").read_text())
        snd, rcv = collector_flows(tmp / "c.out", ns_c, ns_s)
        n = both["datagrams"]
        events = n + both["received"]  # datagram ends the collector accounts (send + receive)
        lost = re.findall(r"^eastwest collector: dropped (.*)$", (tmp / "c.err").read_text(),
                          re.MULTILINE)
        res["side_by_side"] = {
            "datagrams": n, "per_s": both["per_s"], "received": both["received"],
            "by_call": both["by_call"],
            "collector": {"senders": compare(both["sent"], snd),
                          "receivers": compare(both["recv"], rcv),
                          "dropped": lost, "cpu_s": round(col_cpu, 2),
                          "user_ns_per_datagram_end": round(col_cpu / events * 1e9),
                          "kernel_ns_per_datagram_end": round(kernel_ns / events)},
            "tcpdump": {"packets": int(m.group(1)) if m else None,
                        "dropped_by_kernel": int(dropped.group(1)) if dropped else None,
                        "cpu_s": round(td_cpu, 2),
                        "user_ns_per_packet": round(td_cpu / max(n, 1) * 1e9)},
        }
        res["side_by_side"]["cpu_ratio_collector_to_tcpdump"] = round(
            col_cpu / max(td_cpu, 1e-9), 3)
        td = start_tcpdump(tmp / "t2.err")
        td_alone = storm(a)
        td.send_signal(signal.SIGINT)
        td.wait(60)
        res["tcpdump_alone"] = {"datagrams": td_alone["datagrams"], "per_s": td_alone["per_s"],
                                "rate_ratio_vs_no_tool": round(td_alone["per_s"] / base["per_s"],
                                                               3)}
        col = start_collector(tmp / "c2.out", tmp / "c2.err")
        alone = storm(a)
        col.send_signal(signal.SIGINT)
        col.wait(120)
        res["collector_alone"] = {"datagrams": alone["datagrams"], "per_s": alone["per_s"],
                                  "rate_ratio_vs_no_tool": round(alone["per_s"] / base["per_s"],
                                                                 3)}
    finally:
        sh("sysctl", "-q", "-w", f"kernel.bpf_stats_enabled={old_stats or 0}", check=False)
        if not a.loopback:
            teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
