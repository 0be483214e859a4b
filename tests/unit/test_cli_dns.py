"""DNS in the CLI, against the real aggregator app (DuckDB) at the HTTP boundary: `graph` shows
an external server by the name its client resolved and the DNS of the edge to the resolver
(table, csv, json), `--dns-name` and `--dns-rcode` select resolver edges, `top --by dns-errors`
ranks by NXDOMAIN + SERVFAIL + timeouts, and a bad value is a usage error naming the flag."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from eastwest import codec
from eastwest.cli import main
from eastwest.client import ApiClient, ClientSettings
from eastwest.codec import Batch
from tests.unit.test_dns_identity import API_A, RESOLVER, batches

READ, INGEST = "read-token-0123456789", "ingest-token-0123456789"
FRONT = "process:ew-frontend"
RES = f"external:{RESOLVER}"


@pytest.fixture()
def api(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from aggregator.app import create_app
    from aggregator.settings import AggregatorSettings

    settings = AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST,
                                  read_token=READ, retention=None)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    with TestClient(create_app(settings)) as app:
        for seq, (coll, recs) in enumerate(batches(t0), 1):
            r = app.post("/api/v1/ingest", content=codec.encode_batch(Batch(coll, seq, t0, recs)),
                         headers={"Authorization": f"Bearer {INGEST}",
                                  "content-type": codec.CONTENT_TYPE})
            assert r.status_code == 200, r.text
        cli_against(app, monkeypatch)
        yield app


def cli_against(app, monkeypatch) -> None:
    """The `eastwest` commands of this test talk to `app` (a TestClient) with the read token."""
    monkeypatch.setattr("eastwest.cli._common.client_from_args", lambda args: ApiClient(
        ClientSettings(server="http://agg.test", token=READ), transport=app._transport))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_graph_names_the_external_server_and_shows_the_resolver_edge_dns(api, capsys) -> None:
    rc, out, err = run(capsys, "graph")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    dns_at = lines[0].index("DNS")
    rows = {tuple(ln.split()[:2]): ln for ln in lines[1:]}
    assert set(rows) == {(FRONT, "api.example.com*"), (FRONT, RES),
                         ("process:ew-other", f"external:{API_A}")}
    assert rows[(FRONT, RES)][dns_at:] == (
        "5q 1nx 1sf 1to 0.90ms api.example.com 2, flaky.example.com 2, gone.example.com 1")
    _, out, _ = run(capsys, "graph", "-o", "csv")
    by = {(r["client"], r["server"]): r for r in csv.DictReader(io.StringIO(out))}
    r = by[(FRONT, RES)]
    assert (r["dns_queries"], r["dns_nxdomain"], r["dns_servfail"], r["dns_timeouts"],
            r["dns_errors"], r["dns_latency_avg_us"]) == ("5", "1", "1", "1", "3", "900")
    assert r["dns_names"] == "api.example.com:2;flaky.example.com:2;gone.example.com:1"
    assert by[(FRONT, "api.example.com")]["dns_queries"] == ""
    _, out, _ = run(capsys, "graph", "-o", "json")
    doc = json.loads(out)
    api_edge = next(e for e in doc["edges"] if e["target"] == "api.example.com")
    assert api_edge["dns_named"] == {"ttl": 2, "hint": 1}
    assert {"id": "api.example.com", "name": "api.example.com", "namespace": None,
            "kind": "DNS", "in_degree": 1, "out_degree": 0} in doc["nodes"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--dns-rcode", "nxdomain"], [(FRONT, RES)]),
    (["--dns-rcode", "SERVFAIL", "--dns-name", "flaky.example.com"], [(FRONT, RES)]),
    (["--dns-rcode", "servfail", "--dns-name", "api.example.com"], []),
    (["--dns-name", "*.example.com", "--dns-name", "other.test"], [(FRONT, RES)]),
    (["--dns-name", "nothing.test"], []),
])
def test_dns_filter_flags_select_resolver_edges(api, capsys, argv, expected) -> None:
    rc, out, _ = run(capsys, "graph", *argv, "-o", "json")
    assert rc == 0
    assert [(e["source"], e["target"]) for e in json.loads(out)["edges"]] == expected


def test_top_by_dns_errors(api, capsys) -> None:
    rc, out, _ = run(capsys, "top", "--by", "dns-errors")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2  # only the edge with DNS errors
    assert lines[1].split()[:4] == ["1", FRONT, RES, "1"]
    assert "3q" not in lines[1] and "5q 1nx 1sf 1to" in lines[1]


@pytest.mark.parametrize(("argv", "flag"), [
    (["graph", "--dns-rcode", "nxdomian"], "--dns-rcode"),
    (["top", "--dns-name", ""], "--dns-name"),
])
def test_a_bad_dns_filter_value_exits_2_naming_the_flag(api, capsys, argv, flag) -> None:
    rc, out, err = run(capsys, *argv)
    assert (rc, out) == (2, "")
    assert flag in err


def test_flows_api_names_the_server_by_the_answer_and_carries_the_dns_of_a_resolver_flow(
        api, capsys) -> None:
    r = api.get("/api/v1/flows", params={"since": "1h", "limit": "100"},
                headers={"Authorization": f"Bearer {READ}"})
    assert r.status_code == 200, r.text
    flows = r.json()["flows"]
    by = {(f["client"]["ip"], f["client"]["port"]): f for f in flows}
    assert len(flows) == 5
    named = {k: (f["server"]["workload"]["name"], f["server"]["workload"]["resolved_by"])
             for k, f in by.items() if f["server"]["port"] == 443}
    assert named == {("10.244.1.11", 50001): ("api.example.com", "dns"),
                     ("10.244.1.11", 50002): ("api.example.com", "dns"),
                     ("10.244.1.11", 50003): ("api.example.com", "dns-hint"),
                     ("10.244.1.12", 50004): (f"external:{API_A}", "external")}
    resolver = by[("10.244.1.11", 41000)]
    assert resolver["dns"]["queries"] == 5 and resolver["dns"]["nxdomain"] == 1
    assert [(a["name"], a["type"], a["value"], a["ttl"]) for a in resolver["dns"]["answers"]] == [
        ("api.example.com", "A", API_A, 30), ("api.example.com", "A", "203.0.113.8", 30)]
    assert all(f["dns"] is None for k, f in by.items() if k != ("10.244.1.11", 41000))
    # the CLI shows the name
    rc, out, _ = run(capsys, "flows", "--since", "1h", "-o", "jsonl")
    shown = [json.loads(ln)["server"]["workload"]["name"] for ln in out.splitlines()]
    assert rc == 0 and shown.count("api.example.com") == 3


def test_a_dns_named_node_is_a_workload_of_the_window(api, capsys) -> None:
    h = {"Authorization": f"Bearer {READ}"}
    wl = {w["id"]: w for w in api.get("/api/v1/workloads", headers=h).json()["workloads"]}
    assert (wl["api.example.com"]["kind"], wl["api.example.com"]["resolved_by"],
            wl["api.example.com"]["callers"]) == ("DNS", "dns", [FRONT])
    one = api.get("/api/v1/workloads/api.example.com", headers=h).json()
    assert one["upstream"] == [FRONT] and one["callers"][0]["connections_opened"] == 3
