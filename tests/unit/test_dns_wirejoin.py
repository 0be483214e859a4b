"""DNS onto the wire (collector/dns/wirejoin.py): a collector that captures a flow to a resolver
both in the client's namespace (--dns) and on the underlay sends ONE path record stream of it,
the wire's, carrying the DNS summary, whichever capture reports first and in every order of their
records; a flow the wire does not see keeps its DNS records; a flow the DNS capture does not see
keeps its wire records; and the aggregator's correlator makes one connection of what is sent.
The DNS records are made by the real DNS flow table from real DNS messages; the wire's are the
records the underlay flow table makes (source vxlan, tunnel, cumulative counters)."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta

import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.dns.flows import DnsFlowTable
from collector.dns.wirejoin import DnsJoiningSink, DnsWireJoin, joining_sink
from collector.pipeline import CollectorContext, run_pipeline
from eastwest.clock import FakeClock
from eastwest.drops import Drops
from eastwest.record import DnsSummary, Endpoint, FlowRecord, Tunnel

T0 = datetime(2026, 1, 1, tzinfo=UTC)  # FakeClock's start
C, R, CPORT = "10.244.1.5", "10.244.2.3", 40000
KEY = ("udp", C, CPORT, R, 53)
INTERVAL, IDLE, QTIMEOUT, MARGIN = 1.0, 1.0, 2.0, 2.0  # settle 3 s, a final waits up to 5 s
_ids = itertools.count(1)


def nid() -> str:
    return f"h1:{next(_ids)}"


def us(s: float) -> int:
    return int((T0 + timedelta(seconds=s)).timestamp() * 1e6)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def query(name: str, qid: int, rcode=dns.rcode.NOERROR) -> tuple[bytes, bytes]:
    q = dns.message.make_query(name, "A", use_edns=False)
    q.id = qid
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR:
        r.answer.append(dns.rrset.from_text_list(name, 30, "IN", "A", ["10.244.3.11"]))
    return q.to_wire(), r.to_wire()


def dns_table() -> DnsFlowTable:
    return DnsFlowTable("h1", nid, Drops(), query_timeout=QTIMEOUT, idle_timeout=IDLE)


def wire(start: float, end: float, final: bool, pkts: tuple[int, int], *, cport: int = CPORT,
         server: str = R) -> FlowRecord:
    """A record as the underlay's flow table makes it (cumulative, `end` the tick while live)."""
    return FlowRecord(record_id=nid(), collector="h1", source="vxlan", start=at(start),
                      end=at(end), final=final, protocol="udp", family=4,
                      client=Endpoint(C, cport), server=Endpoint(server, 53), observer="path",
                      bytes_c2s=40 * pkts[0], bytes_s2c=60 * pkts[1], packets_c2s=pkts[0],
                      packets_s2c=pkts[1], l3_bytes_c2s=90 * pkts[0], l3_bytes_s2c=110 * pkts[1],
                      tunnel=Tunnel("vxlan", 42, "10.213.0.1", "10.213.0.2", 4789))


def one_flow() -> dict[str, FlowRecord]:
    """One flow of two queries (one answered, one never), as each capture reports it:
    DNS: D1 interim at 1.0 s (2 queries, 1 response), D2 final at 3.0 s (the timeout counted);
    wire: U1 interim at its tick 1.0 s, U2 final at its tick 2.0 s (idle since 0.5 s)."""
    t = dns_table()
    q1, r1 = query("db.shop.svc.cluster.local.", 1)
    q2, _ = query("slow.platform.svc.cluster.local.", 2)
    t.packet(us(0.1), "udp", 4, C, CPORT, R, 53, q1)
    t.packet(us(0.2), "udp", 4, R, 53, C, CPORT, r1)
    t.packet(us(0.5), "udp", 4, C, CPORT, R, 53, q2)
    [d1] = t.expire(us(1.0))
    [d2] = t.expire(us(3.0))
    assert not d1.final and d2.final and d2.dns.timeouts == 1 and d1.dns.timeouts == 0
    return {"D1": d1, "D2": d2, "U1": wire(0.1, 1.0, False, (2, 1)),
            "U2": wire(0.1, 0.5, True, (2, 1))}


