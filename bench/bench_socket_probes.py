"""Benchmark: the socket probes against bcc's tcplife (same tracepoint) under a loopback
connection storm, side by side. Not a test: it reports ratios, it never passes or fails.

Phases (each `--seconds` long, same storm: `--workers` client processes making short
connections as fast as they can, 64 bytes each way, plus one long transfer per worker):
  1. no probes:                    the storm's own connections/s and per-connection latency
  2. collector + tcplife together: connections each saw, events each lost, CPU seconds each
     (repeated `--rounds` times)
  3. collector alone:              the latency the probes add per connection (against phase 1)

CPU seconds are utime + stime + cutime + cstime from /proc/PID/stat of each tool's process:
once when it is ready (start-up: imports, BTF, compiling and attaching the BPF program) and
once after it exited (read from the zombie before it is reaped), so the total includes the
final flush. `steady` = total - start-up. Both tools write their output to a file (the
collector JSON lines, tcplife its text table).

Truth is the storm's own count of connections it completed. Root; traffic stays on 127.0.0.1.
Usage: python bench/bench_socket_probes.py [--seconds 10] [--workers 2] [--rounds 1] [--json FILE]
       [--keep-output]
"""

from __future__ import annotations

import argparse
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
PORT = 47311


def server(ready) -> None:  # noqa: ANN001 - an mp.Event
    import selectors

    sel = selectors.DefaultSelector()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", PORT))
    srv.listen(4096)
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
    ready.set()
    while True:
        for key, _ in sel.select():
            if key.fileobj is srv:
                try:
                    c, _ = srv.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
            else:
                c = key.fileobj
                try:
                    data = c.recv(65536)
                except (BlockingIOError, ConnectionResetError):
                    data = b""
                if data and len(data) < 1000:  # short request: answer 64 bytes
                    try:
                        c.send(b"s" * 64)
                    except OSError:
                        pass
                if not data:
                    sel.unregister(c)
                    c.close()


def client(seconds: float, out) -> None:  # noqa: ANN001 - an mp.Queue
    n, lat = 0, 0.0
    end = time.monotonic() + seconds
    # one long transfer per worker: 64 MiB in 64 KiB writes
    big = socket.create_connection(("127.0.0.1", PORT))
    chunk = b"L" * 65536
    for _ in range(1024):
        big.sendall(chunk)
    big.close()
    n += 1
    while time.monotonic() < end:
        t = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", PORT))
        s.sendall(b"c" * 64)
        got = 0
        while got < 64:
            d = s.recv(64 - got)
            if not d:
                break
            got += len(d)
        s.close()
        lat += time.perf_counter() - t
        n += 1
    out.put((n, lat))


def storm(seconds: float, workers: int) -> tuple[int, float, float]:
    """(connections completed, connections/s, mean µs per short connection)."""
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=client, args=(seconds, q)) for _ in range(workers)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - t0
    n = sum(r[0] for r in results)
    lat = sum(r[1] for r in results) / max(1, n - workers)
    return n, n / elapsed, lat * 1e6


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of a process (children included), proc(5)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return sum(int(x) for x in fields[11:15]) / TICK  # fields 14..17 of the man page


def cpu_seconds_of_exit(proc: subprocess.Popen) -> float:
    """CPU seconds of a process that was told to stop: wait for its exit without reaping it,
    read its /proc stat (a zombie keeps it), then reap it."""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    cpu = cpu_seconds(proc.pid)
    proc.wait()
    return cpu


def start_collector(out: Path, err: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "eastwest", "collector", "--stdout", "--no-vxlan",
           "--interval", "5", "-v"]
    p = subprocess.Popen(cmd, stdout=out.open("wb"), stderr=err.open("wb"), cwd=REPO)
    deadline = time.monotonic() + 120
    while "socket probes attached" not in err.read_text():
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"collector did not start: {err.read_text()[-2000:]}")
        time.sleep(0.2)
    return p


def start_tcplife(out: Path, err: Path) -> subprocess.Popen:
    p = subprocess.Popen(["tcplife-bpfcc"], stdout=out.open("wb"), stderr=err.open("wb"))
    deadline = time.monotonic() + 120
    while not out.read_text().startswith("PID"):
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tcplife did not start: {err.read_text()[-2000:]}")
        time.sleep(0.2)
    return p


