"""A NodePort call's three pieces, through a real pipeline into every store backend: ONE stored
connection and one graph edge whatever the order, an aggregator restart between any two pieces
included (the connections reloaded from the store, the NodePort aliases learnt again from its
stored middle records: aggregator/worker.py `relearn_nat`). A merged half's row is deleted and
its rollup volumes move: the graph has no node address as a workload (docs/aggregator.md,
"NodePort"). In ClickHouse the half's row is replaced by a tombstone (`deleted = 1`, no
mutation) that no read returns, no restart reloads, a stale write of the half does not outrank,
a redone older batch does not undo; tables older than the column get it (docs/scale-out.md)."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from aggregator.graph import build_graph
from aggregator.store.clickhouse_schema import TOMBSTONE_VERSION
from aggregator.store.query import ConnectionQuery
from tests.servers import store_location
from tests.unit.test_correlate import rec
from tests.unit.test_correlate_nodeport import BACKEND, CLIENT, NODE, SEEN, T0, pieces
from tests.unit.test_store_connections import (  # noqa: F401 - a fixture
    WINDOW,
    data_dir,
    edge,
    opened,
)

ORDERS = list(itertools.permutations(("client", "server", "middle")))
HOST = {"client": "h1", "middle": "h2", "server": "h3"}


@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_one_stored_connection_and_one_edge_across_restarts(data_dir, order):  # noqa: F811
    s = opened(data_dir)
    try:
        for which in order:
            for seq, r in enumerate(pieces(which), start=1):
                s.ingest(HOST[which], seq, [r])
            s.flush()
            s.close()
            s = opened(data_dir)
        assert s.connection_count() == 1
        [row] = s.read().connections(ConnectionQuery(limit=10))
        assert (row["client_ip"], row["server_ip"], row["server_port"]) == (
            CLIENT.ip, BACKEND.ip, BACKEND.port)
        assert (row["service_ip"], row["service_port"]) == (NODE.ip, NODE.port)
        assert row["observed_by"] == ",client,path,server,"
        edges = edge(s)
        assert list(edges) == [("shop/frontend", "process:ew-web")], edges
        e = edges[("shop/frontend", "process:ew-web")]
        assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (1, 1000, 5000)
    finally:
        s.close()


# -- ClickHouse: a merged half is a tombstone (docs/scale-out.md, "Store: ClickHouse") ----------

def _feed(s, which: str, data):  # noqa: ANN001 - a Driven store
    for seq, r in enumerate(pieces(which), start=1):
        s.ingest(HOST[which], seq, [r])
    s.flush()
    s.close()
    return opened(data)


def _sql(s, sql: str) -> list:  # noqa: ANN001
    return s.store._exec(sql.replace("{db}", s.store.db))


def _tombstones(s) -> list[tuple]:  # noqa: ANN001
    return _sql(s, "SELECT conn_id, version FROM {db}.connections FINAL WHERE deleted = 1")


def _mutations(s) -> int:  # noqa: ANN001
    """Mutations of the store's connections tables (local tables: `<db>_connections`)."""
    return int(_sql(s, "SELECT count() FROM system.mutations WHERE table = "
                       "'{db}_connections'")[0][0])


def _live_only(s, real: str, half: str) -> None:  # noqa: ANN001
    """Every read of the connections table sees the real connection and never the half."""
    from aggregator.store.query import EdgeQuery

    assert s.connection_count() == 1
    assert [r["conn_id"] for r in s.read().connections(ConnectionQuery(limit=10))] == [real]
    assert [c.conn_id for c in s.store.recent_connections(10**9)] == [real]  # the reload
    [key] = _sql(s, "SELECT protocol, client_ip, client_port, server_ip, server_port, scope "
                    f"FROM {{db}}.connections FINAL WHERE conn_id = '{half}'")  # the tombstone
    assert key[3:5] in ((NODE.ip, NODE.port), (BACKEND.ip, BACKEND.port))  # a half's key
    assert s.store.connections_for_keys([key]) == {key: []}  # a batch's keys reloaded
    for group_by in ("workload", "namespace", "host"):
        nodes = set(build_graph(s.read(), WINDOW, group_by=group_by).nodes)
        assert not any(NODE.ip in n or SEEN.ip in n for n in nodes), (group_by, nodes)
    nodes = set(build_graph(s.read(), WINDOW, group_by="service").nodes)
    assert nodes == {"shop/frontend", f"svc:{NODE.ip}:{NODE.port}"}  # the NodePort dialled
    q = EdgeQuery(since=WINDOW.since, until=WINDOW.until, group_by="service")
    assert [r["n"] for r in s.store.service_backends(q)] == [1]
    assert s.store.service_addresses(q) == [(NODE.ip, NODE.port)]
    counts = s.store.edge_counts(EdgeQuery(since=WINDOW.since, until=WINDOW.until))
    assert sum(r["n"] for r in counts) == 1


