"""`eastwest policy check` and `suggest` end to end over the real aggregator app (DuckDB, a
workload map with labels) at the CLI's HTTP boundary: the observed route's exact edges, denied
edges with the side and policies that deny them, exit statuses, policy files that fail the
Kubernetes schema, and suggest's output checked against the same window."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from eastwest.cli import main
from eastwest.client import ApiClient, ClientSettings
from eastwest.policy.load import load_text
from tests.unit.test_api_query import INGEST, READ, RH, send
from tests.unit.test_correlate import T0, rec

MAP_YAML = """workloads:
- {match: 10.244.1.11/32, name: frontend, namespace: shop, labels: {app: frontend}}
- {match: 10.244.2.11/32, name: api, namespace: shop, labels: {app: api, tier: back, pod: api-1},
   ports: [{name: http, containerPort: 9090}]}
- {match: 10.244.2.12/32, name: api, namespace: shop, labels: {app: api, tier: back, pod: api-2}}
- {match: 10.244.3.11/32, name: db, namespace: data, labels: {app: db}}
"""
FROM, TO = (T0 - timedelta(minutes=5)).isoformat(), (T0 + timedelta(minutes=5)).isoformat()
WINDOW = ["--since", FROM, "--until", TO]


def fill(c: TestClient) -> None:
    """3 frontend -> api:9090, 2 api -> db:5432, 1 api -> 203.0.113.7:443 (outside)."""
    ep = rec("client").client.__class__
    for i in range(3):
        send(c, "h1", 10 + i, [rec("client", cport=41000 + i)])
    send(c, "h2", 100, [rec("client", collector="h2", client=ep("10.244.2.11", 50000 + i),
                            server=ep("10.244.3.11", 5432)) for i in range(2)])
    send(c, "h2", 101, [rec("client", collector="h2", client=ep("10.244.2.11", 50100),
                            server=ep("203.0.113.7", 443))])


@pytest.fixture
def app(tmp_path, monkeypatch):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    settings = AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST, read_token=READ,
                                  workload_map=tmp_path / "map.yaml", retention=None)
    with TestClient(create_app(settings)) as c:
        fill(c)
        monkeypatch.setattr("eastwest.cli._common.client_from_args", lambda args: ApiClient(
            ClientSettings(server="http://agg.test", token=READ), transport=c._transport))
        yield c


def run(capsys, *argv):
    rc = main(["policy", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_observed_route_gives_edges_with_labels_ports_and_exact_counts(app):
    """api's labels are those both its pods share in the map (not `pod`, which differs)."""
    doc = app.get("/api/v1/policy/observed", params={"from": FROM, "to": TO}, headers=RH).json()
    got = {(e["client"]["id"], e["server"]["id"], e["port"], e["protocol"]): e for e in doc["edges"]}
    assert {k: e["connections"] for k, e in got.items()} == {
        ("shop/frontend", "shop/api", 9090, "TCP"): 3, ("shop/api", "data/db", 5432, "TCP"): 2,
        ("shop/api", got_ext(got), 443, "TCP"): 1}
    fe = got["shop/frontend", "shop/api", 9090, "TCP"]
    assert fe["client"]["labels"] == {"app": "frontend"}
    assert fe["server"]["labels"] == {"app": "api", "tier": "back"}
    assert fe["server"]["ip"] is None and fe["server"]["ports"] == {"http": [9090, "TCP"]}
    assert fe["client"]["ports"] is None  # the map names no port of frontend
    ext = got["shop/api", got_ext(got), 443, "TCP"]["server"]
    assert (ext["namespace"], ext["ip"]) == (None, "203.0.113.7")


def got_ext(got):
    return next(k[1] for k in got if k[2] == 443)


DENY_SHOP = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 9090}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: data}}}]
    ports: [{port: 5432}]
"""
DENY_DB = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: data}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: []
"""