def joiner() -> tuple[DnsWireJoin, Drops]:
    drops = Drops()
    return DnsWireJoin(nid, drops, interval=INTERVAL, idle_timeout=IDLE,
                       query_timeout=QTIMEOUT, margin=MARGIN), drops


def interleavings(a: list[str], b: list[str]):
    n = len(a) + len(b)
    for pos in itertools.combinations(range(n), len(a)):
        ai, bi, out = iter(a), iter(b), []
        for i in range(n):
            out.append(next(ai) if i in pos else next(bi))
        yield out


def assert_one_wire_stream(out: list[FlowRecord], recs: dict[str, FlowRecord]) -> None:
    """What the aggregator must get of the flow: the wire's stream only (one start, one final,
    last), ends never going back, the final with the DNS's final summary."""
    mine = [r for r in out if r.key == KEY]
    assert mine
    assert {r.source for r in mine} == {"vxlan"}, "the DNS capture's own record went out"
    assert {r.start for r in mine} == {recs["U2"].start}
    finals = [r for r in mine if r.final]
    assert len(finals) == 1 and mine[-1].final
    assert finals[0].dns == recs["D2"].dns
    assert (finals[0].packets_c2s, finals[0].l3_bytes_c2s, finals[0].tunnel) == (
        2, 180, recs["U2"].tunnel)
    ends = [r.end for r in mine if not r.final]
    assert ends == sorted(ends)
    assert len({r.record_id for r in mine}) == len(mine)


ORDERS = [*interleavings(["D1", "D2"], ["U1", "U2"]), *interleavings(["D1", "D2"], ["U2"]),
          *interleavings(["D2"], ["U1", "U2"]), *interleavings(["D2"], ["U2"])]


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "one-batch"])
def test_every_order_of_the_two_captures_gives_one_wire_stream_with_the_dns(order, batched):
    recs = one_flow()
    join, drops = joiner()
    out: list[FlowRecord] = []
    if batched:  # both captures' records in one write
        out += join.add([recs[k] for k in order], at(2.5))
    else:
        for i, k in enumerate(order):  # each in its own write, within the captures' lag
            out += join.add([recs[k]], at(1.0 + 0.5 * i))
    out += join.add([], at(2.9))  # no deadline passed yet: whatever came is out
    assert_one_wire_stream(out, recs)
    assert join.flows == {} and join.joined == 1 and join.alone == 0
    assert drops.snapshot() == {}


@pytest.mark.parametrize("order", list(interleavings(["D1", "D2"], ["U1", "U2"])), ids="-".join)
def test_the_correlator_makes_one_connection_with_the_dns(order):
    from aggregator.correlate import Correlator
    from aggregator.identity import IdentityResolver, StaticMap

    recs = one_flow()
    join, _ = joiner()
    out = [r for i, k in enumerate(order) for r in join.add([recs[k]], at(1.0 + 0.5 * i))]
    c = Correlator(IdentityResolver(StaticMap([])))
    for r in out:
        c.commit(c.plan([r]))
    conns = [x for bucket in c.index.values() for x in bucket]
    assert len(conns) == 1
    assert list(conns[0].views) == ["path:h1"]


def test_a_flow_the_wire_does_not_see_keeps_its_dns_records_after_an_interval_and_margin():
    """Same-host resolver, a network without overlay: the DNS capture's records wait until the
    wire would have reported the flow, then go out as they are; a wire record that comes even
    later is left out (the flow stays one stream) and counted."""
    recs = one_flow()
    join, drops = joiner()
    assert join.add([recs["D1"]], at(1.0)) == []
    assert join.add([], at(3.0)) == []  # settle: first packet 0.1 + interval 1 + margin 2
    assert join.add([], at(3.2)) == [recs["D1"]]  # held until then, sent as it was
    assert join.add([recs["D2"]], at(3.3)) == [recs["D2"]]  # the rest follows at once
    assert join.add([recs["U2"]], at(3.4)) == []
    assert drops.snapshot() == {("dns", "wire_after_dns"): 1}
    assert join.alone == 1 and join.joined == 0
    join.add([], at(30))
    assert join.flows == {}


def test_dns_only_final_before_the_deadline_goes_out_once_at_the_deadline():
    recs = one_flow()
    join, _ = joiner()
    assert join.add([recs["D1"]], at(1.0)) + join.add([recs["D2"]], at(3.0)) == []
    assert join.add([], at(3.1)) == [recs["D2"]]  # the newest: cumulative, final


