"""The bulk wire decoder: many packets per call, in C when the native helper is built, else
vectorized with numpy.

Stage: decoder (the default). In: a byte array (a mapped capture file or a live receive
buffer) with the offset, captured length, time and link type of each packet, and the
`packets.Policy`. Out: `packets.Decoded`.

No Python runs per packet. `decode_native` hands the whole block to `ew_decode_columns`
(ewvxlan_decode.c), which applies the policy of `packets.py` frame by frame and writes the
columns in place. `decode_numpy` gathers each header field for all packets at once with fancy
indexing (`buf[offsets + k]`), and each check of the policy is a mask over all rows; the first
failing check gives a row its drop reason. A plain packet's IP header is parsed twice, as the
outer header and as the flow's, so tunnelled and plain rows share one pass of the inner checks.
Rows whose layout it does not vectorize (IPv6 extension headers, more than two VLAN tags,
nested tunnels) are handed, one by one, to the scapy reference decoder
(`reference.decode_one`). The differential
test (tests/unit/test_vxlan_differential.py) holds both to equal scapy's output on every column.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import numpy as np

from collector.vxlan import native
from collector.vxlan.packets import (
    CODE,
    ETH_IP4,
    ETH_IP6,
    ETH_TEB,
    ETH_VLAN,
    FALLBACK,
    ICMP,
    ICMP6,
    ICMP6_LINK_CONTROL,
    IP6_EXTENSIONS,
    LINKTYPE_ETHERNET,
    LINKTYPE_SLL,
    LINKTYPE_SLL2,
    LINKTYPES_RAW,
    OK,
    TCP,
    TT_GENEVE,
    TT_GPE,
    TT_VXLAN,
    UDP,
    Decoded,
    Policy,
    as_policy,
)


class _Rows:
    """Gathers of big-endian fields for every row; positions are clipped into the buffer so a
    garbage offset of an already-failed row can never fault (its result is discarded)."""

    def __init__(self, buf: np.ndarray, off: np.ndarray, cap: np.ndarray) -> None:
        self.buf, self.last = buf, len(buf) - 1
        self.end = off + cap
        self.status = np.zeros(len(off), dtype=np.uint8)

    def u8(self, pos: np.ndarray) -> np.ndarray:
        return self.buf[np.minimum(pos, self.last)].astype(np.int64)

    def u16(self, pos: np.ndarray) -> np.ndarray:
        return (self.u8(pos) << 8) | self.u8(pos + 1)

    def block(self, pos: np.ndarray, width: int) -> np.ndarray:
        idx = np.minimum(pos[:, None] + np.arange(width), self.last)
        return np.ascontiguousarray(self.buf[idx])

    def fail(self, mask: np.ndarray, reason: str) -> None:
        self.status[mask & (self.status == OK)] = CODE[reason]

    def need(self, mask: np.ndarray, end: np.ndarray) -> None:
        self.fail(mask & (end > self.end), "truncated")

    def fallback(self, mask: np.ndarray) -> None:
        self.status[mask & (self.status == OK)] = FALLBACK

    @property
    def alive(self) -> np.ndarray:
        return self.status == OK


def _addresses(r: _Rows, is4: np.ndarray, p: np.ndarray,
               o4: int, o6: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 of the address at p+o4 (IPv4 rows) or p+o6 (IPv6 rows)."""
    n = len(p)
    hi = np.zeros(n, dtype=np.uint64)
    lo = np.zeros(n, dtype=np.uint64)
    i4 = np.flatnonzero(is4 & r.alive)
    if len(i4):
        lo[i4] = r.block(p[i4] + o4, 4).view(">u4")[:, 0].astype(np.uint64)
    i6 = np.flatnonzero(~is4 & r.alive)
    if len(i6):
        both = r.block(p[i6] + o6, 16).view(">u8").astype(np.uint64)
        hi[i6], lo[i6] = both[:, 0], both[:, 1]
    return hi, lo


