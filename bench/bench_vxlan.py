"""Benchmark: `eastwest collector --pcap` against `softflowd -r` and `--decoder scapy` on the
same synthetic VXLAN capture, side by side. Not a test: it reports ratios, it never fails on
time; it does fail if one inner flow of the collector's output differs from the truth.

The capture (bench/out/vxlan-<N>.pcap, generated once by bench/vxlan_gen.py) has N packets of
2,000 inner flows over 8 VTEPs. softflowd sees only the outer UDP flows (it does not decapsulate);
it is the peer for packets/s. scapy per packet is timed on the first `--scapy-sample` packets
and extrapolated (said so in the output). Peak memory is each child's maximum RSS (wait4).
Usage: python bench/bench_vxlan.py [--packets 1000000] [--scapy-sample 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vxlan_gen import generate  # noqa: E402

EASTWEST = [sys.executable, "-m", "eastwest", "collector", "--collector-id", "bench"]


def timed(cmd: list[str], stdout) -> tuple[float, int]:  # noqa: ANN001 - a file
    """Wall seconds and peak RSS (MiB) of one child process."""
    with tempfile.TemporaryFile() as errfile:  # a pipe could fill up and stall the child
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=errfile,
                                cwd=HERE.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed: {err[-2000:]}")
    return wall, usage.ru_maxrss // 1024


def cut_pcap(src: Path, dst: Path, packets: int) -> None:
    data = src.read_bytes()
    pos, n = 24, 0
    while n < packets and pos < len(data):
        pos += 16 + int.from_bytes(data[pos + 8:pos + 12], "little")
        n += 1
    dst.write_bytes(data[:pos])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--scapy-sample", type=int, default=20_000)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    pcap = out / f"vxlan-{args.packets}.pcap"
    t0 = time.perf_counter()
    truth = generate(str(pcap), packets=args.packets)
    print(f"generated {pcap} ({pcap.stat().st_size >> 20} MiB, {len(truth)} inner flows) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "records.jsonl"
        with records.open("wb") as fh:
            ours, ours_mem = timed(EASTWEST + ["--pcap", str(pcap), "--stdout"], fh)
        finals = [json.loads(x) for x in records.read_text().splitlines()]
        finals = {(r["client"]["ip"], r["client"]["port"]): r for r in finals if r["final"]}
        wrong = 0
        for f in truth:
            r = finals.get(f.client)
            if (r is None or (r["server"]["ip"], r["server"]["port"]) != f.server
                    or r["protocol"] != f.proto or r["tunnel"]["vni"] != f.vni
                    or (r["tunnel"]["outer_src"], r["tunnel"]["outer_dst"]) != f.vteps
                    or [r["packets_c2s"], r["packets_s2c"]] != f.packets
                    or [r["bytes_c2s"], r["bytes_s2c"]] != f.payload):
                wrong += 1
        exact = len(truth) - wrong
        with open(os.devnull, "wb") as null:
            # softflowd 1.1.0 with -r never exits when its control socket path is 13 characters
            # or longer (seen here): keep it short
            ctl = f"/tmp/s{os.getpid() % 100:02d}.ctl"
            sfd, sfd_mem = timed(["softflowd", "-r", str(pcap), "-n", "127.0.0.1:9",
                                  "-p", ctl[:-3] + "pid", "-c", ctl, "-m", "65536"], null)
            for leftover in (ctl, ctl[:-3] + "pid"):
                Path(leftover).unlink(missing_ok=True)
            sample = Path(tmp) / "sample.pcap"
            cut_pcap(pcap, sample, args.scapy_sample)
            scapy, scapy_mem = timed(EASTWEST + ["--pcap", str(sample), "--stdout",
                                                 "--decoder", "scapy"], null)
    n = args.packets
    res = {
        "packets": n, "inner_flows": len(truth), "inner_flows_exact": exact,
        "eastwest_s": round(ours, 3), "eastwest_pps": round(n / ours),
        "eastwest_peak_mib": ours_mem,
        "softflowd_s": round(sfd, 3), "softflowd_pps": round(n / sfd), "softflowd_peak_mib": sfd_mem,
        "scapy_sample": args.scapy_sample, "scapy_s": round(scapy, 3),
        "scapy_pps_extrapolated": round(args.scapy_sample / scapy), "scapy_peak_mib": scapy_mem,
        "ratio_vs_softflowd": round(sfd / ours, 3), "ratio_vs_scapy": round(scapy / args.scapy_sample * n / ours, 1),
    }
    print(f"eastwest --pcap     {ours:7.2f} s  {n / ours:>11,.0f} pkts/s  peak {ours_mem} MiB  "
          f"inner flows exact {exact}/{len(truth)}")
    print(f"softflowd -r        {sfd:7.2f} s  {n / sfd:>11,.0f} pkts/s  peak {sfd_mem} MiB  "
          "(outer flows only)")
    print(f"--decoder scapy     {scapy:7.2f} s on {args.scapy_sample:,} pkts = "
          f"{args.scapy_sample / scapy:,.0f} pkts/s (extrapolated)  peak {scapy_mem} MiB")
    print(f"eastwest / softflowd packets/s: {res['ratio_vs_softflowd']}x; "
          f"/ scapy: {res['ratio_vs_scapy']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
