"""Grouping with numpy: a batch of decoded packets -> one row per flow session.

Stage: inside `flows.FlowTable.add` (live capture, `--decoder scapy`, and files when the native
helper is not built). In: `packets.Decoded` (one batch, capture order) and the idle timeout.
Out: session rows, flat, `rows.ROW_FIELDS` each, in grouping order; `FlowTable.merge` adds
them into the table. `ewvxlan_flows.c` makes the same rows, in the same order, while it reads a
file; tests/unit/test_vxlan_native.py holds the two equal.

Packets are grouped by key with a 64-bit hash of the key (checked column by column for
collisions; a collision is answered with an exact lexicographic sort), in a stable sort, so a
key's packets stay in capture order. They are cut into sessions where (a) the gap since the
key's previous packet exceeds the idle timeout, or (b) a TCP SYN without ACK follows a FIN or
RST of the same key since its previous SYN (port reuse), and summed with `reduceat`.
"""

from __future__ import annotations

import numpy as np

from collector.vxlan.packets import (
    ECHO_REPLY,
    ECHO_REQUEST,
    OK,
    TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Decoded,
)
from collector.vxlan.rows import DIR_NONE

_BIG = np.iinfo(np.int64).max
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
ORDER_HASH_MASK = 0xFFFF_FFFF_FFFF_FFFF  # tests narrow it (and EW_ORDER_HASH_MASK) to collide


def decoded_reasons(d: Decoded) -> list[tuple[int, int]]:
    """(status code, packets) of the rows that did not decode, by code."""
    bad = d.status[d.status != OK]
    if not len(bad):
        return []
    codes, counts = np.unique(bad, return_counts=True)
    return list(zip(codes.tolist(), counts.tolist(), strict=True))


