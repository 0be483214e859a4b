"""The wire flow table: batches of packets -> flow records (vectorized per batch, Python per flow).

Stage: after the decoders. In: `packets.Decoded` batches (`add`, in capture order) or session
rows made by the native scan (`merge`), and ticks (`now` in µs: packet time for files, wall time
live). Out: `FlowRecord`s (observer "path"; `tunnel` filled for tunnelled flows, null for plain
traffic).

A flow is (VNI, tunnel type, inner IP family, protocol, the two inner endpoints, the types and
VNIs of the tunnels around a nested one); the VNIs keep overlapping address spaces apart, and a
plain flow (type 0, VNI 0) never merges with a tunnelled one. Within a batch, packets are grouped by key and cut into sessions, each
summed into one session row (rows.py: `grouping.py` with numpy, or `ewvxlan_flows.c` while it
reads a file); Python only runs per session, in `merge`, to add it into the table. This module
imports no numpy: the native file path never needs it.

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
VTEPs of the first server->client packet when no client->server packet was seen); so are those
of each tunnel of `tunnel_outer` (nested tunnels, outermost first).
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING

from collector.orientation import client_by_ports
from collector.pipeline import CollectorContext
from collector.vxlan.packets import REASONS, TCP, TUNNEL_NAMES, join128, proto_name
from collector.vxlan.rows import DIR_NONE, KEY_FIELDS, NFIELDS, OUTER_WORDS
from eastwest.record import Endpoint, FlowRecord, Source, Tunnel, flags_from_bits

if TYPE_CHECKING:
    from collector.vxlan.packets import Decoded

CLOSE_GRACE_S = 2.0
DROP_STAGE = "vxlan"  # eastwest_dropped_total{stage}: kept from before plain traffic, for dashboards
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_O0 = NFIELDS - 2 * OUTER_WORDS  # a session row's outer headers: A->B, then B->A
_O1 = NFIELDS - OUTER_WORDS


def utc_us(us: int) -> datetime:
    return _EPOCH + timedelta(0, 0, us)  # positional: exact, and cheaper than microseconds=


_FLAG_NAMES = [tuple(flags_from_bits(bits)) for bits in range(256)]  # per record: a lookup


@lru_cache(maxsize=65536)
def ip_text(fam: int, hi: int, lo: int) -> str:
    """Canonical text (RFC 5952 for IPv6, as `ipaddress` writes it; IPv4 dotted quad)."""
    if fam == 4:
        return f"{lo >> 24}.{lo >> 16 & 255}.{lo >> 8 & 255}.{lo & 255}"
    return str(ipaddress.IPv6Address(join128(hi, lo)))


def _chain(ttype: int, vni: int, xkey: int, c2s: tuple[int, ...] | None,
           s2c: tuple[int, ...] | None) -> list[Tunnel]:
    """The tunnels of a flow, outermost first, the flow's own last; VTEPs as the first
    client->server packet had them (reversed from the first server->client one if none)."""
    if c2s is None:
        assert s2c is not None
        c2s = tuple(v for i in range(0, len(s2c), 6) for v in (
            s2c[i], s2c[i + 3], s2c[i + 4], s2c[i + 1], s2c[i + 2], s2c[i + 5]))
    kinds = [(ttype, vni), (xkey >> 24 & 3, xkey & 0xFFFFFF), (xkey >> 50, xkey >> 26 & 0xFFFFFF)]
    chain = []
    for level, (kind, level_vni) in enumerate(kinds):
        if not kind:
            break
        ofam, s_hi, s_lo, d_hi, d_lo, odport = c2s[6 * level:6 * level + 6]
        chain.append(Tunnel(type=TUNNEL_NAMES[kind], vni=level_vni,  # type: ignore[arg-type]
                            outer_src=ip_text(ofam, s_hi, s_lo),
                            outer_dst=ip_text(ofam, d_hi, d_lo), outer_dport=odport))
    return chain[::-1]


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
        self.outer: list[tuple[int, ...] | None] = [None, None]
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
        by_ports = client_by_ports(self.key[6], self.key[9])
        return self.first_dir == 0 if by_ports is None else by_ports


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
        """Account a decoded batch; returns the final records of flows a new session ended."""
        from collector.vxlan.grouping import decoded_reasons, session_rows

        self.count_drops(decoded_reasons(d))
        rows, packets = session_rows(d, self.idle_us)
        self.packets += packets
        return self.merge(rows)

    def count_drops(self, counts: list[tuple[int, int]]) -> None:
        """(status code, packets) pairs of undecoded packets, counted per reason."""
        for code, n in counts:
            self.ctx.drops.count(DROP_STAGE, REASONS[code - 1], n)

    def merge(self, rows: list[int]) -> list[FlowRecord]:
        """Add a batch's sessions (flat, NFIELDS values each, in grouping order); returns the
        final records of flows whose key a new session took."""
        flows, idle_us, out = self.flows, self.idle_us, []
        for j in range(0, len(rows), NFIELDS):
            (newkey, tmin, tmax, start_syn, pk0, cnt, by0, by1, l30, l31, flags, rst, fin0, fin1,
             first_dir, syn, synack, req, rep, has_syn, tail_fr) = rows[j + KEY_FIELDS:j + _O0]
            key = tuple(rows[j:j + KEY_FIELDS])
            st = flows.get(key)
            if st is not None and (not newkey or tmin - st.last_us > idle_us
                                   or (start_syn and st.finrst_since_syn)):
                out.append(self._record(st, final=True, end_us=st.last_us))
                st = None
            if st is None:
                st = flows[key] = FlowState(key)
                st.first_us = tmin
                st.first_dir = first_dir
            pkts, byts, l3 = st.pkts, st.bytes, st.l3
            pkts[0] += pk0
            pkts[1] += cnt - pk0
            byts[0] += by0
            byts[1] += by1
            l3[0] += l30
            l3[1] += l31
            st.flags |= flags
            st.resets += rst
            st.fins |= (1 if fin0 else 0) | (2 if fin1 else 0)
            if tmin < st.first_us:
                st.first_us = tmin
            if tmax > st.last_us:
                st.last_us = tmax
            if st.syn_dir < 0 and syn != DIR_NONE:
                st.syn_dir = syn
            if st.synack_dir < 0 and synack != DIR_NONE:
                st.synack_dir = synack
            if st.echo_req_dir < 0 and req != DIR_NONE:
                st.echo_req_dir = req
            if st.echo_rep_dir < 0 and rep != DIR_NONE:
                st.echo_rep_dir = rep
            outer = st.outer
            if outer[0] is None and rows[j + _O0]:
                outer[0] = tuple(rows[j + _O0:j + _O1])
            if outer[1] is None and rows[j + _O1]:
                outer[1] = tuple(rows[j + _O1:j + NFIELDS])
            st.finrst_since_syn = (bool(tail_fr) if has_syn
                                   else (st.finrst_since_syn or bool(tail_fr)))
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
        vni, ttype, fam, proto, a_hi, a_lo, a_port, b_hi, b_lo, b_port, xkey = st.key
        a = Endpoint(ip_text(fam, a_hi, a_lo), a_port)
        b = Endpoint(ip_text(fam, b_hi, b_lo), b_port)
        ca = st.client_is_a()
        c2s, s2c = (0, 1) if ca else (1, 0)
        tunnel = tunnel_outer = None
        if ttype:
            chain = _chain(ttype, vni, xkey, st.outer[c2s], st.outer[s2c])
            tunnel, tunnel_outer = chain[-1], (chain[:-1] or None)
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
            final=final, protocol=proto_name(fam, proto), family=fam,  # type: ignore[arg-type]
            client=a if ca else b, server=b if ca else a, observer="path",
            bytes_c2s=st.bytes[c2s], bytes_s2c=st.bytes[s2c],
            packets_c2s=st.pkts[c2s], packets_s2c=st.pkts[s2c],
            l3_bytes_c2s=st.l3[c2s], l3_bytes_s2c=st.l3[s2c], connect=connect,  # type: ignore[arg-type]
            resets=st.resets, tunnel=tunnel, tunnel_outer=tunnel_outer,
            tcp_flags=list(_FLAG_NAMES[st.flags & 0xFF]) if proto == TCP else None,
        )
