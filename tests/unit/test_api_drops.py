"""Drops on the graph (issue 21, part 4), over a real app and DuckDB store: a drops record
joins its connection or is a connection of its own; `GET /api/v1/flows?outcome=dropped` lists
the blocked calls with their packets by reason; each edge of `GET /api/v1/graph` carries
`drops` ({packets, reasons}) summed over its connections of the window, null without; the
folded `other -> other` edge adds them up."""

from __future__ import annotations

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