def collector_seen(out: Path) -> int:
    n = 0
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if r["final"] and r["observer"] == "client" and r["server"]["port"] == PORT:
            n += 1
    return n


def collector_lost(err: Path) -> int:
    """Records the collector counted as lost: its exit summary `eastwest collector: dropped
    stage/reason=N, ...` (the log lines before it are rate-limited, not totals)."""
    m = re.search(r"^eastwest collector: dropped (.*)$", err.read_text(), re.MULTILINE)
    return sum(int(x) for x in re.findall(r"=(\d+)", m.group(1))) if m else 0


def tcplife_seen(out: Path) -> int:
    n = 0
    for line in out.read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 6 and f[5] == str(PORT):  # RPORT column: the client side
            n += 1
    return n


def tcplife_lost(err: Path) -> int:
    return sum(int(x) for x in re.findall(r"[Pp]ossibly lost (\d+)", err.read_text()))


def side_by_side(tmp: Path, seconds: float, workers: int) -> dict:
    """One round of phase 2: both tools attached, one storm, CPU of each."""
    tmp.mkdir()
    col = start_collector(tmp / "c.out", tmp / "c.err")
    col_start = cpu_seconds(col.pid)
    tl = start_tcplife(tmp / "t.out", tmp / "t.err")
    tl_start = cpu_seconds(tl.pid)
    n, rate, _ = storm(seconds, workers)
    time.sleep(2)  # let the last closes (TIME_WAIT side) reach both tools
    tl.send_signal(signal.SIGINT)
    tl_cpu = cpu_seconds_of_exit(tl)
    col.send_signal(signal.SIGINT)
    col_cpu = cpu_seconds_of_exit(col)

    def tool(seen: int, lost: int, total: float, start: float) -> dict:
        return {"seen": seen, "lost": lost, "cpu_s": round(total, 2),
                "startup_cpu_s": round(start, 2), "steady_cpu_s": round(total - start, 2),
                "steady_us_per_socket_end": round((total - start) / (2 * n) * 1e6, 1)}

    out = {"truth": n, "conn_per_s": round(rate),
           "collector": tool(collector_seen(tmp / "c.out"), collector_lost(tmp / "c.err"),
                             col_cpu, col_start),
           "tcplife": tool(tcplife_seen(tmp / "t.out"), tcplife_lost(tmp / "t.err"),
                           tl_cpu, tl_start)}
    out["cpu_ratio_collector_to_tcplife"] = round(col_cpu / max(tl_cpu, 1e-9), 2)
    out["steady_cpu_ratio_collector_to_tcplife"] = round(
        (col_cpu - col_start) / max(tl_cpu - tl_start, 1e-9), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="side-by-side rounds (default 1)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--keep-output", action="store_true",
                    help="keep both tools' output (about 200 MB per round) in the temp dir")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (eBPF)")
    ready = mp.Event()
    srv = mp.Process(target=server, args=(ready,), daemon=True)
    srv.start()
    ready.wait(10)
    tmp = Path(tempfile.mkdtemp(prefix="ewbench-"))
    res: dict = {"seconds": a.seconds, "workers": a.workers}
    try:
        n0, rate0, lat0 = storm(a.seconds, a.workers)
        res["baseline"] = {"connections": n0, "conn_per_s": round(rate0), "lat_us": round(lat0, 1)}

        res["side_by_side"] = [side_by_side(tmp / f"r{i}", a.seconds, a.workers)
                               for i in range(a.rounds)]
        col = start_collector(tmp / "c2.out", tmp / "c2.err")
        n2, rate2, lat2 = storm(a.seconds, a.workers)
        time.sleep(2)
        col.send_signal(signal.SIGINT)
        cpu_seconds_of_exit(col)
        res["collector_alone"] = {"connections": n2, "conn_per_s": round(rate2),
                                  "lat_us": round(lat2, 1),
                                  "seen": collector_seen(tmp / "c2.out"),
                                  "latency_ratio_vs_baseline": round(lat2 / lat0, 3)}
    finally:
        srv.kill()
        if a.keep_output:
            print(f"output kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
