"""Kernel map sizes of the socket probes, from the host's own limits, and their memory.

Stage: collector start-up (`collector.probes.probe_config`) and `eastwest collector --check`.
In: the host's sysctls and memory (/proc/sys/net/ipv4/tcp_ehash_entries, /proc/meminfo,
/proc/sys/kernel/threads-max), or `--map-entries N`. Out: `MapSizes` (entries of `conns` and
`udp_flows`, of `udp_calls`, and why), and the kernel memory of a hash map of a given shape.

The rule (`auto`, the default):
- the kernel's own table of established TCP connections (`net.ipv4.tcp_ehash_entries`, which the
  kernel sizes from memory at boot: one bucket per 128 KiB, net/ipv4/tcp.c tcp_init()
  alloc_large_system_hash; the same estimate from /proc/meminfo where the sysctl is missing,
  before Linux 6.1) says how many connections this host is built for;
- capped so that `conns` and `udp_flows` together take at most 0.25% of the host's memory (the
  share Cilium's `bpf-map-dynamic-size-ratio` gives its maps by default): map memory is kernel
  memory, charged since Linux 5.11 to the memory cgroup of the process that created the map, so
  it counts against the collector's container limit;
- rounded down to a power of two (the kernel rounds a hash map's buckets up to one), at least
  16,384 and at most 4,194,304. `udp_flows` gets the same number: a UDP flow is (socket, peer),
  one per connected socket and one per peer of an unconnected one;
- `udp_calls` (threads inside a send/recv call with an address at once): `kernel.threads-max`,
  between 1,024 and 16,384 (a thread blocked in recvfrom() holds one entry).

Memory of a preallocated hash map, as the kernel counts it (kernel/bpf/hashtab.c
htab_map_mem_usage, the `memlock` of /proc/PID/fdinfo/FD): a 16-byte bucket per power-of-two
slot, and one element per entry plus one per possible CPU, each a 48-byte `struct htab_elem`
header, the key and the value each rounded up to 8 bytes. Checked against fdinfo on 6.18.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from eastwest.errors import ConfigError

PROC_SYS = Path("/proc/sys")
MEMINFO = Path("/proc/meminfo")
MEMORY_SHARE = 0.0025  # of MemTotal, for conns + udp_flows together
MIN_ENTRIES, MAX_ENTRIES = 16384, 1 << 22
MIN_CALLS, MAX_CALLS = 1024, 16384
HTAB_ELEM_BYTES = 48  # struct htab_elem before the key (64-bit kernels)
BUCKET_BYTES = 16  # struct bucket: hlist_nulls_head + raw_spinlock_t


def _r8(n: int) -> int:
    return (n + 7) // 8 * 8


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def hash_map_bytes(entries: int, key: int, value: int, cpus: int | None = None,
                   lru: bool = False) -> int:
    """Kernel memory of a preallocated BPF hash map (htab_map_mem_usage, without its small
    fixed header and per-CPU lock array)."""
    if entries <= 0:
        return 0
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    elems = entries if lru else entries + cpus
    return BUCKET_BYTES * _pow2_ceil(entries) + elems * (HTAB_ELEM_BYTES + _r8(key) + _r8(value))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def mem_total_bytes(meminfo: Path = MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class MapSizes:
    entries: int  # conns and udp_flows each
    udp_calls: int
    why: str  # how `entries` was chosen, for --check and the start-up log


def choose(per_entry_bytes: int, requested: int | None = None, proc_sys: Path = PROC_SYS,
           meminfo: Path = MEMINFO) -> MapSizes:
    """Entries of `conns` and `udp_flows` (`requested`: --map-entries N, else the rule above).
    `per_entry_bytes`: the kernel memory one entry of both maps together takes."""
    threads = _read_int(proc_sys / "kernel" / "threads-max") or MIN_CALLS
    calls = max(MIN_CALLS, min(MAX_CALLS, threads))
    if requested is not None:
        return MapSizes(requested, calls, "--map-entries")
    mem = mem_total_bytes(meminfo)
    ehash = _read_int(proc_sys / "net" / "ipv4" / "tcp_ehash_entries")
    parts = []
    if ehash:
        hint = abs(ehash)  # negative: a per-netns table of that size (tcp_child_ehash_entries)
        parts.append(f"net.ipv4.tcp_ehash_entries {hint}")
    elif mem:
        hint = _pow2_ceil(mem // (128 * 1024))
        parts.append(f"{mem >> 20} MiB of memory / 128 KiB = {hint} (the kernel's TCP table rule)")
    else:
        hint = MIN_ENTRIES * 4
        parts.append(f"host limits unreadable: {hint}")
    entries = hint
    if mem:
        budget = int(mem * MEMORY_SHARE) // per_entry_bytes
        parts.append(f"0.25% of {mem / 2**30:.1f} GiB memory = {budget} entries")
        entries = min(entries, budget)
    entries = max(MIN_ENTRIES, min(MAX_ENTRIES, _pow2_floor(max(1, entries))))
    return MapSizes(entries, calls, "auto: " + ", ".join(parts) + f" -> {entries}")


def map_sizes(given: object, per_entry_bytes: int) -> MapSizes:
    """`--map-entries N|auto` (None: auto). ConfigError naming the flag and the bad value."""
    if given is None or str(given) == "auto":
        return choose(per_entry_bytes)
    try:
        entries = int(str(given))
    except ValueError:
        raise ConfigError("--map-entries", given, "must be a number of entries or auto") from None
    if not 64 <= entries <= 1 << 24:
        raise ConfigError("--map-entries", entries, "must be between 64 and 16777216")
    return choose(per_entry_bytes, requested=entries)
