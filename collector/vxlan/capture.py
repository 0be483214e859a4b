"""Live capture: one AF_PACKET socket per interface, with a classic BPF kernel filter.

Stage: input of `LiveVxlanSource`. In: an interface name, optionally inside a network namespace
(`NETNS/IF`), and the UDP ports to keep (None: every packet, for `--wire-interface`). Out:
blocks of packets (one bytearray, offsets, lengths, times) ready for the bulk decoder, the
interface's link type, and the kernel's drop counter.

The filter (packet(7), SO_ATTACH_FILTER; classic BPF as in linux/filter.h) keeps only UDP to the
tunnel ports (VXLAN, Geneve and VXLAN-GPE, as configured) over IPv4 (first fragments) or IPv6
without extension headers, and every VLAN-tagged frame (the decoder sorts those out): everything
else never reaches user space. A wire interface has no filter: plain traffic is its business.
The link type follows the device (packet(7) `sll_hatype`): Ethernet and loopback devices give
Ethernet frames, devices without a link header (tun, WireGuard, IP tunnels) raw IP. A socket in another namespace is
opened there (setns(2) through ctypes; Python 3.11 has no os.setns) and stays bound to its
interface after the thread returns to its own namespace. With the native helper the packets
arrive in a TPACKET_V3 receive ring (packet(7) PACKET_RX_RING, as libpcap reads them), copied
into the block by one C call per wake-up, with the kernel's receive times; else recv per packet.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from collector.rcvbuf import set_receive_buffer
from collector.vxlan import native
from eastwest.errors import CaptureError, ConfigError

log = logging.getLogger("eastwest.collector.vxlan")

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SOL_PACKET = 263
PACKET_STATISTICS = 6
CLONE_NEWNET = 0x40000000
SNAP = 65535
MAX_BLOCK_PACKETS = 65536
# the receive ring (native helper): 64 blocks of 1 MiB, a block handed over when full or after
# 8 ms (tcpdump's default is 2 MiB in all). It must hold what arrives while the thread decodes a
# block (up to 65,536 packets, ~70 ms unloaded) or is not scheduled: ~0.4 s at 300k packets/s.
RING_BLOCK, RING_BLOCKS, RING_TIMEOUT_MS = 1 << 20, 64, 8

# classic BPF opcodes (linux/bpf_common.h)
LDH_ABS, LDB_ABS, LDH_IND, LDXB_MSH = 0x28, 0x30, 0x48, 0xB1
JEQ, JSET, RET = 0x15, 0x45, 0x06


def kernel_filter(ports: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """The classic BPF program (code, jt, jf, k) that keeps UDP to `ports` (see module doc)."""
    keep = sorted(set(ports))
    prog: list[tuple[Any, ...]] = [  # instructions, and ("label",) marks
        (LDH_ABS, None, None, 12),
        (JEQ, "accept", None, 0x8100), (JEQ, "accept", None, 0x88A8),
        (JEQ, "v6", None, 0x86DD), (JEQ, None, "reject", 0x0800),
        (LDB_ABS, None, None, 23), (JEQ, None, "reject", 17),
        (LDH_ABS, None, None, 20), (JSET, "reject", None, 0x1FFF),
        (LDXB_MSH, None, None, 14), (LDH_IND, None, None, 16), (0, "ports", None, 0),
        ("v6",), (LDB_ABS, None, None, 20), (JEQ, None, "reject", 17),
        (LDH_ABS, None, None, 56), ("ports",),
    ]
    prog += [(JEQ, "accept", None, p) for p in keep]
    prog += [("reject",), (RET, None, None, 0), ("accept",), (RET, None, None, SNAP)]
    labels: dict[str, int] = {}
    real: list[tuple[int, object, object, int]] = []
    for ins in prog:
        if len(ins) == 1:
            labels[ins[0]] = len(real)  # type: ignore[index]
        else:
            real.append(ins)  # type: ignore[arg-type]
    out = []
    for i, (code, jt, jf, k) in enumerate(real):
        if code == 0:  # unconditional jump (BPF_JMP|BPF_JA)
            out.append((0x05, 0, 0, labels[str(jt)] - i - 1))
            continue
        t = labels[str(jt)] - i - 1 if jt else 0
        f = labels[str(jf)] - i - 1 if jf else 0
        out.append((code, t, f, k))
    return out


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise CaptureError(what, f"setns failed: {os.strerror(err)}")


@contextmanager
def in_netns(netns: str | None, spec: str) -> Iterator[None]:
    """The body runs in network namespace `netns` (a name under /run/netns, or a path; None:
    where it is), this thread only, and the thread comes back after it. Errors name `spec`."""
    if not netns:
        yield
        return
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    try:
        target = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CaptureError(spec, f"no network namespace {path}: {exc.strerror}") from exc
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target, spec)
    except CaptureError:
        os.close(own)
        raise
    finally:
        os.close(target)
    try:
        yield
    finally:
        _setns(own, "root namespace")
        os.close(own)


def attach_filter(sock: socket.socket, code: list[tuple[int, int, int, int]]) -> ctypes.Array:
    """Attach classic BPF `code` to `sock`; the program's buffer, which the caller keeps."""
    raw = b"".join(struct.pack("HBBI", *ins) for ins in code)
    prog = ctypes.create_string_buffer(raw)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(code), ctypes.addressof(prog)))
    return prog


