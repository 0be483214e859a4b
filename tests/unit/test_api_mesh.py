"""Folded service-mesh calls through a real aggregator (issue 20): records with `mesh` POSTed to
the ingest API of a real app on DuckDB, then GET /api/v1/flows (each flow's `mesh`), GET
/api/v1/graph (each edge's `mesh`; `show_proxies=true` splits a meshed edge into its hops
through two proxy nodes), the raw records (their `mesh` stored and read back), and an
aggregator restart on the same files (the connection's mesh kept, and still merged)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from tests.unit.mesh_records import FRAMING, hops, meshed
from tests.unit.test_api_query import RH, A, send, settings  # noqa: F401  (a fixture)
from tests.unit.test_correlate import rec

MESHED = 43000  # the meshed calls' client (sidecar) ports: 43000, 43001
PLAIN = 44000   # one frontend -> api call without a mesh


def _feed(c, observers=("client", "server", "path"), seq=10) -> None:
    for i in range(2):
        for o in observers:
            coll = {"client": "h1", "server": "h2", "path": "h3"}[o]
            send(c, coll, seq + i, [meshed(o, 2, cport=MESHED + i, collector=coll)])


def _plain(c) -> None:
    send(c, "h1", 90, [rec("client", cport=PLAIN, c2s=7, s2c=9)])
    send(c, "h2", 90, [rec("server", cport=PLAIN, c2s=7, s2c=9)])


def _flows(c) -> dict[int, dict]:
    r = c.get("/api/v1/flows", params={"limit": "100"}, headers=RH)
    assert r.status_code == 200, r.text
    return {f["client"]["port"]: f for f in r.json()["flows"]}


def _hop_json(observer: str) -> list[dict]:
    return [{"hop": h.hop, "observer": observer,
             "client": {"ip": h.client.ip, "port": h.client.port},
             "server": {"ip": h.server.ip, "port": h.server.port},
             "bytes_c2s": h.bytes_c2s, "bytes_s2c": h.bytes_s2c, "process": h.process,
             "pid": h.pid} for h in hops(observer, 2)]


WANT = {"proxy": "ew-sidecar", "hops": _hop_json("client") + _hop_json("server"),
        "wire_bytes_c2s": 2000 + FRAMING, "wire_bytes_s2c": 10000 + FRAMING}


def test_flows_carry_the_merged_mesh_and_the_apps_bytes(settings):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        _feed(c)
        _plain(c)
        flows = _flows(c)
    f = flows[MESHED]
    assert f["mesh"] == WANT
    assert (f["bytes_c2s"], f["bytes_s2c"]) == (2000, 10000)  # the app's, not the wire's
    assert f["by_observer"]["path"] == {"bytes_c2s": 2000 + FRAMING, "bytes_s2c": 10000 + FRAMING}
    assert f["byte_mismatch"] is False  # the framing is no mismatch
    assert f["client"]["workload"]["id"] == "shop/frontend"
    assert flows[PLAIN]["mesh"] is None


def test_a_meshed_call_without_a_wire_has_null_wire_bytes(settings):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        _feed(c, ("server", "client"))
        f = _flows(c)[MESHED]
    assert f["mesh"] == {**WANT, "wire_bytes_c2s": None, "wire_bytes_s2c": None}


def test_the_raw_records_keep_their_mesh(settings):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        _feed(c, ("client",))
        r = c.get("/api/v1/records", params={"limit": "10"}, headers=RH)
    assert r.status_code == 200, r.text
    [one] = [x for x in r.json()["records"] if x["client"]["port"] == MESHED]
    assert one["mesh"]["proxy"] == "ew-sidecar"
    assert [h["hop"] for h in one["mesh"]["hops"]] == ["app-proxy", "proxy-proxy"]
    assert one["mesh"]["hops"][0]["client"] == {"ip": "10.244.1.11", "port": 51000}


def test_the_graph_edge_counts_its_meshed_connections(settings):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        _feed(c)
        _plain(c)
        r = c.get("/api/v1/graph", params=A, headers=RH)
        ns = c.get("/api/v1/graph", params={**A, "group_by": "namespace"}, headers=RH)
    assert r.status_code == 200, r.text
    [edge] = r.json()["edges"]
    assert (edge["source"], edge["target"]) == ("shop/frontend", "shop/api")
    assert edge["connections_opened"] == 3
    assert edge["mesh"] == {"proxy": "ew-sidecar", "connections": 2,
                            "wire_bytes_c2s": 2 * (2000 + FRAMING),
                            "wire_bytes_s2c": 2 * (10000 + FRAMING)}
    assert edge["bytes_c2s"] == 2 * 2000 + 7  # the apps' bytes
    assert [n["id"] for n in r.json()["nodes"]] == ["shop/api", "shop/frontend"]
    [nse] = ns.json()["edges"]
    assert nse["mesh"]["connections"] == 2


def test_show_proxies_splits_a_meshed_edge_into_its_hops(settings):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        _feed(c)
        _plain(c)
        r = c.get("/api/v1/graph", params={**A, "show_proxies": "true"}, headers=RH)
        dot = c.get("/api/v1/graph", params={**A, "show_proxies": "true", "format": "dot"},
                    headers=RH)
        bad = c.get("/api/v1/graph", params={**A, "show_proxies": "maybe"}, headers=RH)
        spec = c.get("/openapi.json", headers=RH).json()
    graph_doc = spec["paths"]["/api/v1/graph"]["get"]
    assert "show_proxies" in {p["name"] for p in graph_doc["parameters"]}
    assert "mesh" in graph_doc["description"]
    assert "mesh" in spec["paths"]["/api/v1/flows"]["get"]["description"]
    assert r.status_code == 200, r.text
    g = r.json()
    kinds = {n["id"]: n["kind"] for n in g["nodes"]}
    fp, ap = "shop/frontend~ew-sidecar", "shop/api~ew-sidecar"
    assert kinds[fp] == kinds[ap] == "proxy"
    edges = {(e["source"], e["target"]): e for e in g["edges"]}
    assert set(edges) == {("shop/frontend", fp), (fp, ap), (ap, "shop/api"),
                          ("shop/frontend", "shop/api")}
    for (s, d), hop, b in ((("shop/frontend", fp), "app-proxy", (2000, 10000)),
                           ((fp, ap), "proxy-proxy", (2000 + FRAMING, 10000 + FRAMING)),
                           ((ap, "shop/api"), "proxy-app", (2000, 10000))):
        e = edges[(s, d)]
        assert e["mesh"]["hop"] == hop and e["mesh"]["connections"] == 2
        assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (2, 2 * b[0], 2 * b[1])
    assert [edges[k]["ports"] for k in (("shop/frontend", fp), (fp, ap), (ap, "shop/api"))] == [
        [15001], [9090], [9090]]  # the hops' server ports (the sidecar's outbound 15001)
    rest = edges[("shop/frontend", "shop/api")]  # the call without a mesh stays app -> app
    assert (rest["connections_opened"], rest["bytes_c2s"], rest["mesh"]) == (1, 7, None)
    assert f'"{fp}" -> "{ap}"' in dot.text
    assert bad.status_code in (400, 422) and "show_proxies" in bad.text


def test_a_restart_keeps_the_mesh_and_merges_the_later_records(settings):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        _feed(c, ("client",))
        send(c, "h2", 10, [meshed("server", 1, final=False, cport=MESHED, collector="h2")])
        before = _flows(c)[MESHED]["mesh"]
    assert [h["observer"] for h in before["hops"]] == ["client", "client", "server", "server"]
    with TestClient(create_app(settings)) as c:  # the same files: a restart
        assert _flows(c)[MESHED]["mesh"] == before
        send(c, "h2", 11, [meshed("server", 2, cport=MESHED, collector="h2")])
        send(c, "h3", 11, [meshed("path", 2, cport=MESHED, collector="h3")])
        after = _flows(c)[MESHED]
    assert after["mesh"] == WANT  # the server's final replaced its interim hops
    assert len(after["observed_by"]) == 3


@pytest.mark.parametrize("observers", [("client",), ("server",)])
def test_a_one_sided_mesh_shows_that_sides_hops(settings, observers):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        _feed(c, observers)
        f = _flows(c)[MESHED]
    o = observers[0]
    assert f["mesh"]["hops"] == _hop_json(o) and f["mesh"]["proxy"] == "ew-sidecar"

