"""Loader of the drop probe: compiles drops.bpf.c with bcc (in a child process,
collector/bpfload.py), attaches it to skb:kfree_skb,
drains its map in batches.

Stage: the kernel boundary of the drop source (collector/drops/source.py).
In: settings (map size, netns scope), BTF offsets (never header layouts), the tracepoint's
format file (/sys/kernel/tracing/events/skb/kfree_skb/format).
Out: `BccDrops`, implementing `DropKernel`: `drain()` returns the counts of every (netns,
5-tuple, reason) since the last drain and deletes them (BPF_MAP_LOOKUP_AND_DELETE_BATCH,
kernel/bpf/hashtab.c), `stats()` the kernel's own counters (map full, packets without a network
header).

Drop reasons: the names are read from the format file's `__print_symbolic` list (the kernel's
`enum skb_drop_reason`, include/net/dropreason-core.h), never hard-coded: the numbers change
between kernels (NETFILTER_DROP is 12 on 6.18). Kernels before 5.17 have no `reason` field:
every drop is then counted as `UNKNOWN` (`reasons()` says so).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from collector import bpfload
from collector.probes.btf import Btf
from eastwest.errors import CapabilityError

BPF_FILE = Path(__file__).with_name("drops.bpf.c")
FORMAT = Path("/sys/kernel/tracing/events/skb/kfree_skb/format")
STATS = ("map_full", "no_header", "other_l3", "seen")
_SYMBOL = re.compile(r"\{\s*(\d+),\s*\"([A-Z0-9_]+)\"\s*\}")


@dataclass(frozen=True)
class DropKey:
    netns: int
    reason: str
    family: int
    protocol: int  # IP protocol number
    tcp_flags: int  # SYN (0x02) and ACK (0x10) bits of the first dropped packet
    src: str
    sport: int
    dst: str
    dport: int


@dataclass(frozen=True)
class DropCount:
    key: DropKey
    packets: int
    bytes: int
    first_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns)
    last_ns: int


class DropKernel(Protocol):
    def drain(self) -> list[DropCount]: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def reasons(format_text: str) -> dict[int, str]:
    """Drop reason number -> name, from the tracepoint's format; {} when it has no `reason`."""
    if "field:enum skb_drop_reason reason" not in format_text and " reason;" not in format_text:
        return {}
    return {int(n): name for n, name in _SYMBOL.findall(format_text)}


@dataclass(frozen=True)
class DropOffsets:
    skb_head: int
    skb_network_header: int
    skb_dev: int
    skb_sk: int
    dev_net: int
    sk_net: int
    net_ns_inum: int

    def defines(self) -> dict[str, int]:
        return {f"OFF_{k.upper()}": v for k, v in self.__dict__.items()}


def drop_offsets(btf: Btf) -> DropOffsets:
    return DropOffsets(
        skb_head=btf.member_offset("sk_buff", "head"),
        skb_network_header=btf.member_offset("sk_buff", "network_header"),
        skb_dev=btf.member_offset("sk_buff", "dev"),
        skb_sk=btf.member_offset("sk_buff", "sk"),
        dev_net=btf.member_offset("net_device", "nd_net.net"),
        sk_net=btf.member_offset("sock", "__sk_common.skc_net.net"),
        net_ns_inum=btf.member_offset("net", "ns.inum"),
    )


def program_text(offsets: DropOffsets, entries: int, netns: tuple[int, ...],
                 have_reason: bool) -> str:
    consts = {"DROP_ENTRIES": entries, "FILTER_NETNS": int(bool(netns)),
              "HAVE_REASON": int(have_reason), **offsets.defines()}
    head = "// constants for this kernel and these settings (offsets from BTF)\n"
    head += "".join(f"#define {k} {v}\n" for k, v in consts.items())
    return head + "\n" + BPF_FILE.read_text()


def _ip(raw: bytes, family: int) -> str:
    return str(ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw[:16]))


class BccDrops:
    """The compiled, attached drop probe. One thread owns it."""

    def __init__(self, entries: int = 16384, netns: tuple[int, ...] = (),
                 btf: Btf | None = None, format_path: Path = FORMAT) -> None:
        try:
            fmt = format_path.read_text()
        except OSError as exc:
            raise CapabilityError(f"the tracepoint skb:kfree_skb is missing ({format_path}: "
                                  f"{exc.strerror}); is tracefs mounted?") from exc
        self.names = reasons(fmt)
        offsets = drop_offsets(btf or Btf.from_file())
        self.text = program_text(offsets, entries, netns, bool(self.names))
        try:  # compiled in a child process: the compiler's memory is not kept
            self.bpf = bpfload.load(self.text, "the drop probe")
        except bpfload.LoadError as exc:
            raise CapabilityError(str(exc)) from exc
        self._map = self.bpf["drops"]
        self._stats = self.bpf["dstats"]
        if netns:
            allow = self.bpf["netns_allow"]
            for inode in netns:
                allow[allow.Key(inode)] = allow.Leaf(1)

    def _reason(self, n: int) -> str:
        if not self.names:
            return "UNKNOWN"
        return self.names.get(n, f"REASON_{n}")

    def drain(self) -> list[DropCount]:
        out = []
        table = self._map
        try:
            kb, vb, n = table.batch(delete=True)
            ks, vs = ct.sizeof(table.Key), ct.sizeof(table.Leaf)
            items = [(table.Key.from_buffer_copy(kb, i * ks), table.Leaf.from_buffer_copy(vb, i * vs))
                     for i in range(n)]
        except OSError:  # no batch ops (old kernel): one key at a time
            items = []
            for k in list(self._map.keys()):
                try:
                    v = self._map[k]
                    del self._map[k]
                except KeyError:
                    continue
                items.append((k, v))
        for k, v in items:
            fam = int(k.family)
            key = DropKey(int(k.netns), self._reason(int(k.reason)), fam, int(k.proto),
                          int(k.tcp_flags), _ip(bytes(k.saddr), fam), int(k.sport),
                          _ip(bytes(k.daddr), fam), int(k.dport))
            out.append(DropCount(key, int(v.packets), int(v.bytes), int(v.first_ns),
                                 int(v.last_ns)))
        return out

    def stats(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(STATS):
            out[name] = self._stats.percpu_sum(i)
        return out

    def close(self) -> None:
        self.bpf.close()