@pytest.fixture
def ch(tmp_path):
    return "clickhouse", store_location("clickhouse", tmp_path / "ch")


@pytest.mark.parametrize("order", [o for o in ORDERS if o.index("middle") > 0], ids=">".join)
def test_clickhouse_a_merged_half_is_a_tombstone_never_read_nor_reloaded(ch, order):
    s = opened(ch)
    try:
        for which in order:
            s = _feed(s, which, ch)  # a restart after every piece: after the merge too
        tombs = _tombstones(s)
        halves = {"client", "server"} & set(order[:order.index("middle")])
        assert len(tombs) == len(halves) and all(v == TOMBSTONE_VERSION for _, v in tombs)
        assert _mutations(s) == 0  # no part rewritten
        assert s.loaded == 1  # the restart reloaded the real connection only
        [real] = [r["conn_id"] for r in s.read().connections(ConnectionQuery(limit=10))]
        for half, _ in tombs:
            _live_only(s, real, half)
        # retention: the tombstones go with their halves' day and last_seen, counted as none
        assert s.store.apply_retention(T0 - timedelta(days=1))["connections"] == 0
        assert len(_tombstones(s)) == len(halves)
        assert s.store.apply_retention(T0 + timedelta(days=2))["connections"] == 1
        assert _sql(s, "SELECT count() FROM {db}.connections") == [(0,)]
    finally:
        s.close()


def test_clickhouse_a_stale_write_of_a_merged_half_does_not_bring_it_back(ch):
    """A replica that read the half before the merge and writes it again afterwards (a version
    from its clock, above the tombstone's time): the tombstone still wins. Right, because the
    merge is written before its tombstone (the real connection holds the half's views)."""
    s = opened(ch)
    try:
        s = _feed(s, "client", ch)
        # what a replica that read the half before the merge holds: its newest row
        rows, types = s.store._exec(f"SELECT * FROM {s.store.db}.connections FINAL",
                                    with_column_types=True, settings={"strings_as_bytes": True})
        [row] = rows
        cols = {name: [x.decode() if isinstance(x, bytes) and name != "state" else x]
                for (name, _), x in zip(types, row, strict=True)}
        s = _feed(s, "middle", ch)
        [(half, _)] = _tombstones(s)
        assert cols["conn_id"] == [half]
        [real] = [r["conn_id"] for r in s.read().connections(ConnectionQuery(limit=10))]
        cols["version"] = [s.store._next_version(half) + 10**12]  # a clock well ahead
        # merges stopped (the server's, for a moment): the stale row stays beside the
        # tombstone, so the reads show that `deleted = 0` applies after FINAL, not before
        _sql(s, "SYSTEM STOP MERGES")
        try:
            s.store._insert("connections", cols)
            versions = _sql(s, f"SELECT deleted, version FROM {{db}}.connections "
                               f"WHERE conn_id = '{half}'")
            assert {(0, cols["version"][0]), (1, TOMBSTONE_VERSION)} <= set(versions)
            _live_only(s, real, half)
        finally:
            _sql(s, "SYSTEM START MERGES")
        s = _feed(s, "server", ch)
        _live_only(s, real, half)
    finally:
        s.close()


