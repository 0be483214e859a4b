"""DNS flows: queries matched to their answers, summarised per flow to a resolver.

Stage: inside the DNS source. In: DNS packets as the client's namespace saw them (time, protocol,
client and server ends, which way, payload).  Out: `FlowRecord`s (source `wire`, observer `path`)
of each flow to a resolver with a `dns` summary (eastwest.record.DnsSummary, docs/flow-record.md),
interim every interval, final once the flow was idle for `idle_timeout`.

Matching (RFC 1035 section 7.3 / RFC 5452 section 4.3): a response answers the pending query of
the same flow (5-tuple) with the same id; latency is the time between the two packets. A query
left unanswered for `query_timeout` counts as a timeout of its flow (and so of its client).
A response without a pending query (its query seen before the capture began, or a duplicate)
is counted (`DnsFlowTable.unmatched`) and still summarised: its rcode and answers are what the client got.
Orientation: the end on port 53 is the server (both on 53: the receiver of the query).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from collector.dns.message import DnsMessage, DnsParseError, TcpStream, parse
from eastwest.drops import Drops
from eastwest.record import DnsAnswer, DnsLatency, DnsName, DnsSummary, Endpoint, FlowRecord

FlowKey = tuple[str, str, int, str, int]  # protocol, client ip, client port, server ip, port


@dataclass
class _Name:
    count: int = 0
    rcodes: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0


@dataclass
class _Flow:
    family: int
    start_us: int
    last_us: int
    bytes_c2s: int = 0
    bytes_s2c: int = 0
    packets_c2s: int = 0
    packets_s2c: int = 0
    queries: int = 0
    responses: int = 0
    timeouts: int = 0
    rcodes: Counter[str] = field(default_factory=Counter)
    lat_min: int = -1
    lat_max: int = 0
    lat_sum: int = 0
    lat_n: int = 0
    names: dict[tuple[str, str], _Name] = field(default_factory=dict)
    # (asked name, type, value) -> (ttl, when): the newest answer of each kind
    answers: dict[tuple[str, str, str], tuple[int, int]] = field(default_factory=dict)
    pending: dict[int, tuple[int, str, str]] = field(default_factory=dict)  # id -> (t, name, type)
    streams: tuple[TcpStream, TcpStream] | None = None
    changed: bool = True


def _utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


class DnsFlowTable:
    """Per-flow DNS state; `packet()` per DNS packet, `expire()` each interval for the records."""

    def __init__(self, collector: str, next_id, drops: Drops, *, top_names: int = 10,
                 max_answers: int = 32, query_timeout: float = 5.0, idle_timeout: float = 30.0,
                 max_flows: int = 65536) -> None:
        self.collector, self.next_id, self.drops = collector, next_id, drops
        self.top_names, self.max_answers = top_names, max_answers
        self.query_timeout_us = int(query_timeout * 1e6)
        self.idle_us = int(idle_timeout * 1e6)
        self.max_flows = max_flows
        self.flows: dict[FlowKey, _Flow] = {}
        self.unmatched = 0  # responses without a pending query (not dropped: summarised)

    def packet(self, ts_us: int, protocol: str, family: int, src: str, sport: int, dst: str,
               dport: int, payload: bytes) -> None:
        """One packet of a DNS flow (UDP datagram payload, or TCP segment payload)."""
        if sport == 53 and dport != 53:
            key, c2s = (protocol, dst, dport, src, sport), False
        elif dport == 53:
            key, c2s = (protocol, src, sport, dst, dport), True
        else:
            self.drops.count("dns", "not_port_53")
            return
        flow = self.flows.get(key)
        if flow is None:
            if len(self.flows) >= self.max_flows:
                self.drops.count("dns", "flow_table_full")
                return
            flow = self.flows[key] = _Flow(family, ts_us, ts_us)
            if protocol == "tcp":
                flow.streams = (TcpStream(), TcpStream())
        flow.last_us = max(flow.last_us, ts_us)
        flow.changed = True
        if c2s:
            flow.bytes_c2s += len(payload)
            flow.packets_c2s += 1
        else:
            flow.bytes_s2c += len(payload)
            flow.packets_s2c += 1
        if not payload:
            return
        try:
            if flow.streams is None:
                messages = [payload]
            else:
                messages = flow.streams[0 if c2s else 1].feed(payload)
            for wire in messages:
                self._message(flow, ts_us, parse(wire))
        except DnsParseError:
            self.drops.count("dns", "not_dns")

    def _message(self, flow: _Flow, ts_us: int, m: DnsMessage) -> None:
        if not m.response:
            flow.queries += 1
            flow.pending[m.id] = (ts_us, m.name, m.qtype)
            self._name(flow, m.name, m.qtype).count += 1
            return
        flow.responses += 1
        flow.rcodes[m.rcode] += 1
        asked = flow.pending.pop(m.id, None)
        if asked is None:
            self.unmatched += 1
        else:
            lat = max(0, ts_us - asked[0])
            flow.lat_min = lat if flow.lat_min < 0 else min(flow.lat_min, lat)
            flow.lat_max = max(flow.lat_max, lat)
            flow.lat_sum += lat
            flow.lat_n += 1
        self._name(flow, m.name, m.qtype).rcodes[m.rcode] += 1
        for a in m.answers:
            flow.answers[(m.name, a.type, a.value)] = (a.ttl, ts_us)

    def _name(self, flow: _Flow, name: str, qtype: str) -> _Name:
        n = flow.names.get((name, qtype))
        if n is None:
            n = flow.names[(name, qtype)] = _Name()
        return n

    def _timeouts(self, flow: _Flow, now_us: int) -> None:
        for qid, (t, name, qtype) in list(flow.pending.items()):
            if now_us - t >= self.query_timeout_us:
                del flow.pending[qid]
                flow.timeouts += 1
                self._name(flow, name, qtype).timeouts += 1
                flow.changed = True

    def expire(self, now_us: int, *, flush: bool = False) -> list[FlowRecord]:
        """Records of the flows that changed since the last call (interim), and final records
        of those idle for idle_timeout (all of them when `flush`)."""
        out: list[FlowRecord] = []
        for key, flow in list(self.flows.items()):
            self._timeouts(flow, now_us if not flush else now_us + self.query_timeout_us)
            idle = flush or now_us - flow.last_us >= max(self.idle_us, self.query_timeout_us)
            if idle:
                del self.flows[key]
                out.append(self.record(key, flow, final=True))
            elif flow.changed:
                flow.changed = False
                out.append(self.record(key, flow, final=False))
        return out

    def summary(self, flow: _Flow) -> DnsSummary:
        ranked = sorted(flow.names.items(), key=lambda kv: (-kv[1].count, kv[0]))
        top, rest = ranked[:self.top_names], ranked[self.top_names:]
        top_names = {k[0] for k, _ in top}
        answers = sorted(((k, v) for k, v in flow.answers.items() if k[0] in top_names),
                         key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))[:self.max_answers]
        return DnsSummary(
            queries=flow.queries, responses=flow.responses, timeouts=flow.timeouts,
            rcodes=dict(sorted(flow.rcodes.items())),
            latency_us=None if not flow.lat_n else DnsLatency(
                flow.lat_min, flow.lat_sum // flow.lat_n, flow.lat_max),
            names=[DnsName(name, qtype, n.count, dict(sorted(n.rcodes.items())), n.timeouts)
                   for (name, qtype), n in top],
            other_names=sum(n.count for _, n in rest),
            answers=[DnsAnswer(name, typ, value, ttl, _utc(at))
                     for (name, typ, value), (ttl, at) in answers])

    def record(self, key: FlowKey, flow: _Flow, *, final: bool) -> FlowRecord:
        protocol, cip, cport, sip, sport = key
        return FlowRecord(
            record_id=self.next_id(), collector=self.collector, source="wire",
            start=_utc(flow.start_us), end=_utc(flow.last_us), final=final, protocol=protocol,
            family=flow.family,  # type: ignore[arg-type]
            client=Endpoint(cip, cport), server=Endpoint(sip, sport), observer="path",
            bytes_c2s=flow.bytes_c2s, bytes_s2c=flow.bytes_s2c, packets_c2s=flow.packets_c2s,
            packets_s2c=flow.packets_s2c, dns=self.summary(flow))
