"""Benchmark: the drop probe (skb:kfree_skb counted in the kernel per 5-tuple and reason, drained
in batches) against a per-event peer (the same tracepoint, every drop sent through a perf buffer
to a Python callback that counts the same keys: what the probe would cost without in-kernel
aggregation), side by side under one packet flood. Not a test: it reports ratios, never
passes or fails.

The flood: two namespaces joined by a veth; `--senders` processes in the first send UDP
datagrams as fast as they can to the second, from `--flows` source ports, where an iptables rule
drops them (reason NETFILTER_DROP). Truth is the rule's packet counter. Both tools run at once,
each in its own process scoped to the receiving namespace, and are read after the flood:
- drops each counted (and the peer's perf-buffer losses);
- user CPU per drop: utime + stime of the tool's process from when it was attached to its exit
  (the probe drains every `--interval` s; the peer is woken per batch of events);
- kernel CPU per drop: the BPF program's own run time (`kernel.bpf_stats_enabled`, `bpftool prog
  show`: run_time_ns / run_cnt), spent on the CPU that drops the packet, not in the tool.
Root; the traffic stays inside the two namespaces. Usage: python bench/bench_drops.py
[--seconds 10] [--senders 1] [--flows 64] [--interval 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NS_A, NS_B = "ewxdb-a", "ewxdb-b"
IP_A, IP_B, PORT = "10.251.0.1", "10.251.0.2", 9

PEER = r"""
import ctypes as ct, sys, time, os
from bcc import BPF
text = '''
enum skb_drop_reason { EW_ANY = 0, EW_MAX = 0x7fffffff };
struct ev_t { u32 netns; u32 reason; u32 saddr; u32 daddr; u16 sport; u16 dport; u8 proto; };
BPF_PERF_OUTPUT(events);
TRACEPOINT_PROBE(skb, kfree_skb) {
    if (args->protocol != 0x0800) return 0;
    const char *skb = (const char *)args->skbaddr;
    void *dev = 0, *net = 0; u32 inum = 0;
    bpf_probe_read_kernel(&dev, sizeof(dev), skb + OFF_SKB_DEV);
    if (dev) bpf_probe_read_kernel(&net, sizeof(net), (const char *)dev + OFF_DEV_NET);
    if (net) bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_NS_INUM);
    if (inum != NETNS) return 0;
    unsigned char *head = 0; u16 nh = 0;
    bpf_probe_read_kernel(&head, sizeof(head), skb + OFF_SKB_HEAD);
    bpf_probe_read_kernel(&nh, sizeof(nh), skb + OFF_SKB_NETWORK_HEADER);
    if (!head || nh == 0xFFFF) return 0;
    u8 h[24] = {};
    bpf_probe_read_kernel(h, sizeof(h), head + nh);
    struct ev_t e = {.netns = inum, .reason = args->reason, .proto = h[9]};
    __builtin_memcpy(&e.saddr, &h[12], 4); __builtin_memcpy(&e.daddr, &h[16], 4);
    e.sport = (u16)h[20] << 8 | h[21]; e.dport = (u16)h[22] << 8 | h[23];
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
'''
from collector.drops.kernel import drop_offsets
from collector.probes.btf import Btf
defs = {**drop_offsets(Btf.from_file()).defines(), "NETNS": int(sys.argv[1])}
b = BPF(text="".join(f"#define {k} {v}\n" for k, v in defs.items()) + text)
counts, lost = {}, [0]
class Ev(ct.Structure):
    _fields_ = [("netns", ct.c_uint32), ("reason", ct.c_uint32), ("saddr", ct.c_uint32),
                ("daddr", ct.c_uint32), ("sport", ct.c_uint16), ("dport", ct.c_uint16),
                ("proto", ct.c_uint8)]
def on(cpu, data, size):
    e = ct.cast(data, ct.POINTER(Ev)).contents
    k = (e.netns, e.reason, e.saddr, e.daddr, e.sport, e.dport, e.proto)
    counts[k] = counts.get(k, 0) + 1
def on_lost(n):
    lost[0] += n
b["events"].open_perf_buffer(on, page_cnt=256, lost_cb=on_lost)
print("ready", flush=True)
import select
while not select.select([sys.stdin], [], [], 0)[0]:  # until the bench says stop
    b.perf_buffer_poll(timeout=100)
b.perf_buffer_poll(timeout=0)
print({"drops": sum(counts.values()), "keys": len(counts), "lost": lost[0]}, flush=True)
"""

PROBE = r"""
import select, sys, time
from collector.drops.kernel import BccDrops
k = BccDrops(netns=(int(sys.argv[1]),))
print("ready", flush=True)
interval = float(sys.argv[2])
total, keys, drains, stop = 0, set(), 0, False
while True:
    stop = bool(select.select([sys.stdin], [], [], interval)[0])  # until the bench says stop
    got = k.drain()
    drains += 1
    total += sum(c.packets for c in got if c.key.reason == "NETFILTER_DROP")
    keys.update(c.key for c in got)
    if stop:
        break
