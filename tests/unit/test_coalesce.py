"""Coalescing a partition's waiting shares (issue 19): one correlation step, one store write.

The same shares of two partitions, fed through intake's `accept_group` (what the JetStream
consumer calls with the shares it fetched) one, two, three or all at a time, on real DuckDB and
real ClickHouse 18.16 (two local shards): the stored connections, rollups, workloads, raw
records and marks are the same whatever the grouping. A group whose ClickHouse write dies half
way (after its rollups, after its connections) and is redone grouped otherwise stores exactly
what the clean run stored: nothing lost, nothing counted twice. A group is not written once the
partition is not held any more, and a redelivered share is a duplicate inside a group too."""

from __future__ import annotations

from datetime import timedelta
from itertools import count
from typing import Any

import pytest

from aggregator.correlate_columns import ColumnCorrelator
from aggregator.fanout import FanOut
from aggregator.identity import IdentityResolver
from aggregator.intake import Intake, Outcome, Retry
from aggregator.metrics import AggregatorMetrics
from aggregator.partitioned import PartitionedCorrelation
from aggregator.retention import Retention
from aggregator.store import open_store
from aggregator.store.base import StoreError
from aggregator.store.derived import ROLLUP_ATTRS, ROLLUP_COUNTERS, ROLLUP_KEY
from aggregator.store.query import ConnectionQuery
from eastwest import codec
from eastwest.clock import FakeClock
from eastwest.codec import Batch
from eastwest.drops import Drops
from eastwest.partition import mark_seq, record_partition
from tests.servers import store_location
from tests.unit.test_correlate import MAP, T0, rec

P = 2
N = 24  # connections


def collector_batches() -> list[tuple[str, int, list]]:
    """Three collectors' batches in the order they were published: a client's interim record
    then its final one (the connections live past a minute: their deltas span minutes), the
    server's final record and the wire's, spread over batches so that every connection's
    records are in several shares of its partition."""
    def start(i: int):
        return T0 + timedelta(seconds=7 * i)

    interim = [rec("client", cport=41000 + i, start=start(i), dur=20, final=False,
                   c2s=100 * i, s2c=300 * i, collector="h1") for i in range(N)]
    final = [rec("client", cport=41000 + i, start=start(i), dur=95, c2s=1000 + 100 * i,
                 s2c=5000 + 300 * i, collector="h1") for i in range(N)]
    server = [rec("server", cport=41000 + i, start=start(i), dur=95, c2s=1000 + 100 * i,
                  s2c=5000 + 300 * i, collector="h2") for i in range(N)]
    path = [rec("path", cport=41000 + i, start=start(i), dur=95, c2s=1000 + 100 * i,
                s2c=5000 + 300 * i, collector="h3") for i in range(N)]
    h = N // 2
    return [("h1", 1, interim[:h]), ("h2", 1, server[0::2]), ("h1", 2, interim[h:] + final[:h]),
            ("h3", 1, path), ("h2", 2, server[1::2]), ("h1", 3, final[h:])]


def partition_streams() -> dict[int, list[bytes]]:
    """Each partition's shares in stream order, as collectors publish them (split by the
    connection's partition, each share marked with its partition)."""
    streams: dict[int, list[bytes]] = {k: [] for k in range(P)}
    for coll, seq, records in collector_batches():
        for k in range(P):
            mine = [r for r in records if record_partition(r, P) == k]
            if mine:
                streams[k].append(codec.encode_batch(Batch(coll, mark_seq(seq, k), T0, mine)))
    assert all(len(s) >= 5 for s in streams.values())
    return streams


