"""Loader of the socket probes: compiles socket.bpf.c with bcc (in a child process,
collector/bpfload.py, so that the compiler's memory is not kept), attaches it, reads its maps.

Stage: the kernel boundary of the socket probe source.
In: settings (map sizes, netns scope), the hooks the capability probe found, BTF offsets.
Out: `BccKernel`, implementing `collector.probes.conn.KernelSide`: close events from the ring
buffer, batch reads of the connection map, the loss counters.

Userspace runs per batch, not per connection: the kernel wakes the reader once per
`WAKEUP_EVERY` close events per CPU (BPF_RB_NO_WAKEUP otherwise, include/uapi/linux/bpf.h),
the close events are read from the ring buffer's memory mapping (collector/probes/ring.py;
libbpf's per-event callback where that is not supported) and unpacked in one pass
(collector/probes/decode.py). The connection map is read with BPF_MAP_LOOKUP_BATCH
(kernel/bpf/hashtab.c htab_map_lookup_batch) into one buffer, decoded the same way. A second,
small ring buffer (`procs`) announces each new (pid, comm) owning a socket, at once.

The program text is socket.bpf.c preceded by `#define`s for every constant (`program_text`),
so `eastwest collector --print-bpf` prints exactly what is compiled. bcc attaches the
TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE functions by their names.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector import bpfload
from collector.probes.btf import KernelOffsets, UdpOffsets
from collector.probes.conn import STAT_NAMES, ConnState
from collector.probes.decode import ConnDecoder
from collector.probes.ring import RingReader, Wakeups
from collector.probes.ring import supported as ring_supported
from collector.probes.sizing import hash_map_bytes
from collector.probes.udpflow import UdpState
from collector.probes.udpflow import decode as udp_decode
from collector.probes.udpflow import decode_many as udp_decode_many
from eastwest.errors import CapabilityError

BPF_FILE = Path(__file__).with_name("socket.bpf.c")
UDP_BPF_FILE = Path(__file__).with_name("udp.bpf.c")
UDP_KEY_BYTES, UDP_VALUE_BYTES, UDP_CALL_BYTES = 40, 104, 32  # udp.bpf.c structs
CONN_VALUE_BYTES = 144  # sizeof(struct conn_t); checked against bcc's ctypes at load
RINGBUF_RECORD_BYTES = 8 + 8 + CONN_VALUE_BYTES  # ring header + struct close_event_t
PROC_EVENT_BYTES = 24  # sizeof(struct proc_event_t)
DECODE_CHUNK = 4096  # map entries decoded at a time
log = logging.getLogger("eastwest.collector.probes")


@dataclass(frozen=True)
class ProbeConfig:
    conn_entries: int = 65536
    listen_entries: int = 4096
    ringbuf_pages: int = 1024  # 4 MiB: ~26,000 close events, a second of a storm's closes
    overflow_entries: int = 8192  # final states parked while the ring buffer is full
    netns: tuple[int, ...] = ()  # empty: every namespace
    hooks: frozenset[str] = field(default_factory=lambda: frozenset(
        {"bytes", "retransmit", "resets", "rtt", "destroy", "udp"}))
    wakeup_every: int = 0  # close events per CPU between reader wake-ups; 0: from the ring size
    procs_seen_entries: int = 8192  # (pid, comm) pairs already announced (LRU)
    proc_ringbuf_pages: int = 4  # 16 KiB: ~500 new processes between two polls
    udp_entries: int = 65536  # UDP flows (socket + peer)
    udp_call_entries: int = 16384  # threads inside a send/recv syscall at once
    udp_mmsg_max: int = 64  # recvmmsg messages read per call (the rest counted: udp_mmsg_over)

    def udp(self) -> bool:
        """UDP flows need the byte hooks too: sock_send_length / sock_recv_length see them."""
        return "udp" in self.hooks and "bytes" in self.hooks

    def wakeup_threshold(self, cpus: int | None = None) -> int:
        """Events per CPU between wake-ups: a quarter of the ring shared by every CPU, so the
        ring is at most ~1/4 full when the reader is woken (it also polls every 0.2 s)."""
        if self.wakeup_every:
            return self.wakeup_every
        cpus = cpus or os.cpu_count() or 1
        capacity = self.ringbuf_pages * 4096 // RINGBUF_RECORD_BYTES
        return max(1, min(1024, capacity // (4 * cpus)))

    def map_memory(self) -> list[tuple[str, int, int]]:
        """(map, entries, bytes) of the preallocated kernel memory of every map and ring buffer,
        as the kernel counts it (collector/probes/sizing.py); UDP's maps only when on."""
        out = [("conns", self.conn_entries, hash_map_bytes(self.conn_entries, 8, CONN_VALUE_BYTES)),
               ("overflow", self.overflow_entries,
                hash_map_bytes(self.overflow_entries, 16, CONN_VALUE_BYTES)),
               ("listeners", self.listen_entries, hash_map_bytes(self.listen_entries, 8, 32)),
               ("procs_seen", self.procs_seen_entries,
                hash_map_bytes(self.procs_seen_entries, 20, 1, lru=True)),
               ("events (ring)", self.ringbuf_pages * 4096, self.ringbuf_pages * 4096),
               ("procs (ring)", self.proc_ringbuf_pages * 4096, self.proc_ringbuf_pages * 4096)]
        if self.udp():
            out += [("udp_flows", self.udp_entries,
                     hash_map_bytes(self.udp_entries, UDP_KEY_BYTES, UDP_VALUE_BYTES)),
                    ("udp_calls", self.udp_call_entries,
                     hash_map_bytes(self.udp_call_entries, 8, UDP_CALL_BYTES))]
        return out

    def map_memory_bytes(self) -> int:
        """Preallocated kernel memory of the maps and the ring buffers."""
        return sum(b for _, _, b in self.map_memory())