def test_clickhouse_a_redone_older_batch_after_the_merge_stores_the_call_once(ch):
    """The client half's batches were written but their marks lost (the aggregator died before
    them): the middle record merges the half (tombstone), then, after a restart, the half's
    batches are redone. Exactly once: one connection, one edge, the volumes once."""
    s = opened(ch)
    try:
        s = _feed(s, "client", ch)
        s = _feed(s, "middle", ch)
        assert len(_tombstones(s)) == 1
        s.store._delete("ingested_batches", "collector = 'h1'", None)  # the marks, lost
        assert not s.store.batch_applied("h1", 1)
        s = _feed(s, "client", ch)  # the redo
        assert s.store.batch_applied("h1", 2)
        s = _feed(s, "server", ch)
        assert len(_tombstones(s)) == 1
        [row] = s.read().connections(ConnectionQuery(limit=10))
        assert row["observed_by"] == ",client,path,server,"
        assert (row["bytes_c2s"], row["bytes_s2c"]) == (1000, 5000)
        e = edge(s)
        assert list(e) == [("shop/frontend", "process:ew-web")], e
        got = e[("shop/frontend", "process:ew-web")]
        assert (got["connections_opened"], got["bytes_c2s"], got["bytes_s2c"]) == (1, 1000, 5000)
    finally:
        s.close()


def test_clickhouse_an_old_connections_table_gets_the_deleted_column(ch, tmp_path):
    """A store made before tombstones: its connections tables (2 shards' local tables and the
    Distributed one) without `deleted`, a row in them. Opening the store adds the column
    (default 0: the old row is live), and merges then write tombstones into it."""
    from dataclasses import replace

    from clickhouse_driver import Client

    from aggregator.store.clickhouse_schema import TABLE, Location, distributed_ddl, local_ddl
    from tests.servers import CLUSTER, SHARD_DBS

    loc = Location.parse(str(ch[1]))
    old = replace(TABLE["connections"],
                  columns=[c for c in TABLE["connections"].columns if c.split()[0] != "deleted"])
    c = Client(**loc.client_kwargs())
    try:
        c.execute(f"CREATE DATABASE IF NOT EXISTS {loc.database}")
        for sdb in SHARD_DBS:
            c.execute(f"CREATE DATABASE IF NOT EXISTS {sdb}")
            c.execute(local_ddl(old, f"{sdb}.{loc.database}_connections", (18, 16), None))
        c.execute(distributed_ddl(old, f"{loc.database}.connections", CLUSTER,
                                  f"{loc.database}_connections"))
        # a connection row as the older store wrote it (another database: every column but
        # `deleted`), copied in
        other = ("clickhouse", store_location("clickhouse", tmp_path / "other"))
        o = opened(other)
        try:
            o.ingest("h9", 1, [rec("client", collector="h9")])
            o.flush()
            rows, types = o.store._exec(f"SELECT * FROM {o.store.db}.connections FINAL",
                                        with_column_types=True,
                                        settings={"strings_as_bytes": True})
        finally:
            o.close()
        names = [n for n, _ in types if n != "deleted"]
        cols = {n: [x.decode() if isinstance(x, bytes) and n != "state" else x]
                for n, x in zip([n for n, _ in types], rows[0], strict=True) if n in names}
        c.execute(f"INSERT INTO {loc.database}.connections ({', '.join(names)}) VALUES",
                  list(cols.values()), columnar=True, settings={"insert_distributed_sync": 1})
        s = opened(ch)
        try:
            for db, table in [(loc.database, "connections"),
                              *((sdb, f"{loc.database}_connections") for sdb in SHARD_DBS)]:
                [(typ, default)] = c.execute(
                    "SELECT type, default_expression FROM system.columns WHERE database = "
                    f"'{db}' AND table = '{table}' AND name = 'deleted'")
                assert (typ, default) == ("UInt8", "0"), (db, table)
            assert s.connection_count() == 1  # the old row: deleted = 0
            for which in ("client", "middle", "server"):
                s = _feed(s, which, ch)
            assert len(_tombstones(s)) == 1 and s.connection_count() == 2
        finally:
            s.close()
        s = opened(ch)  # opened again: nothing left to add
        s.close()
    finally:
        c.disconnect()