def test_check_lists_denied_edges_with_the_side_and_policies_and_exits_1(app, capsys, tmp_path):
    (tmp_path / "shop.yaml").write_text(DENY_SHOP)
    (tmp_path / "db.yaml").write_text(DENY_DB)
    rc, out, err = run(capsys, "check", str(tmp_path / "shop.yaml"), str(tmp_path / "db.yaml"),
                       *WINDOW, "-o", "json")
    assert rc == 1
    import json
    doc = json.loads(out)
    denied = {(d["client"], d["server"], d["port"]): d for d in doc["denied"]}
    assert set(denied) == {("shop/frontend", "shop/api", 9090), ("shop/api", "data/db", 5432),
                           ("shop/api", got_ext({(0, d[1], d[2], 0): 0 for d in denied}), 443)}
    # frontend's egress is denied by default-deny (egress isolated, no egress rule)
    fe = denied["shop/frontend", "shop/api", 9090]
    assert (fe["denied_by"], fe["connections"], fe["egress_policies"]) == ("egress", 3, ["shop/default-deny"])
    db = denied["shop/api", "data/db", 5432]  # api's egress allows data:5432, db's ingress does not
    assert (db["denied_by"], db["connections"], db["ingress_policies"]) == ("ingress", 2, ["data/db"])
    ext = next(d for d in doc["denied"] if d["port"] == 443)
    assert (ext["denied_by"], ext["egress_policies"]) == ("egress", ["shop/api", "shop/default-deny"])
    assert "3 of 3 edges (6 connections" in err

    rc, out, err = run(capsys, "check", str(tmp_path / "db.yaml"), *WINDOW)
    assert rc == 1
    lines = out.splitlines()
    assert len(lines) == 2 and lines[1].split() == ["shop/api", "data/db", "5432/TCP", "2", "denied",
                                                    "ingress", "data/db"]


def test_check_of_a_set_that_denies_nothing_exits_0(app, capsys, tmp_path):
    (tmp_path / "allow.yaml").write_text(DENY_DB.replace("ingress: []", "ingress: [{}]"))
    rc, out, err = run(capsys, "check", str(tmp_path / "allow.yaml"), *WINDOW)
    assert (rc, out) == (0, "")
    assert "deny none of the 3 edges" in err


@pytest.mark.parametrize(("text", "where"), [
    (DENY_DB + "---\n" + DENY_DB.replace("ingress: []", "ingress: [{ports: [{port: 80, protocol: TCPX}]}]")
     .replace("name: db", "name: db2"), "document 2 (db2): spec.ingress[0].ports[0].protocol"),
    (DENY_DB.replace("  ingress: []", "  ingres: []"), "document 1 (db): spec"),
    (DENY_DB.replace("podSelector: {matchLabels: {app: db}}", "podSelector: {matchExpressions: "
                     "[{key: app, operator: Is, values: [db]}]}"),
     "document 1 (db): spec.podSelector.matchExpressions[0].operator"),
    ("apiVersion: v1\nkind: List\nitems:\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n"
     "  metadata: {name: x}\n  spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}\n",
     "document 1 item 1 (x): spec.egress[0].to[0].ipBlock.cidr"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n", "document 1 (c)"),
])
def test_an_invalid_policy_is_a_usage_error_naming_file_document_and_field(app, capsys, tmp_path,
                                                                            text, where):
    (tmp_path / "bad.yaml").write_text(text)
    rc, out, err = run(capsys, "check", str(tmp_path / "bad.yaml"), *WINDOW)
    assert (rc, out) == (2, "")
    assert err.startswith(f"eastwest policy: {tmp_path / 'bad.yaml'}: {where}"), err


def test_a_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["policy", "check", "--bogus", "x.yaml"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["policy", "suggest", "-o", "xml"])
    assert exc.value.code == 2


def test_suggest_of_the_window_validates_and_check_of_it_denies_nothing(app, capsys, tmp_path):
    rc, out, err = run(capsys, "suggest", *WINDOW)
    assert rc == 0
    policies = load_text(out, "suggested")  # each object passes the Kubernetes schema
    assert sorted(p.ref for p in policies) == ["data/eastwest-db", "shop/eastwest-api",
                                               "shop/eastwest-frontend"]
    assert "# 3 connections in " in out and "from shop/frontend (3)" in out
    assert "- ipBlock:\n        cidr: 203.0.113.7/32" in out
    (tmp_path / "s.yaml").write_text(out)
    rc, _, err = run(capsys, "check", str(tmp_path / "s.yaml"), *WINDOW)
    assert rc == 0, err

    rc, out, _ = run(capsys, "suggest", *WINDOW, "--namespace", "data", "-o", "json")
    import json
    doc = json.loads(out)
    assert [i["metadata"]["name"] for i in doc["items"]] == ["eastwest-db"]
    db = doc["items"][0]
    assert db["spec"]["ingress"] == [{"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "shop"}}, "podSelector": {"matchLabels": {"app": "api", "tier": "back"}}}],
        "ports": [{"protocol": "TCP", "port": 5432}]}]
    assert db["spec"]["egress"] == []
    assert "2 connections" in db["metadata"]["annotations"]["eastwest.io/justification"]
    (tmp_path / "l.json").write_text(out)
    assert [p.ref for p in load_text(out, "l.json")] == ["data/eastwest-db"]


@pytest.mark.parametrize(("path", "params", "parameter"), [
    ("/api/v1/policy/suggest", {"format": "xml"}, "format"),
    ("/api/v1/policy/observed", {"group_by": "host"}, "group_by"),
    ("/api/v1/policy/observed", {"from": "yesterday"}, "from"),
])
def test_the_routes_reject_a_bad_parameter_by_name(app, path, params, parameter):
    r = app.get(path, params={"from": FROM, "to": TO, **params}, headers=RH)
    assert r.status_code == 400 and r.json()["parameter"] == parameter, r.text


def test_a_window_larger_than_the_bound_is_refused_not_cut(app, monkeypatch):
    monkeypatch.setattr("aggregator.api.policy.MAX_CONNECTIONS", 5)
    for path in ("/api/v1/policy/observed", "/api/v1/policy/suggest"):
        r = app.get(path, params={"from": FROM, "to": TO}, headers=RH)
        assert r.status_code == 400 and "more than 5 connections" in r.json()["detail"], r.text
    r = app.get("/api/v1/policy/observed", params={"from": FROM, "to": TO, "workload": "db"},
                headers=RH)
    assert r.status_code == 200 and [e["connections"] for e in r.json()["edges"]] == [2]


NAMED = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: http-only, namespace: NS}
spec:
  podSelector: {}
  ingress: [{ports: [{port: http}]}]