# kernel memory of one `conns` entry and one `udp_flows` entry together (sizing.choose)
ENTRY_PAIR_BYTES = (hash_map_bytes(1 << 16, 8, CONN_VALUE_BYTES, cpus=0)
                    + hash_map_bytes(1 << 16, UDP_KEY_BYTES, UDP_VALUE_BYTES, cpus=0)) >> 16


def program_text(offsets: KernelOffsets | None, cfg: ProbeConfig,
                 udp: UdpOffsets | None = None) -> str:
    """socket.bpf.c (and udp.bpf.c when UDP flows are on and `udp` offsets are known) with
    their compile-time constants as #define lines on top."""
    with_udp = cfg.udp() and udp is not None
    consts = {
        "CONN_ENTRIES": cfg.conn_entries, "OVERFLOW_ENTRIES": cfg.overflow_entries,
        "LISTEN_ENTRIES": cfg.listen_entries,
        "RINGBUF_PAGES": cfg.ringbuf_pages, "FILTER_NETNS": int(bool(cfg.netns)),
        "HAVE_BYTES": int("bytes" in cfg.hooks), "HAVE_RETRANSMIT": int("retransmit" in cfg.hooks),
        "HAVE_RESETS": int("resets" in cfg.hooks), "HAVE_RTT": int("rtt" in cfg.hooks),
        "HAVE_DESTROY": int("destroy" in cfg.hooks), "WAKEUP_EVERY": cfg.wakeup_threshold(),
        "PROCS_SEEN_ENTRIES": cfg.procs_seen_entries, "PROC_RINGBUF_PAGES": cfg.proc_ringbuf_pages,
        "HAVE_UDP": int(with_udp),
    }
    if with_udp and udp is not None:
        consts.update({"UDP_ENTRIES": cfg.udp_entries, "UDP_CALL_ENTRIES": cfg.udp_call_entries,
                       "UDP_MMSG_MAX": cfg.udp_mmsg_max, **udp.defines()})
    if offsets is not None:
        consts.update({"OFF_SK_NET": offsets.sk_net, "OFF_NET_NS_INUM": offsets.net_ns_inum,
                       "OFF_SK_ERR": offsets.sk_err, "OFF_TCP_SRTT_US": offsets.tcp_srtt_us})
    head = "// constants for this kernel and these settings (offsets from BTF)\n"
    head += "".join(f"#define {k} {v}\n" for k, v in consts.items())
    text = head + "\n" + BPF_FILE.read_text()
    if with_udp:
        text += "\n" + UDP_BPF_FILE.read_text()
    return text