class Replica:
    """What an aggregator replica runs between the consumer and the store, every partition
    owned (aggregator/pipeline.py builds the same)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.clock = FakeClock(T0 + timedelta(minutes=10))
        drops = Drops()
        resolver = IdentityResolver(MAP)
        ids = count()

        def make() -> ColumnCorrelator:  # connection ids in order: the same in every run
            return ColumnCorrelator(resolver, clock=self.clock,
                                    ids=lambda n: b"".join(next(ids).to_bytes(16, "big")
                                                           for _ in range(n)))

        self.correlation = PartitionedCorrelation(store, make, FanOut(drops), drops,
                                                  Retention(store, None, self.clock),
                                                  self.clock, P)
        for k in range(P):
            self.correlation.take(k)
        self.intake = Intake(self.correlation, drops, AggregatorMetrics(drops),
                             max_batch_records=10_000)

    def feed(self, streams: dict[int, list[bytes]], size: int) -> list[Any]:
        """Each partition's stream in groups of `size` (0: all at once), partitions taking
        turns, as two partition workers of a replica do."""
        out: list[Any] = []
        groups = {k: [s[i:i + (size or len(s))] for i in range(0, len(s), size or len(s))]
                  for k, s in streams.items()}
        for turn in range(max(len(g) for g in groups.values())):
            for k in range(P):
                if turn < len(groups[k]):
                    out += self.intake.accept_group(groups[k][turn])
        return out


def stored(store: Any) -> dict[str, Any]:
    """Everything the store holds that grouping could change, without connection ids."""
    conns = store.connections(ConnectionQuery(limit=1000))
    shown = sorted(tuple(sorted((k, repr(v)) for k, v in c.items() if k != "conn_id"))
                    for c in conns)
    names = ROLLUP_KEY + ROLLUP_ATTRS
    sums = ", ".join(f"sum({c})" for c in ROLLUP_COUNTERS)
    if store.backend == "clickhouse":
        rows = store._exec(f"SELECT {', '.join(names)}, {sums} FROM {store.db}.rollups FINAL "
                           f"GROUP BY {', '.join(names)} ORDER BY {', '.join(names)}")
    else:
        rows = store._con.execute(f"SELECT {', '.join(names)}, {sums} FROM rollups GROUP BY "
                                  f"{', '.join(names)} ORDER BY {', '.join(names)}").fetchall()
    workloads = sorted(tuple(sorted((k, repr(v)) for k, v in w.items()))
                       for w in store.workload_rows())
    return {"connections": shown, "rollups": [tuple(r) for r in rows], "workloads": workloads,
            "records": store.count(), "batches": store.batches()}


@pytest.fixture(params=["duckdb", "clickhouse"])
def backend(request):
    return request.param


def open_fresh(backend: str, tmp_path, name: str) -> Any:
    return open_store(backend, store_location(backend, tmp_path / name))


def clean_run(backend: str, streams: Any, tmp_path) -> dict[str, Any]:
    """What a fresh store holds after the streams fed one share at a time (`stored`)."""
    clean = open_fresh(backend, tmp_path, "clean")
    try:
        Replica(clean).feed(streams, 1)
        return stored(clean)
    finally:
        clean.close()


def test_the_stored_tables_do_not_depend_on_how_the_shares_were_grouped(backend, tmp_path):
    streams = partition_streams()
    shares = sum(len(s) for s in streams.values())
    results: dict[int, dict[str, Any]] = {}
    for size in (1, 2, 3, 0):
        store = open_fresh(backend, tmp_path, f"g{size}")
        try:
            r = Replica(store)
            outs = r.feed(streams, size)
            assert [type(o) for o in outs] == [Outcome] * shares
            assert not any(o.result.duplicate for o in outs)
            results[size] = stored(store)
            if size != 1:  # the groups were written as groups
                assert r.correlation.groups >= 1
        finally:
            store.close()
    one = results[1]
    assert one["records"] == 4 * N and one["batches"] == shares
    assert len(one["connections"]) == N and len(one["rollups"]) >= 3
    for size in (2, 3, 0):
        assert results[size] == one, f"grouped {size or 'all'} at a time"


@pytest.mark.parametrize("dies_at", ["connections", "ingested_batches"])
def test_a_group_interrupted_half_way_and_redone_grouped_otherwise_stores_it_once(
        tmp_path, dies_at):
    """The ClickHouse write of a whole partition's group dies before `dies_at` is inserted
    (rollups and workloads in; or connections too, the marks not): nothing is acked, the
    shares come again and are applied one at a time, then the rest: the store holds exactly
    what a clean run holds."""
    streams = partition_streams()
    want = clean_run("clickhouse", streams, tmp_path)
    store = open_fresh("clickhouse", tmp_path, "crash")
    try:
        r = Replica(store)
        real = store._insert
        armed = [True]

        def insert(table: str, cols: dict) -> None:
            if table == dies_at and armed[0]:
                armed[0] = False
                raise StoreError("clickhouse: the aggregator died here")
            real(table, cols)

        store._insert = insert
        first = r.intake.accept_group(streams[0])
        assert [type(o) for o in first] == [Retry] * len(streams[0])  # all naked, none acked
        assert r.correlation.parts[0].correlator is not None
        # redelivered: the first share alone, then two, then the rest; the other partition all
        assert all(isinstance(o, Outcome) for o in r.intake.accept_group(streams[0][:1]))
        assert all(isinstance(o, Outcome) for o in r.intake.accept_group(streams[0][1:3]))
        assert all(isinstance(o, Outcome) for o in r.intake.accept_group(streams[0][3:]))
        assert all(isinstance(o, Outcome) for o in r.intake.accept_group(streams[1]))
        assert stored(store) == want
    finally:
        store.close()


def test_a_redelivered_share_is_a_duplicate_inside_a_group_and_nothing_is_written_twice(
        tmp_path):
    streams = partition_streams()
    store = open_fresh("duckdb", tmp_path, "dup")
    try:
        r = Replica(store)
        s = streams[0]
        r.intake.accept_group(s[:2])
        outs = r.intake.accept_group([s[1], s[2], s[2], s[3]])  # one applied, one twice
        assert [o.result.duplicate for o in outs] == [True, False, True, False]
        outs = r.intake.accept_group(s[4:] + streams[1])
        want_batches = sum(len(x) for x in streams.values())
        assert store.batches() == want_batches
        assert stored(store) == clean_run("duckdb", streams, tmp_path)
    finally:
        store.close()


def test_a_group_is_not_written_once_the_partition_is_not_held(tmp_path):
    streams = partition_streams()
    store = open_fresh("duckdb", tmp_path, "lost")
    try:
        r = Replica(store)
        outs = r.intake.accept_group(streams[0], still_owned=lambda: False)
        assert [type(o) for o in outs] == [Retry] * len(streams[0])
        assert store.batches() == 0 and store.count() == 0
        # the memory planned ahead was reloaded: the owner (here, again) applies them right
        outs = r.intake.accept_group(streams[0], still_owned=lambda: True)
        assert all(isinstance(o, Outcome) and not o.result.duplicate for o in outs)
        r.intake.accept_group(streams[1])
        assert stored(store) == clean_run("duckdb", streams, tmp_path)
    finally:
        store.close()


def test_a_run_over_the_record_bound_is_split_and_a_failed_run_naks_every_later_share(tmp_path):
    streams = partition_streams()
    store = open_fresh("duckdb", tmp_path, "runs")
    try:
        r = Replica(store)
        s = streams[0]
        real_group, real_one = store.write_group, store.ingest
        calls: list[int] = []  # shares of each write (a run of one share is an `ingest`)

        def write_group(shares):
            calls.append(len(shares))
            if len(calls) == 2:
                raise StoreError("duckdb: disk full")
            real_group(shares)

        def ingest(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise StoreError("duckdb: disk full")
            return real_one(*args, **kw)

        store.write_group, store.ingest = write_group, ingest
        outs = r.intake.accept_group(s, max_records=N // 2)
        assert len(calls) == 2 and calls[0] >= 1
        kinds = [type(o) for o in outs]
        assert kinds == [Outcome] * calls[0] + [Retry] * (len(s) - calls[0])
        assert store.batches() == calls[0]
    finally:
        store.close()


def test_coalesced_writes_are_counted_with_their_shares_and_records(tmp_path):
    """The `eastwest_nats_group_*` metrics after a known run: a write per group that had a new
    share (a group of duplicates only writes nothing), its new shares and records, and the
    histogram of shares per write."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from aggregator.pipeline import _PartitionMetrics

    streams = partition_streams()
    s0, s1 = streams[0], streams[1]
    store = open_fresh("duckdb", tmp_path, "metrics")
    try:
        r = Replica(store)
        r.intake.accept_group(s0[:3])          # a write of 3 shares
        r.intake.accept_group([s0[2], s0[3]])  # one duplicate, one new: a write of 1
        r.intake.accept_group([s0[3]])         # a duplicate only: no write
        r.intake.accept_group(s0[4:])          # a write of the rest of partition 0
        r.intake.accept_group(s1)              # a write of all of partition 1
        sizes = [3, 1, len(s0) - 4, len(s1)]
        records = sum(len(codec.decode_batch(b).records) for s in streams.values() for b in s)
        assert records == 4 * N
        c = r.correlation
        writes, shares, recs, buckets = c.group_counts()
        assert (writes, shares, recs) == (4, len(s0) + len(s1), records)
        assert dict(buckets) == {le: sum(1 for n in sizes if le == "+Inf" or n <= int(le))
                                 for le, _ in buckets}
        registry = CollectorRegistry()
        registry.register(_PartitionMetrics(SimpleNamespace(owned={0, 1}, taken_over=2), None,
                                            c))
        text = generate_latest(registry).decode()
        for line in ("eastwest_nats_group_writes_total 4.0",
                     f"eastwest_nats_group_shares_total {float(shares)}",
                     f"eastwest_nats_group_records_total {float(records)}",
                     'eastwest_nats_group_size_shares_bucket{le="1"} 1.0',
                     'eastwest_nats_group_size_shares_bucket{le="+Inf"} 4.0',
                     "eastwest_nats_group_size_shares_count 4.0",
                     f"eastwest_nats_group_size_shares_sum {float(shares)}"):
            assert line in text, line
        # a partition handed over (its correlator forgotten) keeps the counts
        c.drop(0)
        assert c.group_counts()[:3] == (4, len(s0) + len(s1), records)
    finally:
        store.close()
