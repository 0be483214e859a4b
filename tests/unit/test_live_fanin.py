"""The live fan-in's receiving and encoding side (aggregator/live_fanin.py) without a server:
chunks under max_payload that read back as the table, a peer's rows into the hub and one's own
never, gaps in a peer's sequence counted, and a late row of a partition's previous owner dropped
whatever the order the owners' messages arrive in; then two fan-ins over a real nats-server
through its restart. The whole path (two replicas, an SSE subscriber on each):
tests/unit/test_nats_transport.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from aggregator.changes import Changes
from aggregator.fanout import LiveHub
from aggregator.live_fanin import (
    H_PART,
    H_REPLICA,
    H_REV,
    H_SEQ,
    LiveFanIn,
    chunks,
    encode,
)
from eastwest.drops import Drops
from eastwest.jetstream import NatsOptions
from tests.servers import NatsServer
from tests.unit.pipes import FakeClock


@dataclass
class Msg:  # what the subscription hands the callback: data and headers
    data: bytes
    headers: dict[str, str] = field(default_factory=dict)


def rows(ids: list[str], version: int = 0) -> pa.Table:
    n = len(ids)
    return pa.table({"conn_id": pa.array(ids, pa.string()),
                     "bytes_c2s": pa.array([version] * n, pa.int64()),
                     "_ends_known": pa.array([True] * n)})


def msg(peer: str, seq: int, ids: list[str], *, part: int = 0, rev: int = 1,
        version: int = 0) -> Msg:
    return Msg(encode(rows(ids, version)), {H_REPLICA: peer, H_SEQ: str(seq),
                                            H_PART: str(part), H_REV: str(rev)})


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def fanin_and_sub(loop):
    drops = Drops()
    hub = LiveHub(drops, hold_s=0, clock=FakeClock())
    f = LiveFanIn(NatsOptions("nats://127.0.0.1:4222"), "me", hub, drops,
                  partition=lambda: None, revision=lambda k: None)

    async def sub():
        return hub.subscribe()
    return f, loop.run_until_complete(sub()), drops


def feed(loop, f: LiveFanIn, sub, msgs: list[Msg]) -> list[tuple[str, int]]:
    async def run():
        for m in msgs:
            await f._on_rows(m)
        await asyncio.sleep(0)  # the hub queues on the subscriber's loop
        out = []
        while not sub.empty():
            r = sub.get_nowait()
            out.append((r["conn_id"], r["bytes_c2s"]))
        return out
    return loop.run_until_complete(run())


def test_chunks_stay_under_the_limit_and_read_back_as_the_table():
    t = pa.table({"conn_id": [f"c{i}" for i in range(5000)],
                  "blob": [b"x" * (i % 300) for i in range(5000)]})
    datas, too_big = chunks(t, 20_000)
    assert too_big == 0 and len(datas) > 5
    assert all(len(d) <= 20_000 for d in datas)
    back = pa.concat_tables([pa.ipc.open_stream(d).read_all() for d in datas])
    assert back.equals(t)
    big = pa.table({"conn_id": ["a", "b", "c"], "blob": [b"x", b"y" * 50_000, b"z"]})
    datas, too_big = chunks(big, 20_000)
    assert too_big == 1
    assert pa.concat_tables([pa.ipc.open_stream(d).read_all() for d in datas]).column(
        "conn_id").to_pylist() == ["a", "c"]


def test_a_peers_rows_reach_the_hub_in_order_and_its_own_never(loop):
    f, sub, drops = fanin_and_sub(loop)
    got = feed(loop, f, sub, [msg("b", 1, ["x", "y"], version=1), msg("me", 1, ["own"]),
                              msg("b", 2, ["x"], version=2)])
    assert got == [("x", 1), ("y", 1), ("x", 2)]
    assert f.received_rows == 3 and not drops.snapshot()


def test_gaps_in_a_peers_sequence_are_counted_as_lost_messages(loop):
    f, sub, drops = fanin_and_sub(loop)
    feed(loop, f, sub, [msg("b", 1, ["x"]), msg("b", 4, ["y"]), msg("c", 7, ["z"]),
                        msg("c", 8, ["w"])])
    assert drops.snapshot() == {("stream", "fanin_lost"): 2}


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_late_row_of_a_partitions_previous_owner_never_replaces_the_new_owners(loop, order):
    """Partition 0 moves from b (lease revision 5) to c (revision 9): whatever order the
    three messages arrive in, once c's row was seen b's is dropped, and c's always shows."""
    f, sub, drops = fanin_and_sub(loop)
    msgs = [msg("b", 1, ["x"], rev=5, version=1), msg("b", 2, ["y"], rev=6, version=1),
            msg("c", 1, ["x"], rev=9, version=2)]
    arrived = [msgs[i] for i in order]
    got = feed(loop, f, sub, arrived)
    c_at = order.index(2)
    want = [(m.headers[H_REPLICA], r) for j, m in enumerate(arrived)
            if m.headers[H_REPLICA] == "c" or j < c_at
            for r in pa.ipc.open_stream(m.data).read_all().column("conn_id").to_pylist()]
    assert [cid for cid, _ in got] == [r for _, r in want]
    assert ("x", 2) in got
    assert drops.snapshot().get(("stream", "fanin_stale"), 0) == 2 - c_at  # b's after c's


