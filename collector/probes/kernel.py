"""Loader of the socket probes: compiles socket.bpf.c with bcc, attaches it, reads its maps.

Stage: the kernel boundary of the socket probe source.
In: settings (map sizes, netns scope), the hooks the capability probe found, BTF offsets.
Out: `BccKernel`, implementing `collector.probes.conn.KernelSide`: close events from the ring
buffer, batch reads of the connection map, the loss counters.

The program text is socket.bpf.c preceded by `#define`s for every constant (`program_text`),
so `eastwest collector --print-bpf` prints exactly what is compiled. bcc attaches the
TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE functions by their names.
"""

from __future__ import annotations

import ctypes as ct
import logging
from dataclasses import dataclass, field
from pathlib import Path

from collector.probes.btf import KernelOffsets
from collector.probes.conn import STAT_NAMES, ConnState
from eastwest.errors import CapabilityError

BPF_FILE = Path(__file__).with_name("socket.bpf.c")
CONN_VALUE_BYTES = 144  # sizeof(struct conn_t); checked against bcc's ctypes at load
HASH_ELEM_OVERHEAD = 48  # struct htab_elem header, kernel/bpf/hashtab.c (approximate)
log = logging.getLogger("eastwest.collector.probes")


@dataclass(frozen=True)
class ProbeConfig:
    conn_entries: int = 65536
    listen_entries: int = 4096
    ringbuf_pages: int = 256  # 1 MiB: ~6,000 close events between two polls
    netns: tuple[int, ...] = ()  # empty: every namespace
    hooks: frozenset[str] = field(default_factory=lambda: frozenset(
        {"bytes", "retransmit", "resets", "rtt", "destroy"}))

    def map_memory_bytes(self) -> int:
        """Preallocated kernel memory of the maps and the ring buffer."""
        conns = self.conn_entries * (8 + CONN_VALUE_BYTES + HASH_ELEM_OVERHEAD)
        listeners = self.listen_entries * (8 + 32 + HASH_ELEM_OVERHEAD)
        return conns + listeners + self.ringbuf_pages * 4096


def program_text(offsets: KernelOffsets | None, cfg: ProbeConfig) -> str:
    """socket.bpf.c with its compile-time constants as #define lines on top."""
    consts = {
        "CONN_ENTRIES": cfg.conn_entries, "LISTEN_ENTRIES": cfg.listen_entries,
        "RINGBUF_PAGES": cfg.ringbuf_pages, "FILTER_NETNS": int(bool(cfg.netns)),
        "HAVE_BYTES": int("bytes" in cfg.hooks), "HAVE_RETRANSMIT": int("retransmit" in cfg.hooks),
        "HAVE_RESETS": int("resets" in cfg.hooks), "HAVE_RTT": int("rtt" in cfg.hooks),
        "HAVE_DESTROY": int("destroy" in cfg.hooks),
    }
    if offsets is not None:
        consts.update({"OFF_SK_NET": offsets.sk_net, "OFF_NET_NS_INUM": offsets.net_ns_inum,
                       "OFF_SK_ERR": offsets.sk_err, "OFF_TCP_SRTT_US": offsets.tcp_srtt_us})
    head = "// constants for this kernel and these settings (offsets from BTF)\n"
    head += "".join(f"#define {k} {v}\n" for k, v in consts.items())
    return head + "\n" + BPF_FILE.read_text()


def _state_from(sk: int, c: ct.Structure) -> ConnState:
    n = 4 if c.family == 2 else 16
    return ConnState(
        sk=sk, start_ns=c.start_ns, role=c.role, phase=c.phase, family=c.family,
        saddr=bytes(c.saddr[:n]), daddr=bytes(c.daddr[:n]), sport=c.sport, dport=c.dport,
        netns=c.netns, end_ns=c.end_ns, bytes_sent=c.bytes_sent, bytes_recv=c.bytes_recv,
        rtt_sum_us=c.rtt_sum_us, rtt_count=c.rtt_count, rtt_min_us=c.rtt_min_us,
        rtt_max_us=c.rtt_max_us, retransmits=c.retransmits, resets_sent=c.resets_sent,
        resets_recv=c.resets_recv, pid=c.pid, cgroup_id=c.cgroup_id,
        comm=bytes(c.comm).split(b"\0", 1)[0].decode("utf-8", "replace"), owner=c.owner,
        sk_err=c.sk_err, close_oldstate=c.close_oldstate, tcp_closed=bool(c.tcp_closed),
        deferred=bool(c.deferred))


