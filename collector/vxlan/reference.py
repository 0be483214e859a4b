"""The reference VXLAN decoder: scapy, one packet at a time.

Stage: decoder (`--decoder scapy`, and the bulk path's fallback for layouts it does not
vectorize: IPv6 extension headers, more than two VLAN tags). In: one Ethernet frame (bytes).
Out: `(status, row)`, the row being the columns of `packets.Decoded` for that packet.

Every header is read by scapy's own layer (`Ether`, `Dot1Q`, `IP`, `IPv6` and its extension
headers, `UDP`, `VXLAN`, `TCP`, `ICMP`), each dissected from the bytes at its offset, so a
truncated or odd packet never makes scapy guess the next layer. The policy (order of checks,
drop reasons) is the one written in `packets.py`. About 2,000 packets/s: right for few packets,
wrong for an underlay.

VXLAN (RFC 7348): scapy's `VXLAN` layer also knows VXLAN-GPE and Group Policy, whose flag bits
move the VNI; on a VXLAN port RFC 7348 says reserved bits are ignored, so the flag byte is
handed to scapy with only the I bit kept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import numpy as np
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6Unknown,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1Q, Dot3, Ether
from scapy.layers.vxlan import VXLAN

from collector.vxlan.packets import (
    CODE,
    ETH_IP4,
    ETH_IP6,
    ETH_VLAN,
    FALLBACK,
    GENEVE_PORT,
    IP6_FRAGMENT,
    OK,
    VXLAN_GPE_PORT,
    Decoded,
    is_icmp,
    split128,
)
from collector.vxlan.packets import ICMP as ICMP4
from collector.vxlan.packets import TCP as TCP_P
from collector.vxlan.packets import UDP as UDP_P

_EXT = {0: IPv6ExtHdrHopByHop, 43: IPv6ExtHdrRouting, 60: IPv6ExtHdrDestOpt}


class _Drop(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _addr(text: str) -> tuple[int, int]:
    return split128(int(ipaddress.ip_address(text)))


def decode_one(raw: bytes, ports: Iterable[int]) -> tuple[int, dict[str, int]]:
    """Decode one frame; (status code, columns). Never raises for any input bytes."""
    try:
        return OK, _decode(raw, frozenset(ports))
    except _Drop as drop:
        return CODE[drop.reason], {}


def _need(raw: bytes, end: int) -> None:
    if end > len(raw):
        raise _Drop("truncated")


def _l2(raw: bytes, p: int) -> tuple[int, int]:
    """Ethernet + any number of 802.1Q/802.1ad tags at p -> (EtherType, offset of L3)."""
    _need(raw, p + 14)
    eth = Ether(raw[p:p + 14])  # scapy dispatches an 802.3 length (<= 1500) to Dot3
    et = eth.len if isinstance(eth, Dot3) else eth.type
    p += 14
    while et in ETH_VLAN:
        _need(raw, p + 4)
        et = Dot1Q(raw[p:p + 4]).type
        p += 4
    return et, p


def _ip(raw: bytes, et: int, p: int, non_ip: str) -> dict[str, Any]:  # ints; src/dst: (hi, lo)
    """IPv4/IPv6 header at p -> family, addresses, protocol, L4 offset, L4 room, L3 length."""
    if et == ETH_IP4:
        _need(raw, p + 20)
        ip = IP(raw[p:p + 20])
        if ip.version != 4 or ip.ihl < 5:
            raise _Drop("malformed")
        ihl = ip.ihl * 4
        if ip.len < ihl:
            raise _Drop("malformed")
        _need(raw, p + ihl)
        if (int(ip.flags) & 1) or ip.frag:
            raise _Drop("fragment")
        src, dst = _addr(ip.src), _addr(ip.dst)
        return {"fam": 4, "src": src, "dst": dst, "proto": ip.proto, "l4": p + ihl,
                "room": ip.len - ihl, "l3len": ip.len}
    if et == ETH_IP6:
        _need(raw, p + 40)
        ip6 = IPv6(raw[p:p + 40])
        if ip6.version != 6:
            raise _Drop("malformed")
        nh, q, room = ip6.nh, p + 40, ip6.plen
        while nh in _EXT:
            _need(raw, q + 8)
            ext = _EXT[nh](raw[q:q + 8])
            size = (ext.len + 1) * 8
            room -= size
            if room < 0:
                raise _Drop("malformed")
            nh, q = ext.nh, q + size
        if nh == IP6_FRAGMENT:
            raise _Drop("fragment")
        return {"fam": 6, "src": _addr(ip6.src), "dst": _addr(ip6.dst), "proto": nh, "l4": q,
                "room": room, "l3len": 40 + ip6.plen}
    raise _Drop(non_ip)


def _decode(raw: bytes, ports: frozenset[int]) -> dict[str, int]:
    et, p = _l2(raw, 0)
    outer = _ip(raw, et, p, "not_vxlan")
    if outer["proto"] != UDP_P:
        raise _Drop("not_vxlan")
    u = outer["l4"]
    _need(raw, u + 8)
    dport = UDP(raw[u:u + 8]).dport
    if dport not in ports:
        if dport == GENEVE_PORT:
            raise _Drop("unsupported_geneve")
        if dport == VXLAN_GPE_PORT:
            raise _Drop("unsupported_vxlan_gpe")
        raise _Drop("not_vxlan")
    _need(raw, u + 16)
    hdr = raw[u + 8:u + 16]
    vx = VXLAN(bytes([hdr[0] & 0x08]) + hdr[1:])  # RFC 7348: reserved bits ignored
    if not int(vx.flags) & 0x08:
        raise _Drop("vxlan_no_vni")
    et, p = _l2(raw, u + 16)
    inner = _ip(raw, et, p, "inner_non_ip")
    fam, proto, l4, room = inner["fam"], inner["proto"], inner["l4"], inner["room"]
    sport = dport_in = flags = 0
    icmp_type = -1
    if proto == TCP_P:
        _need(raw, l4 + 20)
        tcp = TCP(raw[l4:l4 + 20])
        if tcp.dataofs < 5 or room < tcp.dataofs * 4:
            raise _Drop("malformed")
        hdr_len, sport, dport_in, flags = tcp.dataofs * 4, tcp.sport, tcp.dport, int(tcp.flags)
    elif proto == UDP_P:
        _need(raw, l4 + 8)
        if room < 8:
            raise _Drop("malformed")
        udp = UDP(raw[l4:l4 + 8])
        hdr_len, sport, dport_in = 8, udp.sport, udp.dport
    elif is_icmp(fam, proto):
        _need(raw, l4 + 8)
        if room < 8:
            raise _Drop("malformed")
        icmp = ICMP(raw[l4:l4 + 8]) if proto == ICMP4 else ICMPv6Unknown(raw[l4:l4 + 8])
        hdr_len, icmp_type = 8, icmp.type
    else:
        hdr_len = 0
    return {"vni": vx.vni, "ofam": outer["fam"], "osrc_hi": outer["src"][0],
            "osrc_lo": outer["src"][1], "odst_hi": outer["dst"][0], "odst_lo": outer["dst"][1],
            "odport": dport, "fam": fam, "src_hi": inner["src"][0], "src_lo": inner["src"][1],
            "dst_hi": inner["dst"][0], "dst_lo": inner["dst"][1], "proto": proto,
            "sport": sport, "dport": dport_in, "flags": flags & 0xFF, "icmp_type": icmp_type,
            "payload": room - hdr_len, "l3len": inner["l3len"]}


def decode_reference(frames: list[bytes], ts_us: np.ndarray, ports: Iterable[int],
                     linktypes: np.ndarray | None = None) -> Decoded:
    """Decode every frame with scapy into columns (the `--decoder scapy` path)."""
    ports = frozenset(ports)
    out = Decoded.empty(len(frames))
    out.ts_us[:] = ts_us
    for i, raw in enumerate(frames):
        if linktypes is not None and linktypes[i] != 1:
            out.status[i] = CODE["unsupported_linktype"]
            continue
        status, row = decode_one(raw, ports)
        out.status[i] = status
        if status == OK:
            out.set_row(i, row)
    assert not (out.status == FALLBACK).any()
    return out
