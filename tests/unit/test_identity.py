"""Workload identity in layers: static map (ip:port over longest prefix), collector-reported
workload, Kubernetes (against a local fake API server serving API-shaped JSON through the real
`kubernetes` client), process, reverse DNS, CIDR groups, external:<ip>."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aggregator.identity import Facts, IdentityResolver, StaticMap, parse_cidr_groups
from aggregator.k8s import KubernetesIdentity
from eastwest.errors import ConfigError
from eastwest.record import Workload

STATIC = StaticMap([
    {"match": "10.244.0.0/16", "name": "pods", "namespace": "cluster"},
    {"match": "10.244.2.11/32", "name": "api", "namespace": "shop", "kind": "Deployment",
     "host": "h2", "labels": {"app": "api"}},
    {"match": "10.244.2.11:9100", "name": "api-metrics", "namespace": "shop"},
    {"match": "[fd00::5]:443", "name": "v6-svc"},
])


def test_static_map_most_specific_match_wins():
    r = IdentityResolver(STATIC)
    assert r.resolve("10.244.2.11", 9100).name == "api-metrics"
    api = r.resolve("10.244.2.11", 9090)
    assert (api.wid, api.kind, api.host, api.labels, api.source) == (
        "shop/api", "Deployment", "h2", {"app": "api"}, "static")
    assert r.resolve("10.244.7.7", 1).wid == "cluster/pods"
    assert r.resolve("fd00::5", 443).name == "v6-svc"


def test_static_map_file_errors_name_the_entry(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("workloads:\n- {match: not-a-net, name: x}\n")
    with pytest.raises(ConfigError, match=r"workloads\[0\].match"):
        StaticMap.load(p)
    p.write_text("workloads:\n- {name: x}\n")
    with pytest.raises(ConfigError, match="needs `match`"):
        StaticMap.load(p)


def test_layers_in_order_collector_then_process_then_dns_then_cidr_then_external():
    dns_calls = []

    def dns(ip):
        dns_calls.append(ip)
        return "db.example.internal" if ip == "192.0.2.9" else None

    r = IdentityResolver(STATIC, cidr_groups=parse_cidr_groups(["corp=198.51.100.0/24"]),
                         reverse_dns=dns)
    assert r.resolve("10.244.2.11", 1, Facts(Workload("other"))).name == "api"  # static first
    w = r.resolve("192.0.2.1", 1, Facts(Workload("billing", "fin"), comm="java", collector="h9"))
    assert (w.wid, w.source, w.host) == ("fin/billing", "collector", "h9")
    p = r.resolve("192.0.2.1", 1, Facts(comm="nginx", collector="h3"))
    assert (p.name, p.kind, p.host) == ("process:nginx", "Process", "h3")
    c = r.resolve("192.0.2.1", 1, Facts(container="0123456789abcdef0123", comm="x"))
    assert c.name == "container:0123456789ab"
    assert r.resolve("192.0.2.9", 1).name == "db.example.internal"
    assert r.resolve("192.0.2.9", 2).source == "dns" and dns_calls.count("192.0.2.9") == 1  # cached
    assert r.resolve("198.51.100.20", 1).name == "corp"
    assert r.resolve("203.0.113.1", 1).name == "external:203.0.113.1"


def test_cidr_group_needs_name_and_cidr():
    with pytest.raises(ConfigError, match="--cidr-group"):
        parse_cidr_groups(["corp"])
    with pytest.raises(ConfigError, match="not a CIDR"):
        parse_cidr_groups(["corp=10.0.0.300/8"])


# -- Kubernetes, against a FAKE API server (API-shaped JSON on loopback) ------------------------
PODS = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
    {"metadata": {"name": "api-7d9f8b6c5d-x2x9z", "namespace": "shop",
                  "labels": {"app": "api", "pod-template-hash": "7d9f8b6c5d"},
                  "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                       "name": "api-7d9f8b6c5d", "uid": "u1", "controller": True}]},
     "spec": {"nodeName": "node-2", "containers": [{"name": "api", "image": "api:1"}]},
     "status": {"podIP": "10.42.0.7", "podIPs": [{"ip": "10.42.0.7"}]}},
    {"metadata": {"name": "db-0", "namespace": "shop",
                  "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                       "name": "db", "uid": "u2", "controller": True}]},
     "spec": {"nodeName": "node-3", "containers": [{"name": "db", "image": "pg"}]},
     "status": {"podIP": "10.42.0.8"}},
    {"metadata": {"name": "kube-proxy-abc", "namespace": "kube-system"},
     "spec": {"nodeName": "node-1", "hostNetwork": True, "containers": [{"name": "p", "image": "k"}]},
     "status": {"podIP": "172.18.0.2"}},
]}
SERVICES = {"kind": "ServiceList", "apiVersion": "v1", "metadata": {}, "items": [
    {"metadata": {"name": "api", "namespace": "shop", "labels": {"app": "api"}},
     "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]}},
    {"metadata": {"name": "legacy", "namespace": "shop"}, "spec": {"clusterIP": "None"}},
]}
ENDPOINTS = {"kind": "EndpointsList", "apiVersion": "v1", "metadata": {}, "items": [
    {"metadata": {"name": "legacy", "namespace": "shop"},
     "subsets": [{"addresses": [{"ip": "192.168.50.4"}], "ports": [{"port": 5432}]}]},
]}


@pytest.fixture
def fake_k8s():
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            body = {"/api/v1/pods": PODS, "/api/v1/services": SERVICES,
                    "/api/v1/endpoints": ENDPOINTS}.get(self.path.split("?")[0])
            data = json.dumps(body or {"kind": "Status", "code": 404}).encode()
            self.send_response(200 if body else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


def test_kubernetes_pods_services_and_endpoints_through_the_real_client(fake_k8s):
    url, hits = fake_k8s
    now = [0.0]
    k8s = KubernetesIdentity.connect(url, token="t" * 20, ttl_s=30)
    k8s.clock = lambda: now[0]
    r = IdentityResolver(None, [k8s])
    api = r.resolve("10.42.0.7", 9090)
    assert (api.wid, api.kind, api.host, api.source) == ("shop/api", "Deployment", "node-2", "kubernetes")
    db = r.resolve("10.42.0.8", 5432)
    assert (db.wid, db.kind) == ("shop/db", "StatefulSet")
    vip = r.resolve("10.96.0.10", 80)
    assert (vip.wid, vip.kind) == ("shop/api", "Service")
    assert r.resolve("192.168.50.4", 5432).wid == "shop/legacy"
    assert r.resolve("172.18.0.2", 1).name == "external:172.18.0.2"  # host network: not the pod's
    assert sorted(h.split("?")[0] for h in hits) == ["/api/v1/endpoints", "/api/v1/pods", "/api/v1/services"]
    now[0] = 31.0  # after the ttl the maps are refreshed once
    r.resolve("10.42.0.99", 1)
    assert len(hits) == 6


def test_kubernetes_down_keeps_going_and_counts(fake_k8s):
    k8s = KubernetesIdentity.connect("http://127.0.0.1:9", ttl_s=30)
    assert IdentityResolver(None, [k8s]).resolve("10.42.0.7", 1).name == "external:10.42.0.7"
    assert k8s.failures == 1