class BccKernel:
    """The compiled, attached program. Not thread-safe: one source thread owns it."""

    def __init__(self, offsets: KernelOffsets, cfg: ProbeConfig,
                 listeners: list[tuple[int, int, int, str, int]] | None = None) -> None:
        try:
            from bcc import BPF
        except ImportError as exc:
            raise CapabilityError("the bcc Python package is missing (apt-get install "
                                  "python3-bpfcc; bash scripts/setup-venv.sh links it)") from exc
        self.cfg = cfg
        try:
            self.bpf = BPF(text=program_text(offsets, cfg).encode())
        except Exception as exc:  # bcc raises bare Exception on compile/load failure
            raise CapabilityError(f"the socket probes did not load: {exc}") from exc
        self._events: list[ConnState] = []
        conns = self.bpf[b"conns"]
        if ct.sizeof(conns.Leaf) != CONN_VALUE_BYTES:
            log.warning("struct conn_t is %d bytes, map memory estimate assumes %d",
                        ct.sizeof(conns.Leaf), CONN_VALUE_BYTES)
        self._conns = conns

        class CloseEvent(ct.Structure):  # struct close_event_t, built on bcc's conn_t
            _fields_ = [("sk", ct.c_uint64), ("conn", conns.Leaf)]

        self._event_ptr = ct.POINTER(CloseEvent)
        self._stats = self.bpf[b"stats"]
        if cfg.netns:
            allow = self.bpf[b"netns_allow"]
            for inode in cfg.netns:
                allow[allow.Key(inode)] = allow.Leaf(1)
        self._seed_listeners(listeners or [])
        self.bpf[b"events"].open_ring_buffer(self._on_event)
        self._batch_ok = True

    def _seed_listeners(self, listeners: list[tuple[int, int, int, str, int]]) -> None:
        """Owners of listeners that existed before the probes: (netns, port, pid, comm, cgroup)."""
        table = self.bpf[b"listeners"]
        for netns, port, pid, comm, cgroup_id in listeners:
            key = table.Key(netns, port)
            leaf = table.Leaf()
            leaf.pid, leaf.cgroup_id = pid, cgroup_id
            leaf.comm = comm.encode()[:15]
            try:
                table[key] = leaf
            except Exception:  # noqa: BLE001 - a full map: the listener stays unknown
                log.warning("listener map full: owner of port %d in netns %d unknown", port, netns)

    def _on_event(self, _ctx: object, data: int, _size: int) -> None:
        e = ct.cast(data, self._event_ptr).contents
        self._events.append(_state_from(e.sk, e.conn))

    def poll(self, timeout_s: float) -> list[ConnState]:
        self.bpf.ring_buffer_poll(max(0, int(timeout_s * 1000)))
        out, self._events = self._events, []
        return out

    def live(self) -> list[ConnState]:
        if self._batch_ok:
            try:
                return [_state_from(k.value, v) for k, v in self._conns.items_lookup_batch()]
            except Exception as exc:  # noqa: BLE001 - old kernels: fall back to iteration
                log.info("batch map lookup unavailable (%s); iterating", exc)
                self._batch_ok = False
        return [_state_from(k.value, v) for k, v in self._conns.items()]

    def forget(self, states: list[ConnState]) -> None:
        for s in states:
            key = self._conns.Key(s.sk)
            try:
                cur = self._conns[key]
            except KeyError:
                continue
            if cur.start_ns == s.start_ns:  # not a new connection that reused the pointer
                del self._conns[key]

    def stats(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(sum(self._stats[ct.c_int(i)]))
        return out

    def close(self) -> None:
        self.bpf.cleanup()
