"""The VXLAN flow table: decoded packets -> flow records (vectorized per batch, Python per flow).

Stage: after the decoders. In: `packets.Decoded` batches (in capture order) and ticks (`now` in
µs: packet time for files, wall time live). Out: `FlowRecord`s (observer "path", tunnel filled).

A flow is (VNI, inner IP family, protocol, the two inner endpoints); the VNI keeps overlapping
pod address spaces apart. Within a batch, packets are grouped with numpy (a 64-bit hash of the
key, checked column by column for collisions, then a stable sort), cut into sessions and summed
with `reduceat`; Python only runs per session, to merge it into the table.

Sessions of one key are cut where (a) the gap since the key's previous packet exceeds the idle
timeout, or (b) a TCP SYN without ACK follows a FIN or RST of the same key since its previous
SYN (port reuse). A flow ends (final record, `end` = its last packet) when a later session takes
its key, when a tick finds it idle for `idle_timeout`, or closed (RST, or FIN both ways) for
`CLOSE_GRACE_S` (so the last ACK of a close still belongs to it), or at the end of the input.
Every tick also gives an interim record (`end` = the tick) for each live flow that changed.

Orientation (docs/vxlan.md): the sender of the first SYN without ACK is the client; else the
receiver of the first SYN+ACK; else (ICMP) the sender of the first echo request, or the receiver
of the first echo reply; else, ports: a port below 1024 facing one that is not is the server's;
else a port outside Linux's ephemeral range 32768-60999 facing one inside it is the server's;
else the lower port is the server's; equal ports: the first packet's sender is the client.
`tunnel.outer_src/outer_dst` are the VTEPs of the first client->server packet (the reversed
VTEPs of the first server->client packet when no client->server packet was seen).
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import numpy as np

from collector.pipeline import CollectorContext
from collector.vxlan.packets import (
    ECHO_REPLY, ECHO_REQUEST, OK, REASONS, TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Decoded,
    is_icmp, join128, proto_name,
)
from eastwest.record import Endpoint, FlowRecord, Source, Tunnel, flags_from_bits

CLOSE_GRACE_S = 2.0
EPHEMERAL = (32768, 60999)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BIG = np.iinfo(np.int64).max
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)


def utc_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@lru_cache(maxsize=65536)
def ip_text(fam: int, hi: int, lo: int) -> str:
    value = join128(hi, lo)
    return str(ipaddress.IPv4Address(value) if fam == 4 else ipaddress.IPv6Address(value))


class FlowState:
    """One flow in the A/B frame (A = the lower endpoint); counters are indexed by direction
    (0: A->B, 1: B->A). Evidence for orientation keeps the earliest value."""

    __slots__ = ("key", "pkts", "bytes", "l3", "flags", "resets", "fins", "first_us", "last_us",
                 "syn_dir", "synack_dir", "echo_req_dir", "echo_rep_dir", "first_dir", "outer",
                 "finrst_since_syn", "emitted_pkts")

    def __init__(self, key: tuple[int, ...]) -> None:
        self.key = key
        self.pkts, self.bytes, self.l3 = [0, 0], [0, 0], [0, 0]
        self.flags = self.resets = self.fins = 0
        self.first_us = self.last_us = 0
        self.syn_dir = self.synack_dir = self.echo_req_dir = self.echo_rep_dir = -1
        self.first_dir = -1
        self.outer: list[tuple[int, int, int, int, int, int] | None] = [None, None]
        self.finrst_since_syn = False
        self.emitted_pkts = 0

    @property
    def closed(self) -> bool:
        return self.resets > 0 or self.fins == 3

    def client_is_a(self) -> bool:
        for d, want in ((self.syn_dir, 0), (self.synack_dir, 1), (self.echo_req_dir, 0),
                        (self.echo_rep_dir, 1)):
            if d >= 0:
                return d == want
        pa, pb = self.key[5], self.key[8]
        if pa != pb:
            if (pa < 1024) != (pb < 1024):
                return pb < 1024
            ea, eb = (EPHEMERAL[0] <= pa <= EPHEMERAL[1]), (EPHEMERAL[0] <= pb <= EPHEMERAL[1])
            if ea != eb:
                return ea
            return pa > pb
        return self.first_dir == 0


class FlowTable:
    def __init__(self, ctx: CollectorContext, source: Source, *, idle_timeout: float,
                 close_grace: float = CLOSE_GRACE_S) -> None:
        self.ctx, self.source = ctx, source
        self.idle_us = int(idle_timeout * 1_000_000)
        self.grace_us = int(min(close_grace, idle_timeout) * 1_000_000)
        self.flows: dict[tuple[int, ...], FlowState] = {}
        self.packets = 0

    # -- packets in ---------------------------------------------------------------------------
    def add(self, d: Decoded) -> list[FlowRecord]:
        """Account a batch; returns the final records of flows whose key a new session took."""
        bad = d.status[d.status != OK]
        if len(bad):
            for code, n in zip(*np.unique(bad, return_counts=True), strict=True):
                self.ctx.drops.count("vxlan", REASONS[int(code) - 1], int(n))
        c = d.take(np.flatnonzero(d.status == OK))
        if len(c) == 0:
            return []
        self.packets += len(c)
        swap = (c.src_hi > c.dst_hi) | ((c.src_hi == c.dst_hi) & (
            (c.src_lo > c.dst_lo) | ((c.src_lo == c.dst_lo) & (c.sport > c.dport))))
        keys = [c.vni.astype(np.uint64), c.fam.astype(np.uint64), c.proto.astype(np.uint64),
                np.where(swap, c.dst_hi, c.src_hi), np.where(swap, c.dst_lo, c.src_lo),
                np.where(swap, c.dport, c.sport).astype(np.uint64),
                np.where(swap, c.src_hi, c.dst_hi), np.where(swap, c.src_lo, c.dst_lo),
                np.where(swap, c.sport, c.dport).astype(np.uint64)]
        order, newkey = _group(keys)
        return self._sessions(c, swap.astype(np.int8), keys, order, newkey)

    def _sessions(self, c: Decoded, dirs: np.ndarray, keys: list[np.ndarray], order: np.ndarray,
                  newkey: np.ndarray) -> list[FlowRecord]:
        n = len(order)
        ts, fl, dr = c.ts_us[order], c.flags[order].astype(np.int64), dirs[order]
        fam, proto, icmp_t = c.fam[order], c.proto[order], c.icmp_type[order]
        tcp = proto == TCP
        gap = np.zeros(n, dtype=bool)
        gap[1:] = (ts[1:] - ts[:-1]) > self.idle_us
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

        is_icmp_row = ((fam == 4) & (proto == 1)) | ((fam == 6) & (proto == 58))
        req = is_icmp_row & (icmp_t == np.where(fam == 4, ECHO_REQUEST[4], ECHO_REQUEST[6]))
        rep = is_icmp_row & (icmp_t == np.where(fam == 4, ECHO_REPLY[4], ECHO_REPLY[6]))
        pay, l3 = c.payload[order], c.l3len[order]
        cols = {
            "pk0": total(d0), "cnt": np.diff(np.append(starts, n)),
            "by0": total(np.where(d0, pay, 0)), "by1": total(np.where(d0, 0, pay)),
            "l30": total(np.where(d0, l3, 0)), "l31": total(np.where(d0, 0, l3)),
            "flags": np.bitwise_or.reduceat(fl, starts), "rst": total(tcp & ((fl & TCP_RST) != 0)),
            "fin0": total(tcp & d0 & ((fl & TCP_FIN) != 0)),
            "fin1": total(tcp & ~d0 & ((fl & TCP_FIN) != 0)),
            "tmin": np.minimum.reduceat(ts, starts), "tmax": np.maximum.reduceat(ts, starts),
            "syn": first(pure_syn), "synack": first(synack), "req": first(req), "rep": first(rep),
            "o0": first(d0), "o1": first(~d0), "has_syn": total(pure_syn),
            "tail_fr": seg_fr[seg[last]], "start_syn": pure_syn[starts], "newkey": newkey[starts],
        }
        lists = {k: v.tolist() for k, v in cols.items()}
        key_rows = np.stack([k[order][starts] for k in keys], axis=1).tolist()
        dr_l = dr.tolist() if n < 4 * len(starts) else None
        outer_cols = [c.ofam, c.osrc_hi, c.osrc_lo, c.odst_hi, c.odst_lo, c.odport]
        outer_sorted = [col[order] for col in outer_cols]

        def direction(p: int) -> int:
            if p == _BIG:
                return -1
            return dr_l[p] if dr_l is not None else int(dr[p])

        def outer_at(p: int) -> tuple[int, int, int, int, int, int] | None:
            if p == _BIG:
                return None
            return tuple(int(col[p]) for col in outer_sorted)  # type: ignore[return-value]

        out: list[FlowRecord] = []
        for i, key_list in enumerate(key_rows):
            key = tuple(key_list)
            st = self.flows.get(key)
            if st is not None:
                split = (not lists["newkey"][i]
                         or lists["tmin"][i] - st.last_us > self.idle_us
                         or (lists["start_syn"][i] and st.finrst_since_syn))
                if split:
                    out.append(self._record(st, final=True, end_us=st.last_us))
                    st = None
            if st is None:
                st = self.flows[key] = FlowState(key)
                st.first_us = lists["tmin"][i]
                st.first_dir = direction(int(starts[i]))
            pk0 = lists["pk0"][i]
            st.pkts[0] += pk0
            st.pkts[1] += lists["cnt"][i] - pk0
            st.bytes[0] += lists["by0"][i]
            st.bytes[1] += lists["by1"][i]
            st.l3[0] += lists["l30"][i]
            st.l3[1] += lists["l31"][i]
            st.flags |= lists["flags"][i]
            st.resets += lists["rst"][i]
            st.fins |= (1 if lists["fin0"][i] else 0) | (2 if lists["fin1"][i] else 0)
            st.first_us = min(st.first_us, lists["tmin"][i])
            st.last_us = max(st.last_us, lists["tmax"][i])
            for attr, name in (("syn_dir", "syn"), ("synack_dir", "synack"),
                               ("echo_req_dir", "req"), ("echo_rep_dir", "rep")):
                if getattr(st, attr) < 0:
                    setattr(st, attr, direction(lists[name][i]))
            for dd, name in ((0, "o0"), (1, "o1")):
                if st.outer[dd] is None:
                    st.outer[dd] = outer_at(lists[name][i])
            tail = bool(lists["tail_fr"][i])
            st.finrst_since_syn = tail if lists["has_syn"][i] else (st.finrst_since_syn or tail)
        return out

    # -- records out --------------------------------------------------------------------------
    def tick(self, now_us: int) -> list[FlowRecord]:
        """Finals for idle and closed flows, interims for live flows that changed."""
        out: list[FlowRecord] = []
        for key, st in list(self.flows.items()):
            quiet = now_us - st.last_us
            if quiet > self.idle_us or (st.closed and quiet > self.grace_us):
                out.append(self._record(st, final=True, end_us=st.last_us))
                del self.flows[key]
            elif st.pkts[0] + st.pkts[1] != st.emitted_pkts:
                out.append(self._record(st, final=False, end_us=max(now_us, st.last_us)))
        return out

    def flush(self) -> list[FlowRecord]:
        """End of input: every flow's final record."""
        out = [self._record(st, final=True, end_us=st.last_us) for st in self.flows.values()]
        self.flows.clear()
        return out

    def _record(self, st: FlowState, *, final: bool, end_us: int) -> FlowRecord:
        st.emitted_pkts = st.pkts[0] + st.pkts[1]
        vni, fam, proto, a_hi, a_lo, a_port, b_hi, b_lo, b_port = st.key
        a = Endpoint(ip_text(fam, a_hi, a_lo), a_port)
        b = Endpoint(ip_text(fam, b_hi, b_lo), b_port)
        ca = st.client_is_a()
        c2s, s2c = (0, 1) if ca else (1, 0)
        outer = st.outer[c2s]
        if outer is None:
            ofam, s_hi, s_lo, d_hi, d_lo, odport = st.outer[s2c]  # type: ignore[misc]
            outer = (ofam, d_hi, d_lo, s_hi, s_lo, odport)
        ofam, s_hi, s_lo, d_hi, d_lo, odport = outer
        connect = None
        if proto == TCP and st.syn_dir >= 0:
            if st.synack_dir >= 0:
                connect = "reset" if st.resets else "ok"
            elif st.resets:
                connect = "refused"
            elif final:
                connect = "timeout"
        return FlowRecord(
            record_id=self.ctx.next_record_id(), collector=self.ctx.collector_id,
            source=self.source, start=utc_us(st.first_us), end=utc_us(max(end_us, st.first_us)),
            final=final, protocol=proto_name(fam, proto), family=fam,
            client=a if ca else b, server=b if ca else a, observer="path",
            bytes_c2s=st.bytes[c2s], bytes_s2c=st.bytes[s2c],
            packets_c2s=st.pkts[c2s], packets_s2c=st.pkts[s2c],
            l3_bytes_c2s=st.l3[c2s], l3_bytes_s2c=st.l3[s2c], connect=connect,
            resets=st.resets,
            tunnel=Tunnel(type="vxlan", vni=vni, outer_src=ip_text(ofam, s_hi, s_lo),
                          outer_dst=ip_text(ofam, d_hi, d_lo), outer_dport=odport),
            tcp_flags=flags_from_bits(st.flags) if proto == TCP else None,
        )


def _group(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stable order that makes equal keys contiguous (capture order kept within a key), and the
    mask of rows (in that order) that start a new key. A 64-bit hash sorts fast; a collision
    (two keys, one hash) is detected and answered with an exact lexicographic sort."""
    h = np.zeros(len(keys[0]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in keys:
            h = (h ^ col.astype(np.uint64)) * _M1
            h ^= h >> np.uint64(31)
            h *= _M2
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
