"""The userspace half of the socket probes against a fake kernel side and a fake clock: records
per interval and at close, deferred closes finalised from the map, losses counted and marked,
a flush at stop. No root, no bcc."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from collector.pipeline import CollectorContext
from collector.probes.conn import (
    OWNER_CONTEXT,
    PHASE_ESTABLISHED,
    ROLE_CLIENT,
    ROLE_SERVER,
    ConnState,
)
from collector.probes.records import RecordBuilder
from collector.probes.source import ProbeLoop
from collector.proc import ProcessCache
from eastwest.clock import FakeClock

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FakeKernelClock:
    """ktime ns == seconds after T0."""

    def to_utc(self, ns: int) -> datetime:
        return T0 + timedelta(microseconds=ns // 1000)


def conn(sk: int, role: int = ROLE_CLIENT, **kw) -> ConnState:
    base = dict(sk=sk, start_ns=1_000, role=role, phase=PHASE_ESTABLISHED, family=2,
                saddr=bytes([10, 0, 0, 1]), daddr=bytes([10, 0, 0, 2]), sport=40000 + sk,
                dport=80, netns=4026531840, pid=42, comm="curl", owner=OWNER_CONTEXT)
    base.update(kw)
    return ConnState(**base)


class FakeKernel:
    """Scripted: each poll() returns the next batch of close events and advances the clock."""

    def __init__(self, clock: FakeClock, script: list[list[ConnState]], step: float = 0.25):
        self.clock, self.script, self.step = clock, list(script), step
        self.map: dict[int, ConnState] = {}
        self.counters = {"close_deferred": 0, "conn_map_full": 0, "listen_map_full": 0,
                         "deferred_lost": 0, "opened": 0, "closed": 0}
        self.forgotten: list[int] = []
        self.closed = False
        self.stop: threading.Event | None = None

    def poll(self, timeout_s: float) -> list[ConnState]:
        self.clock.t += self.step
        if not self.script:
            if self.stop is not None:
                self.stop.set()
            return []
        return self.script.pop(0)

    def live(self) -> list[ConnState]:
        return list(self.map.values())

    def forget(self, states: list[ConnState]) -> None:
        for s in states:
            self.forgotten.append(s.sk)
            self.map.pop(s.sk, None)

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        self.closed = True


def make(script, interval=1.0):
    clock = FakeClock(T0)
    ctx = CollectorContext(collector_id="t", clock=clock)
    kernel = FakeKernel(clock, script)
    builder = RecordBuilder(ctx, FakeKernelClock(), ProcessCache(cgroup_root=None))
    loop = ProbeLoop(ctx, lambda: kernel, builder, interval=interval)
    return ctx, kernel, loop


def run(loop, kernel):
    batches: list = []
    stop = threading.Event()
    kernel.stop = stop
    loop.run(batches.append, stop)
    return [r for b in batches for r in b]


def test_close_events_become_final_records_in_arrival_order():
    ctx, kernel, loop = make([[conn(1, end_ns=5_000, bytes_sent=10, bytes_recv=20)],
                              [conn(2, role=ROLE_SERVER, end_ns=6_000, bytes_sent=7, bytes_recv=3)]])
    recs = run(loop, kernel)
    assert [(r.final, r.observer, r.bytes_c2s, r.bytes_s2c) for r in recs] == [
        (True, "client", 10, 20), (True, "server", 3, 7)]
    assert [r.record_id for r in recs] == ["t:1", "t:2"]
    assert kernel.closed and loop.ready.is_set()


def test_live_connections_get_one_interim_record_per_interval_and_at_stop():
    ctx, kernel, loop = make([[]] * 10, interval=1.0)  # polls of 0.25 s; the 11th (2.75 s) stops
    kernel.map[7] = conn(7, bytes_sent=100)
    recs = run(loop, kernel)
    assert [r.final for r in recs] == [False, False, False]  # at 1 s, 2 s, and the flush
    assert {r.client.port for r in recs} == {40007}
    assert all(r.end >= r.start for r in recs)


def test_a_connecting_socket_has_no_interim_record():
    ctx, kernel, loop = make([[]] * 5)
    kernel.map[3] = conn(3, phase=1)
    assert run(loop, kernel) == []


def test_deferred_closes_are_finalised_from_the_map_and_forgotten():
    ctx, kernel, loop = make([[]] * 5)
    kernel.map[9] = conn(9, deferred=True, tcp_closed=True, end_ns=2_000, bytes_sent=5)
    kernel.counters["close_deferred"] = 1
    recs = run(loop, kernel)
    assert [(r.final, r.bytes_c2s) for r in recs] == [(True, 5)]
    assert kernel.forgotten == [9] and ctx.drops.snapshot() == {}  # deferred is not a loss
    assert recs[0].incomplete == []


def test_kernel_losses_are_counted_once_and_mark_the_interval():
    ctx, kernel, loop = make([[]] * 5)
    kernel.map[1] = conn(1)
    kernel.counters["conn_map_full"] = 3
    recs = run(loop, kernel)
    assert ctx.drops.snapshot() == {("socket", "conn_map_full"): 3}
    assert recs and "lost_events" in recs[0].incomplete


def test_a_state_without_ports_is_dropped_with_a_reason():
    ctx, kernel, loop = make([[conn(1, sport=0, end_ns=5_000)]])
    assert run(loop, kernel) == []
    assert ctx.drops.snapshot() == {("socket", "no_tuple"): 1}


def test_map_fill_and_kernel_counters_are_gauges_from_the_last_drain():
    ctx, kernel, loop = make([[]] * 5)
    assert loop.gauges(64) == {("eastwest_probe_map_capacity", (("map", "conns"),)): 64.0}
    kernel.map.update({1: conn(1), 2: conn(2), 3: conn(3, phase=1)})  # a connecting one counts
    kernel.counters.update(opened=3, conn_map_full=2)
    run(loop, kernel)
    g = loop.gauges(64)
    assert g[("eastwest_probe_map_entries", (("map", "conns"),))] == 3.0
    assert g[("eastwest_probe_kernel_events_total", (("event", "opened"),))] == 3.0
    assert g[("eastwest_probe_kernel_events_total", (("event", "conn_map_full"),))] == 2.0


def test_collector_metrics_render_a_sources_gauges():
    from collector.metrics import CollectorMetrics

    ctx, kernel, loop = make([[]] * 5)
    kernel.map[1] = conn(1)
    run(loop, kernel)
    class Source:  # a source with gauges() beside one without
        def gauges(self):
            return loop.gauges(64)

    m = CollectorMetrics(ctx.drops)
    m.watch_sources([Source(), object()])
    text = m.render().decode()
    assert 'eastwest_probe_map_entries{map="conns"} 1.0' in text
    assert 'eastwest_probe_map_capacity{map="conns"} 64.0' in text
    assert 'eastwest_probe_kernel_events_total{event="opened"} 0.0' in text
