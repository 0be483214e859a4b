"""The live hub (aggregator/fanout.py) behind GET /api/v1/flows/stream: what a step changed goes
to each subscriber as a table and becomes dicts only as the subscriber reads; order kept across
steps and slices; a subscriber that cannot keep up loses whole tables, counted, never blocks the
writer; a connection whose ends are not known yet is held up to a second, a newer version
replacing it."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from aggregator.changes import Changes
from aggregator.fanout import SLICE, LiveHub
from eastwest.drops import Drops
from tests.unit.pipes import FakeClock

AT = datetime(2026, 12, 6, tzinfo=UTC)


def changes(ids: list[str], known: list[bool] | None = None, version: int = 0) -> Changes:
    n = len(ids)
    rows = pa.table({"conn_id": pa.array(ids, pa.string()),
                     "bytes_c2s": pa.array([version] * n, pa.int64()),
                     "views": pa.array([b"state"] * n, pa.binary())})
    return Changes(AT, rows, np.zeros(n, bool), np.zeros((n, 6), np.int64),
                   np.zeros(n, np.int64), np.array(known if known is not None else [True] * n))


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def drain(loop: asyncio.AbstractEventLoop, sub) -> list[dict]:
    async def run() -> list[dict]:  # on the loop: the tables sent before are queued first
        out = []
        while not sub.empty():
            out.append(sub.get_nowait())
        return out
    return loop.run_until_complete(run())


def subscribe(loop: asyncio.AbstractEventLoop, hub: LiveHub):
    async def run():
        return hub.subscribe()
    return loop.run_until_complete(run())


def test_rows_arrive_in_order_across_steps_and_slices_without_their_state(loop) -> None:
    hub = LiveHub(Drops(), queue_size=10_000, hold_s=1.0, clock=FakeClock())
    sub = subscribe(loop, hub)
    first = [f"a{i}" for i in range(SLICE * 2 + 7)]  # more than a slice: read in three
    hub.publish(changes(first, version=1))
    hub.publish(changes(["b0", "b1"], version=2))
    got = drain(loop, sub)
    assert [r["conn_id"] for r in got] == [*first, "b0", "b1"]
    assert {tuple(sorted(r)) for r in got} == {("bytes_c2s", "conn_id")}  # no `views`
    assert [r["bytes_c2s"] for r in got[-3:]] == [1, 2, 2]
    hub.unsubscribe(sub)
    hub.publish(changes(["c0"]))
    assert drain(loop, sub) == [] and hub.subscribers == 0


def test_a_slow_subscriber_loses_whole_tables_counted_and_catches_up(loop) -> None:
    drops = Drops()
    hub = LiveHub(drops, queue_size=5, hold_s=1.0, clock=FakeClock())
    slow, other = subscribe(loop, hub), subscribe(loop, hub)
    hub.publish(changes(["a0", "a1", "a2"]))
    hub.publish(changes(["b0", "b1", "b2"]))  # 6 > 5: dropped whole for both
    hub.publish(changes(["c0", "c1"]))        # fits: 5
    assert [r["conn_id"] for r in drain(loop, other)] == ["a0", "a1", "a2", "c0", "c1"]
    assert drops.snapshot()[("stream", "subscriber_slow")] == 6
    async def one() -> str:
        return (await slow.get())["conn_id"]
    assert loop.run_until_complete(one()) == "a0"  # room for one more now
    hub.publish(changes(["d0"]))
    assert [r["conn_id"] for r in drain(loop, slow)] == ["a1", "a2", "c0", "c1", "d0"]
    assert drops.snapshot()[("stream", "subscriber_slow")] == 6


class StillClock(FakeClock):
    """The hub's own releaser thread sleeps until the test ends: the test releases by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def sleep(self, seconds: float) -> None:
        self.gate.wait(5)