st = k.stats()
print({"drops": total, "keys": len(keys), "lost": st["map_full"], "drains": drains}, flush=True)
"""


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check).stdout


def setup() -> int:
    teardown()
    sh("ip", "netns", "add", NS_A)
    sh("ip", "netns", "add", NS_B)
    sh("ip", "-n", NS_A, "link", "add", "fa", "type", "veth", "peer", "name", "fb", "netns", NS_B)
    for ns, dev, ip in ((NS_A, "fa", IP_A), (NS_B, "fb", IP_B)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "netns", "exec", NS_B, "iptables", "-w", "-A", "INPUT", "-p", "udp", "--dport",
       str(PORT), "-j", "DROP")
    return os.stat(f"/run/netns/{NS_B}").st_ino


def teardown() -> None:
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "delete", ns, check=False)


def truth() -> int:
    out = sh("ip", "netns", "exec", NS_B, "iptables", "-w", "-L", "INPUT", "-v", "-x", "-n")
    return sum(int(line.split()[0]) for line in out.splitlines() if " DROP " in f" {line} ")


def sender(seconds: float, flows: int, first_port: int, sent) -> None:  # noqa: ANN001
    import ctypes
    import socket

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{NS_A}", os.O_RDONLY)
    if libc.setns(fd, 0) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    socks = []
    for i in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((IP_A, first_port + i))
        s.connect((IP_B, PORT))
        socks.append(s)
    n, payload = 0, b"x" * 64
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for s in socks:
            for _ in range(16):
                s.send(payload)
            n += 16
    sent.value += n


def cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15])  # utime stime cutime cstime


def kfree_progs() -> dict[int, tuple[int, int]]:
    """id -> (run_time_ns, run_cnt) of every loaded skb:kfree_skb program."""
    return {p["id"]: (p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(sh("bpftool", "prog", "show", "-j"))
            if p.get("type") == "tracepoint" and p.get("name", "").endswith("kfree_skb")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--senders", type=int, default=1)
    ap.add_argument("--flows", type=int, default=64)
    ap.add_argument("--interval", type=float, default=1.0, help="the probe's drain interval")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_drops: needs root (namespaces, BPF)", file=sys.stderr)
        return 2
    inode = setup()
    old_stats = sh("sysctl", "-n", "kernel.bpf_stats_enabled").strip()
    sh("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hz = os.sysconf("SC_CLK_TCK")
    try:
        cmds = {"probe": [sys.executable, "-c", PROBE, str(inode), str(args.interval)],
                "peer": [sys.executable, "-c", PEER, str(inode)]}
        tools: dict[str, subprocess.Popen[str]] = {}
        start_cpu, prog_id = {}, {}
        for name, cmd in cmds.items():  # one after the other: the new program id is the tool's
            before = set(kfree_progs())
            p = tools[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               text=True, env=env, cwd=REPO)
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise SystemExit(f"bench_drops: {name} did not start: {line!r}")
            start_cpu[name] = cpu_ticks(p.pid)
            (prog_id[name],) = set(kfree_progs()) - before
        sent = mp.Value("q", 0)
        flood = [mp.Process(target=sender, args=(args.seconds, args.flows, 20000 + i * args.flows,
                                                 sent)) for i in range(args.senders)]
        for f in flood:
            f.start()
        for f in flood:
            f.join()
        time.sleep(args.interval + 0.5)  # the last drain / poll sees the last drops
        kstats = kfree_progs()
        for p in tools.values():
            assert p.stdin is not None
            p.stdin.write("stop\n")
            p.stdin.close()
        result = {"seconds": args.seconds, "senders": args.senders, "flows": args.flows,
                  "sent": sent.value, "dropped_truth": truth(), "tools": {}}
        for name, p in tools.items():
            while True:  # read the zombie's CPU before reaping it
                try:
                    st = Path(f"/proc/{p.pid}/stat").read_text()
                except OSError:
                    break
                if st.rsplit(")", 1)[1].split()[0] == "Z":
                    break
                time.sleep(0.05)
            cpu = (cpu_ticks(p.pid) - start_cpu[name]) / hz
            assert p.stdout is not None
            report = eval(p.stdout.read().strip().splitlines()[-1])  # noqa: S307 - our own child's dict
            p.wait()
            run_ns, run_cnt = kstats.get(prog_id[name], (0, 0))
            drops = report["drops"]
            result["tools"][name] = {
                **report, "user_cpu_s": round(cpu, 3),
                "user_cpu_ns_per_drop": round(cpu * 1e9 / drops, 1) if drops else None,
                "bpf_runs": run_cnt,
                "bpf_ns_per_run": round(run_ns / run_cnt, 1) if run_cnt else None}
        pr, pe = result["tools"]["probe"], result["tools"]["peer"]
        if pr["user_cpu_ns_per_drop"] and pe["user_cpu_ns_per_drop"]:
            result["user_cpu_ratio_peer_over_probe"] = round(
                pe["user_cpu_ns_per_drop"] / pr["user_cpu_ns_per_drop"], 1)
        if pr["bpf_ns_per_run"] and pe["bpf_ns_per_run"]:
            result["bpf_ns_ratio_peer_over_probe"] = round(
                pe["bpf_ns_per_run"] / pr["bpf_ns_per_run"], 1)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    finally:
        sh("sysctl", "-q", "-w", f"kernel.bpf_stats_enabled={old_stats}")
        teardown()


if __name__ == "__main__":
    sys.exit(main())