@dataclass
class Block:
    """Packets received since the last block: one buffer, per-packet offset/length/time."""

    buf: np.ndarray
    off: np.ndarray
    cap: np.ndarray
    ts_us: np.ndarray
    # buf is a run of pcap records (16-byte header in host byte order, µs, then the frame at
    # off[i]): the native scan reads it as a capture (scan.scan_block)
    pcap: bool = False


# ARPHRD_* (linux/if_arp.h) -> the link type of the frames a SOCK_RAW packet socket reads
ARPHRD_LINKTYPES = {1: 1, 772: 1,  # Ethernet, loopback (a zeroed Ethernet header)
                    0xFFFE: 101, 519: 101, 768: 101, 769: 101, 776: 101}  # none, rawip, tunnels


class UnderlayCapture:
    """An AF_PACKET socket on one interface (`IF` or `NETNS/IF`), filtered in the kernel to UDP
    to `ports` (None: unfiltered). `flag` names the option the interface came from."""

    def __init__(self, spec: str, ports: tuple[int, ...] | None, buffer_bytes: int = 32 << 20,
                 flag: str = "--underlay") -> None:
        self.spec, self.flag = spec, flag
        netns, _, ifname = spec.rpartition("/")
        if not ifname:
            raise ConfigError(flag, spec, "expected IF or NETNS/IF")
        # with the native helper, packets arrive in a TPACKET_V3 ring and one C call per
        # wake-up copies them into the block (ewvxlan_recv.c); if the kernel refuses the ring,
        # one C call drains the socket with recv; without the helper, a Python recv_into loop
        # fills lists (the same block, slower)
        self._lib = native.load()
        self._ring = None
        self.sock = self._open(netns, ifname, ports)
        self.sock.setblocking(False)
        self._buf = bytearray(buffer_bytes)
        self._view = memoryview(self._buf)
        if self._lib is not None:
            self._cols = [np.empty(MAX_BLOCK_PACKETS, dtype=np.int64) for _ in range(3)]
            self._ptrs = [c.ctypes.data for c in self._cols]
            self._addr = ctypes.addressof((ctypes.c_char * len(self._buf)).from_buffer(self._buf))
            self._cpos, self._cn = ctypes.c_int64(0), ctypes.c_int64(0)
        self._reset()
        self.kernel_drops = 0

    def _open(self, netns: str, ifname: str, ports: tuple[int, ...] | None) -> socket.socket:
        with in_netns(netns, self.spec):
            try:
                # protocol 0: no packet reaches the socket before bind, so none from another
                # interface, none unfiltered, none outside the ring
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                if ports is not None:
                    self._prog = attach_filter(sock, kernel_filter(ports))
                if self._lib is not None:
                    err = ctypes.c_int(0)
                    self._ring = self._lib.ew_ring_new(sock.fileno(), RING_BLOCK, RING_BLOCKS,
                                                       RING_TIMEOUT_MS, ctypes.byref(err))
                    if not self._ring:
                        log.info("%s: no TPACKET_V3 ring (%s), reading with recv", self.spec,
                                 os.strerror(err.value))
                if not self._ring:
                    set_receive_buffer(sock, 64 << 20)
                sock.bind((ifname, ETH_P_ALL))
                hatype = sock.getsockname()[3]
            except OSError as exc:
                raise CaptureError(self.spec, f"cannot capture: {exc.strerror or exc}") from exc
        if hatype not in ARPHRD_LINKTYPES:
            self.close_socket(sock)
            raise CaptureError(self.spec, f"link type ARPHRD {hatype} is not decoded (Ethernet, "
                               "loopback and devices without a link header are)")
        self.linktype = ARPHRD_LINKTYPES[hatype]
        return sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def _reset(self) -> None:
        self._pos = 0
        if self._lib is not None:
            self._cpos.value = self._cn.value = 0
        self._off: list[int] = []
        self._cap: list[int] = []
        self._ts: list[int] = []

    def drain(self, max_packets: int = 65536) -> bool:
        """Read what the socket holds (non-blocking); True when the block is full."""
        if self._ring:
            off, cap, ts = self._ptrs
            return self._lib.ew_ring_drain(self._ring, self._addr, len(self._buf), self._cpos,
                                           off, cap, ts, self._cn,
                                           min(max_packets, MAX_BLOCK_PACKETS), 1) == 1
        if self._lib is not None:
            off, cap, ts = self._ptrs
            rc = self._lib.ew_recv_drain(self.sock.fileno(), self._addr, len(self._buf),
                                         self._cpos, off, cap, ts, self._cn,
                                         min(max_packets, MAX_BLOCK_PACKETS), SNAP, 1)
            if rc < 0:
                raise CaptureError(self.spec, f"recv failed: {os.strerror(-rc)}")
            return rc == 1
        recv_into, view = self.sock.recv_into, self._view
        size = len(self._buf)
        while len(self._off) < max_packets and size - self._pos >= SNAP:
            try:
                n = recv_into(view[self._pos:self._pos + SNAP])
            except BlockingIOError:
                return False
            self._off.append(self._pos)
            self._cap.append(n)
            self._ts.append(time.time_ns() // 1000)
            self._pos += n
        return True

    def take(self) -> Block:
        """The packets read so far (copied out), and a fresh block."""
        if self._lib is not None:
            n, pos = self._cn.value, self._cpos.value
            off, cap, ts = (c[:n].copy() for c in self._cols)
            block = Block(np.frombuffer(bytes(self._view[:pos]) or b"\0", dtype=np.uint8),
                          off, cap, ts, pcap=True)
            self._reset()
            return block
        block = Block(np.frombuffer(bytes(self._view[:self._pos]) or b"\0", dtype=np.uint8),
                      np.asarray(self._off, dtype=np.int64), np.asarray(self._cap, dtype=np.int64),
                      np.asarray(self._ts, dtype=np.int64))
        self._reset()
        return block

    def read_kernel_drops(self) -> int:
        """Packets the kernel dropped since the last call (PACKET_STATISTICS resets on read)."""
        _, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.kernel_drops += drops
        return drops

    def close(self) -> None:
        self.close_socket(self.sock)

    def close_socket(self, sock: socket.socket) -> None:
        if self._ring:
            self._lib.ew_ring_free(self._ring)
            self._ring = None
        sock.close()