def test_a_connection_without_known_ends_is_held_then_replaced_or_released(loop) -> None:
    clock = StillClock()
    hub = LiveHub(Drops(), hold_s=1.0, clock=clock)
    sub = subscribe(loop, hub)
    hub.publish(changes(["x", "y", "z"], known=[False, True, False], version=1))
    assert [r["conn_id"] for r in drain(loop, sub)] == ["y"] and hub.held == 2
    clock.t += 0.5
    hub.publish(changes(["x"], known=[True], version=2))  # its ends known now: sent, not held
    assert [(r["conn_id"], r["bytes_c2s"]) for r in drain(loop, sub)] == [("x", 2)]
    hub.publish(changes(["z"], known=[False], version=3))  # newer, still unknown: replaces
    assert drain(loop, sub) == [] and hub.held == 1
    assert hub.release(clock.monotonic()) == 1  # held since 0.5 s ago: not yet
    clock.t += 0.6
    assert hub.release(clock.monotonic()) == 0
    assert [(r["conn_id"], r["bytes_c2s"]) for r in drain(loop, sub)] == [("z", 3)]
    hub.publish(changes(["q"], known=[False]))
    clock.t += 1.0
    hub.publish(changes(["q"], known=[False], version=4))  # its second is up: sent as it is
    assert [(r["conn_id"], r["bytes_c2s"]) for r in drain(loop, sub)] == [("q", 4)]
    assert hub.held == 0
    clock.gate.set()


def test_a_row_held_while_the_releaser_is_ending_is_still_released(loop) -> None:
    """The releaser thread found nothing left and was about to end when a step held a new row
    (it saw the thread alive and started none): the row is still sent once its second is up.
    (A loaded CI run's stream waited 60 s for 30 held connections no later step came for.)
    The releaser is stopped right after its last look, as a busy scheduler may."""
    import time

    hub = LiveHub(Drops(), hold_s=0.2)
    sub = subscribe(loop, hub)
    ending, resume = threading.Event(), threading.Event()
    release = hub.release

    def release_then_pause(now: float | None = None) -> int:
        left = release(now)
        if left == 0 and not ending.is_set():
            ending.set()
            assert resume.wait(10)
        return left

    hub.release = release_then_pause  # type: ignore[method-assign]
    hub.publish(changes(["a"], known=[False]))
    assert ending.wait(10)  # "a" released; the releaser has found nothing left
    assert [r["conn_id"] for r in drain(loop, sub)] == ["a"]
    hub.publish(changes(["b"], known=[False]))  # held now, the releaser still alive
    resume.set()
    deadline = time.monotonic() + 5
    got: list[str] = []
    while not got and time.monotonic() < deadline:
        got = [r["conn_id"] for r in drain(loop, sub)]
        time.sleep(0.05)
    assert got == ["b"] and hub.held == 0


def test_a_subscriber_whose_loop_is_gone_is_dropped() -> None:
    lp = asyncio.new_event_loop()
    hub = LiveHub(Drops(), hold_s=0.0)
    subscribe(lp, hub)
    lp.close()
    hub.publish(changes(["a"]))
    assert hub.subscribers == 0


def test_a_filtered_subscriber_is_sent_only_the_rows_its_filter_matches(loop) -> None:
    """The hub narrows each table with the filter compiled as the store compiles it, before
    queueing: a stream for one port is not drowned by everyone else's rows."""
    from eastwest.filters import Filter, ip_hex

    drops = Drops()
    hub = LiveHub(drops, queue_size=4, hold_s=0.0)
    port = subscribe_filtered(loop, hub, Filter.build([("to_port", "65001", False)]))
    every = subscribe(loop, hub)
    ch = changes([f"c{i}" for i in range(10)])
    hexes = pa.array([ip_hex("10.0.0.1")] * 10, pa.string())
    ch.rows = (ch.rows.append_column("server_port", pa.array([80] * 9 + [65001], pa.int32()))
               .append_column("client_ip_hex", hexes).append_column("server_ip_hex", hexes))
    hub.publish(ch)
    assert [r["conn_id"] for r in drain(loop, port)] == ["c9"]
    assert drain(loop, every) == [] and drops.snapshot()[("stream", "subscriber_slow")] == 10


def subscribe_filtered(loop: asyncio.AbstractEventLoop, hub: LiveHub, flt):
    async def run():
        return hub.subscribe(flt)
    return loop.run_until_complete(run())


def test_a_filter_the_rows_cannot_answer_passes_them_all_counted(loop) -> None:
    """A table without the filter's columns (never from the pipeline): the subscriber gets the
    rows unfiltered (its own check of each row still applies), the failure is counted."""
    from eastwest.filters import Filter

    drops = Drops()
    hub = LiveHub(drops, hold_s=0.0)
    sub = subscribe_filtered(loop, hub, Filter.build([("to_port", "65001", False)]))
    hub.publish(changes(["a", "b"]))
    assert [r["conn_id"] for r in drain(loop, sub)] == ["a", "b"]
    assert drops.snapshot()[("stream", "filter_error")] == 1