def test_this_replicas_own_take_over_makes_the_previous_owners_late_rows_stale(loop):
    """On the new owner itself: its own step (told to `on_changes`) states its revision, and
    the old owner's row arriving after it is dropped."""
    f, sub, drops = fanin_and_sub(loop)
    f.partition, f.revision = (lambda: 0), (lambda k: 9)
    f.on_changes(changes(["x"]))
    assert feed(loop, f, sub, [msg("b", 1, ["x"], rev=5)]) == []
    assert drops.snapshot() == {("stream", "fanin_stale"): 1}


def changes(ids: list[str]) -> Changes:
    n = len(ids)
    return Changes(datetime.now(UTC), rows(ids).drop_columns(["_ends_known"]), np.zeros(n, bool),
                   np.zeros((n, 6), np.int64), np.zeros(n, np.int64), np.ones(n, bool))


def test_over_a_real_server_rows_flow_a_restart_is_counted_and_never_blocks(loop, tmp_path):
    """Two fan-ins on a real nats-server: b has a subscriber, so a publishes and b's hub gets
    a's rows; NATS stopped: a's step returns at once, its rows counted as not published; NATS
    back on the same port: the clients reconnect and rows flow again."""
    server = NatsServer(tmp_path / "nats").start()
    drops = Drops()
    opts = NatsOptions(server.url)
    hubs = {n: LiveHub(drops, hold_s=0, clock=FakeClock()) for n in "ab"}
    fa = LiveFanIn(opts, "a", hubs["a"], drops, lambda: 0, lambda k: 3)
    fb = LiveFanIn(opts, "b", hubs["b"], drops, lambda: None, lambda k: None)
    try:
        for f in (fa, fb):
            f.start()
            assert f.ready.wait(10)
        sub = loop.run_until_complete(_subscribe(hubs["b"]))
        got: list[str] = []

        def until(cond, what: str) -> None:
            give_up = time.monotonic() + 20
            while not cond():
                assert time.monotonic() < give_up, f"timed out waiting for {what}"
                loop.run_until_complete(asyncio.sleep(0.05))
                while not sub.empty():
                    got.append(sub.get_nowait()["conn_id"])

        until(lambda: fa.peers_want, "b's interest")
        fa.on_changes(changes(["x", "y"]))
        until(lambda: got == ["x", "y"], "a's rows on b")
        server.stop(keep=True)
        until(lambda: fa.nc is None or not fa.nc.is_connected, "a to see NATS gone")
        t0 = time.monotonic()
        fa.on_changes(changes(["lost"]))
        assert time.monotonic() - t0 < 0.05  # never waits for NATS
        assert drops.snapshot()[("stream", "fanin_publish_failed")] == 1
        server.start()
        until(lambda: fa.nc is not None and fa.nc.is_connected and fb.nc is not None
              and fb.nc.is_connected and fa.peers_want, "both back")
        fa.on_changes(changes(["z"]))
        until(lambda: got[-1:] == ["z"], "rows again after the restart")
        assert got == ["x", "y", "z"] and fb.received_rows == 3
    finally:
        fa.stop()
        fb.stop()
        server.stop()


async def _subscribe(hub: LiveHub):
    return hub.subscribe()