def test_dns_held_at_the_end_goes_out_at_close():
    recs = one_flow()
    join, _ = joiner()
    keep = Keep()
    sink = DnsJoiningSink(keep, join, lambda: at(1.0))
    sink.write([recs["D1"]])
    assert keep.got == []
    sink.close()
    assert keep.got == [recs["D1"]]


def test_a_flow_the_dns_capture_does_not_see_keeps_its_wire_records():
    """A namespace whose DNS is not watched: interims at once and unchanged; the final waits
    only until a DNS record would have come (settle after the flow's first packet)."""
    recs = one_flow()
    join, drops = joiner()
    assert join.add([recs["U1"]], at(1.0)) == [recs["U1"]]
    assert join.add([recs["U2"]], at(2.0)) == []
    assert join.add([], at(3.2)) == [recs["U2"]]
    assert join.flows == {} and drops.snapshot() == {}
    long_ago = wire(0.1, 100.0, True, (9, 9), cport=40001)  # long flows' finals: no wait
    assert join.add([long_ago], at(101.0)) == [long_ago]


def test_a_late_dns_final_is_counted_and_the_wire_final_keeps_the_summary_before_it():
    recs = one_flow()
    join, drops = joiner()
    out = join.add([recs["U1"], recs["D1"]], at(1.0)) + join.add([recs["U2"]], at(2.0))
    # U1 at once, then again with D1's summary (same start and end); U2 waits for D2
    assert [(r.final, r.end, r.dns) for r in out] == [(False, at(1.0), None),
                                                      (False, at(1.0), recs["D1"].dns)]
    out = join.add([], at(5.6))  # U2's last packet 0.5 + max(idle, qtimeout) 2 + 1 + margin 2
    assert len(out) == 1 and out[0].final and out[0].dns == recs["D1"].dns
    assert join.add([recs["D2"]], at(6.0)) == []
    assert drops.snapshot() == {("dns", "dns_after_wire"): 1}
    assert join.flows == {}


def test_a_flow_over_several_intervals_carries_the_growing_summary_on_one_stream():
    """A stub resolver's socket kept for minutes: one query every 0.7 s for 6 s; both captures
    report every interval, in alternating orders; every record of the flow is the wire's, its
    summary never goes back, and the final has all 9 queries."""
    t = dns_table()
    join, drops = joiner()
    out: list[FlowRecord] = []
    sent = 0
    for i in range(9):
        q, r = query(f"n{i}.shop.svc.cluster.local.", 100 + i)
        t.packet(us(0.1 + 0.7 * i), "udp", 4, C, CPORT, R, 53, q)
        t.packet(us(0.15 + 0.7 * i), "udp", 4, R, 53, C, CPORT, r)
        sent = i + 1
        tick = 1.0 + int(0.7 * i)
        if 0.1 + 0.7 * (i + 1) > tick:  # the last query before this tick: both report
            d = t.expire(us(tick))
            u = [wire(0.1, tick, False, (sent, sent))]
            out += join.add(d + u if i % 2 else u + d, at(tick + 0.1))
    out += join.add(t.expire(us(10.0)), at(10.0))  # the DNS's final first, then the wire's
    out += join.add([wire(0.1, 5.75, True, (9, 9))], at(10.1))
    mine = [r for r in out if r.key == KEY]
    assert {r.source for r in mine} == {"vxlan"} and len({r.start for r in mine}) == 1
    counts = [r.dns.queries for r in mine if r.dns is not None]
    assert counts == sorted(counts) and counts[-1] == 9 and mine[-1].final
    assert mine[-1].dns.responses == 9 and len(mine[-1].dns.names) == 9
    assert sum(r.final for r in mine) == 1 and drops.snapshot() == {}


