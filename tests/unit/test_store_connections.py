"""The correlated tables of every store backend: connections, rollups and workloads are written
in the raw batch's transaction (a duplicate or failed batch adds nothing), rollup deltas add up,
the correlator's index is rebuilt after a restart, retention deletes old rows."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from aggregator.correlate import Correlator
from aggregator.graph import Window, build_graph
from aggregator.identity import IdentityResolver
from aggregator.store import BACKENDS, open_store
from aggregator.store.query import RecordQuery
from aggregator.worker import JournaledCorrelation, WorkerSettings
from tests.servers import store_location
from tests.unit.pipes import Driven, driven
from tests.unit.test_correlate import MAP, T0, rec


@pytest.fixture(params=BACKENDS)
def data_dir(request, tmp_path):
    # DuckDB: a directory; ClickHouse: a database on a real server with 2 local shards
    return request.param, store_location(request.param, tmp_path / request.param)


def opened(backend_dir, **over) -> Driven:
    backend, path = backend_dir
    return driven(open_store(backend, path), IdentityResolver(MAP), **over)


def duck(path, **over) -> Driven:
    return driven(open_store("duckdb", path), IdentityResolver(MAP), **over)


class FixedClock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


WINDOW = Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5))


def edge(store: Driven):
    g = build_graph(store.read(), WINDOW)
    return {(u, v): a for u, v, a in g.edges(data=True)}


def test_one_connection_row_per_connection_and_rollups_added(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client", final=False, c2s=400, s2c=100)])
    s.ingest("h2", 1, [rec("server", c2s=1000, s2c=5000)])
    s.ingest("h1", 2, [rec("client", c2s=1000, s2c=5000), rec("client", cport=40001, c2s=1, s2c=2)])
    assert s.connection_count() == 2
    e = edge(s)[("shop/frontend", "shop/api")]
    assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (2, 1001, 5002)
    assert e["observed_by"] == {"client,server": 1, "client": 1}
    s.close()


def test_a_duplicate_batch_changes_no_table(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    r = s.ingest("h1", 1, [rec("client", cport=40001)])
    assert r.duplicate and s.connection_count() == 1
    assert edge(s)[("shop/frontend", "shop/api")]["bytes_c2s"] == 1000
    s.close()


def test_a_failing_write_leaves_store_and_memory_unchanged(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    s.flush()
    # what the ack waits for: the journal's sync (DuckDB, background), the store's commit
    target, name = (s.journal, "append") if s.journal is not None else (s.store, "ingest")
    inner_ingest = getattr(target, name)

    def broken(*a, **kw):
        from aggregator.store import StoreError
        raise StoreError("disk full")

    setattr(target, name, broken)
    from aggregator.store import StoreError
    with pytest.raises(StoreError):
        s.ingest("h2", 1, [rec("server")])
    assert len(s.correlator) == 1
    (conn,) = s.correlator.connections()
    assert conn.observed_by == ["client"]
    assert not s.batch_applied("h2", 1)
    setattr(target, name, inner_ingest)
    s.ingest("h2", 1, [rec("server")])  # the retry correlates as the first try would have
    assert edge(s)[("shop/frontend", "shop/api")]["observed_by"] == {"client,server": 1}
    s.close()


def test_restart_rebuilds_the_index_so_later_records_join(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client", final=False, c2s=10, s2c=0)])
    s.close()
    s = opened(data_dir)
    assert s.loaded == 1
    s.ingest("h2", 1, [rec("server")])
    s.ingest("h1", 2, [rec("client")])
    assert s.connection_count() == 1
    e = edge(s)[("shop/frontend", "shop/api")]
    assert (e["connections_opened"], e["bytes_c2s"], e["observed_by"]) == (1, 1000, {"client,server": 1})
    s.close()


def test_retention_deletes_what_ended_before_the_cutoff(data_dir):
    # the store's clock is fixed, so its own pass at start sees the test's time, not today's (for
    # which T0 is long gone); the writer's next periodic pass is RETENTION_EVERY_S away
    now = T0 + timedelta(days=8, seconds=10)
    s = opened(data_dir, clock=FixedClock(now), retention=timedelta(days=7))
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 2, [rec("client", cport=40001, start=T0 + timedelta(days=8))])
    gone = s.apply_retention(now)
    assert gone == {"flows": 1, "connections": 1, "rollups": 1, "workloads": 0}
    assert s.connection_count() == 1 and s.count() == 1
    s.close()


def test_workloads_table_keeps_first_and_last_seen(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 2, [rec("client", cport=40001, start=T0 + timedelta(minutes=3))])
    rows = {r["wid"]: r for r in s.read().workload_rows()}
    assert set(rows) == {"shop/frontend", "shop/api"}
    assert rows["shop/api"]["first_seen"] == T0
    assert rows["shop/api"]["last_seen"] == T0 + timedelta(minutes=3, seconds=2)
    assert rows["shop/api"]["source"] == "static"
    s.close()


def test_past_window_sees_only_its_connections(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 2, [rec("client", cport=40001, start=T0 + timedelta(hours=1))])
    g = build_graph(s.read(), Window(T0 - timedelta(minutes=1), T0 + timedelta(minutes=1)))
    assert g.edges["shop/frontend", "shop/api"]["connections_opened"] == 1
    assert g.edges["shop/frontend", "shop/api"]["bytes_c2s"] == 1000
    s.close()


def test_listeners_get_each_written_step_once_and_cannot_break_ingest(data_dir):
    s = opened(data_dir)
    seen = []
    s.add_listener(lambda ch: seen.append([c.observed_by for c in ch.connections()]))
    s.add_listener(lambda ch: 1 / 0)  # a broken exporter: counted, the ingest still succeeds
    s.ingest("h1", 1, [rec("client")])
    s.flush()  # written alone: a worker behind would write it in one step with the server's
    s.ingest("h1", 1, [rec("client")])  # duplicate: no plan committed, nobody told
    s.ingest("h2", 1, [rec("server")])
    s.flush()
    assert seen == [[["client"]], [["client", "server"]]]
    assert s.pipeline.drops.snapshot() == {("exporters", "listener_error"): 2}
    assert s.connection_count() == 1
    s.close()


def test_fast_rows_are_the_column_getters():
    """The store's rows (one pass per connection) equal the reference getters of CONN_COLUMNS,
    and a connection comes back from its DuckDB row unchanged."""
    import random

    from aggregator.correlate import Plan
    from aggregator.store.derived import CONN_NAMES, connection_of, connections_table, derived_of
    from tests.unit.test_correlate import random_connection

    rnd = random.Random(9)
    conns = [random_connection(rnd) for _ in range(500)]
    plan = Plan(connections={c.conn_id: c for c in conns})
    ref = connections_table(conns).to_pydict()
    fast = derived_of(plan).connections.to_pydict()
    assert fast == ref
    rows = derived_of(plan).connection_rows().to_pylist()
    assert [r[n] for r in rows for n in CONN_NAMES if n != "state"] == \
        [ref[n][i] for i in range(len(conns)) for n in CONN_NAMES if n != "state"]
    assert [connection_of(r) for r in rows] == conns


def test_pruned_connections_settle_and_a_restart_reloads_only_live_ones(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 2, [rec("client", cport=40001, start=T0 + timedelta(minutes=10))])
    s.flush()
    assert s.correlator.prune() == 1  # the first one closed 10 minutes ago: it can never change
    s.ingest("h1", 3, [rec("client", cport=40002, start=T0 + timedelta(minutes=10))])
    s.flush()
    assert s.correlator.settled == [] and s.connection_count() == 3
    g = build_graph(s.read(), Window(T0 - timedelta(minutes=1), T0 + timedelta(minutes=20)))
    assert g.edges["shop/frontend", "shop/api"]["connections_opened"] == 3
    s.close()
    s = opened(data_dir)
    # DuckDB reloads exactly what the correlator could still change; a backend may reload more
    assert s.loaded == 2 if data_dir[0] == "duckdb" else s.loaded >= 2
    s.ingest("h2", 1, [rec("server", cport=40001, start=T0 + timedelta(minutes=10))])
    assert s.connection_count() == 3
    e = build_graph(s.read(), Window(T0 - timedelta(minutes=1), T0 + timedelta(minutes=20))).edges[
        "shop/frontend", "shop/api"]
    assert e["observed_by"] == {"client": 2, "client,server": 1}
    s.close()


def test_a_file_of_the_one_table_layout_keeps_its_connections(tmp_path):
    """DuckDB files written with one `connections` table (primary key, `state` blobs): opened,
    old connections stay queryable and recent ones are reloaded into the correlator."""
    import duckdb

    from aggregator.store.derived import CONN_SCHEMA, connections_table, ddl
    from aggregator.store.duckdb import FILE_NAME

    c = Correlator(IdentityResolver(MAP))
    old = c.plan([rec("client", final=False)])
    c.commit(old)
    recent = c.plan([rec("client", cport=40001, start=T0 + timedelta(hours=2), final=False)])
    conns = [*old.connections.values(), *recent.connections.values()]
    con = duckdb.connect(str(tmp_path / FILE_NAME))
    con.execute("CREATE TABLE connections " + ddl(CONN_SCHEMA, ["conn_id"]))
    con.register("t", connections_table(conns))
    con.execute("INSERT INTO connections SELECT * FROM t")
    con.close()
    s = duck(tmp_path)
    assert s.loaded == 1 and s.connection_count() == 2  # the 2-hour-old one is settled
    s.ingest("h2", 1, [rec("server", cport=40001, start=T0 + timedelta(hours=2))])
    assert s.connection_count() == 2
    g = build_graph(s.read(), Window(T0 - timedelta(minutes=1), T0 + timedelta(hours=3)))
    assert g.edges["shop/frontend", "shop/api"]["observed_by"] == {"client": 1, "client,server": 1}
    s.close()


def test_acknowledged_batches_not_yet_applied_are_applied_at_the_next_start(tmp_path):
    """Background mode: the ack means the batch is in the journal, synced; when the aggregator
    stops before applying it (here: the store's write fails, then the process 'dies'), the next
    start replays the journal: stored and correlated in the order acknowledged, nothing twice,
    and the journal's segments are deleted once applied."""
    from aggregator.store import StoreError

    s = duck(tmp_path)
    assert isinstance(s.correlation, JournaledCorrelation)
    s.ingest("h1", 1, [rec("client", final=False, c2s=400, s2c=100)])
    s.flush()

    def broken(*a, **kw):
        raise StoreError("disk full")

    s.store.write_batches = broken
    assert not s.ingest("h2", 1, [rec("server", c2s=1000, s2c=5000)]).duplicate
    s.ingest("h1", 2, [rec("client", c2s=1000, s2c=5000), rec("client", cport=40001, c2s=1, s2c=2)])
    assert s.count() == 4 and s.store.count() == 1  # acknowledged: 3 of them in the journal only
    assert s.ingest("h1", 2, [rec("client")]).duplicate and s.batch_applied("h2", 1)
    assert not s.flush(timeout=0.5)  # correlation cannot catch up while the store fails
    assert s.lag()["batches"] == 2 and s.lag()["records"] == 3
    assert s.pipeline.drops.snapshot()[("correlate", "store_unavailable")] >= 1
    s.correlation._stopping = True  # the process dies: the worker stops, the store is closed
    s.store.close()
    s.correlation._writer.join(5)

    s = duck(tmp_path)
    assert s.connection_count() == 2  # waits for the batches queued again at start
    e = edge(s)[("shop/frontend", "shop/api")]
    assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (2, 1001, 5002)
    assert e["observed_by"] == {"client,server": 1, "client": 1}
    assert s.lag() == {"batches": 0, "records": 0, "seconds": 0.0}
    assert s.store.count() == 4 and s.store.uncorrelated_batches() == []
    assert s.ingest("h1", 2, [rec("client")]).duplicate
    s.ingest("h1", 3, [rec("client", cport=40002)])  # appended to the journal's newest segment
    assert s.flush(5) and s.journal.bytes() == 0
    s.close()
    assert [p.name for p in (tmp_path / "journal").iterdir()] in ([], ["0000000000000001.ewj"])
    s = duck(tmp_path)
    assert s.lag()["batches"] == 0 and s.count() == 5  # nothing replayed twice
    s.close()


def test_a_read_waits_for_the_batches_acknowledged_before_it_not_for_later_ones(tmp_path):
    """Under a steady stream the correlation queue never empties: a read (flush) waits only for
    what was acknowledged before it, so it answers while later batches are still queued."""
    import threading
    import time

    s = duck(tmp_path)
    gate, reached = threading.Event(), threading.Event()
    correlate = s.correlation._correlate

    def held(take):
        if take[0][1] == 3:  # batch 3: correlation stalls on it
            reached.set()
            gate.wait(10)
        correlate(take)

    s.correlation._correlate = held
    try:
        s.ingest("h1", 1, [rec("client", final=False)])
        s.ingest("h1", 2, [rec("client", cport=40001)])
        assert s.flush(5)  # batches 1 and 2: correlated
        s.ingest("h1", 3, [rec("client", cport=40002)])
        assert reached.wait(5)
        assert not s.flush(0.3)  # batch 3 was acknowledged before this read: it waits
        assert s.correlation.correlated_batches == 2 and s.lag()["batches"] == 1
    finally:
        gate.set()
    assert s.flush(5) and s.connection_count() == 3
    # a read started while batch 4 is in flight returns once 4 is done, batch 5 still stalled
    gates = {4: threading.Event(), 5: threading.Event()}
    started = threading.Event()

    def held2(take):
        if take[0][1] == 4:
            started.set()
        gates[take[0][1]].wait(10)
        correlate(take)

    s.correlation._correlate = held2
    try:
        s.ingest("h1", 4, [rec("client", cport=40003)])
        assert started.wait(5)
        got: list[bool] = []
        reader = threading.Thread(target=lambda: got.append(s.flush(5)))
        reader.start()
        while not s.correlation._cond._waiters:  # its target is fixed now
            time.sleep(0.01)
        s.ingest("h1", 5, [rec("client", cport=40004)])  # acknowledged after the read began
        gates[4].set()
        reader.join(6)
        assert got == [True] and s.correlation.correlated_batches == 4  # batch 5 still stalled
    finally:
        for g in gates.values():
            g.set()
    assert s.flush(5) and s.connection_count() == 5
    s.close()


def test_a_wire_batch_is_journaled_as_bytes_and_stored_from_them(tmp_path):
    """The binary path: the journal (and the queue) hold the batch's wire bytes and the indices
    ingest rejected; the worker decodes them again into the raw store's columns and the
    records it correlates, leaving out the rejected record (here one whose collector is not the
    batch's): it is in no table."""
    from datetime import UTC, datetime

    from aggregator.store.journal import Entry
    from aggregator.store.wire_columns import decode_columns
    from aggregator.worker import entry_batch
    from eastwest import codec

    s = duck(tmp_path)
    queued: list[object] = []
    append = s.journal.append
    s.journal.append = lambda *a: queued.append(append(*a)) or queued[-1]  # type: ignore[method-assign]
    stranger = rec("client", cport=40009, collector="h9")
    body = codec.encode_batch(codec.Batch("h1", 1, datetime.now(UTC), [
        rec("client", final=False, c2s=400, s2c=100), stranger, rec("client", cport=40001)]))
    batch = decode_columns(body)
    assert [r[:2] for r in batch.rejected] == [(1, "collector")]
    r = s.ingest_columns(batch, body)
    assert (r.stored, r.duplicate) == (2, False)
    assert isinstance(queued[0], Entry) and queued[0].body == body and queued[0].rejected == [1]
    assert [x.client.port for x in entry_batch(queued[0]).records()] == [40000, 40001]
    assert s.ingest_columns(decode_columns(body), body).duplicate
    assert s.connection_count() == 2
    assert sorted(x.client.port for x in s.read().records(RecordQuery())) == [40000, 40001]
    assert s.store.uncorrelated_batches() == []
    s.close()


def test_ingest_waits_while_correlation_is_a_whole_backlog_behind(tmp_path):
    """Back-pressure: with `max_pending` records waiting for correlation, the next ingest waits
    (up to `admit_wait_s`, 2 s) until the worker has made room (the collectors' spools hold the
    rest meanwhile)."""
    import threading

    s = duck(tmp_path, worker=WorkerSettings(max_pending=2))
    gate = threading.Event()
    correlate = s.correlation._correlate
    s.correlation._correlate = lambda take: (gate.wait(10), correlate(take))[1]
    try:
        s.ingest("h1", 1, [rec("client", cport=40001), rec("client", cport=40002)])  # 2 pending
        done = threading.Event()
        t = threading.Thread(target=lambda: (s.ingest("h1", 2, [rec("client", cport=40003)]),
                                             done.set()))
        t.start()
        assert not done.wait(0.5) and s.count() == 2  # waiting, batch 2 not journaled yet
        gate.set()
        assert done.wait(10) and s.count() == 3
        t.join()
    finally:
        gate.set()
    assert s.flush(5) and s.connection_count() == 3
    s.close()


def test_raw_batches_an_older_version_left_uncorrelated_are_correlated_first(tmp_path):
    """A data directory of the version before the journal acknowledged raw batches in `flows`
    flagged `correlated = false`: they are correlated at start, before what the journal holds."""
    raw = open_store("duckdb", tmp_path)
    raw.ingest("h1", 1, [rec("client", final=False, c2s=400, s2c=100)])  # raw only, as then
    raw.ingest("h2", 1, [rec("server", c2s=1000, s2c=5000)])
    assert [b[:2] for b in raw.uncorrelated_batches()] == [("h1", 1), ("h2", 1)]
    raw.close()
    s = duck(tmp_path)
    s.ingest("h1", 2, [rec("client", c2s=1000, s2c=5000)])
    assert s.connection_count() == 1 and s.count() == 3
    e = edge(s)[("shop/frontend", "shop/api")]
    assert (e["connections_opened"], e["bytes_c2s"], e["observed_by"]) == (1, 1000, {"client,server": 1})
    assert s.store.uncorrelated_batches() == [] and s.ingest("h2", 1, [rec("server")]).duplicate
    s.close()


def test_a_failed_write_after_the_planner_went_ahead_is_replanned_exactly(tmp_path):
    """The worker's planner advances the correlator's memory before the writer has stored the
    step, and plans the next batches meanwhile. When the write fails, every step not written goes
    back to the queue in order and memory is rebuilt from the store: the result is the one
    without the failure (no view twice, no byte counted twice), and listeners hear of each
    connection only once it is stored."""
    import threading

    from aggregator.store import StoreError

    s = duck(tmp_path, worker=WorkerSettings(coalesce=0))  # one batch a step
    s.ingest("h1", 1, [rec("client", final=False, c2s=400, s2c=100)])
    assert s.flush(5)
    heard: list[tuple[str, ...]] = []
    s.add_listener(lambda ch: heard.extend(tuple(c.observed_by) for c in ch.connections()))
    write = s.store.write_batches
    fail = threading.Event()
    fail.set()

    def once(*a, **kw):
        if fail.is_set():
            deadline = time.monotonic() + 5
            while len(s.correlation._writes) < 2 and time.monotonic() < deadline:  # planned ahead
                time.sleep(0.01)
            fail.clear()
            raise StoreError("disk full, once")
        return write(*a, **kw)

    s.store.write_batches = once
    s.ingest("h2", 1, [rec("server", c2s=1000, s2c=5000)])
    s.ingest("h1", 2, [rec("client", c2s=1000, s2c=5000)])
    s.ingest("h1", 3, [rec("client", cport=40001, c2s=7, s2c=9)])
    assert s.flush(10) and not fail.is_set()
    assert s.pipeline.drops.snapshot()[("correlate", "store_unavailable")] >= 1
    assert s.connection_count() == 2
    e = edge(s)[("shop/frontend", "shop/api")]
    assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (2, 1007, 5009)
    assert e["observed_by"] == {"client,server": 1, "client": 1}
    assert ("client", "server") in heard and s.count() == 4 and s.journal.bytes() == 0
    s.close()


def test_batches_out_of_order_are_stored_and_their_retries_are_duplicates(tmp_path):
    """The ack path knows a batch is new without asking the store when its batch_seq is above
    every one of its collector's; below that (a retry, or batches out of order) it asks."""
    s = duck(tmp_path)
    assert not s.ingest("h1", 7, [rec("client", cport=40007)]).duplicate
    assert not s.ingest("h1", 5, [rec("client", cport=40005)]).duplicate  # below 7, never seen
    assert s.flush(5)
    assert s.ingest("h1", 5, [rec("client", cport=40005)]).duplicate  # stored: the store says so
    assert s.ingest("h1", 7, [rec("client", cport=40007)]).duplicate
    assert not s.ingest("h2", 1, [rec("server", cport=40007)]).duplicate  # another collector
    s.close()
    s = duck(tmp_path)
    assert s.ingest("h1", 7, [rec("client")]).duplicate and s.ingest("h1", 6, []).duplicate is False
    assert s.count() == 3 and s.connection_count() == 2
    s.close()


def test_records_handed_over_as_objects_are_journaled_as_a_wire_batch(tmp_path):
    """Records given as objects (JSON ingest, JetStream into a journaled store) are journaled in
    the wire form and correlated from it, like the binary path: the same connections."""
    import threading

    s = duck(tmp_path)
    gate = threading.Event()
    plan = s.correlation._correlate
    s.correlation._correlate = lambda take: (gate.wait(10), plan(take))[1]
    try:
        s.ingest("h1", 1, [rec("client", final=False, c2s=400, s2c=100)])
        s.ingest("h2", 1, [rec("server", c2s=1000, s2c=5000)])
        queued = [p for _, _, p, _, _ in s.correlation._queue]
        assert all(q.rejected == [-1] and q.body[:4] == b"EWB1" for q in queued)
    finally:
        gate.set()
    e = edge(s)[("shop/frontend", "shop/api")]
    assert (e["connections_opened"], e["bytes_c2s"], e["observed_by"]) == (1, 1000, {"client,server": 1})
    s.close()


def test_a_full_backlog_answers_backlogged_after_a_short_wait(tmp_path):
    """Past `admit_wait_s` in a full backlog the ingest is refused (`Backlogged`: HTTP 429), not
    held: nothing is journaled for it, and the retry goes through once there is room."""
    import threading

    from aggregator.store.base import Backlogged

    s = duck(tmp_path, worker=WorkerSettings(max_pending=1, admit_wait_s=0.2))
    gate = threading.Event()
    plan = s.correlation._correlate
    s.correlation._correlate = lambda take: (gate.wait(10), plan(take))[1]
    try:
        s.ingest("h1", 1, [rec("client", cport=40001)])
        with pytest.raises(Backlogged, match=r"1 records behind \(--correlation-backlog 1\)"):
            s.ingest("h1", 2, [rec("client", cport=40002)])
        assert s.count() == 1 and not s.batch_applied("h1", 2)
        assert s.pipeline.drops.snapshot()[("ingest", "backlogged")] == 1
    finally:
        gate.set()
    assert not s.ingest("h1", 2, [rec("client", cport=40002)]).duplicate
    assert s.flush(5) and s.connection_count() == 2
    s.close()


def test_a_file_with_rollups_before_link_local_is_migrated_keeping_its_rows(tmp_path):
    """Rollups written before they were keyed by `link_local` keep their volumes (as not
    link-local: the older rows cannot be told apart) under the new primary key."""
    import duckdb

    from aggregator.store.derived import ROLLUP_ATTRS, ROLLUP_COUNTERS

    (tmp_path / "data").mkdir()
    con = duckdb.connect(str(tmp_path / "data" / "eastwest.duckdb"))
    old_key = ["minute", "client_wid", "server_wid", "client_host", "server_host", "server_port",
               "protocol"]
    cols = ("minute TIMESTAMPTZ, client_wid VARCHAR, server_wid VARCHAR, client_host VARCHAR, "
            "server_host VARCHAR, server_port INTEGER, protocol VARCHAR, "
            + ", ".join(f"{n} VARCHAR" for n in ROLLUP_ATTRS) + ", "
            + ", ".join(f"{n} BIGINT" for n in ROLLUP_COUNTERS))
    con.execute(f"CREATE TABLE rollups ({cols}, PRIMARY KEY ({', '.join(old_key)}))")
    con.execute("INSERT INTO rollups VALUES (?, 'shop/frontend', 'shop/api', 'h1', 'h2', 9090, "
                "'tcp', 'frontend', 'shop', 'api', 'shop', 1000, 5000, 0, 0, 0, 0)",
                [T0.replace(second=0, microsecond=0)])
    con.close()
    s = duck(tmp_path / "data")
    try:
        s.ingest("h1", 1, [rec("client", c2s=7, s2c=3)])
        g = build_graph(s.read(), Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
        e = g.edges["shop/frontend", "shop/api"]
        assert (e["bytes_c2s"], e["bytes_s2c"]) == (1007, 5003)
        with s.store._lock:
            rows = s.store._con.execute("SELECT link_local, bytes_c2s FROM rollups").fetchall()
        assert rows == [(False, 1007)]
    finally:
        s.close()


def test_automatic_checkpoints_do_not_vacuum_and_the_live_table_stays_bounded(tmp_path):
    """What the store's checkpoint setting rests on (aggregator/store/duckdb.py, VACUUM_TASKS_*):
    with vacuum off, a row group whose rows are all deleted is still dropped by a checkpoint, so
    `connections_live`, whose every row leaves it (replaced or settled), does not grow however
    long the aggregator runs. Driven in SQL on the store's own connection: 40 steps that each
    replace recent rows and move the oldest out, checkpointed as the COMMIT that crosses the
    threshold does."""
    from aggregator.store.duckdb import VACUUM_TASKS_WRITING, DuckDBStore

    store = DuckDBStore(tmp_path)
    con = store._con  # the writer's connection: its settings are the database's
    try:
        assert con.execute("SELECT current_setting('max_vacuum_tasks')").fetchone()[0] == \
            VACUUM_TASKS_WRITING == 0
        cols = [r[0] for r in con.execute("DESCRIBE connections_live").fetchall()]
        fill = ", ".join("lpad(printf('%x', i), 32, '0')" if c == "conn_id" else
                         "i" if c == "client_port" else "NULL" for c in cols)

        def step(lo: int, hi: int) -> None:
            con.execute(f"INSERT INTO connections_live SELECT {fill} FROM range({lo}, {hi}) t(i)")

        step(0, 200_000)
        con.execute("CHECKPOINT")
        used = []
        nxt = 200_000
        for k in range(40):
            con.execute("BEGIN")
            # settled: the oldest 20,000 move out; replaced: 5,000 recent ones get a new row
            con.execute("DELETE FROM connections_live WHERE client_port < "
                        "(SELECT min(client_port) FROM connections_live) + 20000")
            con.execute(f"DELETE FROM connections_live WHERE client_port >= {nxt - 10_000} AND "
                        f"client_port % 2 = 0")
            con.execute(f"INSERT INTO connections_live SELECT {fill} FROM range({nxt - 10_000}, "
                        f"{nxt}) t(i) WHERE i % 2 = 0")
            step(nxt, nxt + 20_000)
            con.execute("COMMIT")
            nxt += 20_000
            if k % 5 == 4:
                con.execute("CHECKPOINT")
                used.append(con.execute("SELECT used_blocks FROM pragma_database_size()")
                            .fetchone()[0])
        rows = con.execute("SELECT count(*) FROM connections_live").fetchone()[0]
        assert 190_000 <= rows <= 210_000
        # 1M rows went through the table; what it occupies stays that of ~200,000 rows
        assert max(used) <= 2 * used[0], used
    finally:
        store.close()
