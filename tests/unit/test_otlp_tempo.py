"""OTLP export as real Tempo sees it (issue 22): the aggregator's spans go through the faithful
Tempo double (tests/unit/tempo_servicegraph.py) on arrival, on the real clock, with the ingestion
window of now +- 30 s: same-named workloads in two namespaces stay two nodes (the service.namespace
dimension, or service.name = namespace/name), UDP flows make edges, the sample ratio scales the
counts, both spans of a pair travel together, the workloads' resources carry nothing of the
aggregator's environment, external ends fold within the edge budget, and spans older than the
window are counted on /metrics by reason."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from eastwest import codec
from eastwest.codec import Batch
from eastwest.record import Endpoint
from tests.unit.fake_otlp import (
    KIND_CLIENT,
    RECOMMENDED,
    SAMPLE_RATIO,
    FakeTempo,
    tempo_edges,
)
from tests.unit.tempo_servicegraph import REQUEST_TOTAL, ServiceGraph, ServiceGraphConfig
from tests.unit.test_api_query import INGEST, RH
from tests.unit.test_correlate import rec
from tests.unit.test_otlp import make_app as make_otlp_app

MAP_YAML = """workloads:
- {match: 10.1.0.1/32, name: api, namespace: staging, host: h1}
- {match: 10.1.0.2/32, name: api, namespace: prod, host: h2}
- {match: 10.1.0.3/32, name: db, namespace: prod, host: h3}
"""
STAGING_API, PROD_API, PROD_DB = "10.1.0.1", "10.1.0.2", "10.1.0.3"
HOST = {STAGING_API: "h1", PROD_API: "h2", PROD_DB: "h3"}


@pytest.fixture
def tempo():
    with FakeTempo() as t:
        yield t


def make_app(tmp_path, endpoint, **over):
    """test_otlp's app, with this module's map (same-named workloads in two namespaces)."""
    return make_otlp_app(tmp_path, endpoint, MAP_YAML, **over)


_seq = iter(range(1, 10**6))


def send(c, collector, records):
    now = datetime.now(UTC)
    r = c.post("/api/v1/ingest",
               content=codec.encode_batch(Batch(collector, next(_seq), now, records)),
               headers={"Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE})
    assert r.status_code == 200, r.text


def connection(c, client_ip, server_ip, port, *, cport, protocol="tcp", ago=1.0, server=True,
               connect="ok"):
    """One connection that ended `ago` seconds before now, seen by its client (and server)."""
    start = datetime.now(UTC) - timedelta(seconds=ago + 0.5)
    kw = dict(cport=cport, start=start, dur=0.5, protocol=protocol,
              client=Endpoint(client_ip, cport), server=Endpoint(server_ip, port))
    if protocol == "udp":
        kw["connect"] = None
    send(c, HOST[client_ip], [rec("client", collector=HOST[client_ip],
                                  **{**kw, "connect": kw.get("connect", connect)})])
    if server:
        send(c, HOST[server_ip], [rec("server", collector=HOST[server_ip], **kw)])


def flush(app):
    ex = app.state.pipeline.exporters
    ex.tick(everything_closed=True)
    ex.force_flush()
    return ex


def api_edges(c):
    now = datetime.now(UTC)
    params = {"from": (now - timedelta(minutes=5)).isoformat(), "to": now.isoformat()}
    g = c.get("/api/v1/graph", params=params, headers=RH).json()
    return {(e["source"], e["target"]): e["connections_opened"] for e in g["edges"]}


def test_same_named_workloads_in_two_namespaces_and_udp_are_tempo_edges_equal_to_the_graph(
        tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint)
    c = TestClient(app)
    for i in range(3):
        connection(c, STAGING_API, PROD_API, 8080, cport=41000 + i)        # staging/api -> prod/api
    for i in range(2):
        connection(c, PROD_API, PROD_DB, 5432, cport=42000 + i)            # prod/api -> prod/db
    for i in range(4):
        connection(c, STAGING_API, PROD_DB, 53, cport=43000 + i, protocol="udp")
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 18, 30)
    sg = tempo.got.tempo
    assert sg.discarded_spans == {} and sg.waiting == 0
    want = api_edges(c)
    assert want == {("staging/api", "prod/api"): 3, ("prod/api", "prod/db"): 2,
                    ("staging/api", "prod/db"): 4}
    assert {k: v["requests"] for k, v in tempo_edges(sg).items()} == want
    # the series real Tempo writes with the recommended configuration
    assert sg.query(REQUEST_TOTAL, {"client": "api", "server": "api",
                                    "client_service_namespace": "staging",
                                    "server_service_namespace": "prod"}) == 3
    # a Tempo without the dimension: one node `api`, a self-loop (the first finding)
    bare = ServiceGraph(ServiceGraphConfig(ingestion_slack_s=None))
    bare.push(tempo.got.spans)
    assert bare.edges()[("api", "api")] == 3


def test_a_server_seen_only_on_the_wire_answering_gets_its_span_a_refused_one_does_not(
        tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",))
    c = TestClient(app)
    start = datetime.now(UTC) - timedelta(seconds=1)
    udp = dict(start=start, dur=0.5, protocol="udp", connect=None, collector="h1",
               client=Endpoint(STAGING_API, 45000), server=Endpoint(PROD_DB, 53))
    send(c, "h1", [rec("path", **udp)])                                   # wire only, answered
    tcp = dict(start=start, dur=0.1, collector="h2", client=Endpoint(PROD_API, 45001),
               server=Endpoint(PROD_DB, 5432))
    send(c, "h2", [rec("client", connect="refused", c2s=0, s2c=0, **tcp),
                   rec("path", c2s=0, s2c=0, packets_c2s=1, packets_s2c=1, **tcp)])  # an RST
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 3, 30)
    kinds = {s.attributes["network.transport"]: sorted(x.kind for x in tempo.got.spans
                                                       if x.trace_id == s.trace_id)
             for s in tempo.got.spans}
    assert kinds == {"udp": [2, 3], "tcp": [3]}   # SERVER + CLIENT; CLIENT alone
    tempo.got.tempo.expire(time.time() + 60)
    assert {k: v["requests"] for k, v in tempo_edges(tempo.got.tempo).items()} == {
        ("staging/api", "prod/db"): 1, ("prod/api", "db"): 1}       # the refused: virtual `db`


def test_service_name_namespace_slash_name_needs_no_dimension(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_service_name="namespace/name")
    c = TestClient(app)
    connection(c, STAGING_API, PROD_API, 8080, cport=41000)
    connection(c, PROD_API, PROD_DB, 5432, cport=42000, server=False, connect="refused")
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 3, 30)
    bare = ServiceGraph(ServiceGraphConfig(ingestion_slack_s=None))
    bare.push(tempo.got.spans)
    bare.expire(time.time() + 60)          # the refused connect: Tempo's virtual node, by name
    assert bare.edges() == {("staging/api", "prod/api"): 1, ("prod/api", "prod/db"): 1}
    client = next(s for s in tempo.got.spans if s.kind == KIND_CLIENT
                  and s.attributes["server.port"] == 5432)
    assert client.resource["service.namespace"] == "prod"
    assert client.attributes["peer.service"] == "prod/db"


def test_the_sample_ratio_attribute_makes_tempo_count_every_connection(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_sample=0.5, otlp_signals=("traces",))
    c = TestClient(app)
    for i in range(40):
        connection(c, STAGING_API, PROD_API, 8080, cport=41000 + i)
    flush(app)
    otlp = app.state.pipeline.exporters.otlp
    kept = otlp.connections["queued"]
    assert 0 < kept < 40 and otlp.connections["sampled_out"] == 40 - kept
    assert tempo.got.wait(lambda g: len(g.spans) == 2 * kept, 30)
    assert {s.attributes[SAMPLE_RATIO] for s in tempo.got.spans} == {0.5}
    assert isinstance(tempo.got.spans[0].attributes[SAMPLE_RATIO], float)  # Tempo wants a double
    assert tempo.got.tempo.edges() == {("api", "api"): 2.0 * kept}
    assert RECOMMENDED.span_multiplier_key == SAMPLE_RATIO


def test_workload_resources_carry_nothing_of_the_aggregators_environment(tmp_path, tempo,
                                                                           monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ops,team=obs")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "eastwest-aggregator")
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",))
    c = TestClient(app)
    connection(c, STAGING_API, PROD_API, 8080, cport=41000)
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 2, 30)
    for s in tempo.got.spans:
        assert set(s.resource) <= {"service.name", "service.namespace", "host.name",
                                   "eastwest.workload.kind", "eastwest.identity.source"}
        assert s.resource["service.name"] == "api"


def test_external_ends_past_the_edge_budget_fold_into_one_node(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",), edge_budget=2)
    c = TestClient(app)
    HOST.update({f"192.0.2.{i}": "x" for i in range(1, 6)})
    connection(c, STAGING_API, PROD_API, 8080, cport=41000)          # the one edge of the budget
    for i in range(1, 6):                                             # 5 external servers
        connection(c, STAGING_API, f"192.0.2.{i}", 443, cport=44000 + i, server=False)
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 7, 30)
    peers = sorted(s.attributes["peer.service"] for s in tempo.got.spans if s.kind == KIND_CLIENT)
    assert peers == ["api"] + ["external"] * 5
    assert app.state.pipeline.exporters.otlp.folded == 5
    assert "eastwest_otlp_folded_connections_total 5.0" in c.get("/metrics").text


def test_spans_older_than_tempos_window_are_counted_by_reason(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",), otlp_late_after_s=30.0)
    c = TestClient(app)
    # a connection that ended before the aggregator started (a restart, a spool replayed)
    connection(c, STAGING_API, PROD_API, 8080, cport=41000, ago=45)
    connection(c, STAGING_API, PROD_API, 8080, cport=41001, ago=0.2)   # in time
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 4, 30)
    sg = tempo.got.tempo
    assert sg.discarded_spans == {"outside_metrics_ingestion_slack": 2}
    assert sg.edges() == {("api", "api"): 1.0}
    assert app.state.pipeline.exporters.otlp.late_counts() == {
        "ended_before_start": 2, "completed_late": 0, "export_delay": 0}
    m = c.get("/metrics").text
    assert 'eastwest_otlp_late_spans_total{reason="ended_before_start"} 2.0' in m


def test_a_connection_completed_after_the_window_is_completed_late(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",), otlp_late_after_s=0.3)
    c = TestClient(app)
    connection(c, STAGING_API, PROD_API, 8080, cport=41000, ago=0.0)
    time.sleep(0.5)  # the real clock: it completes after the (short) window
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 2, 30)
    assert app.state.pipeline.exporters.otlp.late_counts()["completed_late"] == 2


def test_both_spans_of_a_pair_are_queued_and_sent_together_or_neither():
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExportResult

    from aggregator.exporters.otlp import SpanQueue
    from eastwest.drops import Drops

    class Recording:
        def __init__(self):
            self.batches = []

        def export(self, batch):
            self.batches.append([s.name for s in batch])
            return SpanExportResult.SUCCESS

        def shutdown(self):
            pass

    drops, rx = Drops(), Recording()
    q = SpanQueue(rx, drops, max_queue=5, max_batch=3, start=False)
    for i in range(3):
        assert q.offer([ReadableSpan(f"c{i}"), ReadableSpan(f"s{i}")]) == (i < 2)
    assert q.offer([ReadableSpan("c3")])   # a lone client span still fits
    assert len(q) == 5 and drops.snapshot() == {("otlp", "queue_full"): 2}
    q.shutdown()
    # batches of whole groups: no request carries half a pair
    assert rx.batches == [["c0", "s0"], ["c1", "s1", "c3"]]


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.9])
def test_the_sample_keeps_its_share_of_version_4_uuids(share):
    import uuid
    from types import SimpleNamespace

    from aggregator.exporters.edges import EdgeLabels
    from aggregator.exporters.otlp import OtlpExporter
    from aggregator.exporters.otlp_config import OtlpConfig
    from eastwest.drops import Drops

    cfg = OtlpConfig(endpoint="http://t", protocols={"traces": "grpc", "metrics": "grpc"},
                     signals=(), sample=share)
    ex = OtlpExporter(cfg, Drops(), EdgeLabels(10))
    kept = sum(ex.sampled(SimpleNamespace(conn_id=uuid.uuid4().hex)) for _ in range(4000))
    assert abs(kept / 4000 - share) < 0.04


def tempo_selectors():
    """Every label selector of the dashboards that Grafana applies to traces_service_graph_*:
    Tempo service-map queries and any PromQL naming those series."""
    import json
    import re
    from pathlib import Path

    out = []
    for path in sorted((Path(__file__).parents[2] / "dashboards").glob("*.json")):
        def walk(x, path=path):
            if isinstance(x, dict):
                if x.get("queryType") == "serviceMap":
                    out.append((path.name, x.get("serviceMapQuery") or "{}"))
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
            elif isinstance(x, str) and "traces_service_graph" in x:
                out.extend((path.name, m) for m in
                           re.findall(r"traces_service_graph_\w+(\{[^}]*\})", x))
        walk(json.loads(path.read_text()))
    return out


def matches(selector, labels, variables):
    import re

    for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
        for var, val in variables.items():
            value = value.replace(f"${var}", val)
        have = labels.get(name, "")
        ok = {"=": have == value, "!=": have != value,
              "=~": re.fullmatch(value, have) is not None,
              "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


def test_the_dashboards_tempo_queries_use_the_labels_tempo_writes_for_eastwest(tmp_path, tempo):
    import re

    sels = tempo_selectors()
    assert sels, "the Tempo dashboard has a service map"
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",))
    c = TestClient(app)
    connection(c, STAGING_API, PROD_API, 8080, cport=41000)
    connection(c, PROD_API, PROD_DB, 5432, cport=42000)
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 4, 30)
    series = [dict(lab) for lab in tempo.got.tempo.series()[REQUEST_TOTAL]]
    names = set().union(*series)
    assert {"client_service_namespace", "server_service_namespace"} <= names
    for dash, sel in sels:
        used = set(re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"', sel))
        assert used <= names, f"{dash}: {sel} uses labels Tempo does not write: {used - names}"
        everything = {"namespace": ".*", "service": ".*"}
        assert all(matches(sel, s, everything) for s in series), (dash, sel)
        if "$namespace" in sel:
            got = {(s["client"], s["server"]) for s in series
                   if matches(sel, s, {**everything, "namespace": "staging"})}
            assert got == {("api", "api")}, (dash, sel)


def test_a_restart_sends_no_pair_twice_and_only_the_missing_server_span(tmp_path, tempo):
    """The first process tells at shutdown what is closed: a connection whose server record had
    not come yet as its CLIENT span alone, a whole one as a pair. The second process, getting
    the server's record of the first and the wire's of the second, adds the SERVER span of the
    first only: Tempo counts each connection once."""
    kw = dict(dur=0.5, collector="h1")
    start = datetime.now(UTC) - timedelta(seconds=1)
    half = dict(start=start, client=Endpoint(STAGING_API, 41000), server=Endpoint(PROD_API, 8080))
    whole = dict(start=start, client=Endpoint(STAGING_API, 41001), server=Endpoint(PROD_API, 8080))
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",))
    with TestClient(app) as c:
        send(c, "h1", [rec("client", **half, **kw), rec("client", **whole, **kw)])
        send(c, "h2", [rec("server", **{**whole, **kw, "collector": "h2"})])
    assert tempo.got.wait(lambda g: len(g.spans) == 3, 30)
    assert (tmp_path / "data" / "exporters-told.json").exists()
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",))
    with TestClient(app) as c:
        send(c, "h2", [rec("server", **{**half, **kw, "collector": "h2"})])
        send(c, "h1", [rec("path", **whole, **kw)])
    assert tempo.got.wait(lambda g: len(g.spans) == 4, 30)
    time.sleep(0.5)
    assert len(tempo.got.spans) == 4          # nothing sent twice
    sg = tempo.got.tempo
    assert sg.edges() == {("api", "api"): 2.0} and sg.waiting == 0