def test_a_new_flow_on_the_same_five_tuple_is_joined_afresh():
    recs = one_flow()
    join, _ = joiner()
    out = join.add([recs["U1"], recs["D1"], recs["U2"], recs["D2"]], at(3.0))
    t = dns_table()
    q, r = query("auth.shop.svc.cluster.local.", 9)
    t.packet(us(60.0), "udp", 4, C, CPORT, R, 53, q)
    t.packet(us(60.1), "udp", 4, R, 53, C, CPORT, r)
    [d3] = t.expire(us(61.0))
    [d4] = t.expire(us(63.0))
    out += join.add([d3], at(61.0)) + join.add([wire(60.0, 60.1, True, (1, 1))], at(62.0))
    out += join.add([d4], at(63.0))
    finals = [r for r in out if r.final]
    assert [(r.start, r.dns.queries) for r in finals] == [(at(0.1), 2), (at(60.0), 1)]
    assert all(r.source == "vxlan" for r in out)


def test_other_records_pass_at_once_and_untouched():
    join, _ = joiner()
    other = [wire(0.1, 1.0, False, (1, 1), server=R).replace(
        server=Endpoint(R, 8080)),  # not port 53
        wire(0.1, 1.0, False, (1, 1)).replace(observer="client", source="socket", tunnel=None)]
    assert join.add(other, at(1.0)) == other
    assert join.flows == {}


def test_another_capture_points_stream_of_the_joined_flow_passes_unchanged():
    recs = one_flow()
    join, _ = joiner()
    join.add([recs["U1"], recs["D1"]], at(1.0))
    elsewhere = wire(0.12, 1.0, False, (2, 1))  # a second underlay link of the same collector
    assert join.add([elsewhere], at(1.1)) == [elsewhere]


class Keep:
    """The collector's sink, keeping what it got."""

    def __init__(self) -> None:
        self.got: list[FlowRecord] = []

    def write(self, records: list[FlowRecord]) -> None:
        self.got.extend(records)

    def close(self) -> None:
        pass


def test_the_collectors_pipeline_with_fake_sources_sends_one_stream_in_any_thread_order():
    """The sources' interface (collector/pipeline.py `Source`): a fake DNS capture and a fake
    underlay capture run in their own threads and emit the same flow's records into the sink
    the collector wires; whatever the threads' order, the sink gets the wire's one stream."""
    for _ in range(20):
        recs = one_flow()
        clock = FakeClock()
        clock.t = 1.5
        join, drops = joiner()
        keep = Keep()

        class Fake:
            def __init__(self, name: str, batches: list[list[FlowRecord]]) -> None:
                self.name, self.batches = name, batches

            def run(self, emit, stop: threading.Event) -> None:
                for b in self.batches:
                    emit(b)
                    emit([])  # the underlay's empty block batches

        run_pipeline([Fake("dns", [[recs["D1"]], [recs["D2"]]]),
                      Fake("vxlan:eth0", [[recs["U1"]], [recs["U2"]]])],
                     DnsJoiningSink(keep, join, clock.now), handle_signals=False)
        assert_one_wire_stream(keep.got, recs)
        assert drops.snapshot() == {}


def test_the_join_is_wired_only_when_both_captures_run():
    from collector.dns.source import DnsSource
    from collector.vxlan.live import LiveVxlanSource

    ctx = CollectorContext("h1", clock=FakeClock())
    dns_src = object.__new__(DnsSource)
    dns_src.interval, dns_src.table = 5.0, dns_table()
    vx = object.__new__(LiveVxlanSource)
    vx.interval = 5.0

    class Sink:
        def write(self, records): pass
        def close(self): pass

    sink = Sink()
    assert joining_sink(sink, [dns_src], ctx) is sink
    assert joining_sink(sink, [vx], ctx) is sink
    joined = joining_sink(sink, [vx, dns_src], ctx)
    assert isinstance(joined, DnsJoiningSink) and joined.inner is sink
    assert joined.join.settle == timedelta(seconds=5.0 + MARGIN)
    assert joined.join.final_wait == timedelta(seconds=max(IDLE, QTIMEOUT) + 5.0 + MARGIN)


# -- a simulation: many flows, both captures ticking on their own, records arriving late -------
FLOW = st.tuples(
    st.floats(0.0, 4.0),  # first query
    st.integers(1, 4),  # queries
    st.sampled_from([0.3, 0.8, 1.3]),  # between queries
    st.booleans(),  # the last query never answered
    st.booleans(),  # the wire sees the flow (else: same-host resolver)
)


