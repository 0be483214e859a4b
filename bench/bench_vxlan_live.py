"""Benchmark: live VXLAN capture loss of `LiveVxlanSource` (AF_PACKET) against `tcpdump -w
/dev/null`, replaying the synthetic capture with tcpreplay at increasing packet rates.

Not a test: it reports, per offered rate, the fraction of the packets that reached the interface
which each capture got, and the lowest rate at which each one starts losing packets (more than
`--loss` of them); it fails only if a run of ours miscounts (packets in its flow records differ
from the packets it received).

Setup (root): two network namespaces `ewbl-tx` and `ewbl-rx` joined by a veth pair (`ewbl0` in
tx, `ewbl1` in rx), IPv6 off on both so no other traffic appears; everything is removed at the
end. tcpreplay replays bench/out/vxlan-live.pcap (bench/vxlan_gen.py, `--file-packets` VXLAN
packets, preloaded, looped) onto ewbl0 in tx at `--pps R` for about `--seconds` per run
(`--topspeed`: as fast as it can). The denominator is what arrived: the rx_packets counter of
ewbl1 (a veth whose backlog overflows drops before any tap, for both captures alike).

- ours: a child process runs `LiveVxlanSource` on `ewbl-rx/ewbl1` (the collector's live path:
  AF_PACKET socket with its kernel filter and, with the native helper, a 64 MiB TPACKET_V3
  ring, blocks decoded and summed in C, the flow table), stopped after the replay; it reports
  the packets it received, the kernel's drop counter (PACKET_STATISTICS) and the packets in
  its flow records.
- tcpdump: `tcpdump -i ewbl1 -w /dev/null 'udp dst port 4789'` in rx (libpcap TPACKET_V3 ring,
  default 2 MiB buffer), stopped with SIGINT; its "captured" and "dropped by kernel" lines.
- tcpdump_B32M: the same with `-B 32768`, half the size of our ring (64 MiB).

They take turns (ours first at even steps, last at odd ones), never at the same time; CPU is
each capture process's user + system seconds. The load average is printed before and after.
Usage: python bench/bench_vxlan_live.py [--rates 25000,50000,...] [--seconds 4] [--topspeed]
                                        [--repeat 1] [--file-packets 200000] [--loss 0.001]
                                        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TX, RX, TX_IF, RX_IF = "ewbl-tx", "ewbl-rx", "ewbl0", "ewbl1"
DEFAULT_RATES = "25000,50000,100000,200000,300000,400000,600000"
TOOLS = ("ours", "tcpdump", "tcpdump_B32M")


def sh(*cmd: str, check: bool = True) -> str:
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {run.stderr.strip()}")
    return run.stdout


def setup() -> None:
    teardown()
    sh("ip", "netns", "add", TX)
    sh("ip", "netns", "add", RX)
    sh("ip", "link", "add", TX_IF, "netns", TX, "type", "veth", "peer", "name", RX_IF,
       "netns", RX)
    for ns, dev in ((TX, TX_IF), (RX, RX_IF)):
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
        sh("ip", "-n", ns, "link", "set", dev, "up")


def teardown() -> None:
    for ns in (TX, RX):
        sh("ip", "netns", "del", ns, check=False)


def rx_packets() -> int:
    link = json.loads(sh("ip", "-n", RX, "-s", "-j", "link", "show", RX_IF))[0]
    return int(link["stats64"]["rx"]["packets"])


def replay(pcap: Path, pps: int | None, packets: int, file_packets: int) -> dict:
    loops = -(-packets // file_packets)
    cmd = ["ip", "netns", "exec", TX, "tcpreplay", "-i", TX_IF, "--preload-pcap",
           f"--loop={loops}", f"--limit={packets}"]
    cmd += [f"--pps={pps}"] if pps else ["--topspeed"]
    out = sh(*cmd, str(pcap))
    sent = re.search(r"Actual: (\d+) packets .* in ([\d.]+) seconds", out)
    rated = re.search(r"Rated: [\d.]+ Bps, ([\d.]+) Mbps, ([\d.]+) pps", out)
    if not sent or not rated:
        raise SystemExit(f"tcpreplay output not understood:\n{out}")
    return {"sent": int(sent.group(1)), "seconds": float(sent.group(2)),
            "pps": round(float(rated.group(2))), "mbps": float(rated.group(1))}


def run_ours(pcap: Path, pps: int | None, packets: int, file_packets: int) -> dict:
    child = subprocess.Popen([sys.executable, __file__, "--child-ours", f"{RX}/{RX_IF}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=HERE.parent)
    assert child.stdin and child.stdout
    if child.stdout.readline().strip() != "ready":
        raise SystemExit("our capture child did not start")
    before = rx_packets()
    rep = replay(pcap, pps, packets, file_packets)
    arrived = rx_packets() - before
    time.sleep(1.0)  # let it drain what its socket holds
    child.stdin.write("stop\n")
    child.stdin.flush()
    got = json.loads(child.stdout.readline())
    child.wait(60)
    return {**rep, "arrived": arrived, "captured": got["received"],
            "kernel_drops": got["kernel_drops"], "in_records": got["in_records"],
            "cpu_s": round(got["cpu_s"], 3)}


def run_tcpdump(pcap: Path, pps: int | None, packets: int, file_packets: int,
                buffer_kib: int | None = None) -> dict:
    cmd = ["ip", "netns", "exec", RX, "tcpdump", "-i", RX_IF, "-n", "-w", "/dev/null",
           *(["-B", str(buffer_kib)] if buffer_kib else []),
           "udp dst port 4789"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert child.stderr
    line = child.stderr.readline()  # "listening on ewbl1, ..." once the ring is up
    if "listening" not in line:
        raise SystemExit(f"tcpdump did not start: {line}")
    before = rx_packets()
    rep = replay(pcap, pps, packets, file_packets)
    arrived = rx_packets() - before
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    err = child.stderr.read()
    _, status, use = os.wait4(child.pid, 0)  # `ip netns exec` execs tcpdump: same process
    child.returncode = os.waitstatus_to_exitcode(status)
    captured = re.search(r"(\d+) packets? captured", err)
    dropped = re.search(r"(\d+) packets? dropped by kernel", err)
    if not captured or not dropped:
        raise SystemExit(f"tcpdump output not understood:\n{err}")
    return {**rep, "arrived": arrived, "captured": int(captured.group(1)),
            "kernel_drops": int(dropped.group(1)), "cpu_s": round(use.ru_utime + use.ru_stime, 3)}


def child_ours(spec: str) -> int:
    """Run LiveVxlanSource on `spec` until a line arrives on stdin; print one JSON line."""
    sys.path.insert(0, str(HERE.parent))
    from collector.pipeline import CollectorContext
    from collector.vxlan import LiveVxlanSource

    ctx = CollectorContext(collector_id="bench")
    # one interval and idle timeout longer than a run: every record is a final one at the end
    args = argparse.Namespace(underlay=[spec], vxlan_port=[4789], decoder="bulk",
                              interval=600.0, idle_timeout=1200.0)
    src = LiveVxlanSource(ctx, args)
    cap = src.captures[0]
    received = [0]
    take = cap.take

    def counting_take():  # noqa: ANN202 - a Block
        block = take()
        received[0] += len(block.off)
        return block

    cap.take = counting_take  # type: ignore[method-assign]
    records: list = []
    stop = threading.Event()
    t = threading.Thread(target=src.run, args=(records.extend, stop), daemon=True)
    t.start()
    print("ready", flush=True)
    sys.stdin.readline()
    stop.set()
    t.join(120)
    in_records = sum(r.packets_c2s + r.packets_s2c for r in records if r.final)
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"received": received[0], "kernel_drops": cap.kernel_drops,
                      "in_records": in_records, "cpu_s": use.ru_utime + use.ru_stime}),
          flush=True)
    return 0


def per_rate(rows: list[dict], tool: str) -> list[dict]:
    """Per offered rate (in order): the runs' lowest achieved rate and highest loss."""
    out: dict = {}
    for row in rows:
        r, s = row[tool], out.setdefault(row["offered_pps"], {"offered": row["offered_pps"]})
        s["sent_pps"] = min(s.get("sent_pps", r["pps"]), r["pps"])
        s["max_sent_pps"] = max(s.get("max_sent_pps", r["pps"]), r["pps"])
        s["worst_lost_frac"] = max(s.get("worst_lost_frac", 0.0), r["lost_frac"])
        s["runs_lost_frac"] = [*s.get("runs_lost_frac", []), r["lost_frac"]]
    return list(out.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default=DEFAULT_RATES, help="offered packets/s, comma-separated")
    ap.add_argument("--topspeed", action=argparse.BooleanOptionalAction, default=True,
                    help="a last step with tcpreplay --topspeed")
    ap.add_argument("--seconds", type=float, default=4.0, help="replay length per run")
    ap.add_argument("--file-packets", type=int, default=200_000)
    ap.add_argument("--loss", type=float, default=0.001, help="loss fraction that counts")
    ap.add_argument("--repeat", type=int, default=1, help="runs per rate (the worst counts)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--child-ours", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_ours:
        return child_ours(args.child_ours)
    for tool in ("tcpreplay", "tcpdump"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (scripts/setup-system.sh installs it)")
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, AF_PACKET)")
    sys.path.insert(0, str(HERE))
    from vxlan_gen import generate

    out = HERE / "out"
    out.mkdir(exist_ok=True)
    pcap = out / "vxlan-live.pcap"
    generate(str(pcap), packets=args.file_packets)
    steps: list[int | None] = [int(x) for x in args.rates.split(",") if x]
    if args.topspeed:
        steps.append(None)
    steps = [pps for pps in steps for _ in range(args.repeat)]
    load_before = os.getloadavg()[0]
    rows, bad = [], 0
    setup()
    try:
        for i, pps in enumerate(steps):
            packets = int((pps or 500_000) * args.seconds)
            order = [("ours", run_ours), ("tcpdump", run_tcpdump),
                     ("tcpdump_B32M", lambda *a: run_tcpdump(*a, buffer_kib=32 << 10))]
            if i % 2:
                order.reverse()
            row: dict = {"offered_pps": pps or "topspeed"}
            for name, fn in order:
                r = fn(pcap, pps, packets, args.file_packets)
                r["lost_frac"] = round(1 - r["captured"] / r["arrived"], 6) if r["arrived"] else 0.0
                row[name] = r
                if name == "ours" and r["in_records"] != r["captured"]:
                    bad += 1
            rows.append(row)
            print(f"offered {str(row['offered_pps']):>9} pps", flush=True)
            for name in TOOLS:
                r = row[name]
                print(f"  {name:<13} sent at {r['pps']:>9,} pkts/s  arrived {r['arrived']:>9,}  "
                      f"captured {r['captured']:>9,}  lost {r['lost_frac']:.2%}  kernel drops "
                      f"{r['kernel_drops']:>7,}  cpu {r['cpu_s']:.2f} s", flush=True)
    finally:
        teardown()
    load_after = os.getloadavg()[0]
    res: dict = {"file_packets": args.file_packets, "seconds": args.seconds, "loss": args.loss,
                 "load_avg_1m": [round(load_before, 2), round(load_after, 2)], "rows": rows,
                 "miscounted_runs": bad}
    print(f"load average {load_before:.2f} before, {load_after:.2f} after")
    for tool in TOOLS:
        rates = per_rate(rows, tool)
        res[f"{tool}_per_rate"] = rates
        lossy = [i for i, r in enumerate(rates) if r["worst_lost_frac"] > args.loss]
        first = rates[lossy[0]] if lossy else None
        clean = rates[lossy[0] - 1]["sent_pps"] if lossy and lossy[0] else None
        res[f"{tool}_loss_begins"] = {"offered": first["offered"] if first else None,
                                      "sent_pps": first["sent_pps"] if first else None,
                                      "highest_lossless_sent_pps": clean}
        worst = ", ".join(f"{r['offered']}: {r['worst_lost_frac']:.2%}" for r in rates)
        if first:
            print(f"{tool}: loss > {args.loss:.1%} begins at offered {first['offered']} "
                  f"({first['sent_pps']:,} pkts/s sent); lossless below, up to {clean or 0:,} "
                  f"pkts/s. Worst loss per rate: {worst}")
        else:
            top = max(r["max_sent_pps"] for r in rates)
            print(f"{tool}: no loss > {args.loss:.1%} up to {top:,} pkts/s "
                  f"sent. Worst loss per rate: {worst}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
