"""The reference wire decoder: scapy, one packet at a time.

Stage: decoder (`--decoder scapy`, and the bulk path's fallback for layouts it does not
vectorize: IPv6 extension headers, more than two VLAN tags). In: one frame (bytes), its link
type and the `packets.Policy`. Out: `(status, row)`, the row being the columns of
`packets.Decoded` for that packet.

Every header is read by scapy's own layer (`Ether`, `Dot1Q`, `CookedLinux`, `CookedLinuxV2`,
`IP`, `IPv6` and its extension headers, `UDP`, `VXLAN`, `GENEVE`, `TCP`, `ICMP`), each
dissected from the bytes at its offset, so a truncated or odd packet never makes scapy guess the
next layer. The policy (order of checks, drop reasons) is the one written in `packets.py`.
About 2,000 packets/s: right for few packets, wrong for an underlay.

VXLAN (RFC 7348): scapy's `VXLAN` layer also knows VXLAN-GPE and Group Policy, whose flag bits
move the VNI; on a VXLAN port RFC 7348 says reserved bits are ignored, so the flag byte is
handed to scapy with only the I bit kept; on a GPE port with only the GPE bits (I, P, version,
O) kept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import numpy as np
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Dot3, Ether
from scapy.layers.vxlan import VXLAN

from collector.vxlan.packets import (
    CODE,
    ETH_IP4,
    ETH_IP6,
    ETH_TEB,
    ETH_VLAN,
    FALLBACK,
    ICMP6_LINK_CONTROL,
    IP6_FRAGMENT,
    LINKTYPE_ETHERNET,
    LINKTYPE_SLL,
    LINKTYPE_SLL2,
    LINKTYPES_RAW,
    MAX_TUNNELS,
    OK,
    TT_GENEVE,
    TT_GPE,
    Decoded,
    Policy,
    as_policy,
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


def decode_one(raw: bytes, ports: Policy | Iterable[int],
               linktype: int = LINKTYPE_ETHERNET) -> tuple[int, dict[str, int]]:
    """Decode one frame; (status code, columns). Never raises for any input bytes."""
    policy = as_policy(ports)
    try:
        return OK, _decode(raw, linktype, policy.kinds(), policy.plain)
    except _Drop as drop:
        return CODE[drop.reason], {}


def _need(raw: bytes, end: int) -> None:
    if end > len(raw):
        raise _Drop("truncated")


def _l2(raw: bytes, p: int) -> tuple[int, int]:
    """Ethernet + any number of 802.1Q/802.1ad tags at p -> (EtherType, offset of L3)."""
    _need(raw, p + 14)
    eth = Ether(raw[p:p + 14])  # scapy dispatches an 802.3 length (<= 1500) to Dot3
    return _tags(raw, eth.len if isinstance(eth, Dot3) else eth.type, p + 14)


def _raw_ip(raw: bytes, p: int) -> tuple[int, int]:
    """No link header: the IP version nibble gives the EtherType."""
    _need(raw, p + 1)
    return {4: ETH_IP4, 6: ETH_IP6}.get(raw[p] >> 4, 0), p


def _link(raw: bytes, linktype: int) -> tuple[int, int]:
    """The capture's link layer -> (EtherType, offset of L3)."""
    if linktype == LINKTYPE_ETHERNET:
        return _l2(raw, 0)
    if linktype == LINKTYPE_SLL:
        _need(raw, 16)
        return _tags(raw, CookedLinux(raw[:16]).proto, 16)
    if linktype == LINKTYPE_SLL2:
        _need(raw, 20)
        return _tags(raw, CookedLinuxV2(raw[:20]).proto, 20)
    if linktype in LINKTYPES_RAW:
        return _raw_ip(raw, 0)
    raise _Drop("unsupported_linktype")


def _tags(raw: bytes, et: int, p: int) -> tuple[int, int]:
    """Any number of 802.1Q/802.1ad tags at p, after EtherType et."""
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


