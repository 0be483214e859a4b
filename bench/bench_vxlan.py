"""Benchmark: `eastwest collector --pcap` against `softflowd -r` and `--decoder scapy` on three
synthetic captures of the same flows, side by side: VXLAN, Geneve and plain (untunnelled)
traffic. Not a test: it reports ratios, it never fails on time; it does fail if one flow of the
collector's output differs from the truth, or if softflowd did not process every packet.

The captures (bench/out/<kind>-<N>.pcap, written by bench/vxlan_gen.py on every run, so both
tools read them from the page cache) have N packets each of the same 2,000 inner flows over 8
VTEPs, in the same order: `vxlan` (UDP 4789), `geneve` (UDP 6081, one 8-byte option per packet),
`plain` (the inner frames themselves). softflowd does not decapsulate: on the tunnelled captures
it counts the outer UDP flows (VTEP to VTEP, one per direction of each inner flow, ~4,000), on
the plain capture the same flows as ours; the plain capture is the like-for-like comparison.
softflowd runs with `-v 9` (NetFlow v9): with the default v5 it skips IPv6 packets (its
`want_v6`), a fifth of the plain capture; its exit statistics (packets processed and ignored,
flows) are read and printed. eastwest and softflowd run alternately `--repeat` times each per
capture (the machine may be shared: medians, and the load average before and after, are
printed); eastwest also runs once with the numpy fallback (`EASTWEST_VXLAN_NATIVE=0`: a machine
without a C compiler). Every eastwest run's records are checked against the truth. scapy per
packet is timed on the first `--scapy-sample` packets and extrapolated (said so in the output).
Each tool is a separate process timed from start to exit (ours includes interpreter start-up
and writing JSON lines); CPU is user + system seconds; peak memory is the child's maximum
resident set as GNU time reports it (a child's ru_maxrss taken by this script would include
this script's own size at fork).
Usage: python bench/bench_vxlan.py [--packets 1000000] [--repeat 5] [--scapy-sample 20000]
                                   [--captures vxlan,geneve,plain] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vxlan_gen import KINDS, Flow, generate  # noqa: E402

EASTWEST = [sys.executable, "-m", "eastwest", "collector", "--collector-id", "bench"]
GNU_TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"


def timed(cmd: list[str], stdout, env: dict | None = None) -> dict:  # noqa: ANN001 - a file
    """Wall seconds, CPU seconds and peak RSS (MiB) of one child process."""
    with tempfile.NamedTemporaryFile("r") as usage, tempfile.TemporaryFile() as errfile:
        t0 = time.perf_counter()
        run = subprocess.run([GNU_TIME, "-o", usage.name, "-f", "%U %S %M", *cmd],
                             stdin=subprocess.DEVNULL, stdout=stdout, stderr=errfile,
                             cwd=HERE.parent, env={**os.environ, **(env or {})}, check=False)
        wall = time.perf_counter() - t0
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
        fields = usage.read().split()
    if run.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {err[-2000:]}")
    user, system, rss_kib = float(fields[-3]), float(fields[-2]), int(fields[-1])
    return {"wall": wall, "cpu": user + system, "rss": rss_kib / 1024, "stderr": err}


def cut_pcap(src: Path, dst: Path, packets: int) -> None:
    data = src.read_bytes()
    pos, n = 24, 0
    while n < packets and pos < len(data):
        pos += 16 + int.from_bytes(data[pos + 8:pos + 12], "little")
        n += 1
    dst.write_bytes(data[:pos])


def wrong_flows(records: Path, truth: list[Flow]) -> int:
    finals = [json.loads(x) for x in records.read_text().splitlines()]
    by_client = {(r["client"]["ip"], r["client"]["port"]): r for r in finals if r["final"]}
    wrong = 0
    for f in truth:
        r = by_client.get(f.client)
        t = None if r is None else r["tunnel"]
        if f.kind == "plain":
            tunnel_ok = t is None
        else:
            tunnel_ok = (t is not None and t["type"] == f.kind and t["vni"] == f.vni
                         and (t["outer_src"], t["outer_dst"]) == f.vteps)
        if (r is None or not tunnel_ok or (r["server"]["ip"], r["server"]["port"]) != f.server
                or r["protocol"] != f.proto
                or [r["packets_c2s"], r["packets_s2c"]] != f.packets
                or [r["bytes_c2s"], r["bytes_s2c"]] != f.payload):
            wrong += 1
    return wrong + (len(by_client) - len(truth))  # and no extra flows


SOFTFLOWD_STATS = {  # softflowd -r prints its statistics on stdout at exit
    "processed": re.compile(r"^Packets processed: (\d+)", re.M),
    "ignored": re.compile(r"^Ignored packets: (\d+)", re.M),
    "flows": re.compile(r"^Flows expired: (\d+)", re.M),
}


def softflowd(pcap: Path) -> dict:
    # softflowd 1.1.0 with -r never exits when its control socket path is 13 characters or
    # longer (seen here): keep it short. -v 9: v5 cannot carry IPv6, and softflowd then skips
    # IPv6 packets altogether (they would not be counted: not the same work as ours)
    ctl = f"/tmp/s{os.getpid() % 100:02d}.ctl"
    with tempfile.TemporaryFile() as out:
        res = timed(["softflowd", "-r", str(pcap), "-n", "127.0.0.1:9", "-p", ctl[:-3] + "pid",
                     "-c", ctl, "-m", "65536", "-v", "9"], out)
        out.seek(0)
        text = out.read().decode(errors="replace")
    for leftover in (ctl, ctl[:-3] + "pid"):
        Path(leftover).unlink(missing_ok=True)
    for key, pattern in SOFTFLOWD_STATS.items():
        m = pattern.search(text)
        res[key] = int(m.group(1)) if m else -1
    return res


def summary(runs: list[dict], n: int) -> dict:
    wall = statistics.median(r["wall"] for r in runs)
    return {"runs_s": [round(r["wall"], 3) for r in runs], "median_s": round(wall, 3),
            "best_s": round(min(r["wall"] for r in runs), 3), "pps": round(n / wall),
            "cpu_s": round(statistics.median(r["cpu"] for r in runs), 3),
            "peak_mib": round(max(r["rss"] for r in runs), 1)}


def measure(kind: str, args: argparse.Namespace, out: Path) -> dict:
    """Generate one capture, run the tools on it, print and return its results."""
    pcap = out / f"{kind}-{args.packets}.pcap"
    t0 = time.perf_counter()
    truth = generate(str(pcap), packets=args.packets, kind=kind)
    print(f"\n== {kind}: generated {pcap} ({pcap.stat().st_size >> 20} MiB, {len(truth)} "
          f"flows) in {time.perf_counter() - t0:.1f} s", flush=True)
    load_before = os.getloadavg()[0]
    n = args.packets
    ours_runs, peer_runs, wrong = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "records.jsonl"
        for _ in range(args.repeat):
            with records.open("wb") as fh:
                ours_runs.append(timed(EASTWEST + ["--pcap", str(pcap), "--stdout"], fh))
            wrong += wrong_flows(records, truth)
            peer_runs.append(softflowd(pcap))
        with records.open("wb") as fh:
            fallback = timed(EASTWEST + ["--pcap", str(pcap), "--stdout"], fh,
                             env={"EASTWEST_VXLAN_NATIVE": "0"})
        wrong_fallback = wrong_flows(records, truth)
        sample = Path(tmp) / "sample.pcap"
        cut_pcap(pcap, sample, args.scapy_sample)
        with open(os.devnull, "wb") as null:
            scapy = timed(EASTWEST + ["--pcap", str(sample), "--stdout", "--decoder", "scapy"],
                          null)
    load_after = os.getloadavg()[0]
    ours, peer = summary(ours_runs, n), summary(peer_runs, n)
    peer_counts = {k: sorted({r[k] for r in peer_runs}) for k in SOFTFLOWD_STATS}
    res = {
        "capture": kind, "packets": n, "bytes": pcap.stat().st_size, "flows": len(truth),
        "repeat": args.repeat, "flows_wrong": wrong,
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "eastwest": ours, "softflowd": {**peer, **peer_counts},
        "eastwest_numpy_fallback": {"s": round(fallback["wall"], 3),
                                    "pps": round(n / fallback["wall"]),
                                    "cpu_s": round(fallback["cpu"], 3),
                                    "peak_mib": round(fallback["rss"], 1),
                                    "flows_wrong": wrong_fallback},
        "scapy_sample": args.scapy_sample, "scapy_s": round(scapy["wall"], 3),
        "scapy_pps_extrapolated": round(args.scapy_sample / scapy["wall"]),
        "scapy_peak_mib": round(scapy["rss"], 1),
        "ratio_vs_softflowd": round(peer["median_s"] / ours["median_s"], 3),
        "ratio_vs_softflowd_best": round(peer["best_s"] / ours["best_s"], 3),
        "cpu_ratio_vs_softflowd": round(peer["cpu_s"] / ours["cpu_s"], 3),
        "ratio_vs_scapy": round(scapy["wall"] / args.scapy_sample * n / ours["median_s"], 1),
        "softflowd_processed_all": peer_counts["processed"] == [n],
    }
    what = "inner" if kind != "plain" else "plain"
    seen = (f"processed {'/'.join(map(str, peer_counts['processed']))}, ignored "
            f"{'/'.join(map(str, peer_counts['ignored']))}, "
            f"{'/'.join(map(str, peer_counts['flows']))} "
            f"{'outer UDP ' if kind != 'plain' else ''}flows")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after; medians of "
          f"{args.repeat} alternating runs")
    for name, s, note in (
            ("eastwest --pcap", ours, f"{what} flows wrong {wrong} (of {len(truth)} x "
                                      f"{args.repeat} runs)"),
            ("softflowd -r", peer, seen)):
        print(f"{name:<20} {s['median_s']:6.3f} s (best {s['best_s']:.3f})  {s['pps']:>11,} "
              f"pkts/s  cpu {s['cpu_s']:.3f} s  peak {s['peak_mib']:.1f} MiB  {note}")
    fb = res["eastwest_numpy_fallback"]
    print(f"{'  numpy fallback':<20} {fb['s']:6.3f} s               {fb['pps']:>11,} pkts/s  "
          f"cpu {fb['cpu_s']:.3f} s  peak {fb['peak_mib']:.1f} MiB  {what} flows wrong "
          f"{wrong_fallback}")
    print(f"{'--decoder scapy':<20} {scapy['wall']:6.3f} s on {args.scapy_sample:,} pkts = "
          f"{res['scapy_pps_extrapolated']:,} pkts/s (extrapolated)  peak {scapy['rss']:.1f} MiB")
    print(f"{kind}: eastwest / softflowd packets/s: {res['ratio_vs_softflowd']}x median "
          f"({res['ratio_vs_softflowd_best']}x best runs); CPU: "
          f"{res['cpu_ratio_vs_softflowd']}x; / scapy: {res['ratio_vs_scapy']}x", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5, help="runs of eastwest and softflowd each")
    ap.add_argument("--scapy-sample", type=int, default=20_000)
    ap.add_argument("--captures", default=",".join(KINDS),
                    help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    kinds = [k for k in args.captures.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--captures: one or more of {', '.join(KINDS)}")
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    results = [measure(kind, args, out) for kind in kinds]
    print("\nsummary (eastwest / softflowd packets/s, median; peak RSS eastwest / softflowd):")
    for r in results:
        print(f"  {r['capture']:<7} {r['ratio_vs_softflowd']:.3f}x  "
              f"({r['eastwest']['pps']:,} vs {r['softflowd']['pps']:,} pkts/s; "
              f"{r['eastwest']['peak_mib']:.1f} / {r['softflowd']['peak_mib']:.1f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"captures": results}, indent=2))
    ok = all(r["flows_wrong"] == 0 and r["eastwest_numpy_fallback"]["flows_wrong"] == 0
             and r["softflowd_processed_all"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