def _l2(r: _Rows, start: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ethernet and its tags at `start` (rows in `mask`) -> (EtherType, offset of L3)."""
    r.need(mask, start + 14)
    return _tags(r, r.u16(start + 12), start + 14, mask)


def _tags(r: _Rows, et: np.ndarray, p: np.ndarray,
          mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    for _ in range(2):
        tagged = mask & np.isin(et, ETH_VLAN)
        r.need(tagged, p + 4)
        et = np.where(tagged, r.u16(p + 2), et)
        p = np.where(tagged, p + 4, p)
    r.fallback(mask & np.isin(et, ETH_VLAN))
    return et, p


def _link(r: _Rows, off: np.ndarray, lt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The capture's link layer of each row -> (EtherType, offset of L3)."""
    eth, sll, sll2 = lt == LINKTYPE_ETHERNET, lt == LINKTYPE_SLL, lt == LINKTYPE_SLL2
    raw = np.isin(lt, LINKTYPES_RAW)
    r.fail(~(eth | sll | sll2 | raw), "unsupported_linktype")
    for mask, size in ((eth, 14), (sll, 16), (sll2, 20), (raw, 1)):
        r.need(mask, off + size)
    nibble = r.u8(off) >> 4
    et = np.select([eth, sll, sll2], [r.u16(off + 12), r.u16(off + 14), r.u16(off)],
                   np.where(nibble == 4, ETH_IP4, np.where(nibble == 6, ETH_IP6, 0)))
    p = off + np.select([eth, sll, sll2], [14, 16, 20], 0)
    return _tags(r, et, p, eth | sll | sll2)


def _ip(r: _Rows, et: np.ndarray, p: np.ndarray, non_ip: str) -> dict[str, np.ndarray]:
    is4, is6 = et == ETH_IP4, et == ETH_IP6
    r.fail(~(is4 | is6), non_ip)
    r.need(is4, p + 20)
    r.need(is6, p + 40)
    vb = r.u8(p)
    r.fail(is4 & ((vb >> 4) != 4), "malformed")
    r.fail(is6 & ((vb >> 4) != 6), "malformed")
    ihl = (vb & 0x0F) * 4
    r.fail(is4 & (ihl < 20), "malformed")
    tot = r.u16(p + 2)
    r.fail(is4 & (tot < ihl), "malformed")
    r.need(is4, p + ihl)
    r.fail(is4 & ((r.u16(p + 6) & 0x3FFF) != 0), "fragment")
    nh = r.u8(p + 6)
    r.fallback(is6 & np.isin(nh, IP6_EXTENSIONS))
    plen = r.u16(p + 4)
    src = _addresses(r, is4, p, 12, 8)
    dst = _addresses(r, is4, p, 16, 24)
    return {"is4": is4, "src": src, "dst": dst,
            "proto": np.where(is4, r.u8(p + 9), nh),
            "l4": np.where(is4, p + ihl, p + 40),
            "room": np.where(is4, tot - ihl, plen),
            "l3len": np.where(is4, tot, plen + 40)}


def decode_bulk(buf: np.ndarray, off: np.ndarray, cap: np.ndarray, ts_us: np.ndarray,
                ports: Policy | Iterable[int], linktype: np.ndarray | None = None) -> Decoded:
    """Decode every packet `buf[off[i]:off[i]+cap[i]]` into columns: natively if the helper
    is built, else with numpy (the same columns). `ports`: a `Policy`, or VXLAN ports."""
    lib = native.load()
    if lib is not None:
        return decode_native(lib, buf, off, cap, ts_us, ports, linktype)
    return decode_numpy(buf, off, cap, ts_us, ports, linktype)


def decode_native(lib: ctypes.CDLL, buf: np.ndarray, off: np.ndarray, cap: np.ndarray,
                  ts_us: np.ndarray, ports: Policy | Iterable[int],
                  linktype: np.ndarray | None = None) -> Decoded:
    """`ew_decode_columns` over the whole block; it writes the columns of `Decoded` in place."""
    policy = as_policy(ports)
    n = len(off)
    out = Decoded.empty(n)
    out.ts_us[:] = ts_us
    if n == 0:
        return out
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    off = np.ascontiguousarray(off, dtype=np.int64)
    cap = np.ascontiguousarray(cap, dtype=np.int64)
    if off.min() < 0 or cap.min() < 0 or int((off + cap).max()) > len(buf):
        raise ValueError(f"packet outside the buffer ({len(buf)} bytes)")  # C must not read it
    link = None if linktype is None else np.ascontiguousarray(linktype, dtype=np.uint16)
    names = [c.split(":")[0] for c in Decoded.native_columns().split(",")]
    cols = (ctypes.c_void_p * len(names))(*(getattr(out, name).ctypes.data for name in names))
    kinds, plain = native.policy_args(policy)
    lib.ew_decode_columns(buf.ctypes.data, off.ctypes.data, cap.ctypes.data,
                          None if link is None else link.ctypes.data, n, kinds, plain, cols)
    return out


def decode_numpy(buf: np.ndarray, off: np.ndarray, cap: np.ndarray, ts_us: np.ndarray,
                 ports: Policy | Iterable[int], linktype: np.ndarray | None = None) -> Decoded:
    """Decode every packet `buf[off[i]:off[i]+cap[i]]` into columns with numpy (and scapy for
    the layouts it does not vectorize)."""
    policy = as_policy(ports)
    n = len(off)
    out = Decoded.empty(n)
    out.ts_us[:] = ts_us
    if n == 0:
        return out
    off = off.astype(np.int64)
    r = _Rows(buf, off, cap.astype(np.int64))
    lt = (np.full(n, LINKTYPE_ETHERNET, dtype=np.int64) if linktype is None
          else np.asarray(linktype).astype(np.int64))

    et, p = _link(r, off, lt)
    outer = _ip(r, et, p, "non_ip")
    u = outer["l4"]
    is_udp = outer["proto"] == UDP
    r.need(is_udp, u + 8)
    odport = np.where(is_udp, r.u16(u + 2), 0)
    kinds = np.frombuffer(policy.table(), dtype=np.uint8)
    kind = np.where(is_udp & r.alive, kinds[odport], 0)
    tun = kind != 0

    h = u + 8  # the tunnel header (RFC 7348, RFC 8926, VXLAN-GPE: 8 bytes each)
    vx, gen, gpe = kind == TT_VXLAN, kind == TT_GENEVE, kind == TT_GPE
    r.need(tun, h + 8)
    b0 = r.u8(h)
    r.fail(gen & ((b0 >> 6) != 0), "tunnel_version")
    r.fail((vx | gpe) & ((b0 & 0x08) == 0), "vxlan_no_vni")
    r.fail(gpe & ((b0 & 0x30) != 0), "tunnel_version")
    gproto = r.u16(h + 2)
    nxt = np.where((b0 & 0x04) != 0, r.u8(h + 3), 3)
    in_eth = vx | (gen & (gproto == ETH_TEB)) | (gpe & (nxt == 3))
    in_ip4 = (gen & (gproto == ETH_IP4)) | (gpe & (nxt == 1))
    in_ip6 = (gen & (gproto == ETH_IP6)) | (gpe & (nxt == 2))
    r.fail(tun & ~(in_eth | in_ip4 | in_ip6), "inner_non_ip")
    start = np.where(gen, h + 8 + (b0 & 0x3F) * 4, h + 8)
    iet, ip = _l2(r, start, in_eth & r.alive)
    iet = np.where(in_ip4, ETH_IP4, np.where(in_ip6, ETH_IP6, iet))
    ip = np.where(in_eth, ip, start)
    vni = (r.u8(h + 4) << 16) | (r.u8(h + 5) << 8) | r.u8(h + 6)
    if not policy.plain:
        r.fail(~tun, "not_tunnel")

    # the flow's own IP header: the inner one, or the outer one again for plain packets
    inner = _ip(r, np.where(tun, iet, et), np.where(tun, ip, p), "inner_non_ip")
    proto, l4, room, is4 = inner["proto"], inner["l4"], inner["room"], inner["is4"]
    tcp, udp = proto == TCP, proto == UDP
    icmp = (is4 & (proto == ICMP)) | (~is4 & (proto == ICMP6))
    r.need(tcp, l4 + 20)
    r.need(udp | icmp, l4 + 8)
    r.fallback(tun & udp & (kinds[r.u16(l4 + 2)] != 0))  # a nested tunnel: scapy's
    doff = (r.u8(l4 + 12) >> 4) * 4
    r.fail(tcp & (doff < 20), "malformed")
    hdr = np.where(tcp, doff, np.where(udp | icmp, 8, 0))
    r.fail(room < hdr, "malformed")
    r.fail(icmp & ~is4 & np.isin(r.u8(l4), ICMP6_LINK_CONTROL), "link_control")

    ok = r.alive
    out.status[:] = r.status
    zero = np.zeros(n, dtype=np.int64)
    cols = {"ttype": kind, "vni": np.where(tun, vni, 0),
            "ofam": np.where(tun, np.where(outer["is4"], 4, 6), 0),
            "osrc_hi": np.where(tun, outer["src"][0], 0),
            "osrc_lo": np.where(tun, outer["src"][1], 0),
            "odst_hi": np.where(tun, outer["dst"][0], 0),
            "odst_lo": np.where(tun, outer["dst"][1], 0), "odport": np.where(tun, odport, zero),
            "fam": np.where(is4, 4, 6), "src_hi": inner["src"][0], "src_lo": inner["src"][1],
            "dst_hi": inner["dst"][0], "dst_lo": inner["dst"][1], "proto": proto,
            "sport": np.where(tcp | udp, r.u16(l4), 0),
            "dport": np.where(tcp | udp, r.u16(l4 + 2), 0),
            "flags": np.where(tcp, r.u8(l4 + 13), 0),
            "icmp_type": np.where(icmp, r.u8(l4), -1),
            "payload": room - hdr, "l3len": inner["l3len"]}
    for name, values in cols.items():
        column = getattr(out, name)
        column[ok] = values[ok].astype(column.dtype)

    fallback = np.flatnonzero(out.status == FALLBACK).tolist()
    if fallback:  # scapy is imported only when a packet needs it (it costs ~0.5 s to import)
        from collector.vxlan.reference import decode_one
    for i in fallback:
        begin = int(off[i])
        status, row = decode_one(bytes(buf[begin:begin + int(cap[i])]), policy, int(lt[i]))
        out.status[i] = status
        if status == OK:
            out.set_row(i, row)
    out.clear_failed()
    return out
