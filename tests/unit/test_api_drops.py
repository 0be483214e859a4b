"""Drops on the graph (issue 21, part 4), over a real app and DuckDB store: a drops record
joins its connection or is a connection of its own; `GET /api/v1/flows?outcome=dropped` lists
the blocked calls with their packets by reason; each edge of `GET /api/v1/graph` carries
`drops` ({packets, reasons}) summed over its connections of the window, null without; the
folded `other -> other` edge adds them up."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.graph_edges import add_drops, drops_of, fold_attrs
from eastwest.record import Drop, Endpoint
from tests.unit.test_api_query import RH, A, send, settings  # noqa: F401 - fixture
from tests.unit.test_correlate import T0, rec

DB = Endpoint("10.244.3.11", 5432)


def drops_rec(cport: int, reasons, collector: str = "h1", start=T0):
    return rec("path", collector=collector, source="drops", start=start, dur=3.0, c2s=0, s2c=0,
               connect=None, tunnel=None, client=Endpoint("10.244.1.11", cport), server=DB,
               drops=[Drop(r, n) for r, n in reasons])


@pytest.fixture
def client(settings):  # noqa: F811 - the fixture imported above
    with TestClient(create_app(settings)) as c:
        # frontend -> db:5432, blocked three times: once the client's socket saw the timeout
        # too (its record after the drops), twice only the drop source saw it
        send(c, "h1", 1, [drops_rec(42000, [("NETFILTER_DROP", 3)]),
                                drops_rec(42001, [("NETFILTER_DROP", 2), ("NO_SOCKET", 1)])])
        send(c, "h1", 2, [rec("client", cport=42000, client=Endpoint("10.244.1.11", 42000),
                              server=DB, dur=3.0, c2s=0, s2c=0, connect="timeout")])
        send(c, "h3", 1, [drops_rec(42002, [("NETFILTER_DROP", 4)], collector="h3")])
        # frontend -> api:9090, established, no drops
        send(c, "h1", 3, [rec("client", cport=41000)])
        yield c


def test_flows_outcome_dropped_lists_each_blocked_call_with_its_reasons(client) -> None:
    r = client.get("/api/v1/flows", params={"since": "2000-01-01T00:00:00Z", "outcome": "dropped",
                                            "sort": "start"}, headers=RH)
    assert r.status_code == 200, r.text
    flows = sorted(r.json()["flows"], key=lambda f: f["client"]["port"])
    assert [(f["client"]["port"], f["connect"], f["observed_by"], f["drops"]) for f in flows] == [
        (42000, "timeout", ["client", "drops"],
         {"packets": 3, "reasons": {"NETFILTER_DROP": 3}}),
        (42001, None, ["drops"], {"packets": 3, "reasons": {"NETFILTER_DROP": 2, "NO_SOCKET": 1}}),
        (42002, None, ["drops"], {"packets": 4, "reasons": {"NETFILTER_DROP": 4}})]
    assert all(f["server"]["workload"]["id"] == "shop/db" for f in flows)
    ok = client.get("/api/v1/flows", params={"since": "2000-01-01T00:00:00Z", "outcome": "ok"},
                    headers=RH).json()["flows"]
    assert [(f["server"]["port"], f["drops"]) for f in ok] == [(9090, None)]


def test_each_edge_carries_its_drops_by_reason(client) -> None:
    g = client.get("/api/v1/graph", params=A, headers=RH).json()
    edges = {(e["source"], e["target"]): e for e in g["edges"]}
    blocked = edges[("shop/frontend", "shop/db")]
    assert blocked["drops"] == {"packets": 10, "reasons": {"NETFILTER_DROP": 9, "NO_SOCKET": 1}}
    assert (blocked["connections_opened"], blocked["connections_failed"]) == (3, 3)
    assert blocked["bytes_c2s"] == 0 and blocked["observed_by"] == {"client,drops": 1, "drops": 2}
    assert edges[("shop/frontend", "shop/api")]["drops"] is None
    # a window after the drops: none
    later = {"from": (T0 + timedelta(minutes=10)).isoformat(),
             "to": (T0 + timedelta(minutes=20)).isoformat()}
    assert client.get("/api/v1/graph", params=later, headers=RH).json()["edges"] == []


def test_edge_drops_add_up_when_folded() -> None:
    a, b = drops_of(3, "NETFILTER_DROP=3"), drops_of(4, "NETFILTER_DROP=1,NO_SOCKET=3")
    assert add_drops([a, None, b]) == {"packets": 7, "reasons": {"NETFILTER_DROP": 4, "NO_SOCKET": 3}}
    assert add_drops([None, None]) is None and drops_of(None, None) is None
    base = {"connections_opened": 1, "connections_active": 0, "connections_closed": 1,
            "connections_failed": 1, "resets": 0, "retransmits": 0, "bytes_c2s": 0,
            "bytes_s2c": 0, "packets_c2s": None, "packets_s2c": None, "byte_mismatches": 0,
            "ports": [5432], "protocols": ["tcp"], "observed_by": {"drops": 1}, "complete": True,
            "first_seen": None, "last_seen": None}
    assert fold_attrs([{**base, "drops": a}, {**base, "drops": b}])["drops"] == add_drops([a, b])


@pytest.fixture
def cli(client, monkeypatch):
    """The `eastwest` command talking to the real app above (its in-process transport)."""
    from eastwest.client import ApiClient, ClientSettings

    def make(args):
        return ApiClient(ClientSettings(server="http://testserver", token=RH["Authorization"][7:]),
                         transport=client._transport)

    monkeypatch.setattr("eastwest.cli._common.client_from_args", make)

    def run(capsys, *argv: str) -> str:
        from eastwest.cli import main

        assert main(list(argv)) == 0
        return capsys.readouterr().out
    return run


def test_top_by_drops_ranks_the_edges_that_dropped_with_their_reasons(cli, capsys) -> None:
    out = cli(capsys, "top", "--by", "drops", "--since", A["from"], "--until", A["to"])
    lines = out.splitlines()
    assert lines[0].split()[-1] == "DROPS" and len(lines) == 2, out  # only the edge with drops
    assert lines[1].split()[:3] == ["1", "shop/frontend", "shop/db"]
    assert lines[1].endswith("10 NETFILTER_DROP 9, NO_SOCKET 1"), out
    rows = list(csv.DictReader(io.StringIO(cli(capsys, "graph", "--since", A["from"], "--until",
                                               A["to"], "-o", "csv"))))
    assert {(r["server"], r["dropped"], r["drop_reasons"]) for r in rows} == {
        ("shop/db", "10", "NETFILTER_DROP=9;NO_SOCKET=1"), ("shop/api", "0", "")}


def test_flows_outcome_dropped_on_the_command_line(cli, capsys) -> None:
    out = cli(capsys, "flows", "--outcome", "dropped", "--since", "3650d", "-o", "csv")
    rows = sorted(csv.DictReader(io.StringIO(out)), key=lambda r: r["client_port"])
    assert [(r["client_port"], r["outcome"], r["drops"]) for r in rows] == [
        ("42000", "dropped", "NETFILTER_DROP=3"), ("42001", "dropped", "NETFILTER_DROP=2;NO_SOCKET=1"),
        ("42002", "dropped", "NETFILTER_DROP=4")]
    table = cli(capsys, "flows", "--outcome", "dropped", "--since", "3650d")
    assert "dropped (NETFILTER_DROP=2,NO_SOCKET=1)" in table, table


def test_prometheus_counts_drops_per_edge_and_reason_and_dropped_failures(client) -> None:
    """`eastwest_edge_drops_total{<edge>,reason}`: the packets of each completed connection, by
    its reasons (the graph's numbers); a blocked call is a failure with reason `dropped`."""
    from tests.unit.test_prom_edges import edge, samples

    client.app.state.pipeline.exporters.tick(everything_closed=True)
    text = client.get("/metrics").text
    assert samples(text, "eastwest_edge_drops_total") == {
        edge("frontend", "db", 5432, reason="NETFILTER_DROP"): 9,
        edge("frontend", "db", 5432, reason="NO_SOCKET"): 1}
    assert samples(text, "eastwest_edge_failures_total") == {
        edge("frontend", "db", 5432, reason="dropped"): 3}
