"""A folded service-mesh call (issue 20): both correlators keep the connection's `mesh`, the
client's and the server's hops merged, one entry per (hop, observer), whatever the order of the
client's, the server's and the wire's records, interim then final; a restart keeps it
(aggregator/mesh.py, aggregator/correlate_mesh.py)."""

from __future__ import annotations

import itertools

import pytest

from aggregator import mesh
from aggregator.correlate import Correlator
from aggregator.identity import IdentityResolver
from aggregator.store.derived import connection_of, derived_of
from tests.unit.correlate_workloads import Pair
from tests.unit.mesh_records import FRAMING, hops, meshed
from tests.unit.test_correlate import MAP

OBSERVERS = ("client", "server", "path")
ORDERS = [o for n in (1, 2, 3) for s in itertools.combinations(OBSERVERS, n)
          for o in itertools.permutations(s)]


def want(observers: tuple[str, ...], k: int = 2) -> dict | None:
    """The API's `mesh` of a call these observers reported (their k-th records)."""
    sides = [o for o in ("client", "server") if o in observers]
    if not sides:
        return None
    hs = {o: hops(o, k) for o in sides}
    order = [("client", 0), ("client", 1), ("server", 0), ("server", 1)]
    return {"proxy": "ew-sidecar",
            "hops": [{"hop": h.hop, "observer": o, "client": {"ip": h.client.ip,
                                                              "port": h.client.port},
                      "server": {"ip": h.server.ip, "port": h.server.port},
                      "bytes_c2s": h.bytes_c2s, "bytes_s2c": h.bytes_s2c,
                      "process": h.process, "pid": h.pid}
                     for o, i in order if o in hs for h in [hs[o][i]]],
            "wire_bytes_c2s": 2000 + FRAMING if "path" in observers else None,
            "wire_bytes_s2c": 10000 + FRAMING if "path" in observers else None}


def shown(conn) -> dict | None:
    return mesh.shown(mesh.stored(conn.mesh), *conn.side_bytes("path"))


@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_the_reference_merges_the_hops_of_every_observer_in_every_order(order) -> None:
    """Each observer's interim then final record, observers in this order, and again with
    every record in reverse (finals first: the interims change nothing)."""
    for recs in ([meshed(o, k, final=k == 2) for o in order for k in (1, 2)],
                 [meshed(o, k, final=k == 2) for o in reversed(order) for k in (2, 1)]):
        c = Correlator(IdentityResolver(MAP))
        for r in recs:
            c.commit(c.plan([r]))
        [[conn]] = c.index.values()
        assert conn.best()[:2] == ((2000, 10000) if set(order) != {"path"}
                                   else (2000 + FRAMING, 10000 + FRAMING))
        assert shown(conn) == want(order)
        # the wire's framing is no mismatch of a meshed connection
        assert not conn.summary().byte_mismatch and not conn.byte_mismatch


def test_the_reference_keeps_the_mesh_through_its_stored_row_and_a_restart() -> None:
    c = Correlator(IdentityResolver(MAP))
    p = c.plan([meshed("client", 2), meshed("path", 2), meshed("server", 2)])
    c.commit(p)
    [row] = derived_of(p).connection_rows().to_pylist()
    assert mesh.shown(row["mesh"], row["path_bytes_c2s"], row["path_bytes_s2c"]) == want(OBSERVERS)
    again = connection_of(row)
    assert again.mesh == p.connections[row["conn_id"]].mesh
    fresh = Correlator(IdentityResolver(MAP))
    fresh.load([again])
    p2 = fresh.plan([meshed("server", 1, final=False)])  # an old interim: superseded
    [conn] = p2.connections.values()
    assert shown(conn) == want(OBSERVERS)


def test_a_newer_record_replaces_its_observers_hops_and_one_without_mesh_removes_them() -> None:
    c = Correlator(IdentityResolver(MAP))
    c.commit(c.plan([meshed("client", 1, final=False), meshed("server", 1, final=False)]))
    c.commit(c.plan([meshed("client", 2)]))  # newer: the client's hops of k=2
    [[conn]] = c.index.values()
    got = shown(conn)
    assert [h["bytes_c2s"] for h in got["hops"]] == [2000, 2000 + FRAMING, 1000 + FRAMING, 1000]
    c.commit(c.plan([meshed("server", 2, mesh=False)]))  # the server's final without a mesh
    [[conn]] = c.index.values()
    assert [h["observer"] for h in shown(conn)["hops"]] == ["client", "client"]
    c.commit(c.plan([meshed("client", 3, mesh=False)]))
    [[conn]] = c.index.values()
    assert conn.mesh is None and shown(conn) is None


@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_the_column_correlator_keeps_the_same_mesh_in_every_order(order) -> None:
    """The C core with its mesh pass against the reference, batch by batch (rows, objects,
    state): interim records, then finals in reverse, then a restart of both."""
    with Pair(0, 10.0) as pair:
        assert pair.col.native
        for o in order:
            pair.batch([meshed(o, 1, final=False)])
        for o in reversed(order):
            pair.batch([meshed(o, 2)])
        pair.batch([meshed(order[0], 1, final=False)])  # superseded: nothing changes
        [conn] = pair.col.connections()
        assert shown(conn) == want(order)
        pair.restart()
        [again] = pair.col.connections()
        assert again.mesh == conn.mesh
        pair.batch([meshed(o, 3, mesh=False) for o in order if o != "path"][:1])


def test_the_column_correlator_drops_an_observers_hops_for_a_newer_record_without_mesh() -> None:
    with Pair(0, 10.0) as pair:
        pair.batch([meshed("client", 1, final=False), meshed("server", 1, final=False)])
        pair.batch([meshed("server", 2, mesh=False), meshed("path", 2)])
        [conn] = pair.col.connections()
        assert [s.observer for s in conn.mesh] == ["client"]
        pair.rollback([meshed("client", 2, mesh=False)])  # planned, rolled back: kept
        [conn] = pair.col.connections()
        assert [s.observer for s in conn.mesh] == ["client"]
        pair.batch([meshed("client", 2, mesh=False)])
        [conn] = pair.col.connections()
        assert conn.mesh is None
