"""DNS onto the wire: one path record stream per flow when one collector captures a flow to a
resolver twice, in its client's namespace (`--dns`) and on the underlay (`--underlay`, the VXLAN
devices' links, or `--wire-interface`).

Stage: between the sources and the sink, under the sink's lock (collector/pipeline.py), after NAT
folding. Wired by collector/main.py only when the collector runs both a DNS capture and a packet
capture. In: every record of the collector. Out: the same records, except for flows to port 53:

- the DNS capture's records (observer `path` with a `dns` summary) are not sent while the packet
  capture reports the same flow (protocol, client, server): the packet capture's records are,
  each carrying the newest `dns` summary of the flow. So the aggregator gets one `path` view per
  (collector, flow), with the wire's counters, tunnel and VTEPs, and the DNS;
- when the DNS summary changes after the packet capture's last record of the flow (an answer read
  later, a query timed out), that record is sent again with the new summary: a new record id, the
  same `start` and `end` (the aggregator replaces a view by a record of the same end);
- the packet capture's final record of a flow that has DNS waits for the DNS capture's final
  record (the summary with every timeout counted), at most `max(idle_timeout, query_timeout) +
  interval + margin` after the flow's last packet;
- a flow the packet capture does not see (a resolver on the same host, a network that is not an
  overlay, a namespace whose DNS does not leave through a captured link) keeps the DNS capture's
  own records: they wait until `interval + margin` after the flow's first packet (by then the
  packet capture, which ticks every interval, would have reported it), then go out as they are;
- whichever capture reports first: a packet capture's final that comes before any DNS record of
  its flow waits the same `interval + margin` for one.

What cannot be joined is counted (drops stage `dns`): a packet capture's record of a flow whose
DNS records already went out on their own (`wire_after_dns`: it is left out, so the flow stays one
stream; the wire saw it later than `interval + margin`), a DNS summary that came after the packet
capture's final of its flow had to go (`dns_after_wire`: the final kept the summary before it).
Held records are released by the next write after their deadline (the packet capture writes at
least every 0.25 s, empty batches included), and all of them at `close()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from collector.pipeline import CollectorContext, Sink
from eastwest.drops import Drops
from eastwest.record import DnsSummary, FlowRecord

FlowKey = tuple[str, str, int, str, int]  # protocol, client ip, client port, server ip, port
DNS_PORT = 53
MARGIN_S = 2.0  # beyond one interval: a busy capture's block, its tick's own work
MAX_FLOWS = 65536
_PROTOCOLS = ("udp", "tcp")

WAIT, JOINED, ALONE = "wait", "joined", "alone"


@dataclass
class _Flow:
    mode: str = WAIT
    dns: FlowRecord | None = None  # the DNS capture's newest record of the flow
    wire: FlowRecord | None = None  # the packet capture's newest record sent (as sent)
    wire_final: FlowRecord | None = None  # its final, held for the DNS capture's final
    wire_done: bool = False  # the packet capture's final went out
    sent_dns: DnsSummary | None = None  # the summary on the last wire record sent
    deadline: datetime | None = None  # when what is held goes out as it is
    counted: bool = False  # counted in `joined`


def is_dns_record(r: FlowRecord) -> bool:
    """A DNS capture's record (collector/dns/flows.py): a path record with a `dns` summary."""
    return r.dns is not None and r.observer == "path" and r.source != "drops"


def is_wire_dns_flow(r: FlowRecord) -> bool:
    """A packet capture's record of a flow to a resolver: a path record to port 53, no `dns`."""
    return (r.observer == "path" and r.dns is None and r.server.port == DNS_PORT
            and r.protocol in _PROTOCOLS and r.source != "drops")


