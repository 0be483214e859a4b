"""Workload identity in layers: static map (ip:port over longest prefix), collector-reported
workload, a pluggable source (Kubernetes: tests/unit/test_k8s_*.py), process, reverse DNS, CIDR
groups, external:<ip>."""

from __future__ import annotations

import pytest

from aggregator.identity import Facts, IdentityResolver, StaticMap, parse_cidr_groups
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


def test_a_source_is_asked_for_the_time_of_the_connection():
    """Pluggable sources (Kubernetes) answer for the connection's start: addresses are reused."""
    from datetime import UTC, datetime

    asked = []

    class Source:
        def lookup(self, ip, port, at):
            asked.append(at)
            return None

    r = IdentityResolver(None, [Source()])
    t = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert r.resolve("10.42.0.7", 80, at=t).name == "external:10.42.0.7"
    r.resolve("10.42.0.7", 80)  # no time: now
    assert asked[0] == t and asked[1] > t