def simulate(flows, dns_phase: float, jitter: list[float]) -> tuple[list, dict]:
    """Each capture's records of `flows`, as they tick (DNS every INTERVAL from `dns_phase`,
    the wire on multiples of it) and arrive (tick + a jitter): [(arrival, record)], and per
    flow what must come out."""
    events: list[tuple[float, int, FlowRecord]] = []
    want = {}
    j = itertools.cycle(jitter or [0.0])
    for n, (first, nq, gap, lost, seen) in enumerate(flows):
        port = 42000 + n
        qs = [first + gap * i for i in range(nq)]
        answers = [q + 0.05 for q in (qs[:-1] if lost else qs)]
        last = max(qs + answers)
        # the DNS capture: interim when something changed, final once idle max(idle, qtimeout)
        dns_recs = []
        reported = None
        t = dns_phase
        while True:
            t += INTERVAL
            if t < first:
                continue
            nq_t = sum(q <= t for q in qs)
            na_t = sum(a <= t for a in answers)
            to_t = sum(1 for q in qs if q <= t and q + 0.05 not in answers and t - q >= QTIMEOUT)
            final = t - last >= max(IDLE, QTIMEOUT) and to_t == nq - len(answers)
            state = (nq_t, na_t, to_t)
            if state != reported or final:
                s = DnsSummary(queries=nq_t, responses=na_t, timeouts=to_t,
                               rcodes={"NOERROR": na_t} if na_t else {})
                dns_recs.append((t, FlowRecord(
                    record_id=nid(), collector="h1", source="wire", start=at(first),
                    end=at(max(q for q in qs + answers if q <= t)), final=final,
                    protocol="udp", family=4, client=Endpoint(C, port), server=Endpoint(R, 53),
                    observer="path", bytes_c2s=40 * nq_t, bytes_s2c=60 * na_t,
                    packets_c2s=nq_t, packets_s2c=na_t, dns=s)))
                reported = state
            if final:
                break
        events += [(t + next(j), 0, r) for t, r in dns_recs]
        wire_recs = []
        if seen:  # the underlay: ticks on multiples of the interval, final once idle `IDLE`
            t, sent = 0.0, None
            while True:
                t += INTERVAL
                pk = sum(x <= t for x in qs + answers)
                if not pk:
                    continue
                if t - last > IDLE:
                    wire_recs.append((t, wire(first, last, True, (nq, len(answers)), cport=port)))
                    break
                if pk != sent:
                    wire_recs.append((t, wire(first, t, False, (sum(q <= t for q in qs),
                                                                 sum(a <= t for a in answers)),
                                              cport=port)))
                    sent = pk
            events += [(t + next(j), 1, r) for t, r in wire_recs]
        want[("udp", C, port, R, 53)] = (seen, [r for _, r in dns_recs], [r for _, r in wire_recs])
    events.sort(key=lambda e: (e[0], e[1]))
    return [(t, r) for t, _, r in events], want


@settings(max_examples=300, deadline=None)
@given(st.lists(FLOW, min_size=1, max_size=6), st.floats(0.0, 0.99),
       st.lists(st.floats(0.0, 0.5), max_size=7), st.booleans())
def test_simulated_captures_give_one_stream_per_flow_with_the_final_dns(flows, phase, jitter,
                                                                          wire_first):
    events, want = simulate(flows, phase, jitter)
    if wire_first:  # equal arrival times: the other capture's record first
        events.sort(key=lambda e: (e[0], e[1].source != "vxlan"))
    join, drops = joiner()
    out: list[FlowRecord] = []
    for t, r in events:
        out += join.add([r], at(t))
    out += join.flush()
    assert drops.snapshot() == {}
    for key, (seen, dns_recs, wire_recs) in want.items():
        mine = [r for r in out if r.key == key]
        finals = [r for r in mine if r.final]
        assert len(finals) == 1 and mine[-1].final, (key, mine)
        assert finals[0].dns == dns_recs[-1].dns  # the summary with every timeout
        if seen:
            assert {r.source for r in mine} == {"vxlan"}
            assert {r.start for r in mine} == {wire_recs[0].start}
            assert finals[0].packets_c2s == wire_recs[-1].packets_c2s
        else:  # the DNS capture's own records, from the one held at the deadline on
            assert mine == dns_recs[len(dns_recs) - len(mine):]