"""


def test_named_ports_resolve_from_the_map_and_are_unknown_where_it_names_none(app, capsys, tmp_path):
    (tmp_path / "n.yaml").write_text(NAMED.replace("NS", "shop") + "---\n" +
                                     NAMED.replace("NS", "data"))
    rc, out, err = run(capsys, "check", str(tmp_path / "n.yaml"), *WINDOW, "-o", "json")
    import json
    doc = json.loads(out)
    assert (rc, doc["denied"]) == (0, [])  # frontend -> api:9090 is api's `http`
    assert [(u["server"], u["verdict"], u["ingress_policies"]) for u in doc["unknown"]] == [
        ("data/db", "unknown", ["data/http-only"])]
    assert "1 edges cannot be evaluated" in err


@pytest.mark.parametrize(("ports", "where"), [
    ([{"name": "http", "containerPort": 0}], "m: workloads[0].ports[0].containerPort=0"),
    ([{"containerPort": 80}], "m: workloads[0].ports[0]="),
    ([{"name": "dns", "containerPort": 53, "protocol": "ICMP"}], "m: workloads[0].ports[0].protocol='ICMP'"),
    ({"http": 80}, "m: workloads[0].ports="),
])
def test_a_bad_named_port_in_the_workload_map_is_named(ports, where):
    from aggregator.identity import StaticMap
    from eastwest.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        StaticMap([{"match": "10.0.0.1/32", "name": "a", "namespace": "x", "ports": ports}], "m")
    assert str(exc.value).startswith(where), str(exc.value)


def test_suggest_for_one_workload_and_for_a_scope_with_nothing_in_it(app, capsys):
    rc, out, err = run(capsys, "suggest", *WINDOW, "--workload", "api")
    assert rc == 0 and [p.ref for p in load_text(out, "api")] == ["shop/eastwest-api"]
    rc, out, err = run(capsys, "suggest", *WINDOW, "--namespace", "nosuch")
    assert (rc, out) == (0, "")
    assert err == "eastwest policy suggest: no pod workload in scope had traffic in this window\n"
    rc, out, err = run(capsys, "suggest", *WINDOW, "--namespace", "nosuch", "-o", "json")
    assert rc == 0 and '"items": []' in out and "no pod workload" in err