def session_rows(d: Decoded, idle_us: int) -> tuple[list[int], int]:
    """(flat session rows, packets decoded) of one batch."""
    c = d.take(np.flatnonzero(d.status == OK))
    n = len(c)
    if n == 0:
        return [], 0
    swap = (c.src_hi > c.dst_hi) | ((c.src_hi == c.dst_hi) & (
        (c.src_lo > c.dst_lo) | ((c.src_lo == c.dst_lo) & (c.sport > c.dport))))
    keys = [c.vni.astype(np.uint64), c.ttype.astype(np.uint64), c.fam.astype(np.uint64),
            c.proto.astype(np.uint64),
            np.where(swap, c.dst_hi, c.src_hi), np.where(swap, c.dst_lo, c.src_lo),
            np.where(swap, c.dport, c.sport).astype(np.uint64),
            np.where(swap, c.src_hi, c.dst_hi), np.where(swap, c.src_lo, c.dst_lo),
            np.where(swap, c.sport, c.dport).astype(np.uint64),
            outer_keys(c)]
    order, newkey = group(keys)

    ts, fl, dr = c.ts_us[order], c.flags[order].astype(np.int64), swap[order].astype(np.int64)
    fam, proto, icmp_t = c.fam[order], c.proto[order], c.icmp_type[order]
    tcp = proto == TCP
    gap = np.zeros(n, dtype=bool)
    gap[1:] = (ts[1:] - ts[:-1]) > idle_us
    gap &= ~newkey
    pure_syn = tcp & ((fl & (TCP_SYN | TCP_ACK)) == TCP_SYN)
    synack = tcp & ((fl & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK))
    finrst = tcp & ((fl & (TCP_FIN | TCP_RST)) != 0)
    seg = np.cumsum(newkey | gap | pure_syn) - 1
    seg_fr = np.bincount(seg, weights=finrst, minlength=int(seg[-1]) + 1) > 0
    prev_seg = np.maximum(seg - 1, 0)
    syn_split = pure_syn & ~newkey & ~gap & seg_fr[prev_seg]
    starts = np.flatnonzero(newkey | gap | syn_split)
    last = np.append(starts[1:], n) - 1
    pos = np.arange(n, dtype=np.int64)
    d0 = dr == 0

    def first(mask: np.ndarray) -> np.ndarray:
        return np.minimum.reduceat(np.where(mask, pos, _BIG), starts)

    def total(values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values.astype(np.int64), starts)

    def direction(p: np.ndarray) -> np.ndarray:
        return np.where(p == _BIG, DIR_NONE, dr[np.minimum(p, n - 1)])

    is_icmp = ((fam == 4) & (proto == 1)) | ((fam == 6) & (proto == 58))
    req = is_icmp & (icmp_t == np.where(fam == 4, ECHO_REQUEST[4], ECHO_REQUEST[6]))
    rep = is_icmp & (icmp_t == np.where(fam == 4, ECHO_REPLY[4], ECHO_REPLY[6]))
    pay, l3 = c.payload[order], c.l3len[order]
    cols = [k[order][starts] for k in keys] + [
        newkey[starts], np.minimum.reduceat(ts, starts), np.maximum.reduceat(ts, starts),
        pure_syn[starts], total(d0), np.diff(np.append(starts, n)),
        total(np.where(d0, pay, 0)), total(np.where(d0, 0, pay)),
        total(np.where(d0, l3, 0)), total(np.where(d0, 0, l3)),
        np.bitwise_or.reduceat(fl, starts), total(tcp & ((fl & TCP_RST) != 0)),
        total(tcp & d0 & ((fl & TCP_FIN) != 0)), total(tcp & ~d0 & ((fl & TCP_FIN) != 0)),
        dr[starts], direction(first(pure_syn)), direction(first(synack)),
        direction(first(req)), direction(first(rep)), total(pure_syn), seg_fr[seg[last]],
    ]
    outer = [c.ofam, c.osrc_hi, c.osrc_lo, c.odst_hi, c.odst_lo, c.odport,
             c.x1fam, c.x1src_hi, c.x1src_lo, c.x1dst_hi, c.x1dst_lo, c.x1dport,
             c.x2fam, c.x2src_hi, c.x2src_lo, c.x2dst_hi, c.x2dst_lo, c.x2dport]
    for mask in (d0, ~d0):
        p = first(mask)
        cols += [np.where(p == _BIG, 0, col[order][np.minimum(p, n - 1)]) for col in outer]
    table = np.stack([np.asarray(col).astype(np.uint64) for col in cols], axis=1)
    return table.ravel().tolist(), n


def outer_keys(c: Decoded) -> np.ndarray:
    """`packets.outer_key` of every row: the nested tunnels around the flow's (0: none)."""
    u = np.uint64
    x1 = (c.x1type.astype(u) << u(24)) | c.x1vni.astype(u)
    x2 = (c.x2type.astype(u) << u(24)) | c.x2vni.astype(u)
    return x1 | (x2 << u(26))


def group(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stable order that makes equal keys contiguous (capture order kept within a key), and the
    mask of rows (in that order) that start a new key. A 64-bit hash sorts fast; a collision
    (two keys, one hash) is detected and answered with an exact lexicographic sort."""
    h = np.zeros(len(keys[0]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in keys:
            h = (h ^ col.astype(np.uint64)) * _M1
            h ^= h >> np.uint64(31)
            h *= _M2
    if ORDER_HASH_MASK != 0xFFFF_FFFF_FFFF_FFFF:
        h &= np.uint64(ORDER_HASH_MASK)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    newkey = np.ones(len(order), dtype=bool)
    newkey[1:] = hs[1:] != hs[:-1]
    differs = np.zeros(len(order), dtype=bool)
    for col in keys:
        s = col[order]
        differs[1:] |= s[1:] != s[:-1]
    if (differs & ~newkey).any():  # a hash collision: exact sort instead
        order = np.lexsort([np.arange(len(h))] + keys[::-1])
        newkey = np.ones(len(order), dtype=bool)
        newkey[1:] = False
        for col in keys:
            s = col[order]
            newkey[1:] |= s[1:] != s[:-1]
    return order, newkey
