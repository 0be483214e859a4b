"""Benchmark: the collector's footprint with `--connections` concurrent TCP connections and
`--udp-flows` live UDP flows held open on the host (default 100,000 each). Not a test: it
reports figures, it never passes or fails.

Memory is measured absolutely (a peer's figures are quoted in docs/benchmarks.md, not run):
- RSS and PSS of the collector process (/proc/PID/smaps_rollup) once the probes are attached
  (BPF compile included), after `--rest` seconds at rest, under the load (after an interval drain
  of every connection and flow), and its peak (VmHWM);
- the kernel maps' memory: `memlock` of every BPF map the process holds (/proc/PID/fdinfo,
  each map once), against what `--check` prints;
- CPU at rest (utime + stime over `--rest` seconds, /proc/PID/stat) and per interval drain
  under the load;
- completeness against the generator's ground truth: every connection and every flow must be in
  the collector's records with its exact bytes (datagrams), and the kernel's loss counters
  (`conn_map_full`, `udp_map_full`, ... from the collector's /metrics) must stay 0 while the load
  is below the map sizes `--check` reports.

The load lives in two namespaces of its own joined by a veth (`ewfp-c`, `ewfp-s`); the
collector watches the client's (`--netns ewfp-c`), as a node agent watches its pods, whose peers
are elsewhere. Clients: `--workers` processes (more when the hard RLIMIT_NOFILE, 20,000 here, needs them),
each holding its share of the TCP connections to its own server port (blocking connects, 7 bytes
sent on each, then idle), plus one process whose unconnected UDP
sockets each send one 5-byte datagram to each of 100 server ports. Servers in `ewfp-s`: one
process per TCP port accepting and holding, one draining the UDP ports. RLIMIT_NOFILE's soft
limit is raised to the hard one; the collector runs with `--idle-timeout 3600` so that no UDP flow ends while measured.

`--map-entries N` runs the collector with smaller maps than the load: the kernel must then
count exactly the connections and datagrams it could not track (`conn_map_full` = connections -
N; `udp_map_full` = datagrams of the flows beyond N), never silently drop them.

`--loopback`: no namespaces; clients and servers on 127.0.77.0/24 of the collector's own
namespace, both ends watched (two `conns` entries per connection), the TCP clients bound to
source ports 12,000-30,000 so that the shared ephemeral range stays free for others.

Root. With namespaces, run it under the lab lock (`flock /tmp/ew-lab.lock`).
Usage: python bench/bench_footprint.py [--connections 100000] [--udp-flows 100000]
       [--workers 2] [--interval 15] [--rest 20] [--map-entries N] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NS_C, NS_S = "ewfp-c", "ewfp-s"
IP_C, IP_S = "10.252.0.1", "10.252.0.2"
TCP_PORT0 = 31101  # worker i connects to TCP_PORT0 + i (28,232 source ports each)
LO_SRC_PORTS = (12000, 30000)  # --loopback: clients bind these, outside the ephemeral range
UDP_PORTS = tuple(range(31000, 31100))
TCP_BYTES, UDP_BYTES = 7, 5
METRICS = "127.0.0.1:9479"
LOOPBACK = {"on": False}  # --loopback: everything in this namespace, on 127.0.77.0/24
TICK = os.sysconf("SC_CLK_TCK")
CLONE_NEWNET = 0x40000000


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check).stdout


def setup() -> int:
    teardown()
    sh("ip", "netns", "add", NS_C)
    sh("ip", "netns", "add", NS_S)
    sh("ip", "-n", NS_C, "link", "add", "fpc", "type", "veth", "peer", "name", "fps", "netns", NS_S)
    for ns, dev, ip in ((NS_C, "fpc", IP_C), (NS_S, "fps", IP_S)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.core.somaxconn=65535",
           "net.ipv4.tcp_max_syn_backlog=65535")  # the default port range: 28,232 per port
    return os.stat(f"/run/netns/{NS_C}").st_ino


def teardown() -> None:
    for ns in (NS_C, NS_S):
        sh("ip", "netns", "delete", ns, check=False)


def enter(ns: str, files: int) -> None:
    """This process into namespace `ns` (not with --loopback), with room for `files`
    descriptors."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(files, hard), hard))
    if LOOPBACK["on"]:
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns {ns}")
    os.close(fd)


def tcp_server(port: int, expect: int, ready, stop) -> None:  # noqa: ANN001 - mp.Event
    enter(NS_S, expect + 1024)
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((IP_S, port))
    srv.listen(65535)
    srv.settimeout(0.5)
    ready.set()
    held = []
    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except TimeoutError:
            continue
        held.append(c)  # the 7 bytes stay unread: the client's bytes_sent is what is checked
    for c in held:
        c.close()


