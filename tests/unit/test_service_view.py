"""The graph's Service view (issue 16, aggregator/service_view.py) on real stores: a call to a
Service is one edge client -> Service listing the backends that served it, a direct call stays
workload -> workload, no connection is counted twice (the two views' totals are equal), and the
result does not depend on the order the records arrive in. Service names come from the static
map's `services` section; `to_service` takes a name."""

from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest

from aggregator.graph import Window, graph_data
from aggregator.identity import IdentityResolver, StaticMap
from aggregator.service_view import ServiceNames, resolve_filter
from aggregator.store import BACKENDS, open_store
from aggregator.store.query import ConnectionQuery
from eastwest.errors import ConfigError
from eastwest.filters import Filter, ServiceRef
from eastwest.record import Endpoint, Nat
from tests.servers import store_location
from tests.unit.pipes import driven
from tests.unit.test_correlate import T0, rec

FRONTEND, BATCH = "10.244.1.11", "10.244.1.12"
API_A, API_B, CANARY, CACHE = "10.244.2.11", "10.244.2.12", "10.244.2.13", "10.244.3.13"
API_VIP, CACHE_VIP = "10.96.0.11", "10.96.0.99"   # the cache's ClusterIP is named by no layer
MAP = StaticMap([
    {"match": f"{FRONTEND}/32", "name": "frontend", "namespace": "shop", "host": "h1"},
    {"match": f"{BATCH}/32", "name": "batch", "namespace": "jobs", "host": "h1"},
    {"match": f"{API_A}/32", "name": "api", "namespace": "shop", "host": "h2"},
    {"match": f"{API_B}/32", "name": "api", "namespace": "shop", "host": "h2"},
    {"match": f"{CANARY}/32", "name": "api-canary", "namespace": "shop", "host": "h2"},
    {"match": f"{CACHE}/32", "name": "cache", "namespace": "shop", "host": "h3"},
], services=[{"match": API_VIP, "name": "api", "namespace": "shop"}])
WINDOW = Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5))


def call(client: str, server: str, port: int, cport: int, vip: str | None = None,
         vport: int = 80) -> list:
    """One connection: the client's record (its server the backend, the dialled address in
    `nat` when it went through a Service) and the server's record."""
    over = dict(client=Endpoint(client, cport), server=Endpoint(server, port))
    nat = [Nat("dnat", Endpoint(vip, vport), Endpoint(server, port), 4026531840)] if vip else None
    return [rec("client", nat=nat, **over), rec("server", **over)]


CALLS = [
    *call(FRONTEND, API_A, 8080, 40001, API_VIP),
    *call(FRONTEND, API_B, 8080, 40002, API_VIP),
    *call(FRONTEND, CANARY, 8080, 40003, API_VIP),
    *call(FRONTEND, API_A, 8080, 40004),               # a pod IP dialled directly
    *call(BATCH, API_B, 8080, 40005, API_VIP),
    *call(FRONTEND, CACHE, 6379, 40006, CACHE_VIP, 6379),
]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    return request.param, store_location(request.param, tmp_path / request.param)


def fill(backend, records) -> object:
    s = driven(open_store(*backend), IdentityResolver(MAP))
    for i, r in enumerate(records):
        s.ingest(r.collector, i + 1, [r])
    s.correlation.applied(10)
    return s


def edges(s, group_by: str, flt: Filter | None = None) -> dict:
    data = graph_data(s.read(), WINDOW, group_by=group_by, flt=flt,
                      names=ServiceNames(IdentityResolver(MAP)))
    doc = json.loads(data.json_bytes())
    return {"nodes": {n["id"]: n for n in doc["nodes"]},
            "edges": {(e["source"], e["target"]): e for e in doc["edges"]}}


def test_a_service_call_is_one_edge_to_the_service_listing_its_backends(backend):
    s = fill(backend, CALLS)
    try:
        svc = edges(s, "service")
        assert {k: e["connections_opened"] for k, e in svc["edges"].items()} == {
            ("shop/frontend", "svc:shop/api"): 3, ("jobs/batch", "svc:shop/api"): 1,
            ("shop/frontend", "shop/api"): 1, ("shop/frontend", f"svc:{CACHE_VIP}:6379"): 1}
        e = svc["edges"][("shop/frontend", "svc:shop/api")]
        assert e["service"] == {"id": "svc:shop/api", "name": "api", "namespace": "shop",
                                "addresses": [f"{API_VIP}:80"]}
        assert [(b["id"], b["connections"], b["connections_opened"]) for b in e["backends"]] == [
            ("shop/api", 2, 2), ("shop/api-canary", 1, 1)]
        assert svc["edges"][("shop/frontend", "shop/api")]["service"] is None
        assert svc["edges"][("shop/frontend", "shop/api")]["backends"] == []
        unnamed = svc["edges"][("shop/frontend", f"svc:{CACHE_VIP}:6379")]
        assert unnamed["service"]["name"] is None
        assert [b["id"] for b in unnamed["backends"]] == ["shop/cache"]
        assert (svc["nodes"]["svc:shop/api"]["name"], svc["nodes"]["svc:shop/api"]["namespace"],
                svc["nodes"]["svc:shop/api"]["kind"]) == ("api", "shop", "Service")
        # the workload view: backends as servers; the same totals, nothing counted twice
        wl = edges(s, "workload")
        assert {k: e["connections_opened"] for k, e in wl["edges"].items()} == {
            ("shop/frontend", "shop/api"): 3, ("shop/frontend", "shop/api-canary"): 1,
            ("jobs/batch", "shop/api"): 1, ("shop/frontend", "shop/cache"): 1}
        for k in ("connections_opened", "bytes_c2s", "bytes_s2c", "connections_failed"):
            assert sum(e[k] for e in svc["edges"].values()) == sum(
                e[k] for e in wl["edges"].values())
        # the backends of the Service edges add up to their edges' connections
        for e in svc["edges"].values():
            if e["service"]:
                assert sum(b["connections_opened"] for b in e["backends"]) == e["connections_opened"]
    finally:
        s.close()


