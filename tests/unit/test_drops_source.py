"""The drop source's userspace half against a fake kernel (no root, no bcc): orientation of
dropped packets, per-reason cumulative counts, interim and final records, losses counted, and
the same records whatever order the kernel's counts arrive in."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta

import pytest

from collector.drops.kernel import DropCount, DropKey, reasons
from collector.drops.source import DropSource, DropTracker, orient
from collector.pipeline import CollectorContext
from eastwest.clock import FakeClock
from eastwest.record import Drop

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
S = 1_000_000_000


def to_utc(ns: int) -> datetime:
    return T0 + timedelta(microseconds=ns // 1000)


def count(src: str, sport: int, dst: str, dport: int, reason: str = "NETFILTER_DROP",
          packets: int = 1, flags: int = 0, at: int = 0, proto: int = 6) -> DropCount:
    return DropCount(DropKey(7, reason, 4, proto, flags, src, sport, dst, dport), packets,
                     60 * packets, at, at)


SYN = count("10.0.0.1", 40000, "10.0.0.2", 5432, packets=3, flags=0x02, at=1 * S)
# a SYN-ACK the client's side dropped (as if its own policy dropped replies): to the client
SYNACK = count("10.0.0.2", 5432, "10.0.0.1", 40000, reason="NO_SOCKET", flags=0x12, at=2 * S)
# data from the server, oriented by the port rule (5432 is not ephemeral: the server's)
DATA = count("10.0.0.2", 5432, "10.0.0.1", 40000, reason="TCP_CSUM", packets=2, at=3 * S)


def test_a_dropped_syn_names_its_sender_the_client_and_a_syn_ack_its_receiver() -> None:
    for c in (SYN, SYNACK, DATA):
        assert orient(c)[1] == (7, "tcp", 4, "10.0.0.1", 40000, "10.0.0.2", 5432)
    # equal ports, no SYN: the sender (nothing tells otherwise)
    assert orient(count("10.0.0.9", 53, "10.0.0.8", 53, proto=17))[1][3] == "10.0.0.9"
    # a SYN from the low port to an ephemeral one is still the client's
    assert orient(count("10.0.0.3", 80, "10.0.0.4", 45000, flags=0x02))[1][3] == "10.0.0.3"


@pytest.mark.parametrize("order", list(itertools.permutations([SYN, SYNACK, DATA])))
def test_one_record_per_flow_in_every_arrival_order(order) -> None:
    ctx = CollectorContext("h1")
    t = DropTracker(ctx, to_utc, idle_timeout=30)
    for i, c in enumerate(order):  # one drain each, or all in one: the same record
        t.add([c])
        if i == 0:
            (first,) = t.records(4 * S)
            assert not first.final
    (rec,) = t.records(4 * S, flush=True)
    assert rec.final and rec.source == "drops" and rec.observer == "path" and rec.netns == 7
    assert (rec.client.ip, rec.client.port, rec.server.ip, rec.server.port) == (
        "10.0.0.1", 40000, "10.0.0.2", 5432)
    assert rec.drops == [Drop("NETFILTER_DROP", 3), Drop("NO_SOCKET", 1), Drop("TCP_CSUM", 2)]
    assert rec.start == to_utc(1 * S) and rec.end == to_utc(3 * S)
    assert t.flows == {}


def test_counts_are_cumulative_interim_while_dropping_final_when_idle() -> None:
    t = DropTracker(CollectorContext("h1"), to_utc, idle_timeout=30)
    t.add([count("10.0.0.1", 40000, "10.0.0.2", 80, packets=2, flags=0x02, at=1 * S)])
    (r1,) = t.records(2 * S)
    t.add([count("10.0.0.1", 40000, "10.0.0.2", 80, packets=1, flags=0x02, at=3 * S)])
    (r2,) = t.records(4 * S)
    assert t.records(5 * S) == []  # nothing new, not idle yet: no record
    (r3,) = t.records(33 * S)  # 30 s after the last drop
    assert [r.final for r in (r1, r2, r3)] == [False, False, True]
    assert [r.drops for r in (r1, r2, r3)] == [[Drop("NETFILTER_DROP", 2)]] + [[Drop("NETFILTER_DROP", 3)]] * 2
    assert len({r.record_id for r in (r1, r2, r3)}) == 3


class FakeKernel:
    def __init__(self, batches: list[list[DropCount]], stats: list[dict[str, int]]) -> None:
        self.batches, self._stats, self.closed = batches, stats, False

    def drain(self) -> list[DropCount]:
        return self.batches.pop(0) if self.batches else []

    def stats(self) -> dict[str, int]:
        return self._stats.pop(0) if len(self._stats) > 1 else self._stats[0]

    def close(self) -> None:
        self.closed = True


def test_the_source_drains_every_interval_counts_kernel_losses_and_flushes_at_stop() -> None:
    clock = FakeClock(T0)
    ctx = CollectorContext("h1", clock=clock)
    kernel = FakeKernel([[SYN], [], [DATA]], [{"map_full": 0}, {"map_full": 0}, {"map_full": 4}])
    stop = threading.Event()
    got: list = []

    def emit(recs: list) -> None:
        got.extend(recs)
        if len(got) >= 2:
            stop.set()

    src = DropSource(ctx, lambda: kernel, DropTracker(ctx, to_utc), lambda: 4 * S, interval=1)
    src.run(emit, stop)
    assert kernel.closed and clock.slept[:2] == [1, 1]
    assert [r.final for r in got] == [False, False, True]
    assert got[-1].drops == [Drop("NETFILTER_DROP", 3), Drop("TCP_CSUM", 2)]
    assert got[-1].incomplete == ["lost_events"]  # the map was full in one drain
    assert ctx.drops.snapshot() == {("drops", "map_full"): 4}


FORMAT = ('\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\nprint fmt: '
          '"reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, '
          '{ 3, "NO_SOCKET" }, { 12, "NETFILTER_DROP" }, { 130, "MAX" })')


def test_reason_names_come_from_the_format_file() -> None:
    assert reasons(FORMAT) == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP", 130: "MAX"}
    # before Linux 5.17 the tracepoint had no reason: nothing to name (counted as UNKNOWN)
    assert reasons('\tfield:void * location;\n\nprint fmt: "skbaddr=%p protocol=%u location=%p"') == {}

