"""A data folder written by an earlier version opens and is read by this one (the stored data is
part of the contract): tests/data/store-before-pipeline.tar.gz, written by commit 3159b35 with
tests/data/make_store_before_pipeline.py (tests/data/README.md). Its rollups have no
`link_local` key yet (migrated), its connections no `naming`; the correlator reloads the open
connection, and a later record still joins it."""

from __future__ import annotations

import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aggregator.graph import Window, build_graph
from aggregator.identity import IdentityResolver
from aggregator.store.duckdb import DuckDBStore
from aggregator.store.query import ConnectionQuery, RecordQuery
from tests.unit.pipes import driven
from tests.unit.test_correlate import MAP, rec

FOLDER = Path(__file__).resolve().parents[1] / "data" / "store-before-pipeline.tar.gz"
T0 = datetime(2026, 11, 28, 4, 0, 10, tzinfo=UTC)
WINDOW = Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5))


def test_a_data_folder_of_the_version_before_the_pipeline_opens_and_reads(tmp_path):
    with tarfile.open(FOLDER) as tar:
        tar.extractall(tmp_path, filter="data")
    s = driven(DuckDBStore(tmp_path), IdentityResolver(MAP))
    try:
        assert s.loaded >= 1  # the open connection (and the recent closed ones) reloaded
        read = s.read()
        assert len(read.records(RecordQuery())) == 10
        rows = read.connections(ConnectionQuery(limit=10, columns=(
            "client_wid", "server_wid", "observed_by", "bytes_c2s", "closed")))
        assert sorted((r["observed_by"], r["bytes_c2s"], r["closed"]) for r in rows) == [
            (",client,", 100, False)] + [(",client,path,server,", 1000, True)] * 3
        g = build_graph(read, WINDOW)
        e = g.edges["shop/frontend", "shop/api"]
        assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (4, 3100, 15010)
        # the open connection goes on: its server's record joins it, and its client's final
        s.ingest("h2", 100, [rec("server", cport=42000, final=False, dur=5, c2s=100, s2c=10)])
        s.ingest("h1", 100, [rec("client", cport=42000, dur=9, c2s=300, s2c=30)])
        read = s.read()
        assert read.connection_count() == 4
        e = build_graph(read, WINDOW).edges["shop/frontend", "shop/api"]
        assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (4, 3300, 15030)
        assert e["observed_by"] == {"client,path,server": 3, "client,server": 1}
    finally:
        s.close()
