"""Capability probe: what this kernel and this process allow the socket probes to do.

Stage: collector start-up (`SocketProbeSource`) and `eastwest collector --check`.
In: tracefs (/sys/kernel/tracing/events), the kernel's BTF, /proc/mounts, the process's
capabilities (/proc/self/status CapEff), bcc, the kernel headers bcc compiles against.
Out: `Capabilities`: which hooks exist, which features run, what records will lack
(`missing_measurements`, used for `incomplete`), one warning for all degradations, and the
table `--check` prints (exit 0: everything needed is present, 1: something needed is missing).

Raw tracepoints are used only when BTF proves their first argument is `struct sock *`
(`btf_trace_<name>` prototypes), so `ctx->args[0]` is never a guess.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eastwest.errors import CapabilityError

if TYPE_CHECKING:
    from collector.probes.kernel import ProbeConfig
    from collector.probes.sizing import MapSizes

TRACEFS = (Path("/sys/kernel/tracing/events"), Path("/sys/kernel/debug/tracing/events"))
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


@dataclass(frozen=True)
class Hook:
    group: str
    name: str
    feature: str  # "" = required; else the feature it enables (kernel.ProbeConfig.hooks)
    raw: bool  # attached as a raw tracepoint (needs the BTF prototype check)
    used_for: str
    fallback: str
    measures: str = ""  # the `incomplete` label when the hook is missing


HOOKS = (
    Hook("sock", "inet_sock_set_state", "", False, "lifecycle, role, 5-tuple, failed connects",
         "none (required)"),
    Hook("sock", "sock_send_length", "bytes", True, "payload bytes sent (TCP; UDP datagrams)",
         "records marked incomplete: bytes", "bytes"),
    Hook("sock", "sock_recv_length", "bytes", True, "payload bytes received (TCP; UDP datagrams)",
         "records marked incomplete: bytes", "bytes"),
    Hook("tcp", "tcp_retransmit_skb", "retransmit", True, "retransmitted segments",
         "records marked incomplete: retransmits", "retransmits"),
    Hook("tcp", "tcp_send_reset", "resets", True, "RSTs sent",
         "records marked incomplete: resets", "resets"),
    Hook("tcp", "tcp_receive_reset", "resets", True, "RSTs received",
         "records marked incomplete: resets (refused still from sk_err)", "resets"),
    Hook("tcp", "tcp_probe", "rtt", True, "smoothed RTT (srtt_us at a BTF offset)",
         "rtt_us null", "rtt"),
    Hook("tcp", "tcp_destroy_sock", "destroy", True, "final record after the last read",
         "final record at CLOSE (reads after an RST missed)"),
    *(Hook("syscalls", f"sys_{edge}_{call}", "udp", False, f"UDP, {call}(): {what}",
           "no UDP flows (TCP unaffected)")
      for call, edge, what in (
          ("sendto", "enter", "the peer's address (read at sock_send_length)"),
          ("sendto", "exit", "end of the call"),
          ("sendmsg", "enter", "msg_name (read at sock_send_length)"),
          ("sendmsg", "exit", "end of the call"),
          ("sendmmsg", "enter", "each message's msg_name (read at sock_send_length)"),
          ("sendmmsg", "exit", "end of the call"),
          ("recvfrom", "enter", "where the kernel will write the sender"),
          ("recvfrom", "exit", "the sender's address, read"),
          ("recvmsg", "enter", "where the kernel will write the sender"),
          ("recvmsg", "exit", "msg_name, read"),
          ("recvmmsg", "enter", "where the kernel will write the senders"),
          ("recvmmsg", "exit", "each message's msg_name and msg_len, read"))),
)


@dataclass
class Capabilities:
    hooks: dict[str, bool] = field(default_factory=dict)  # name -> usable
    notes: dict[str, str] = field(default_factory=dict)  # name -> why not usable
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, ok, detail)
    offsets: object | None = None  # KernelOffsets when BTF resolved them
    udp_offsets: object | None = None  # UdpOffsets when BTF resolved them (else no UDP flows)

    def features(self) -> frozenset[str]:
        """Optional features whose every hook is usable (UDP also needs its BTF offsets and
        the byte hooks, which see its datagrams)."""
        feats = {h.feature for h in HOOKS if h.feature}
        usable = {f for f in feats
                  if all(self.hooks.get(h.name) for h in HOOKS if h.feature == f)}
        if self.udp_offsets is None or "bytes" not in usable:
            usable.discard("udp")
        return frozenset(usable)

    def missing_measurements(self) -> tuple[str, ...]:
        out: list[str] = []
        for h in HOOKS:
            if h.measures and h.feature not in self.features() and h.measures != "rtt" \
                    and h.measures not in out:
                out.append(h.measures)
        return tuple(out)

    def problems(self) -> list[str]:
        """What is needed and missing: the socket probes cannot run."""
        out = [f"{what}: {detail}" for what, ok, detail in self.checks if not ok]
        for h in HOOKS:
            if not h.feature and not self.hooks.get(h.name):
                out.append(f"tracepoint {h.group}:{h.name}: {self.notes.get(h.name, 'missing')}")
        return out

    def degradations(self) -> list[str]:
        out = [f"{h.group}:{h.name} unusable ({self.notes.get(h.name, 'missing')}): {h.fallback}"
               for h in HOOKS if h.feature and not self.hooks.get(h.name)]
        if "udp" not in self.features() and not any(
                h.feature == "udp" and not self.hooks.get(h.name) for h in HOOKS):
            why = "its BTF offsets are unknown" if self.udp_offsets is None else \
                "the byte hooks are missing"
            out.append(f"UDP flows off ({why}): TCP unaffected")
        return out

    def require(self) -> None:
        problems = self.problems()
        if problems:
            raise CapabilityError("the socket probes cannot run here: " + "; ".join(problems)
                                  + " (see `eastwest collector --check`)")

    def warn_once(self, log: logging.Logger) -> None:
        """ONE warning naming every degradation (nothing when all hooks are usable)."""
        d = self.degradations()
        if d:
            log.warning("socket probes degraded: %s", "; ".join(d))


def _tracepoint_exists(group: str, name: str) -> bool:
    return any((root / group / name).is_dir() for root in TRACEFS)


def _effective_caps(status: Path = Path("/proc/self/status")) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _mounted(fstype: str) -> str | None:
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == fstype:
                return parts[1]
    except OSError:
        return None
    return None


def probe() -> Capabilities:
    """Look at this machine; never raises (what fails is reported in the result)."""
    from collector.probes.btf import Btf, kernel_offsets, udp_offsets

    caps = Capabilities()
    btf = None
    try:
        btf = Btf.from_file()
        caps.offsets = kernel_offsets(btf)
        caps.checks.append(("BTF /sys/kernel/btf/vmlinux", True, f"offsets {caps.offsets}"))
    except CapabilityError as exc:
        caps.checks.append(("BTF /sys/kernel/btf/vmlinux", False, str(exc)))
    if btf is not None:
        try:
            caps.udp_offsets = udp_offsets(btf)
            caps.checks.append(("BTF UDP offsets", True, "socket, msghdr and mmsghdr fields"))
        except CapabilityError as exc:  # optional: UDP flows off, TCP unaffected
            caps.checks.append(("BTF UDP offsets", True, f"unknown, no UDP flows: {exc}"))
    for h in HOOKS:
        if not _tracepoint_exists(h.group, h.name):
            caps.hooks[h.name], caps.notes[h.name] = False, "no such tracepoint"
            continue
        if h.raw:
            params = btf.raw_tracepoint_params(h.name) if btf else None
            if not params or params[0] != "struct sock *":
                caps.hooks[h.name] = False
                caps.notes[h.name] = f"raw tracepoint arguments are {params}, not (struct sock *, ...)"
                continue
        caps.hooks[h.name] = True
    caps.checks.append(("skb:kfree_skb (--drops)", True, _drop_reasons()))
    tracefs = any(root.is_dir() for root in TRACEFS)
    caps.checks.append(("tracefs", tracefs, "mounted" if tracefs else
                        "mount -t tracefs nodev /sys/kernel/tracing"))
    bpffs = _mounted("bpf")
    caps.checks.append(("bpffs", True, f"mounted at {bpffs}" if bpffs else
                        "not mounted (not needed: maps are not pinned)"))
    eff = _effective_caps()
    perm = os.geteuid() == 0 or bool(eff & (1 << CAP_SYS_ADMIN)) or (
        bool(eff & (1 << CAP_BPF)) and bool(eff & (1 << CAP_PERFMON)))
    caps.checks.append(("permissions", perm, f"euid {os.geteuid()}, CapEff {eff:#x}"
                        + ("" if perm else ": needs root or CAP_BPF+CAP_PERFMON")))
    # found, not imported: importing bcc maps its compiler (libLLVM) into this process, and the
    # programs are compiled in a child process (collector/bpfload.py) so that it is not kept
    if importlib.util.find_spec("bcc") is not None:
        caps.checks.append(("bcc", True, "importable"))
    else:
        caps.checks.append(("bcc", False, "apt-get install python3-bpfcc; bash scripts/setup-venv.sh"))
    build = Path(f"/lib/modules/{os.uname().release}/build")
    caps.checks.append(("kernel headers", build.exists(), str(build) if build.exists() else
                        f"{build} missing: bash scripts/setup-system.sh links the nearest ones"))
    return caps


def _drop_reasons() -> str:
    """What `--drops` (collector/drops) can say here; optional, so never a problem."""
    from collector.drops.kernel import reasons

    for root in TRACEFS:
        fmt = root / "skb" / "kfree_skb" / "format"
        try:
            text = fmt.read_text()
        except OSError:
            continue
        names = reasons(text)
        if names:
            return f"present with drop reasons ({len(names)} names, NETFILTER_DROP = " \
                   f"{next((n for n, v in names.items() if v == 'NETFILTER_DROP'), '?')})"
        return "present without a reason field (Linux < 5.17): drops counted as UNKNOWN"
    return "missing: --drops cannot run"


def table(caps: Capabilities, sizes: MapSizes) -> str:
    from collector.probes.kernel import ProbeConfig

    rows = [("hook", "present", "used for", "fallback")]
    for h in HOOKS:
        ok = caps.hooks.get(h.name, False)
        rows.append((f"{h.group}:{h.name}" + (" (raw)" if h.raw else ""),
                     "yes" if ok else f"NO: {caps.notes.get(h.name, '')}", h.used_for,
                     "-" if ok else h.fallback))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for what, ok, detail in caps.checks:
        lines.append(f"{what + ':':<28} {'ok' if ok else 'MISSING'}  {detail}")
    lines += map_lines(ProbeConfig(conn_entries=sizes.entries, udp_entries=sizes.entries,
                                   udp_call_entries=sizes.udp_calls, hooks=caps.features()),
                       sizes)
    lines.append(f"{'not available here:':<28} kprobes, fentry (not used)")
    return "\n".join(lines)


def map_lines(cfg: ProbeConfig, sizes: MapSizes) -> list[str]:
    """`--check`'s kernel maps: the sizes, why, and the kernel memory each takes (preallocated
    at load, charged to the collector's memory cgroup; collector/probes/sizing.py)."""
    lines = [f"{'map memory:':<28} {cfg.map_memory_bytes() / 2**20:.1f} MiB of kernel memory "
             f"({sizes.entries} connections and {sizes.entries} UDP flows tracked at once"
             if cfg.udp() else
             f"{'map memory:':<28} {cfg.map_memory_bytes() / 2**20:.1f} MiB of kernel memory "
             f"({sizes.entries} connections tracked at once",
             f"{'map sizes:':<28} {sizes.why}; --map-entries N to choose"]
    lines[0] += "; beyond that counted as conn_map_full / udp_map_full)"
    for name, entries, size in cfg.map_memory():
        what = f"{entries // 1024} KiB" if "ring" in name else f"{entries} entries"
        lines.append(f"{'  ' + name + ':':<28} {size / 2**20:6.1f} MiB  {what}")
    return lines