class DnsWireJoin:
    """The join of the module doc. `add(records, now)` -> the records to send now;
    `flush()` -> whatever is still held (the end)."""

    def __init__(self, next_id: Callable[[], str], drops: Drops, *, interval: float,
                 idle_timeout: float, query_timeout: float, margin: float = MARGIN_S,
                 max_flows: int = MAX_FLOWS) -> None:
        self.next_id, self.drops = next_id, drops
        self.settle = timedelta(seconds=interval + margin)
        self.final_wait = timedelta(seconds=max(idle_timeout, query_timeout) + interval + margin)
        self.max_flows = max_flows
        self.flows: dict[FlowKey, _Flow] = {}
        self.joined = 0  # flows whose DNS went onto the wire's records
        self.alone = 0  # flows whose DNS records went out on their own

    # -- in ---------------------------------------------------------------------------------
    def add(self, records: list[FlowRecord], now: datetime) -> list[FlowRecord]:
        out: list[FlowRecord] = []
        for r in records:
            if r.dns is None and r.server.port != DNS_PORT:  # nearly every record: at once
                out.append(r)
            elif is_dns_record(r):
                self._dns(r, now, out)
            elif is_wire_dns_flow(r):
                self._wire(r, now, out)
            else:
                out.append(r)
        self._release(now, out)
        return out

    def flush(self) -> list[FlowRecord]:
        out: list[FlowRecord] = []
        for key, f in list(self.flows.items()):
            self._end(key, f, out)
        return out

    def _flow(self, key: FlowKey, r: FlowRecord, out: list[FlowRecord]) -> _Flow | None:
        f = self.flows.get(key)
        if f is None:
            if len(self.flows) >= self.max_flows:
                self.drops.count("dns", "join_full")
                out.append(r)  # unjoined, as it came: nothing is lost
                return None
            f = self.flows[key] = _Flow()
        return f

    def _dns(self, r: FlowRecord, now: datetime, out: list[FlowRecord]) -> None:
        key = r.key
        f = self.flows.get(key)
        if f is not None and f.dns is not None and f.dns.start != r.start:
            # a new DNS flow on the same 5-tuple (the last one ended): the old join is over
            self._end(key, f, out)
            f = None
        if f is None:
            f = self._flow(key, r, out)
            if f is None:
                return
        f.dns = r
        if f.mode == ALONE:
            out.append(r)
            if r.final:  # a late wire record of it is still left out for a while
                f.deadline = now + self.settle
            return
        if f.mode == WAIT:
            if f.wire_final is None:  # nothing of the wire yet: hold until it would have come
                if f.deadline is None:
                    f.deadline = r.start + self.settle
                return
            self._joined(f)  # the wire's final waited for this: now for the DNS's final too
            f.deadline = f.wire_final.end + self.final_wait
        if f.wire_done:
            if r.dns != f.sent_dns:
                self.drops.count("dns", "dns_after_wire")
            if r.final:
                del self.flows[key]
            return
        if f.wire_final is not None:
            if r.final:
                self._send_final(key, f, out)
            return
        assert f.wire is not None
        if r.dns != f.sent_dns:  # the wire's last record again, with the new summary
            out.append(f.wire.replace(record_id=self.next_id(), dns=r.dns))
            f.sent_dns = r.dns

    def _wire(self, r: FlowRecord, now: datetime, out: list[FlowRecord]) -> None:
        key = r.key
        f = self.flows.get(key)
        if f is not None and f.mode == ALONE:
            self.drops.count("dns", "wire_after_dns")
            return
        if f is not None and (f.wire_done or (f.wire_final is not None
                                              and f.wire_final.start != r.start)):
            self._end(key, f, out)  # a new flow on the same 5-tuple
            f = None
        if f is not None and f.wire is not None and f.wire.start != r.start:
            out.append(r)  # another capture point's stream of the flow: not the joined one
            return
        if f is None:
            f = self._flow(key, r, out)
            if f is None:
                return
            if not r.final:  # the wire reports the flow first: its stream is the flow's
                f.mode = JOINED
        if f.dns is not None:
            self._joined(f)
            f.deadline = None
        dns = f.dns.dns if f.dns is not None else None
        if not r.final:
            sent = r.replace(dns=dns) if dns is not None else r
            out.append(sent)
            f.wire, f.sent_dns = sent, dns
            return
        if f.dns is not None and f.dns.final:  # both ends in: the flow is done
            f.wire_final = r
            self._send_final(key, f, out)
            return
        f.wire_final = r  # wait for the DNS's final (or, without DNS yet, for any DNS)
        if f.dns is None:
            f.mode = WAIT
            f.deadline = max(r.start + self.settle, now)
        else:
            f.deadline = r.end + self.final_wait

    def _joined(self, f: _Flow) -> None:
        f.mode = JOINED
        if not f.counted:
            f.counted = True
            self.joined += 1

    # -- out --------------------------------------------------------------------------------
    def _send_final(self, key: FlowKey, f: _Flow, out: list[FlowRecord]) -> None:
        assert f.wire_final is not None
        dns = f.dns.dns if f.dns is not None else None
        out.append(f.wire_final.replace(dns=dns) if dns is not None else f.wire_final)
        f.sent_dns, f.wire_final, f.wire_done, f.deadline = dns, None, True, None
        if f.dns is None or f.dns.final:
            del self.flows[key]

    def _release(self, now: datetime, out: list[FlowRecord]) -> None:
        for key, f in list(self.flows.items()):
            if f.deadline is not None and now >= f.deadline:
                self._expire(key, f, now, out)

    def _expire(self, key: FlowKey, f: _Flow, now: datetime, out: list[FlowRecord]) -> None:
        """What `f` holds goes out as it is (its deadline passed); a flow with nothing held
        left is forgotten."""
        if f.wire_final is not None:
            self._send_final(key, f, out)
            if key in self.flows:  # the DNS's final did not come in time: forget it later
                f.deadline = now + self.final_wait
        elif f.mode == WAIT and f.dns is not None:  # the wire did not see it: DNS on its own
            f.mode = ALONE
            self.alone += 1
            out.append(f.dns)
            # a late wire record of it is left out for a while after the DNS's final
            f.deadline = now + self.settle if f.dns.final else None
        else:
            del self.flows[key]

    def _end(self, key: FlowKey, f: _Flow, out: list[FlowRecord]) -> None:
        """The join is over (a new flow took its 5-tuple, or the collector stops): what it
        holds goes out, and it is forgotten."""
        if f.wire_final is not None:
            self._send_final(key, f, out)
        elif f.mode == WAIT and f.dns is not None:
            self.alone += 1
            out.append(f.dns)
        self.flows.pop(key, None)


