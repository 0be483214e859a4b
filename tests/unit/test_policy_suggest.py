"""Suggest, as a property over generated graphs: every suggested object passes the Kubernetes
schema (through the same loader `check` uses, from the YAML with its comments and from the JSON
List), checking the suggestion of a window against that window denies nothing, and any
connection that was not observed (a pod of the window on either end) is denied. Plus the shape
of one suggestion: merged rules, endPort ranges, IPv6 /128, justification comments."""

from __future__ import annotations

import json
from itertools import product

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eastwest.policy.check import check
from eastwest.policy.load import load_text
from eastwest.policy.observed import End, ObservedEdge
from eastwest.policy.semantics import Conn, evaluate
from eastwest.policy.suggest import Scope, suggest, to_json_list, to_yaml

WINDOW = "2026-11-28T03:00:00Z..2026-11-28T04:00:00Z"
PORTS = (53, 80, 81, 82, 443, 5432)
PROTOS = ("TCP", "UDP", "SCTP")
EXTERNAL = ("203.0.113.7", "198.51.100.1", "2001:db8::5")


def pod(ns: str, name: str, extra: bool = False) -> End:
    labels = {"app": name, **({"tier": "x"} if extra else {})}
    return End(f"{ns}/{name}", ns, name, "Deployment", labels)


def outside(ip: str) -> End:
    return End(f"external:{ip}", ip=ip)


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[End], list[ObservedEdge]]:
    names = draw(st.lists(st.tuples(st.sampled_from(("shop", "data")),
                                    st.sampled_from(("api", "db", "web", "dns")), st.booleans()),
                          min_size=1, max_size=5, unique_by=lambda t: (t[0], t[1])))
    ends = [pod(ns, n, extra) for ns, n, extra in names] + [outside(ip) for ip in EXTERNAL]
    raw = draw(st.lists(st.tuples(st.integers(0, len(ends) - 1), st.integers(0, len(ends) - 1),
                                  st.sampled_from(PORTS), st.sampled_from(PROTOS),
                                  st.integers(1, 9)), min_size=1, max_size=12))
    counts: dict[tuple[int, int, int, str], int] = {}
    for c, s, p, proto, n in raw:
        counts[c, s, p, proto] = counts.get((c, s, p, proto), 0) + n
    edges = [ObservedEdge(ends[c], ends[s], p, proto, n) for (c, s, p, proto), n in counts.items()]
    return ends, edges


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_check_of_the_suggestion_denies_nothing_observed_and_everything_else(graph):
    ends, edges = graph
    sugg = suggest(edges, WINDOW)
    policies = load_text(to_yaml(sugg), "suggested.yaml")  # the Kubernetes schema, every object
    assert [p.ref for p in load_text(json.dumps(to_json_list(sugg)), "list.json")] == \
        [p.ref for p in policies]
    assert check(policies, edges) == []

    seen = {e.id for x in edges for e in (x.client, x.server) if e.is_pod}
    observed = {(x.client.id, x.server.id, x.port, x.protocol) for x in edges}
    for c, s, p, proto in product(ends, ends, PORTS, PROTOS):
        if (c.id, s.id, p, proto) in observed or not ({c.id, s.id} & seen):
            continue
        v = evaluate(policies, Conn(c.endpoint(), s.endpoint(), p, proto))
        assert v.allowed is False, (c.id, s.id, p, proto)


@settings(max_examples=30, deadline=None)
@given(graphs(), st.sampled_from(("shop", "data")))
def test_a_namespace_scope_writes_only_its_policies_and_still_denies_nothing_observed(graph, ns):
    _, edges = graph
    policies = load_text(to_yaml(suggest(edges, WINDOW, Scope(namespace=ns))) or "", "s") \
        if any(e.client.namespace == ns or e.server.namespace == ns for e in edges) else []
    assert all(p.namespace == ns for p in policies)
    assert check(policies, edges) == []


def test_one_suggestion_merges_peers_by_ports_and_justifies_each_rule():
    web, api, db = pod("shop", "web"), pod("shop", "api"), pod("data", "db")
    v6 = outside("2001:db8::5")
    edges = [ObservedEdge(web, api, 8080, "TCP", 5), ObservedEdge(web, api, 8081, "TCP", 2),
             ObservedEdge(db, api, 8080, "TCP", 1), ObservedEdge(db, api, 8081, "TCP", 1),
             ObservedEdge(v6, api, 443, "TCP", 4), ObservedEdge(api, db, 53, "UDP", 3)]
    api_pol = next(s for s in suggest(edges, WINDOW) if s.obj["metadata"]["name"] == "eastwest-api")
    assert api_pol.obj["spec"]["ingress"] == [
        {"from": [{"ipBlock": {"cidr": "2001:db8::5/128"}}], "ports": [{"protocol": "TCP", "port": 443}]},
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data"}},
                   "podSelector": {"matchLabels": {"app": "db"}}},
                  {"podSelector": {"matchLabels": {"app": "web"}}}],
         "ports": [{"protocol": "TCP", "port": 8080, "endPort": 8081}]}]
    assert api_pol.obj["spec"]["egress"] == [
        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "data"}},
                 "podSelector": {"matchLabels": {"app": "db"}}}],
         "ports": [{"protocol": "UDP", "port": 53}]}]
    assert api_pol.comments == {
        ("ingress", 0): f"4 connections in {WINDOW}: from external:2001:db8::5 (4)",
        ("ingress", 1): f"9 connections in {WINDOW}: from data/db (2), shop/web (7)",
        ("egress", 0): f"3 connections in {WINDOW}: to data/db (3)"}
    text = to_yaml([api_pol])
    assert f"  # 9 connections in {WINDOW}: from data/db (2), shop/web (7)\n  - from:" in text
    assert json.loads(api_pol.obj["metadata"]["annotations"]["eastwest.io/justification"]) == {
        f"{d}[{i}]": c for (d, i), c in api_pol.comments.items()}


def test_a_workload_name_becomes_a_dns_name_and_a_comment_stays_one_line():
    odd = End("shop/Web_App\nx", "shop", "Web_App\nx", None, {"app": "web"})
    api = pod("shop", "api")
    s = suggest([ObservedEdge(odd, api, 80, "TCP", 1)], WINDOW)
    assert {x.obj["metadata"]["name"] for x in s} == {"eastwest-api", "eastwest-web-app-x"}
    text = to_yaml(s)
    assert all(not line.startswith("  #") or "\n" not in line for line in text.splitlines())
    assert "from shop/Web_App?x (1)" in text
    load_text(text, "odd")


def test_selectors_leave_out_the_labels_kubernetes_sets_per_pod_or_rollout():
    api = End("shop/api", "shop", "api", "Deployment",
              {"app": "api", "pod-template-hash": "5d8f7c", "controller-revision-hash": "abc"})
    web = End("shop/web", "shop", "web", "StatefulSet",
              {"app": "web", "statefulset.kubernetes.io/pod-name": "web-0"})
    s = {x.obj["metadata"]["name"]: x.obj for x in suggest([ObservedEdge(web, api, 80, "TCP", 1)], WINDOW)}
    assert s["eastwest-api"]["spec"]["podSelector"] == {"matchLabels": {"app": "api"}}
    assert s["eastwest-api"]["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "web"}}}]