class UdpBatch:
    """The entries of one batch read of `udp_flows`: sized; each iteration decodes them from
    the raw bytes (the states of 200,000 flows are not all kept)."""

    def __init__(self, key: Any, leaf: Any, keys: bytes, values: bytes, n: int) -> None:
        self.key, self.leaf, self.keys, self.values, self.n = key, leaf, keys, values, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[UdpState]:
        if not self.n:
            return
        for i in range(0, self.n, DECODE_CHUNK):
            yield from udp_decode_many(self.key, self.leaf, self.keys, self.values, i,
                                       min(self.n, i + DECODE_CHUNK))


class BccKernel:
    """The compiled, attached program. Not thread-safe: one source thread owns it."""

    def __init__(self, offsets: KernelOffsets, cfg: ProbeConfig,
                 listeners: list[tuple[int, int, int, str, int]] | None = None,
                 on_process: Callable[[int, str], object] | None = None,
                 udp: UdpOffsets | None = None) -> None:
        """`on_process(pid, comm)` is called, from `poll`, when a process owns a socket for the
        first time (before the close events of the same poll are decoded)."""
        self.cfg = cfg
        try:  # compiled in a child process: the compiler's memory is not kept (bpfload.py)
            self.bpf = bpfload.load(program_text(offsets, cfg, udp), "the socket probes")
        except bpfload.LoadError as exc:
            raise CapabilityError(str(exc)) from exc
        conns = self.bpf["conns"]
        if ct.sizeof(conns.Leaf) != CONN_VALUE_BYTES:
            log.warning("struct conn_t is %d bytes, map memory estimate assumes %d",
                        ct.sizeof(conns.Leaf), CONN_VALUE_BYTES)
        self._conns = conns
        self._overflow = self.bpf["overflow"]
        self._overflowed = 0  # close_overflowed count at the last drain of `overflow`

        class CloseEvent(ct.Structure):  # struct close_event_t, built on bcc's conn_t
            _fields_ = [("sk", ct.c_uint64), ("conn", conns.Leaf)]

        self.decoder = ConnDecoder(conns.Leaf, CloseEvent)
        self._stats = self.bpf["stats"]
        if cfg.netns:
            allow = self.bpf["netns_allow"]
            for inode in cfg.netns:
                allow[allow.Key(inode)] = allow.Leaf(1)
        self._seed_listeners(listeners or [])
        self._on_process = on_process
        self._chunks: list[bytes] = []
        self.bad_events = 0  # events of an unexpected size (none are sent: a defensive count)
        events, procs = self.bpf["events"], self.bpf["procs"]
        self.bpf.open_ring_buffer("procs", self._on_proc)  # few events: libbpf's consumer
        self._reader: RingReader | None = None
        self._wakeups: Wakeups | None = None
        if ring_supported():
            try:
                self._reader = RingReader(events.map_fd, events.max_entries,
                                          self.decoder.event_size)
                self._wakeups = Wakeups()
                self._wakeups.watch(events.map_fd)
                self._wakeups.watch(procs.map_fd)
            except (OSError, ValueError) as exc:
                log.info("ring buffer not mappable (%s): per-event callbacks instead", exc)
                if self._reader is not None:
                    self._reader.close()
                self._reader = self._wakeups = None
        if self._reader is None:
            self.bpf.open_ring_buffer("events", self._on_event)
        self._batch_ok = True
        self.udp_enabled = cfg.udp() and udp is not None
        self._udp = self.bpf["udp_flows"] if self.udp_enabled else None

    def _seed_listeners(self, listeners: list[tuple[int, int, int, str, int]]) -> None:
        """Owners of listeners that existed before the probes: (netns, port, pid, comm, cgroup)."""
        table = self.bpf["listeners"]
        for netns, port, pid, comm, cgroup_id in listeners:
            key = table.Key(netns, port)
            leaf = table.Leaf()
            leaf.pid, leaf.cgroup_id = pid, cgroup_id
            leaf.comm = comm.encode()[:15]
            try:
                table[key] = leaf
            except Exception:  # noqa: BLE001 - a full map: the listener stays unknown
                log.warning("listener map full: owner of port %d in netns %d unknown", port, netns)

    def _on_proc(self, _ctx: object, data: int, size: int) -> int:
        if size == PROC_EVENT_BYTES and self._on_process is not None:
            pid, _, comm = struct.unpack("=II16s", ct.string_at(data, size))
            self._on_process(pid, comm.split(b"\0", 1)[0].decode("utf-8", "replace"))
        return 0

    def _on_event(self, _ctx: object, data: int, size: int) -> int:
        # libbpf's consumer (architectures without RingReader): copy, decode later in bulk
        if size == self.decoder.event_size:
            self._chunks.append(ct.string_at(data, size))
        else:
            self.bad_events += 1
        return 0

    def poll(self, timeout_s: float) -> list[ConnState]:
        # Sleeps until a forced wake-up (a new process, or the ring filling up) or the timeout,
        # then takes everything there is: close events do not wake the reader one by one.
        if self._reader is not None and self._wakeups is not None:
            self._wakeups.wait(timeout_s)
            self.bpf.ring_buffer_consume()  # process announcements first
            none: list[ConnState] = []
            states = self._reader.consume(self.decoder.ring_records, none)
            self.bad_events = self._reader.skipped
        else:
            self.bpf.ring_buffer_poll(max(0, int(timeout_s * 1000)))
            self.bpf.ring_buffer_consume()
            chunks, self._chunks = self._chunks, []
            states = self.decoder.events(b"".join(chunks)) if chunks else []
        return states + self._parked()

    def _parked(self) -> list[ConnState]:
        """Final states the kernel parked in `overflow` (ring buffer full), taken out of it.
        Looked for only when the kernel counted new ones: one map lookup per poll otherwise."""
        overflowed = self._stat(STAT_NAMES.index("close_overflowed"))
        if overflowed == self._overflowed:
            return []
        self._overflowed = overflowed
        keys, values, n = self._overflow.batch(delete=True)
        sks = memoryview(keys).cast("Q")[:2 * n:2].tolist()  # (sk, start_ns) -> sk
        return self.decoder.entries(sks, memoryview(values)[:n * self.decoder.leaf_size])

    def _stat(self, index: int) -> int:
        return self._stats.percpu_sum(index)

    def live(self) -> Iterator[ConnState]:
        """Every entry of the connection map, read in one batch and decoded DECODE_CHUNK at a
        time as it is iterated (decoding goes through one Python list per field: for 200,000
        entries at once that alone would be ~200 MB)."""
        if self._batch_ok:
            try:
                keys, values, n = self._conns.batch(delete=False)
            except OSError as exc:  # old kernels: no batch ops on hash maps; iterate instead
                log.info("batch map lookup unavailable (%s); iterating", exc)
                self._batch_ok = False
            else:
                sks = memoryview(keys).cast("Q")
                size = self.decoder.leaf_size
                for i in range(0, n, DECODE_CHUNK):
                    j = min(n, i + DECODE_CHUNK)
                    yield from self.decoder.entries(sks[i:j].tolist(),
                                                    memoryview(values)[i * size:j * size])
                return
        items = self._conns.items()
        yield from self.decoder.entries([k.value for k, _ in items],
                                        b"".join(bytes(v) for _, v in items))

    def udp_flows(self) -> UdpBatch:
        """Every UDP flow of the map, read in one batch (item by item where batches are
        missing), decoded anew at each iteration."""
        table = self._udp
        if table is None:
            return UdpBatch(None, None, b"", b"", 0)
        try:
            kb, vb, n = table.batch(delete=False)
        except OSError:
            items = table.items()
            kb, vb, n = b"".join(bytes(k) for k, _ in items), \
                b"".join(bytes(v) for _, v in items), len(items)
        return UdpBatch(table.Key, table.Leaf, kb, vb, n)

    def udp_end(self, states: list[UdpState]) -> list[UdpState]:
        """Each flow's final counters, taken out of the map by BPF_MAP_LOOKUP_AND_DELETE_ELEM
        (kernel/bpf/syscall.c map_lookup_and_delete_elem, hash maps since 5.14): a datagram
        counted between the read and the delete is in the value returned, never lost."""
        table = self._udp
        if table is None:
            return []
        out: list[UdpState] = []
        for s in states:
            value = table.lookup_and_delete(table.Key.from_buffer_copy(s.key))
            if value is not None:
                out.append(udp_decode(table.Key, table.Leaf, s.key, bytes(value)))
        return out

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
        out = {name: self._stat(i) for i, name in enumerate(STAT_NAMES)}
        out["bad_event_size"] = self.bad_events
        return out

    def close(self) -> None:
        if self._reader is not None and self._wakeups is not None:
            self._wakeups.close()
            self._reader.close()
        self.bpf.close()
