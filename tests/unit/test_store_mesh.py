"""A folded service-mesh call (issue 20) in every store backend (DuckDB, and ClickHouse on the
tests' shared server): the records' `mesh` stored and read back field for field, the
connection's `mesh` column written with it, kept across a restart (the correlator's index is
rebuilt from the store) and still merged after it; a DuckDB file written before the column
existed gets it."""

from __future__ import annotations

import duckdb
import pytest

from aggregator import mesh
from aggregator.api.views import ROW_COLUMNS, flow_json
from aggregator.store import BACKENDS
from aggregator.store.query import ConnectionQuery
from tests.servers import store_location
from tests.unit.mesh_records import meshed
from tests.unit.test_correlate import rec
from tests.unit.test_store_connections import duck, opened


@pytest.fixture(params=BACKENDS)
def data_dir(request, tmp_path):
    return request.param, store_location(request.param, tmp_path / request.param)


def test_a_meshed_call_round_trips_and_its_mesh_survives_a_restart(data_dir):
    s = opened(data_dir)
    sent = [meshed("client", 2), meshed("server", 1, final=False)]
    s.ingest("h1", 1, sent[:1])
    s.ingest("h2", 1, sent[1:])
    stored = sorted(s.read().records(), key=lambda r: r.observer)
    assert stored == sent  # every field, `mesh` and its hops included
    s.close()
    s = opened(data_dir)  # a restart
    assert s.loaded == 1
    s.ingest("h2", 2, [meshed("server", 2)])  # the server's final replaces its interim hops
    s.ingest("h3", 1, [meshed("path", 2, collector="h3")])
    s.ingest("h1", 2, [rec("client", cport=40001)])
    rows = sorted(s.rows(*ROW_COLUMNS), key=lambda r: r["client_port"])
    assert [r["client_port"] for r in rows] == [40000, 40001]
    got = flow_json(rows[0])["mesh"]
    assert [(h["hop"], h["observer"], h["bytes_c2s"]) for h in got["hops"]] == [
        ("app-proxy", "client", 2000), ("proxy-proxy", "client", 2040),
        ("proxy-proxy", "server", 2040), ("proxy-app", "server", 2000)]
    assert (got["wire_bytes_c2s"], got["wire_bytes_s2c"]) == (2040, 10040)
    assert rows[1]["mesh"] is None and flow_json(rows[1])["mesh"] is None
    assert not rows[0]["byte_mismatch"]
    q = ConnectionQuery(limit=10, columns=("client_port", "mesh"), meshed=True)
    [only] = s.read().connections(q)
    assert only["client_port"] == 40000 and mesh.sides_of(only["mesh"])
    s.close()


def test_a_duckdb_file_without_the_mesh_column_gets_it(tmp_path):
    s = duck(tmp_path)
    s.ingest("h1", 1, [meshed("client", 1, final=False)])
    s.close()
    con = duckdb.connect(str(next(tmp_path.glob("*.duckdb"))))
    con.execute("DROP VIEW connections")
    for table in ("connections_live", "connections_settled"):
        con.execute(f"ALTER TABLE {table} DROP COLUMN mesh")
    con.close()
    s = duck(tmp_path)
    assert s.loaded == 1  # its mesh was not stored then: none known
    s.ingest("h1", 2, [meshed("client", 2)])
    [row] = s.rows("mesh", "observed_by")
    assert [x.observer for x in mesh.sides_of(row["mesh"])] == ["client"]
    s.close()
