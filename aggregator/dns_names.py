"""DNS facts of a window: the answers each client got, and the DNS of each flow to a resolver.

Stage: query side, beside the graph (aggregator/dns_graph.py). In: the raw records of flows to
port 53 that carry a `dns` summary (eastwest.record.DnsSummary, docs/flow-record.md), read from
the store. Out: `DnsFacts`: per (client address, answered address) the answers the client got
(`name_for`: the name that names a connection of that client to that address), and per DNS flow
its latest summary (`summaries`).

Why from the stored records, at read time (docs/aggregator.md, "Identity from DNS answers"): an
answer and the connection it explains reach the aggregator in any order, the answer often last
(a DNS flow's record comes at its interim tick or idle timeout, after the call it resolved). The
stored records are the same whatever order they arrived in and survive a restart, so the name a
read gives a connection depends on what is stored, never on arrival order. Answers are not read
back further than `LOOKBACK` before a window.

Naming rule (RFC 1035 section 3.2.1: a TTL is how long an answer may be used): an answer that
`client` got for `address` at `at` with `ttl` names a connection of that client to that address
started in [at - GRACE, at + ttl + GRACE] (source `dns`); a connection started later, while the
answer is still the newest that client got for the address, is named by it as a hint (source
`dns-hint`: the client may have kept the address past its TTL, or learnt it elsewhere). Among
several answers the newest wins, then the smallest name (the same answer in any order).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

from eastwest.record import DnsSummary, FlowRecord

DNS_PORT = 53
LOOKBACK = timedelta(minutes=15)  # answers older than this before a window's start are not read
GRACE = timedelta(seconds=1)      # capture time vs socket time of one host
FlowKey = tuple[str, str, int, str, int]  # protocol, client ip, client port, server ip, port


class Learnt(NamedTuple):
    at: datetime
    ttl: int
    name: str  # the asked name without its trailing dot, lower case


class Named(NamedTuple):
    name: str
    source: str  # `dns` (within the answer's TTL) or `dns-hint` (after it)


@dataclass
class Flow:
    """One DNS flow of one observer: its latest record's summary."""

    key: FlowKey
    start: datetime
    end: datetime
    final: bool
    summary: DnsSummary


def display_name(name: str) -> str:
    return name.rstrip(".").lower() or "."


@dataclass
class DnsFacts:
    # (client ip, answered address) -> answers, sorted by (at, name, ttl)
    answers: dict[tuple[str, str], list[Learnt]] = field(default_factory=dict)
    flows: list[Flow] = field(default_factory=list)

    @classmethod
    def of_records(cls, records: Iterable[FlowRecord], until: datetime) -> DnsFacts:
        """`records`: flows to port 53 in any order. Answers that arrived at or after `until`
        are left out (the window's future); each flow keeps its latest record before `until`
        (its cumulative summary), else its first one."""
        seen: dict[tuple[str, str], set[Learnt]] = {}
        latest: dict[tuple[FlowKey, datetime, str], FlowRecord] = {}
        for rec in records:
            d = rec.dns
            if d is None:
                continue
            for a in d.answers:
                if a.type in ("A", "AAAA") and a.at < until:
                    seen.setdefault((rec.client.ip, a.value), set()).add(
                        Learnt(a.at, a.ttl, display_name(a.name)))
            fk = (rec.protocol, rec.client.ip, rec.client.port, rec.server.ip, rec.server.port)
            k = (fk, rec.start, rec.collector)
            have = latest.get(k)
            if have is None or _later(rec, have, until):
                latest[k] = rec
        flows = [Flow(k[0], r.start, r.end, r.final, r.dns)  # type: ignore[arg-type]
                 for k, r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]
        return cls({k: sorted(v) for k, v in seen.items()}, flows)

    def name_for(self, client_ip: str, server_ip: str, start: datetime) -> Named | None:
        """The name a connection of `client_ip` to `server_ip` started at `start` gets from
        the answers that client got (the module's rule), None when none applies."""
        got = self.answers.get((client_ip, server_ip))
        if not got:
            return None
        # answers that arrived before the connection started (GRACE: clock of capture vs socket)
        upto = bisect_right(got, (start + GRACE, 1 << 62, "\uffff"))
        if not upto:
            return None
        valid = [a for a in got[:upto] if start <= a.at + timedelta(seconds=a.ttl) + GRACE]
        if valid:
            newest = max(a.at for a in valid)
            return Named(min(a.name for a in valid if a.at == newest), "dns")
        newest = got[upto - 1].at
        return Named(min(a.name for a in got[:upto] if a.at == newest), "dns-hint")

    @property
    def addresses(self) -> set[str]:
        return {ip for _, ip in self.answers}


def _later(rec: FlowRecord, have: FlowRecord, until: datetime) -> bool:
    """Whether `rec` is a better summary of its flow than `have` for a window ending `until`:
    the latest record that ended before `until`, else the earliest."""
    r_in, h_in = rec.end < until, have.end < until
    if r_in != h_in:
        return r_in
    if r_in:
        return (rec.end, rec.final, rec.record_id) > (have.end, have.final, have.record_id)
    return (rec.end, rec.record_id) < (have.end, have.record_id)


# -- the DNS of an edge to a resolver ----------------------------------------------------------------
TOP_NAMES = 10


def edge_dns(summaries: Iterable[DnsSummary], top: int = TOP_NAMES) -> dict[str, object]:
    """The DNS of one edge (docs/api.md, edge `dns`): its flows' summaries added up; names the
    top `top` by count (then by name), the rest counted in `other_names`."""
    queries = responses = timeouts = other = lat_n = 0
    lat_min: int | None = None
    lat_max = lat_sum = 0
    rcodes: dict[str, int] = {}
    names: dict[tuple[str, str], list] = {}
    for s in summaries:
        queries += s.queries
        responses += s.responses
        timeouts += s.timeouts
        other += s.other_names
        for rc, n in s.rcodes.items():
            rcodes[rc] = rcodes.get(rc, 0) + n
        if s.latency_us is not None:
            w = max(1, s.responses)
            lat_min = s.latency_us.min if lat_min is None else min(lat_min, s.latency_us.min)
            lat_max = max(lat_max, s.latency_us.max)
            lat_sum += s.latency_us.avg * w
            lat_n += w
        for nm in s.names:
            acc = names.setdefault((display_name(nm.name), nm.type), [0, {}, 0])
            acc[0] += nm.count
            for rc, n in nm.rcodes.items():
                acc[1][rc] = acc[1].get(rc, 0) + n
            acc[2] += nm.timeouts
    ranked = sorted(names.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return {
        "queries": queries, "responses": responses, "timeouts": timeouts,
        "nxdomain": rcodes.get("NXDOMAIN", 0), "servfail": rcodes.get("SERVFAIL", 0),
        "errors": timeouts + sum(n for rc, n in rcodes.items() if rc != "NOERROR"),
        "rcodes": dict(sorted(rcodes.items())),
        "latency_us": None if lat_min is None else {
            "min": lat_min, "avg": round(lat_sum / lat_n), "max": lat_max},
        "names": [{"name": n, "type": t, "count": c, "rcodes": dict(sorted(r.items())),
                   "timeouts": to} for (n, t), (c, r, to) in ranked[:top]],
        "other_names": other + sum(c for _, (c, _, _) in ranked[top:]),
    }