def conntrack_lines(netns: list[str]) -> list[str]:
    """`--check`'s lines about conntrack (NAT translations, collector/conntrack.py), one per
    named `--netns` (the root namespace when none is named; inode numbers are not opened).
    Informational: the socket probes run without it."""
    from collector.conntrack import check

    names: list[str | None] = [n for n in netns if not str(n).isdigit()] or [None]
    out = []
    for ns in names:
        why = check(ns)
        where = f"conntrack {ns or '(this namespace)'}:"
        out.append(f"{where:<28} {'ok' if why is None else 'NOT READABLE'}  "
                   + ("NAT translations readable (ctnetlink events)" if why is None else why))
    return out


def main_check(args: argparse.Namespace) -> int:
    """`eastwest collector --check`: print the table; 0 when everything needed is present."""
    caps = probe()
    from collector.probes.kernel import ENTRY_PAIR_BYTES
    from collector.probes.sizing import map_sizes

    print(table(caps, map_sizes(getattr(args, "map_entries", None), ENTRY_PAIR_BYTES)))
    for line in conntrack_lines(list(getattr(args, "netns", None) or [])):
        print(line)
    from collector.mesh_proxies import check_line

    print(check_line(args))
    problems, degraded = caps.problems(), caps.degradations()
    print()
    if problems:
        print("result: the socket probes CANNOT run: " + "; ".join(problems))
        return 1
    if degraded:
        print("result: the socket probes run DEGRADED: " + "; ".join(degraded))
    else:
        print("result: everything the socket probes need is present")
    return 0