def test_any_order_of_the_records_gives_the_same_service_view(tmp_path):
    want = None
    for seed in range(8):
        records = list(CALLS)
        random.Random(seed).shuffle(records)
        s = fill(("duckdb", tmp_path / str(seed)), records)
        try:
            got = edges(s, "service")
            got = {k: {f: e[f] for f in ("connections_opened", "bytes_c2s", "bytes_s2c",
                                          "service", "backends", "observed_by")}
                   for k, e in got["edges"].items()}
        finally:
            s.close()
        assert want is None or got == want, seed
        want = got


def test_to_service_by_name_and_filters_in_the_service_view(tmp_path):
    s = fill(("duckdb", tmp_path), CALLS)
    names = ServiceNames(IdentityResolver(MAP))
    try:
        flt = resolve_filter(Filter.build([("to_service", "shop/api", False)]), names)
        rows = s.read().connections(ConnectionQuery(filter=flt, columns=("client_port",)))
        assert sorted(r["client_port"] for r in rows) == [40001, 40002, 40003, 40005]
        svc = edges(s, "service", flt)
        assert set(svc["edges"]) == {("shop/frontend", "svc:shop/api"),
                                     ("jobs/batch", "svc:shop/api")}
        neg = resolve_filter(Filter.build([("to_service", "shop/api", True)]), names)
        assert set(edges(s, "service", neg)["edges"]) == {
            ("shop/frontend", "shop/api"), ("shop/frontend", f"svc:{CACHE_VIP}:6379")}
        with pytest.raises(ConfigError, match="no Service of this name"):
            resolve_filter(Filter.build([("to_service", "shop/nope", False)]), names)
    finally:
        s.close()


def test_to_service_values_and_the_services_section():
    assert Filter.build([("to_service", "shop/api", False)]).service_refs() == [
        ServiceRef("shop", "api")]
    assert str(ServiceRef("shop", "api")) == "shop/api"
    for bad in ("10.0.0.5/33", "a b", "a/b/c", "fd00::1/200"):
        with pytest.raises(ConfigError, match="--to-service"):
            Filter.build([("to_service", bad, False)])
    with pytest.raises(ConfigError, match="needs `match`"):
        StaticMap([], services=[{"name": "x"}])
    with pytest.raises(ConfigError, match="not an IP"):
        StaticMap([], services=[{"match": "10.96.0.0/16", "name": "x"}])
    m = StaticMap([], services=[{"match": "10.96.0.1", "name": "a", "namespace": "n"},
                                {"match": "10.96.0.1:443", "name": "b", "namespace": "n"}])
    assert m.service_at("10.96.0.1", 80) == ("n", "a")
    assert m.service_at("10.96.0.1", 443) == ("n", "b")
    assert m.service_at("10.96.0.2", 80) is None


class _Cluster:
    """The Kubernetes layer as the resolver sees it (aggregator/k8s/watch.py
    `KubernetesIdentity` without its watch threads): lookups and Service addresses of a real
    index fed the objects a watch would deliver."""

    def __init__(self, index) -> None:
        self.index = index

    def lookup(self, ip, port, at):
        return self.index.lookup(ip, at.timestamp())

    def service_addresses(self, namespace, name):
        return self.index.service_addresses(namespace, name)


def test_the_kubernetes_layer_names_services_and_resolves_names_to_clusterips():
    from aggregator.k8s.index import Index
    from tests.k8s_fake import pod, service

    ix = Index()
    ix.replace("services", [service("api", "shop", ["10.96.0.11", "fd00:96::11"]),
                            service("db", "shop", ["10.96.0.12"])])
    ix.replace("pods", [pod("api-0", "shop", "10.244.2.11", "h2")])
    names = ServiceNames(IdentityResolver(None, [_Cluster(ix)]))
    assert names.name_of("10.96.0.11", 80) == ServiceRef("shop", "api")
    assert names.name_of("fd00:96::11", 443) == ServiceRef("shop", "api")
    assert names.name_of("10.244.2.11", 8080) is None  # a pod is no Service
    assert names.addresses(ServiceRef("shop", "api")) == ["10.96.0.11", "fd00:96::11"]
    flt = resolve_filter(Filter.build([("to_service", "shop/db", False),
                                       ("to_service", "10.96.1.0/24", False)]), names)
    assert [str(v) for v in flt.clauses[0].values] == ["10.96.0.12/32", "10.96.1.0/24"]
    ix.apply("services", "DELETED", service("db", "shop", ["10.96.0.12"]))
    assert names.addresses(ServiceRef("shop", "db")) == []
    # the static map's `services` comes first
    both = ServiceNames(IdentityResolver(
        StaticMap([], services=[{"match": "10.96.0.11", "name": "api-v2", "namespace": "shop"}]),
        [_Cluster(ix)]))
    assert both.name_of("10.96.0.11", 80) == ServiceRef("shop", "api-v2")
