"""DNS capture: one packet socket per watched network namespace, filtered in the kernel to port 53.

Stage: input of `DnsSource`. In: a namespace (`NETNS`: every interface of it) or one interface
(`NETNS/IF`, or `/IF` in the collector's own namespace).  Out: DNS packets as the CLIENT's
namespace saw them: (time, protocol, family, src, sport, dst, dport, payload).

The socket (packet(7), SOCK_DGRAM: frames without their link header, any link type) carries a
classic BPF filter that keeps UDP and TCP with source or destination port 53 over IPv4 (first
fragments) and IPv6 without extension headers; the loads are relative to the network header
(SKF_NET_OFF, linux/filter.h), so one program serves Ethernet, loopback and raw-IP devices alike.

Each exchange is kept once, where its client lives: a query the namespace SENT (PACKET_OUTGOING)
from one of its own addresses, a response it RECEIVED (PACKET_HOST) for one of its own addresses.
So a host namespace that only bridges or routes its pods' DNS (veths, a bridge, a VXLAN device
that all carry the same packet) adds nothing, and a collector watching both the client's and the
resolver's namespaces reports each exchange once. The namespace's addresses are read over
netlink at start and every `ADDRESS_REFRESH_S`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator

from collector.rcvbuf import set_receive_buffer
from collector.vxlan.capture import attach_filter, in_netns
from eastwest.errors import CaptureError, ConfigError

ETH_P_ALL = 0x0003
PACKET_HOST, PACKET_OUTGOING = 0, 4
SKF_AD_PROTOCOL = -0x1000 + 0
SKF_NET_OFF = -0x100000
ADDRESS_REFRESH_S = 10.0
SNAP = 65535
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (SO_TIMESTAMPNS_OLD: a struct timespec of longs)
_TIMESPEC = struct.Struct("@ll")

# classic BPF (linux/bpf_common.h)
LD_H_ABS, LD_B_ABS, LD_H_IND = 0x28, 0x30, 0x48
ALU_AND_K, ALU_LSH_K, MISC_TAX = 0x54, 0x64, 0x07
JEQ, JSET, RET = 0x15, 0x45, 0x06


def dns_filter(port: int = 53) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k): keep UDP/TCP from or to `port` (see the module doc)."""

    def net(k: int) -> int:  # a load relative to the network header
        return (SKF_NET_OFF + k) & 0xFFFFFFFF

    prog: list[tuple[object, ...]] = [  # instructions (code, jt, jf, k), and ("label",) marks
        (LD_H_ABS, None, None, SKF_AD_PROTOCOL & 0xFFFFFFFF),
        (JEQ, "v6", None, 0x86DD), (JEQ, None, "reject", 0x0800),
        (LD_B_ABS, None, None, net(9)), (JEQ, "v4l4", None, 17), (JEQ, None, "reject", 6),
        ("v4l4",), (LD_H_ABS, None, None, net(6)), (JSET, "reject", None, 0x1FFF),
        (LD_B_ABS, None, None, net(0)), (ALU_AND_K, None, None, 0x0F),
        (ALU_LSH_K, None, None, 2), (MISC_TAX, None, None, 0),  # X = IPv4 header length
        (LD_H_IND, None, None, net(0)), (JEQ, "accept", None, port),
        (LD_H_IND, None, None, net(2)), (JEQ, "accept", "reject", port),
        ("v6",), (LD_B_ABS, None, None, net(6)), (JEQ, "v6l4", None, 17),
        (JEQ, None, "reject", 6),
        ("v6l4",), (LD_H_ABS, None, None, net(40)), (JEQ, "accept", None, port),
        (LD_H_ABS, None, None, net(42)), (JEQ, "accept", "reject", port),
        ("reject",), (RET, None, None, 0), ("accept",), (RET, None, None, SNAP),
    ]
    labels: dict[object, int] = {}
    real: list[tuple[object, ...]] = []
    for ins in prog:
        if len(ins) == 1:
            labels[ins[0]] = len(real)
        else:
            real.append(ins)
    out = []
    for i, (code, jt, jf, k) in enumerate(real):
        out.append((int(code),  # type: ignore[call-overload]
                    labels[jt] - i - 1 if jt else 0, labels[jf] - i - 1 if jf else 0, int(k)))  # type: ignore[call-overload]
    return out


Packet = tuple[str, int, str, int, str, int, bytes]  # protocol, family, src, sport, dst, dport, payload


