"""Identity from DNS answers and DNS on resolver edges, through the real pipeline and DuckDB: an
address a client got in an answer names that client's connections to it (within the TTL:
`dns`; after it: a hint), whatever order the DNS record and the connections arrive in, with an
aggregator restart between any two batches; the resolver's edge carries the client's DNS
(names, NXDOMAIN, SERVFAIL, timeouts, latency); the graph's DNS filters select edges."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aggregator.dns_names import DnsFacts, Named
from aggregator.graph import Window, graph_data
from aggregator.identity import IdentityResolver
from aggregator.store.duckdb import DuckDBStore
from aggregator.worker import WorkerSettings
from eastwest.dns_filter import DnsEdgeFilter
from eastwest.errors import ConfigError
from eastwest.record import (
    DnsAnswer,
    DnsLatency,
    DnsName,
    DnsSummary,
    Endpoint,
    FlowRecord,
    Process,
)
from tests.unit.pipes import driven

T0 = datetime(2026, 12, 7, 9, 0, 0, tzinfo=UTC)
FRONT, OTHER, RESOLVER = "10.244.1.11", "10.244.1.12", "10.244.0.53"
API_A, API_B = "203.0.113.7", "203.0.113.8"
WINDOW = Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5))
_ids = itertools.count(1)


def dns_summary(t0: datetime) -> DnsSummary:
    return DnsSummary(
        queries=5, responses=4, timeouts=1, rcodes={"NOERROR": 2, "NXDOMAIN": 1, "SERVFAIL": 1},
        latency_us=DnsLatency(300, 900, 2100),
        names=[DnsName("api.example.com.", "A", 2, {"NOERROR": 2}),
               DnsName("gone.example.com.", "A", 1, {"NXDOMAIN": 1}),
               DnsName("flaky.example.com.", "A", 2, {"SERVFAIL": 1}, 1)],
        answers=[DnsAnswer("api.example.com.", "A", API_A, 30, t0),
                 DnsAnswer("api.example.com.", "A", API_B, 30, t0)])


DNS = dns_summary(T0)


def r(observer: str, client: tuple[str, int], server: tuple[str, int], start: datetime, *,
      protocol: str = "tcp", comm: str | None = None, dns: DnsSummary | None = None,
      collector: str = "h1") -> FlowRecord:
    return FlowRecord(
        record_id=f"{collector}:{next(_ids)}", collector=collector,
        source="socket" if observer != "path" else "wire", start=start,
        end=start + timedelta(seconds=2), final=True, protocol=protocol, family=4,
        client=Endpoint(*client), server=Endpoint(*server), observer=observer,
        bytes_c2s=300, bytes_s2c=1200, connect="ok" if protocol == "tcp" and observer != "path"
        else None, process=Process(7, comm) if comm else None, dns=dns)


def batches(t0: datetime = T0) -> list[tuple[str, list[FlowRecord]]]:
    """Three batches: the DNS flow (its socket view and the capture's `dns` summary), the
    connections within the answers' TTL, and one after it plus one of a client that got none."""
    dns_flow = ((FRONT, 41000), (RESOLVER, 53))
    return [
        ("h1", [r("client", *dns_flow, t0 - timedelta(seconds=1), protocol="udp",
                  comm="ew-frontend"),
                r("path", *dns_flow, t0 - timedelta(seconds=1), protocol="udp", dns=dns_summary(t0))]),
        ("h1", [r("client", (FRONT, 50001), (API_A, 443), t0 + timedelta(seconds=2),
                  comm="ew-frontend"),
                r("client", (FRONT, 50002), (API_B, 443), t0 + timedelta(seconds=3),
                  comm="ew-frontend")]),
        ("h1", [r("client", (FRONT, 50003), (API_A, 443), t0 + timedelta(seconds=100),
                  comm="ew-frontend"),
                r("client", (OTHER, 50004), (API_A, 443), t0 + timedelta(seconds=4),
                  comm="ew-other")]),
    ]


def graph(store: Any, **dns: Any) -> dict[tuple[str, str], dict[str, Any]]:
    import json

    data = graph_data(store.read(), WINDOW, dns=DnsEdgeFilter.build(**dns) if dns else None)
    doc = json.loads(data.json_bytes())
    return {(e["source"], e["target"]): e for e in doc["edges"]}


def open_store(tmp: Path) -> Any:
    return driven(DuckDBStore(tmp), IdentityResolver(), worker=WorkerSettings(coalesce=0))


def run(tmp: Path, order: tuple[int, ...], restart_after: int | None) -> dict[tuple[str, str], Any]:
    all_batches = batches()
    store = open_store(tmp)
    try:
        for i, k in enumerate(order):
            coll, recs = all_batches[k]
            store.ingest(coll, k + 1, recs)
            if restart_after == i:
                assert store.flush(30)
                store.close()
                store = open_store(tmp)
        assert store.flush(30)
        return graph(store)
    finally:
        store.close()


def test_the_rule_within_the_ttl_then_a_hint_newest_answer_first() -> None:
    rec = batches()[0][1][1]
    later = DnsSummary(queries=1, responses=1, answers=[
        DnsAnswer("www.example.org.", "A", API_A, 10, T0 + timedelta(seconds=60))])
    facts = DnsFacts.of_records([rec, r("path", (FRONT, 41001), (RESOLVER, 53), T0,
                                        protocol="udp", dns=later)], WINDOW.until)
    assert facts.name_for(FRONT, API_A, T0 - timedelta(seconds=5)) is None  # before any answer
    assert facts.name_for(FRONT, API_A, T0 + timedelta(seconds=30)) == Named("api.example.com", "dns")
    assert facts.name_for(FRONT, API_A, T0 + timedelta(seconds=45)) == Named("api.example.com", "dns-hint")
    assert facts.name_for(FRONT, API_A, T0 + timedelta(seconds=65)) == Named("www.example.org", "dns")
    assert facts.name_for(FRONT, API_A, T0 + timedelta(seconds=600)) == Named("www.example.org", "dns-hint")
    assert facts.name_for(OTHER, API_A, T0 + timedelta(seconds=5)) is None  # not its answer
    # an answer after the window's end is not known to it
    assert DnsFacts.of_records([rec], T0).answers == {}


EXPECTED_API = {"connections_opened": 3, "dns_named": {"ttl": 2, "hint": 1},
                "bytes_c2s": 900, "bytes_s2c": 3600}


# every order of the three batches, and a restart after each position of each order
CASES = [(order, restart) for order in itertools.permutations(range(3))
         for restart in (None, 0, 1)]


@pytest.mark.parametrize(("order", "restart"), CASES)
def test_names_from_answers_in_every_order_and_across_a_restart(tmp_path: Path, order, restart) -> None:
    edges = run(tmp_path, order, restart)
    api = edges[("process:ew-frontend", "api.example.com")]
    assert {k: api[k] for k in EXPECTED_API} == EXPECTED_API
    # the client that got no answer still sees the address
    assert edges[("process:ew-other", f"external:{API_A}")]["connections_opened"] == 1
    assert not any(dst.startswith("external:203.") for src, dst in edges
                   if src == "process:ew-frontend")
    dns = edges[("process:ew-frontend", f"external:{RESOLVER}")]["dns"]
    assert dns == {
        "queries": 5, "responses": 4, "timeouts": 1, "nxdomain": 1, "servfail": 1, "errors": 3,
        "rcodes": {"NOERROR": 2, "NXDOMAIN": 1, "SERVFAIL": 1},
        "latency_us": {"min": 300, "avg": 900, "max": 2100},
        "names": [{"name": "api.example.com", "type": "A", "count": 2,
                   "rcodes": {"NOERROR": 2}, "timeouts": 0},
                  {"name": "flaky.example.com", "type": "A", "count": 2,
                   "rcodes": {"SERVFAIL": 1}, "timeouts": 1},
                  {"name": "gone.example.com", "type": "A", "count": 1,
                   "rcodes": {"NXDOMAIN": 1}, "timeouts": 0}],
        "other_names": 0}


def test_a_partly_named_edge_splits_and_the_rest_stays(tmp_path: Path) -> None:
    """A client's connection to the address before it got the answer stays `external:`."""
    store = open_store(tmp_path)
    try:
        for k, (coll, recs) in enumerate(batches()):
            store.ingest(coll, k + 1, recs)
        store.ingest("h1", 9, [r("client", (FRONT, 50009), (API_A, 443),
                                 T0 - timedelta(seconds=30), comm="ew-frontend")])
        assert store.flush(30)
        edges = graph(store)
    finally:
        store.close()
    assert edges[("process:ew-frontend", "api.example.com")]["connections_opened"] == 3
    rest = edges[("process:ew-frontend", f"external:{API_A}")]
    assert rest["connections_opened"] == 1 and "dns_named" not in rest


def test_dns_edge_filters(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        for k, (coll, recs) in enumerate(batches()):
            store.ingest(coll, k + 1, recs)
        assert store.flush(30)
        resolver = ("process:ew-frontend", f"external:{RESOLVER}")
        assert list(graph(store, names=["*.EXAMPLE.com."])) == [resolver]
        assert list(graph(store, rcodes=["nxdomain"])) == [resolver]
        assert list(graph(store, names=["gone.example.com"], rcodes=["nxdomain"])) == [resolver]
        assert list(graph(store, names=["api.example.com"], rcodes=["nxdomain"])) == []
        assert list(graph(store, names=["flaky.*"], rcodes=["timeout"])) == [resolver]
        assert list(graph(store, names=["nothing.example"])) == []
    finally:
        store.close()
    with pytest.raises(ConfigError, match="--dns-rcode.*nxdomian.*one of"):
        DnsEdgeFilter.build(rcodes=["nxdomian"])
    with pytest.raises(ConfigError, match="--dns-name"):
        DnsEdgeFilter.build(names=[" "])
