"""The tunnel's type (VXLAN, Geneve, VXLAN-GPE) from the record to the connection and the API:
ingest -> both correlators -> the connections table -> GET /api/v1/flows, across a restart (the
C core reloads the stored connections), and a store file written before the type was kept."""

from __future__ import annotations

from datetime import timedelta

import duckdb
import msgspec
import pytest
from fastapi.testclient import TestClient

from aggregator import correlate_native
from aggregator.app import create_app
from aggregator.connection import Tunnel as ConnTunnel
from aggregator.correlate_columns import ColumnCorrelator
from aggregator.identity import IdentityResolver
from aggregator.store.columns import Extra
from aggregator.store.duckdb import FILE_NAME, DuckDBStore
from eastwest.record import Endpoint, Tunnel
from tests.unit.test_api_query import RH, send, settings  # noqa: F401 - fixture
from tests.unit.test_correlate import T0, rec

TYPES = {41001: "geneve", 41002: "vxlan-gpe", 41003: "vxlan"}


def _tunnel(kind: str, vni: int) -> Tunnel:
    return Tunnel(kind, vni, "10.213.0.1", "10.213.0.2",  # type: ignore[arg-type]
                  {"vxlan": 4789, "geneve": 6081, "vxlan-gpe": 4790}[kind])


def _fill(c) -> None:
    """Per type, a connection seen by the wire (the tunnel, first) then by its client."""
    for k, (port, kind) in enumerate(TYPES.items()):
        send(c, "h1", 10 + k, [rec("path", cport=port, tunnel=_tunnel(kind, 100 + k))])
        send(c, "h2", 10 + k, [rec("client", cport=port, collector="h2")])


def _types(c) -> dict[int, tuple[str, int] | None]:
    flows = c.get("/api/v1/flows", params={"limit": 100}, headers=RH).json()["flows"]
    return {f["client"]["port"]: (f["tunnel"]["type"], f["tunnel"]["vni"]) if f["tunnel"] else None
            for f in flows}


@pytest.mark.parametrize("native", [True, False])
def test_each_tunnel_type_reaches_the_flows_api_and_survives_a_restart(settings, monkeypatch,  # noqa: F811
                                                                       native):
    if not native:  # the reference correlator (as without the library)
        monkeypatch.setattr(correlate_native, "load", lambda: (None, None, "off"))
    with TestClient(create_app(settings)) as c:
        assert c.app.state.pipeline.correlator.native == native
        _fill(c)
        want = {port: (kind, 100 + k) for k, (port, kind) in enumerate(TYPES.items())}
        assert _types(c) == want
    with TestClient(create_app(settings)) as c:  # reloaded into the correlator
        assert _types(c) == want
        # a later record of each (its server: no tunnel) rewrites the row from the held state
        for k, port in enumerate(TYPES):
            send(c, "h3", 50 + k, [rec("server", cport=port, collector="h3")])
        assert _types(c) == want
        flows = c.get("/api/v1/flows", params={"limit": 100}, headers=RH).json()["flows"]
        assert all(sorted(f["observed_by"]) == ["client", "path", "server"] for f in flows)


def test_the_first_observer_with_a_tunnel_names_its_type_in_both_cores() -> None:
    """A Geneve wire view first, then a VXLAN-GPE one of another collector: Geneve stays; the
    connection reloaded into a fresh C core keeps it."""
    recs = [rec("path", cport=42000, tunnel=_tunnel("geneve", 7)),
            rec("path", cport=42000, collector="h2", tunnel=_tunnel("vxlan-gpe", 8),
                start=T0 + timedelta(milliseconds=1))]
    got = {}
    for native in (True, False):
        corr = ColumnCorrelator(IdentityResolver(), native_core=native, ids=_ids())
        plan = corr.plan_records(recs)
        corr.commit(plan)
        (row,) = plan.rows.to_pylist()
        got[native] = (row["tunnel_type"], row["vni"])
        (conn,) = corr.connections()
        assert conn.tunnel is not None and conn.tunnel.type == "geneve"
    assert got == {True: ("geneve", 7), False: ("geneve", 7)}
    core = ColumnCorrelator(IdentityResolver(), native_core=True)
    conns = [conn, msgspec.structs.replace(
        conn, conn_id="ab" * 16, client_port=42001,
        tunnel=ConnTunnel(9, "10.213.0.3", "fd99::7", None, "h9", "vxlan-gpe"))]
    assert core.load(conns) == 2
    assert {c.conn_id: c.tunnel for c in core.connections()} == {c.conn_id: c.tunnel for c in conns}


def _ids():
    n = iter(range(1, 1 << 30))

    def ids(k: int) -> bytes:
        return b"".join(next(n).to_bytes(16, "big") for _ in range(k))
    return ids


def test_a_store_file_written_before_the_type_was_kept_still_reads(settings, tmp_path):  # noqa: F811
    """Flows rows without the `tunnel_type` column (their type in `extra` when not VXLAN, as
    written earlier today) and connection rows without it: the records read back exactly, the
    connections that had a VNI show VXLAN, and new rows keep their type."""
    geneve = rec("path", cport=43001, tunnel=_tunnel("geneve", 5))
    vxlan = rec("path", cport=43002, tunnel=_tunnel("vxlan", 6))
    with TestClient(create_app(settings)) as c:
        send(c, "h1", 1, [geneve, vxlan])
    path = settings.data_dir / FILE_NAME
    con = duckdb.connect(str(path))
    old = Extra(outer_dport=6081, tunnel_type="geneve")  # the blob of that layout
    con.execute("UPDATE flows SET extra = ? WHERE record_id = ?",
                [msgspec.msgpack.encode(old), geneve.record_id])
    con.execute("DROP VIEW connections")
    for table in ("flows", "connections_live", "connections_settled"):
        con.execute(f"ALTER TABLE {table} DROP COLUMN tunnel_type")
    con.close()
    store = DuckDBStore(settings.data_dir)
    assert sorted(store.records(), key=lambda r: r.record_id) == sorted(
        [geneve, vxlan], key=lambda r: r.record_id)
    store.close()
    with TestClient(create_app(settings)) as c:
        assert _types(c) == {43001: ("vxlan", 5), 43002: ("vxlan", 6)}
        send(c, "h1", 2, [rec("path", cport=43003, server=Endpoint("10.244.2.11", 9090),
                              tunnel=_tunnel("vxlan-gpe", 7))])
        assert _types(c)[43003] == ("vxlan-gpe", 7)