def decode(packet: bytes, proto: int) -> Packet | None:
    """A network-layer packet -> (protocol, family, src, sport, dst, dport, payload); None when
    it is no first fragment of IPv4/IPv6 UDP/TCP (the filter keeps those only)."""
    if proto == 0x0800 and len(packet) >= 20 and packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        total = int.from_bytes(packet[2:4], "big")
        l4, family = packet[9], 4
        src = socket.inet_ntop(socket.AF_INET, packet[12:16])
        dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
        body = packet[ihl:total]
    elif proto == 0x86DD and len(packet) >= 40 and packet[0] >> 4 == 6:
        l4, family = packet[6], 6
        src = str(ipaddress.IPv6Address(packet[8:24]))
        dst = str(ipaddress.IPv6Address(packet[24:40]))
        body = packet[40:40 + int.from_bytes(packet[4:6], "big")]
    else:
        return None
    if l4 == 17 and len(body) >= 8:
        return ("udp", family, src, int.from_bytes(body[0:2], "big"), dst,
                int.from_bytes(body[2:4], "big"), body[8:])
    if l4 == 6 and len(body) >= 20:
        doff = (body[12] >> 4) * 4
        return ("tcp", family, src, int.from_bytes(body[0:2], "big"), dst,
                int.from_bytes(body[2:4], "big"), body[doff:])
    return None


_libc = ctypes.CDLL(None, use_errno=True)


def _bind_all(sock: socket.socket) -> None:
    """bind(2) a packet socket to every interface: sockaddr_ll with ifindex 0 (packet(7))."""
    addr = struct.pack("HHiHBB8s", socket.AF_PACKET, socket.htons(ETH_P_ALL), 0, 0, 0, 0, b"")
    buf = ctypes.create_string_buffer(addr)
    if _libc.bind(sock.fileno(), buf, len(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def packet_time_us(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The SCM_TIMESTAMPNS of a received packet in µs since the epoch; the time now when the
    kernel gave none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            if sec > 0:
                return sec * 1_000_000 + nsec // 1000
    return time.time_ns() // 1000


class DnsCapture:
    """The packet socket of one namespace or interface (see the module doc)."""

    def __init__(self, spec: str, flag: str = "--dns") -> None:
        self.spec, self.flag = spec, flag
        netns, sep, ifname = spec.partition("/")
        if not spec or (sep and not ifname):  # NETNS, NETNS/IF, or /IF (this namespace's)
            raise ConfigError(flag, spec, "expected NETNS, NETNS/IF or /IF")
        self.netns = netns or None
        self.ifname = ifname or None
        self._prog: ctypes.Array[ctypes.c_char] | None = None
        with in_netns(self.netns, self.spec):
            self.sock = self._open()
        self.sock.setblocking(False)
        self.addresses: set[str] = set()
        self._addresses_at = -ADDRESS_REFRESH_S
        self.refresh_addresses()

    def _open(self) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            self._prog = attach_filter(sock, dns_filter())
            set_receive_buffer(sock, 4 << 20)  # past rmem_max: queued while we are busy
            # the kernel's time of each packet: a query and its answer read in one go (a busy
            # collector) keep the latency between them, not the time of the read
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            # protocol 0 until now: nothing arrived unfiltered. Bound to one interface, or
            # (ifindex 0, which Python's bind cannot name) to every interface of the namespace
            if self.ifname:
                sock.bind((self.ifname, ETH_P_ALL))
            else:
                _bind_all(sock)
        except OSError as exc:
            raise CaptureError(self.spec, f"cannot capture DNS: {exc.strerror or exc}") from exc
        return sock

    def refresh_addresses(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._addresses_at < ADDRESS_REFRESH_S:
            return
        self._addresses_at = now
        from pyroute2 import IPRoute

        def read() -> set[str]:
            with IPRoute() as ipr:
                return {str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
                        for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")}

        with in_netns(self.netns, self.spec):
            self.addresses = read()

    def fileno(self) -> int:
        return self.sock.fileno()

    def packets(self, max_packets: int = 4096) -> Iterator[tuple[int, Packet]]:
        """What the socket holds now (non-blocking): (time µs, decoded packet) of the client's
        view (the module doc). The time is the kernel's, when the packet passed the interface."""
        mine = self.addresses
        for _ in range(max_packets):
            try:
                data, anc, _, addr = self.sock.recvmsg(SNAP, 64)
            except BlockingIOError:
                return
            ts = packet_time_us(anc)
            pkttype = addr[2]
            d = decode(data, addr[1])
            if d is None:
                continue
            _, _, src, sport, dst, dport, _ = d
            if pkttype == PACKET_OUTGOING and dport == 53 and src in mine:
                yield ts, d
            elif pkttype == PACKET_HOST and sport == 53 and dst in mine:
                yield ts, d

    def close(self) -> None:
        self.sock.close()