def udp_server(ready, stop) -> None:  # noqa: ANN001
    import selectors

    enter(NS_S, 4096)
    sel = selectors.DefaultSelector()
    for port in UDP_PORTS:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((IP_S, port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    ready.set()
    while not stop.is_set():
        for key, _ in sel.select(0.5):
            try:
                while True:
                    key.fileobj.recvfrom(2048)  # type: ignore[union-attr]
            except BlockingIOError:
                pass


def tcp_client(n: int, port: int, out: str, done, stop) -> None:  # noqa: ANN001
    enter(NS_C, n + 1024)
    held, truth = [], []
    for i in range(n):
        if LOOPBACK["on"]:  # an explicit source port: the shared ephemeral range stays free
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((IP_C, LO_SRC_PORTS[0] + i))
            s.connect((IP_S, port))
        else:
            s = socket.create_connection((IP_S, port))
        s.sendall(b"c" * TCP_BYTES)
        held.append(s)
        truth.append((s.getsockname()[1], port))
    Path(out).write_text(json.dumps(truth))
    done.set()
    stop.wait()
    for s in held:
        s.close()


def udp_client(flows: int, out: str, done, stop) -> None:  # noqa: ANN001
    enter(NS_C, flows // len(UDP_PORTS) + 1024)
    socks, truth = [], []
    for _ in range((flows + len(UDP_PORTS) - 1) // len(UDP_PORTS)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((IP_C, 0))
        socks.append(s)
    sent = 0
    for s in socks:
        lport = s.getsockname()[1]
        for port in UDP_PORTS:
            if sent == flows:
                break
            s.sendto(b"u" * UDP_BYTES, (IP_S, port))
            truth.append((lport, port))
            sent += 1
    Path(out).write_text(json.dumps(truth))
    done.set()
    stop.wait()
    for s in socks:
        s.close()


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS (smaps_rollup) and peak RSS (VmHWM) of a process, MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts[0] in ("Rss:", "Pss:", "Pss_Anon:", "Pss_File:"):
            out[parts[0][:-1].lower()] = round(int(parts[1]) / 1024, 1)
    m = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    out["peak_rss"] = round(int(m.group(1)) / 1024, 1) if m else 0.0
    return out


def map_memory(pid: int) -> dict[str, int]:
    """memlock of each BPF map the process holds (each map once, by map_id), bytes."""
    seen: dict[str, int] = {}
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = fdinfo.read_text()
        except OSError:
            continue
        if "map_id:" not in text:
            continue
        f = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        seen[f["map_id"].strip()] = int(f.get("memlock", "0"))
    return seen


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / TICK


def metrics() -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("eastwest_probe_", "eastwest_dropped_total")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def start_collector(out: Path, err: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "eastwest", "collector", "--output", str(out), "--no-vxlan",
           "--netns", NS_C, "--interval", str(args.interval), "--idle-timeout", "3600",
           "--metrics-listen", METRICS, "-v"]
    if args.map_entries:
        cmd += ["--map-entries", str(args.map_entries)]
    p = subprocess.Popen(cmd, stderr=err.open("wb"), cwd=REPO)
    deadline = time.monotonic() + 180
    while "socket probes attached" not in err.read_text():
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"collector did not start: {err.read_text()[-2000:]}")
        time.sleep(0.1)
    return p


def seen(out: Path, netns: int) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], int]]:
    """The client-side bytes (TCP) and datagrams (UDP) of each (client port, server port) in the
    collector's records of namespace `netns` (its latest record of each)."""
    import msgspec

    tcp: dict[tuple[int, int], int] = {}
    udp: dict[tuple[int, int], int] = {}
    dec = msgspec.json.Decoder()
    with out.open("rb") as f:
        for line in f:
            r = dec.decode(line)
            if r.get("netns") != netns or r.get("observer") != "client":
                continue
            key = (r["client"]["port"], r["server"]["port"])
            if r["protocol"] == "tcp":
                tcp[key] = r["bytes_c2s"]
            else:
                udp[key] = (r["packets_c2s"] or 0) * 1000 + r["bytes_c2s"]
    return tcp, udp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--udp-flows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2,
                    help="TCP client processes, at least (more when RLIMIT_NOFILE's hard limit "
                    "needs them: a process holds at most that many connections)")
    ap.add_argument("--interval", type=float, default=15.0, help="collector --interval")
    ap.add_argument("--rest", type=float, default=20.0, help="seconds at rest measured")
    ap.add_argument("--map-entries", type=int, help="collector --map-entries (default: auto)")
    ap.add_argument("--loopback", action="store_true",
                    help="no namespaces: clients and servers on 127.0.77.0/24 in this one, both "
                    "ends watched (2 map entries per connection: give --map-entries)")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (eBPF, namespaces)")
    tmp = Path(tempfile.mkdtemp(prefix="ewfoot-"))
    global IP_C, IP_S, NS_C
    if a.loopback:
        LOOPBACK["on"] = True
        IP_C, IP_S = "127.0.77.2", "127.0.77.1"
        netns = os.stat("/proc/self/ns/net").st_ino
        NS_C = str(netns)  # the collector's --netns
    else:
        netns = setup()
    stop = mp.Event()
    procs: list[mp.Process] = []
    res: dict = {"connections": a.connections, "udp_flows": a.udp_flows, "loopback": a.loopback,
                 "interval_s": a.interval, "map_entries": a.map_entries or "auto"}
    col = None
    try:
        check = sh(sys.executable, "-m", "eastwest", "collector", "--check",
                   *(["--map-entries", str(a.map_entries)] if a.map_entries else []), check=False)
        res["check_map_lines"] = [ln.strip() for ln in check.splitlines()
                                  if ln.startswith(("map memory", "map sizes", "  "))]
        out, err = tmp / "records.jsonl", tmp / "collector.err"
        t0 = time.monotonic()
        col = start_collector(out, err, a)
        res["startup_s"] = round(time.monotonic() - t0, 2)
        res["startup_cpu_s"] = round(cpu_seconds(col.pid), 2)
        res["after_start"] = memory(col.pid)
        maps = map_memory(col.pid)
        res["map_memlock_mib"] = round(sum(maps.values()) / 2**20, 1)
        res["maps"] = len(maps)
        c0 = cpu_seconds(col.pid)
        time.sleep(a.rest)
        res["rest_cpu_pct"] = round((cpu_seconds(col.pid) - c0) / a.rest * 100, 2)
        res["at_rest"] = memory(col.pid)

        cap = resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 1024  # fds a process may hold
        workers = max(a.workers, -(-a.connections // cap))
        shares = [a.connections // workers + (i < a.connections % workers)
                  for i in range(workers)]
        res["tcp_processes"] = workers
        ready = [mp.Event() for _ in range(workers + 1)]
        procs += [mp.Process(target=tcp_server, args=(TCP_PORT0 + i, n, ready[i], stop))
                  for i, n in enumerate(shares)]
        procs.append(mp.Process(target=udp_server, args=(ready[-1], stop)))
        for p in procs:
            p.start()
        for e in ready:
            e.wait(30)
        done = [mp.Event() for _ in range(workers + 1)]
        clients = [mp.Process(target=tcp_client, args=(n, TCP_PORT0 + i, str(tmp / f"tcp{i}.json"),
                                                       done[i], stop))
                   for i, n in enumerate(shares)]
        clients.append(mp.Process(target=udp_client, args=(a.udp_flows, str(tmp / "udp.json"),
                                                           done[-1], stop)))
        t1 = time.monotonic()
        for p in clients:
            p.start()
        procs += clients
        for e in done:
            if not e.wait(900):
                raise SystemExit("the load generator did not finish")
        res["load_setup_s"] = round(time.monotonic() - t1, 1)
        truth_tcp = {tuple(x) for i in range(workers)
                     for x in json.loads((tmp / f"tcp{i}.json").read_text())}
        truth_udp = {tuple(x) for x in json.loads((tmp / "udp.json").read_text())}
        # two intervals after the load is complete: at least one drain reads every entry
        c1 = cpu_seconds(col.pid)
        time.sleep(2 * a.interval + 1)
        res["cpu_s_per_drain_under_load"] = round((cpu_seconds(col.pid) - c1) / 2, 2)
        res["under_load"] = memory(col.pid)
        res["map_memlock_mib_under_load"] = round(sum(map_memory(col.pid).values()) / 2**20, 1)
        res["metrics"] = {k: v for k, v in metrics().items()
                          if "map_" in k or "full" in k or "dropped" in k or "lost" in k}
        col.send_signal(signal.SIGINT)
        col.wait(300)
        res["exit_summary"] = re.findall(r"^eastwest collector: dropped .*$", err.read_text(),
                                         re.MULTILINE)
        tcp, udp = seen(out, netns)
        res["tcp"] = {"truth": len(truth_tcp), "seen": len(truth_tcp & tcp.keys()),
                      "missing": len(truth_tcp - tcp.keys()),
                      "bytes_exact": sum(1 for k in truth_tcp if tcp.get(k) == TCP_BYTES)}
        res["udp"] = {"truth": len(truth_udp), "seen": len(truth_udp & udp.keys()),
                      "missing": len(truth_udp - udp.keys()),
                      "exact": sum(1 for k in truth_udp if udp.get(k) == 1000 + UDP_BYTES)}
        res["output_mib"] = round(out.stat().st_size / 2**20, 1)
        if a.map_entries:  # what the kernel must have counted: every one beyond the map
            ends = 2 if a.loopback else 1  # --loopback: both ends tracked (and others' too)
            res["expected_map_full"] = {
                "conn_map_full": max(0, ends * a.connections - a.map_entries),
                "udp_map_full": max(0, ends * a.udp_flows - a.map_entries)}
    finally:
        stop.set()
        if col is not None and col.poll() is None:
            col.kill()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        if not a.loopback:
            teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