def _decode(raw: bytes, linktype: int, kinds: dict[int, int], plain: bool) -> dict[str, int]:
    et, p = _link(raw, linktype)
    ip = _ip(raw, et, p, "non_ip")
    chain: list[dict[str, int]] = []  # the tunnels, outermost first
    while ip["proto"] == UDP_P:
        u = ip["l4"]
        _need(raw, u + 8)
        dport = UDP(raw[u:u + 8]).dport
        kind = kinds.get(dport, 0)
        if not kind:
            break
        if len(chain) == MAX_TUNNELS:
            raise _Drop("tunnel_depth")
        vni, et, p = _tunnel(raw, kind, u + 8)
        chain.append({"type": kind, "vni": vni, "fam": ip["fam"], "src_hi": ip["src"][0],
                      "src_lo": ip["src"][1], "dst_hi": ip["dst"][0], "dst_lo": ip["dst"][1],
                      "dport": dport})
        ip = _ip(raw, et, p, "inner_non_ip")
    if not chain and not plain:
        raise _Drop("not_tunnel")
    tun = {"ttype": 0, "vni": 0, "ofam": 0, "osrc_hi": 0, "osrc_lo": 0, "odst_hi": 0,
           "odst_lo": 0, "odport": 0}
    if chain:
        own = chain[-1]
        tun = {"ttype": own["type"], "vni": own["vni"], "ofam": own["fam"],
               "osrc_hi": own["src_hi"], "osrc_lo": own["src_lo"], "odst_hi": own["dst_hi"],
               "odst_lo": own["dst_lo"], "odport": own["dport"]}
        for level, around in enumerate(reversed(chain[:-1]), start=1):
            tun |= {f"x{level}{name}": value for name, value in around.items()}
    return tun | _transport(raw, ip)


def _tunnel(raw: bytes, kind: int, h: int) -> tuple[int, int, int]:
    """The tunnel header at h -> (VNI, inner EtherType, offset of the inner L2 or L3)."""
    _need(raw, h + 8)
    if kind == TT_GENEVE:
        gen = GENEVE(raw[h:h + 8])  # options are not dissected: only their length is needed
        if gen.version != 0:
            raise _Drop("tunnel_version")
        start = h + 8 + gen.optionlen * 4
        if gen.proto == ETH_TEB:
            return gen.vni, *_l2(raw, start)
        if gen.proto in (ETH_IP4, ETH_IP6):
            return gen.vni, gen.proto, start
        raise _Drop("inner_non_ip")
    if kind == TT_GPE:
        vx = VXLAN(bytes([raw[h] & 0x3D]) + raw[h + 1:h + 8])  # I, P, version, O
        if not int(vx.flags) & 0x08:
            raise _Drop("vxlan_no_vni")
        if int(vx.flags) & 0x30:
            raise _Drop("tunnel_version")
        nxt = vx.NextProtocol if int(vx.flags) & 0x04 else 3
        if nxt == 3:
            return vx.vni, *_l2(raw, h + 8)
        if nxt in (1, 2):
            return vx.vni, ETH_IP4 if nxt == 1 else ETH_IP6, h + 8
        raise _Drop("inner_non_ip")
    vx = VXLAN(bytes([raw[h] & 0x08]) + raw[h + 1:h + 8])  # RFC 7348: reserved bits ignored
    if not int(vx.flags) & 0x08:
        raise _Drop("vxlan_no_vni")
    return vx.vni, *_l2(raw, h + 8)


def _transport(raw: bytes, inner: dict[str, Any]) -> dict[str, int]:
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
        # the type is the header's first byte; scapy's ICMP layer is not used to read it: for
        # some types (address mask, timestamp) it wants fields beyond the 8-byte header and
        # fails on a datagram that ends there
        hdr_len, icmp_type = 8, raw[l4]
        if proto != ICMP4 and icmp_type in ICMP6_LINK_CONTROL:
            raise _Drop("link_control")
    else:
        hdr_len = 0
    return {"fam": fam, "src_hi": inner["src"][0], "src_lo": inner["src"][1],
            "dst_hi": inner["dst"][0], "dst_lo": inner["dst"][1], "proto": proto,
            "sport": sport, "dport": dport_in, "flags": flags & 0xFF, "icmp_type": icmp_type,
            "payload": room - hdr_len, "l3len": inner["l3len"]}


def decode_reference(frames: list[bytes], ts_us: np.ndarray, ports: Policy | Iterable[int],
                     linktypes: np.ndarray | None = None) -> Decoded:
    """Decode every frame with scapy into columns (the `--decoder scapy` path)."""
    policy = as_policy(ports)
    out = Decoded.empty(len(frames))
    out.ts_us[:] = ts_us
    for i, raw in enumerate(frames):
        link = LINKTYPE_ETHERNET if linktypes is None else int(linktypes[i])
        status, row = decode_one(raw, policy, link)
        out.status[i] = status
        if status == OK:
            out.set_row(i, row)
    assert not (out.status == FALLBACK).any()
    return out
