"""The dialled Service address of a connection (issue 16) in every store backend: written with
the connection, shown by the API's flow rows, kept across a restart (the correlator's index is
rebuilt from the store), and a DuckDB file written before the columns existed gets them."""

from __future__ import annotations

from datetime import timedelta

import duckdb
import pytest

from aggregator.api.views import ROW_COLUMNS, flow_json
from aggregator.store import BACKENDS
from aggregator.store.query import ConnectionQuery, EdgeQuery
from eastwest.filters import Filter
from eastwest.record import Endpoint, Nat
from tests.servers import store_location
from tests.unit.test_correlate import T0, rec
from tests.unit.test_store_connections import duck, opened

VIP, BACKEND = Endpoint("10.96.0.11", 9090), Endpoint("10.244.2.11", 9090)
DNAT = [Nat("dnat", VIP, BACKEND, 4026531840)]


@pytest.fixture(params=BACKENDS)
def data_dir(request, tmp_path):
    return request.param, store_location(request.param, tmp_path / request.param)


def test_a_service_call_is_one_row_with_its_dialled_address_across_a_restart(data_dir):
    s = opened(data_dir)
    s.ingest("h1", 1, [rec("client", final=False, c2s=10, s2c=0, nat=DNAT)])
    s.close()
    s = opened(data_dir)
    assert s.loaded == 1
    s.ingest("h2", 1, [rec("server")])  # the server knows nothing of the ClusterIP
    s.ingest("h1", 2, [rec("client", nat=DNAT), rec("client", cport=40001)])
    rows = sorted(s.rows(*ROW_COLUMNS), key=lambda r: r["client_port"])
    assert [(r["client_port"], r["observed_by"], r["service_ip"], r["service_port"])
            for r in rows] == [(40000, ",client,server,", "10.96.0.11", 9090),
                               (40001, ",client,", None, None)]
    for negate, want in ((False, [40000]), (True, [40001])):  # --to-service, --not --to-service
        q = ConnectionQuery(filter=Filter.build([("to_service", "10.96.0.0/16", negate)]),
                            limit=100, columns=("client_port",))
        assert [r["client_port"] for r in s.read().connections(q)] == want
        g = s.read().edges(EdgeQuery(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5),
                                     "workload", q.filter))
        assert g["conns"] == [1]  # one edge of one connection (from the connections table)
    flows = [flow_json(r) for r in rows]
    assert [(f["server"]["ip"], f["service_ip"], f["service_port"]) for f in flows] == [
        ("10.244.2.11", "10.96.0.11", 9090), ("10.244.2.11", None, None)]
    s.close()


def test_a_duckdb_file_without_the_service_columns_gets_them(tmp_path):
    s = duck(tmp_path)
    s.ingest("h1", 1, [rec("client", final=False)])
    s.close()
    con = duckdb.connect(str(next(tmp_path.glob("*.duckdb"))))
    con.execute("DROP VIEW connections")
    for table in ("connections_live", "connections_settled"):
        con.execute(f"ALTER TABLE {table} DROP COLUMN service_ip")
        con.execute(f"ALTER TABLE {table} DROP COLUMN service_port")
        con.execute(f"ALTER TABLE {table} DROP COLUMN service_ip_hex")
    con.close()
    s = duck(tmp_path)
    assert s.loaded == 1
    s.ingest("h1", 2, [rec("client", nat=DNAT)])
    [row] = s.rows("service_ip", "service_port", "observed_by")
    assert (row["service_ip"], row["service_port"]) == ("10.96.0.11", 9090)
    s.close()
