"""Services in the query API over a real app and DuckDB store (issue 16): GET /api/v1/graph with
group_by=service (one edge client -> Service with its backends, direct calls workload ->
workload, the same totals as the workload view), the flows' `service` name, `to_service` by
namespace/name on flows, graph and diff, and a 400 naming an unknown Service."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from tests.unit.test_api_query import INGEST, READ, RH, A, send
from tests.unit.test_service_view import API_VIP, CACHE_VIP, CALLS

MAP_YAML = """workloads:
- {match: 10.244.1.11/32, name: frontend, namespace: shop, host: h1}
- {match: 10.244.1.12/32, name: batch, namespace: jobs, host: h1}
- {match: 10.244.2.11/32, name: api, namespace: shop, host: h2}
- {match: 10.244.2.12/32, name: api, namespace: shop, host: h2}
- {match: 10.244.2.13/32, name: api-canary, namespace: shop, host: h2}
- {match: 10.244.3.13/32, name: cache, namespace: shop, host: h3}
services:
- {match: 10.96.0.11, name: api, namespace: shop}
"""


@pytest.fixture
def client(tmp_path):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    s = AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST, read_token=READ,
                           workload_map=tmp_path / "map.yaml", retention=None)
    with TestClient(create_app(s)) as c:
        for i, r in enumerate(CALLS):
            send(c, r.collector, i + 1, [r])
        yield c


def graph(c, **params):
    r = c.get("/api/v1/graph", params={**A, **params}, headers=RH)
    assert r.status_code == 200, r.text
    return r.json()


def test_graph_group_by_service(client):
    doc = graph(client, group_by="service")
    assert doc["group_by"] == "service" and doc["volume_source"] == "connections"
    got = {(e["source"], e["target"]): (e["connections_opened"],
                                        [(b["id"], b["connections_opened"]) for b in e["backends"]])
           for e in doc["edges"]}
    assert got == {
        ("shop/frontend", "svc:shop/api"): (3, [("shop/api", 2), ("shop/api-canary", 1)]),
        ("jobs/batch", "svc:shop/api"): (1, [("shop/api", 1)]),
        ("shop/frontend", "shop/api"): (1, []),
        ("shop/frontend", f"svc:{CACHE_VIP}:6379"): (1, [("shop/cache", 1)])}
    node = next(n for n in doc["nodes"] if n["id"] == "svc:shop/api")
    assert (node["name"], node["namespace"], node["kind"], node["in_degree"]) == (
        "api", "shop", "Service", 2)
    wl = graph(client)
    assert "backends" not in wl["edges"][0]  # the workload view is as it was
    for k in ("connections_opened", "bytes_c2s", "bytes_s2c"):
        assert sum(e[k] for e in doc["edges"]) == sum(e[k] for e in wl["edges"]) > 0
    dot = client.get("/api/v1/graph", params={**A, "group_by": "service", "format": "dot"},
                     headers=RH).text
    assert '"shop/frontend" -> "svc:shop/api" [label="3 conns' in dot


def test_flows_name_the_service_and_filter_by_it(client):
    r = client.get("/api/v1/flows", params={"to_service": "shop/api", "sort": "start"},
                   headers=RH)
    assert r.status_code == 200, r.text
    flows = r.json()["flows"]
    assert sorted(f["client"]["port"] for f in flows) == [40001, 40002, 40003, 40005]
    assert {(f["service_ip"], f["service_port"]) for f in flows} == {(API_VIP, 80)}
    assert all(f["service"] == {"namespace": "shop", "name": "api"} for f in flows)
    other = client.get("/api/v1/flows", params={"not_to_service": "shop/api"}, headers=RH).json()
    assert sorted((f["client"]["port"], f["service"]) for f in other["flows"]) == [
        (40004, None), (40006, None)]  # a direct call; a ClusterIP no layer names
    g = graph(client, group_by="service", to_service="shop/api")
    assert {(e["source"], e["target"]) for e in g["edges"]} == {
        ("shop/frontend", "svc:shop/api"), ("jobs/batch", "svc:shop/api")}
    d = client.get("/api/v1/diff", params={"a_from": "2020-01-01T00:00:00Z",
                                           "a_to": "2020-01-01T01:00:00Z",
                                           "b_from": A["from"], "b_to": A["to"],
                                           "group_by": "service", "to_service": "shop/api"},
                   headers=RH)
    assert d.status_code == 200, d.text
    assert [(e["source"], e["target"], e["connections_opened"]) for e in d.json()["added"]] == [
        ("jobs/batch", "svc:shop/api", 1), ("shop/frontend", "svc:shop/api", 3)]


def test_an_unknown_service_name_is_a_400_naming_it(client):
    for route in ("/api/v1/flows", "/api/v1/graph"):
        r = client.get(route, params={"to_service": "shop/nope"}, headers=RH)
        assert r.status_code == 400, r.text
        assert "shop/nope" in r.text and "to_service" in r.text
    r = client.get("/api/v1/flows", params={"to_service": "not a name"}, headers=RH)
    assert r.status_code == 400 and "to_service" in r.text
