"""The correlated tables of every store backend: connections, rollups and workloads are written
in the raw batch's transaction (a duplicate or failed batch adds nothing), rollup deltas add up,
the correlator's index is rebuilt after a restart, retention deletes old rows."""

from __future__ import annotations

from datetime import timedelta

import pytest

from aggregator.correlate import Correlator
from aggregator.correlating import CorrelatingStore
from aggregator.graph import Window, build_graph
from aggregator.identity import IdentityResolver
from aggregator.store import BACKENDS, open_store
from eastwest.drops import Drops
from tests.servers import store_location
from tests.unit.test_correlate import MAP, T0, rec


@pytest.fixture(params=BACKENDS)
def data_dir(request, tmp_path):
    # DuckDB: a directory; ClickHouse: a database on a real server with 2 local shards
    return request.param, store_location(request.param, tmp_path / request.param)


def opened(backend_dir):
    backend, path = backend_dir
    return CorrelatingStore(open_store(backend, path), Correlator(IdentityResolver(MAP)), Drops())


WINDOW = Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5))


def edge(store):
    g = build_graph(store, WINDOW)
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
    inner_ingest = s.inner.ingest

    def broken(*a, **kw):
        from aggregator.store import StoreError
        raise StoreError("disk full")

    s.inner.ingest = broken
    from aggregator.store import StoreError
    with pytest.raises(StoreError):
        s.ingest("h2", 1, [rec("server")])
    assert len(s.correlator) == 1
    (conn,) = [c for b in s.correlator.index.values() for c in b]
    assert conn.observed_by == ["client"]
    s.inner.ingest = inner_ingest
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
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 2, [rec("client", cport=40001, start=T0 + timedelta(days=8))])
    s.retention = timedelta(days=7)
    gone = s.maybe_apply_retention(now=T0 + timedelta(days=8, seconds=10))
    assert gone == {"flows": 1, "connections": 1, "rollups": 1, "workloads": 0}
    assert s.connection_count() == 1 and s.count() == 1
    s.close()


def test_workloads_table_keeps_first_and_last_seen(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 2, [rec("client", cport=40001, start=T0 + timedelta(minutes=3))])
    rows = {r["wid"]: r for r in s.workload_rows()}
    assert set(rows) == {"shop/frontend", "shop/api"}
    assert rows["shop/api"]["first_seen"] == T0
    assert rows["shop/api"]["last_seen"] == T0 + timedelta(minutes=3, seconds=2)
    assert rows["shop/api"]["source"] == "static"
    s.close()


def test_past_window_sees_only_its_connections(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 2, [rec("client", cport=40001, start=T0 + timedelta(hours=1))])
    g = build_graph(s, Window(T0 - timedelta(minutes=1), T0 + timedelta(minutes=1)))
    assert g.edges["shop/frontend", "shop/api"]["connections_opened"] == 1
    assert g.edges["shop/frontend", "shop/api"]["bytes_c2s"] == 1000
    s.close()


def test_listeners_get_each_committed_plan_once_and_cannot_break_ingest(data_dir):
    s = opened(data_dir)
    seen = []
    s.add_listener(lambda plan: seen.append([c.observed_by for c in plan.connections.values()]))
    s.add_listener(lambda plan: 1 / 0)  # a broken exporter: counted, the ingest still succeeds
    s.ingest("h1", 1, [rec("client")])
    s.ingest("h1", 1, [rec("client")])  # duplicate: no plan committed, nobody told
    s.ingest("h2", 1, [rec("server")])
    assert seen == [[["client"]], [["client", "server"]]]
    assert s.drops.snapshot() == {("exporters", "listener_error"): 2}
    assert s.connection_count() == 1
    s.close()