class DnsJoiningSink:
    """A sink that joins DNS onto the wire's records before handing them on (`Sink`)."""

    def __init__(self, inner: Sink, join: DnsWireJoin, now: Callable[[], datetime]) -> None:
        self.inner, self.join, self.now = inner, join, now

    def write(self, records: list[FlowRecord]) -> None:
        self.inner.write(self.join.add(records, self.now()))

    def close(self) -> None:
        try:
            self.inner.write(self.join.flush())
        finally:
            self.inner.close()


def joining_sink(sink: Sink, sources: Sequence[object], ctx: CollectorContext) -> Sink:
    """`sink` behind a `DnsJoiningSink` when `sources` hold both a DNS capture and a live packet
    capture (collector/main.py wires it); `sink` itself otherwise."""
    from collector.dns.source import DnsSource

    dns = [s for s in sources if isinstance(s, DnsSource)]
    if not dns:
        return sink
    from collector.vxlan.live import LiveVxlanSource

    wire = [s for s in sources if isinstance(s, LiveVxlanSource)]
    if not wire:
        return sink
    d = dns[0]
    join = DnsWireJoin(ctx.next_record_id, ctx.drops,
                       interval=max([d.interval] + [w.interval for w in wire]),
                       idle_timeout=d.table.idle_us / 1e6,
                       query_timeout=d.table.query_timeout_us / 1e6)
    return DnsJoiningSink(sink, join, ctx.clock.now)
