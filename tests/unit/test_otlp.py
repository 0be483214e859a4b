"""OTLP export of correlated connections, against a fake Tempo (an OTLP gRPC receiver built from
opentelemetry-proto's service definitions, tests/unit/fake_otlp.py) and an OTLP/HTTP one:
every connection arrives as a CLIENT + SERVER span pair (one trace, parent link, kinds, resources,
semantic-convention attributes, error status for refused and reset); Tempo's pairing of the
received spans gives the API's graph; the metrics carry the right totals; a receiver that fails
is retried, one that stays down costs counted drops and nothing else."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from tests.unit.fake_otlp import KIND_CLIENT, KIND_SERVER, FakeOtlpHttp, FakeTempo, service_graph
from tests.unit.test_api_query import INGEST, MAP_YAML, READ, RH, A, fill, send
from tests.unit.test_correlate import T0, rec

SPANS = 16  # fill(): 9 connections, 7 seen by their server (a pair), 2 api->db by the client only


@pytest.fixture
def tempo():
    with FakeTempo() as t:
        yield t


def make_app(tmp_path, endpoint, map_yaml: str = MAP_YAML, **over):
    (tmp_path / "map.yaml").write_text(map_yaml)
    s = AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST, read_token=READ,
                           workload_map=tmp_path / "map.yaml", retention=None,
                           otlp_endpoint=endpoint, **{"otlp_protocol": "grpc", **over})
    return create_app(s)


def flush(app):
    ex = app.state.pipeline.exporters
    ex.tick(everything_closed=True)
    ex.force_flush()
    return ex


def pairs(spans):
    by_trace = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    return by_trace


def test_every_connection_is_a_client_server_span_pair_and_tempo_pairs_them_into_the_graph(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint)
    c = TestClient(app)
    fill(c)
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == SPANS, 30)
    traces = pairs(tempo.got.spans)
    assert len(traces) == 9
    for tid, spans in traces.items():
        if len(spans) == 1:  # api->db: no server saw it, no SERVER span made up
            (client,) = spans
            refused = client.attributes["eastwest.connection.outcome"] == "refused"
            assert client.kind == KIND_CLIENT and client.attributes["peer.service"] == "db"
            assert client.status == (Status.STATUS_CODE_ERROR if refused else Status.STATUS_CODE_UNSET)
            assert client.attributes["server.port"] == (5433 if refused else 5432)
            continue
        client, server = sorted(spans, key=lambda s: s.kind, reverse=True)
        assert (client.kind, server.kind) == (KIND_CLIENT, KIND_SERVER)
        assert server.parent_span_id == client.span_id and client.parent_span_id == b""
        assert client.trace_id == server.trace_id == tid
        assert uuid.UUID(bytes=tid).hex == client.attributes["eastwest.connection.id"]
        ca, sa = client.attributes, server.attributes
        assert ca["network.transport"] == "tcp" and ca["network.type"] == "ipv4"
        assert ca["server.address"] == sa["server.address"] == sa["network.local.address"]
        assert ca["network.peer.address"] == ca["server.address"]
        assert sa["network.peer.address"] == ca["client.address"] == sa["client.address"]
        assert ca["network.peer.port"] == ca["server.port"] and sa["network.peer.port"] == ca["client.port"]
        assert client.resource["service.name"] == ca["eastwest.client.workload"].split("/")[1]
        assert server.resource["service.name"] == ca["eastwest.server.workload"].split("/")[1]
        assert ca["peer.service"] == server.resource["service.name"]
        assert ca["eastwest.sample.ratio"] == sa["eastwest.sample.ratio"] == 1.0
        assert client.resource["service.namespace"] == "shop" and client.scope == "eastwest.aggregator"
        assert client.start_ns <= server.start_ns <= server.end_ns <= client.end_ns
        assert client.status == server.status == Status.STATUS_CODE_UNSET
    by_port = {}
    for s in tempo.got.spans:
        if s.kind == KIND_CLIENT:
            by_port.setdefault(s.attributes["server.port"], []).append(s.attributes)
    assert sorted(a["eastwest.bytes.client_to_server"] for a in by_port[9090]) == [100 * i for i in range(1, 8)]
    assert [a["eastwest.bytes.server_to_client"] for a in by_port[5432]] == [60]
    # Tempo (with the service.namespace dimension) from the received spans == the aggregator's
    # graph, but for api->db, which no server reported: Tempo makes that edge to the virtual node
    # `db`, named by peer.service, once `wait` has passed (a virtual node has no namespace)
    sg = service_graph(tempo.got.spans)
    assert (sg.unpaired_client, sg.unpaired_server) == (0, 0)
    g = c.get("/api/v1/graph", params=A, headers=RH).json()
    assert {(e["source"], e["target"]): (e["connections_opened"],
                                         e["connections_failed"] + e["resets"])
            for e in g["edges"]} == {("shop/frontend", "shop/api"): (7, 0),
                                     ("shop/api", "shop/db"): (2, 1)}
    assert sg.edges == {("shop/frontend", "shop/api"): {"requests": 7, "failed": 0},
                        ("shop/api", "db"): {"requests": 2, "failed": 1}}
    assert app.state.drops.snapshot() == {}


def test_reset_connections_are_errors_and_the_vxlan_tunnel_is_an_attribute(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint)
    c = TestClient(app)
    send(c, "h1", 1, [rec("client", resets=1, rtt_us=None), rec("path")])
    send(c, "h2", 1, [rec("server", resets=1)])
    flush(app)
    assert tempo.got.wait(lambda g: len(g.spans) == 2, 30)
    client = next(s for s in tempo.got.spans if s.kind == KIND_CLIENT)
    assert client.status == Status.STATUS_CODE_ERROR
    assert client.attributes["eastwest.connection.outcome"] == "reset"
    assert client.attributes["eastwest.vni"] == 42
    assert client.attributes["eastwest.tunnel.type"] == "vxlan"
    assert client.attributes["eastwest.observed_by"] == ["client", "path", "server"]
    assert client.resource["host.name"] == "h1"


def test_metrics_arrive_with_the_edge_totals(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint)
    c = TestClient(app)
    fill(c)
    flush(app)
    assert tempo.got.wait(lambda g: g.latest_points("eastwest.edge.failures"), 30)
    conns = {(dict(k)["client"], dict(k)["server"], dict(k)["server.port"]): p.as_int
             for k, p in tempo.got.latest_points("eastwest.edge.connections").items()}
    assert conns == {("frontend", "api", 9090): 7, ("api", "db", 5432): 1, ("api", "db", 5433): 1}
    by = {(dict(k)["client"], dict(k)["direction"]): p.as_int
          for k, p in tempo.got.latest_points("eastwest.edge.bytes").items()}
    assert by == {("frontend", "c2s"): 2800, ("frontend", "s2c"): 70, ("api", "c2s"): 50, ("api", "s2c"): 60}
    fails = {(dict(k)["server.port"], dict(k)["reason"]): p.as_int
             for k, p in tempo.got.latest_points("eastwest.edge.failures").items()}
    assert fails == {(5433, "refused"): 1}
    (k, _), = tempo.got.latest_points("eastwest.edge.failures").items()
    assert dict(k)["client.namespace"] == "shop" and dict(k)["network.transport"] == "tcp"


def test_a_receiver_that_fails_twice_is_retried_and_gets_every_span_once(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",), otlp_timeout_s=30.0)
    tempo.unavailable = 2
    c = TestClient(app)
    fill(c)
    flush(app)
    assert tempo.got.calls["traces"] == 3  # two UNAVAILABLE answers, then accepted
    assert len(tempo.got.spans) == SPANS and len({(s.trace_id, s.span_id) for s in tempo.got.spans}) == SPANS
    assert app.state.drops.snapshot() == {}
    assert app.state.pipeline.exporters.otlp.spans.exported == SPANS


def test_a_receiver_that_stays_down_costs_counted_drops_and_the_aggregator_is_unaffected(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",), otlp_timeout_s=3.5)
    tempo.down = True
    c = TestClient(app)
    fill(c)
    flush(app)
    assert tempo.got.calls["traces"] >= 2  # retried before giving up
    assert tempo.got.spans == []
    assert app.state.drops.snapshot() == {("otlp", "export_failed"): SPANS}
    # ingest and the API go on as if nothing happened
    send(c, "h1", 500, [rec("client", cport=42000, c2s=9, s2c=9)])
    g = c.get("/api/v1/graph", params=A, headers=RH).json()
    fa = next(e for e in g["edges"] if e["source"] == "shop/frontend")
    assert fa["connections_opened"] == 8
    metrics = c.get("/metrics").text
    assert f'eastwest_dropped_total{{reason="export_failed",stage="otlp"}} {SPANS}.0' in metrics
    assert 'eastwest_otlp_export_requests_total{result="failed"} 1.0' in metrics
    # the receiver comes back: the next connection (seen by its client only) is exported
    tempo.down = False
    flush(app)
    assert len(tempo.got.spans) == 1


def test_http_protobuf_to_an_otlp_http_receiver(tmp_path):
    with FakeOtlpHttp() as rx:
        app = make_app(tmp_path, rx.endpoint, otlp_protocol="http/protobuf")
        c = TestClient(app)
        fill(c)
        flush(app)
        assert rx.got.wait(lambda g: len(g.spans) == SPANS and g.metric_requests, 30)
    assert rx.got.calls["/v1/traces"] >= 1 and rx.got.calls["/v1/metrics"] >= 1
    sg = service_graph(rx.got.spans)
    assert sg.edges[("shop/frontend", "shop/api")] == {"requests": 7, "failed": 0}


def test_filter_and_sample_choose_the_connections(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",), otlp_filter="to_port=9090")
    c = TestClient(app)
    fill(c)
    flush(app)
    assert {s.attributes["server.port"] for s in tempo.got.spans} == {9090}
    assert len(tempo.got.spans) == 14
    otlp = app.state.pipeline.exporters.otlp
    assert otlp.connections == {"queued": 7, "filtered": 2, "sampled_out": 0}


def test_no_endpoint_anywhere_means_no_otlp(tmp_path, monkeypatch):
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    app = make_app(tmp_path, None)
    assert app.state.pipeline.exporters.otlp is None
    assert app.state.pipeline.exporters.prometheus is not None


def test_spans_keep_their_own_times_in_one_trace_when_clocks_differ(tmp_path, tempo):
    app = make_app(tmp_path, tempo.endpoint, otlp_signals=("traces",))
    c = TestClient(app)
    # the server's host clock runs 0.3 s late: its span is clamped inside the client's
    send(c, "h1", 1, [rec("client", dur=2.0)])
    send(c, "h2", 1, [rec("server", start=T0 + timedelta(seconds=0.3), dur=2.0)])
    flush(app)
    client = next(s for s in tempo.got.spans if s.kind == KIND_CLIENT)
    server = next(s for s in tempo.got.spans if s.kind == KIND_SERVER)
    assert client.end_ns - client.start_ns == 2_000_000_000
    assert server.start_ns - client.start_ns == 300_000_000 and server.end_ns == client.end_ns


def test_settings_flags_reach_the_config():
    from argparse import Namespace

    from aggregator.settings import _exporter_args

    got = _exporter_args(Namespace(otlp_endpoint="http://t:4317", otlp_protocol="grpc",
                                   otlp_signals="traces", otlp_sample=0.5, otlp_filter=None,
                                   otlp_timeout=2.0, otlp_queue_size=10,
                                   otlp_metrics_interval=None, export_settle=1.0))
    assert got == {"otlp_endpoint": "http://t:4317", "otlp_protocol": "grpc", "otlp_sample": 0.5,
                   "otlp_timeout_s": 2.0, "otlp_queue_size": 10, "export_settle_s": 1.0,
                   "otlp_signals": ("traces",)}


def settings_of(**flags):
    from pathlib import Path

    return AggregatorSettings(data_dir=Path("/nonexistent"), insecure_open=True, **flags)


@pytest.mark.parametrize("env,flags,want", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://t:4318"}, {}, ("http/protobuf", None)),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, {}, ("grpc", None)),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, {"otlp_endpoint": "http://t:4318",
                                              "otlp_protocol": "http/protobuf"},
     ("http/protobuf", "http://t:4318/v1/traces")),
    ({}, {"otlp_endpoint": "http://t:4317", "otlp_protocol": "grpc"}, ("grpc", "http://t:4317")),
])
def test_config_flags_then_standard_environment_then_defaults(env, flags, want):
    from aggregator.exporters.otlp_config import OtlpConfig

    cfg = OtlpConfig.resolve(settings_of(**flags), env)
    assert (cfg.protocols["traces"], cfg._endpoint("traces")) == want


@pytest.mark.parametrize("flags,env,key,bad", [
    ({"otlp_endpoint": "tempo:4317"}, {}, "--otlp-endpoint", "tempo:4317"),
    ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://t", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ({"otlp_endpoint": "http://t", "otlp_sample": 1.5}, {}, "--otlp-sample", 1.5),
    ({"otlp_endpoint": "http://t", "otlp_filter": "colour=red"}, {}, "--otlp-filter", "colour=red"),
    ({"otlp_endpoint": "http://t", "otlp_filter": "protocol=smtp"}, {}, "--otlp-filter",
     "protocol=smtp"),
    ({"otlp_endpoint": "http://t", "otlp_signals": ("logs",)}, {}, "--otlp-signals", "logs"),
])
def test_config_errors_name_the_key_and_the_value(flags, env, key, bad):
    from aggregator.exporters.otlp_config import OtlpConfig
    from eastwest.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        OtlpConfig.resolve(settings_of(**flags), env)
    assert (err.value.key, err.value.value) == (key, bad)


def test_the_span_queue_counts_what_does_not_fit_and_what_the_exporter_refused():
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExportResult

    from aggregator.exporters.otlp import SpanQueue
    from eastwest.drops import Drops

    class Refusing:
        batches: list[int] = []

        def export(self, batch):
            self.batches.append(len(batch))
            return SpanExportResult.FAILURE

        def shutdown(self):
            pass

    drops = Drops()
    q = SpanQueue(Refusing(), drops, max_queue=5, max_batch=2, start=False)
    for i in range(7):
        q.on_end(ReadableSpan(f"s{i}"))
    assert len(q) == 5 and drops.snapshot() == {("otlp", "queue_full"): 2}
    q.shutdown()
    assert Refusing.batches == [2, 2, 1]
    assert drops.snapshot() == {("otlp", "queue_full"): 2, ("otlp", "export_failed"): 5}
    q.on_end(ReadableSpan("late"))
    assert drops.snapshot()[("otlp", "after_shutdown")] == 1


def test_force_flush_exports_what_a_tick_in_progress_took(tmp_path, tempo):
    """The ticker thread takes the complete connections from the completions, then hands their
    spans to OTLP: a force_flush in between (the completions already empty) still exports
    them. The hand-over is held open on purpose, as a loaded machine's scheduler may."""
    import threading

    app = make_app(tmp_path, tempo.endpoint)
    c = TestClient(app)
    fill(c)
    ex = app.state.pipeline.exporters
    assert ex.otlp is not None
    taken, release = threading.Event(), threading.Event()
    on_complete = ex.otlp.on_complete

    def slow(*args, **kwargs):
        taken.set()
        assert release.wait(30)
        on_complete(*args, **kwargs)

    ex.otlp.on_complete = slow
    ticker = threading.Thread(target=lambda: ex.tick(everything_closed=True))
    ticker.start()
    assert taken.wait(30)
    assert ex.completions.pending_closed() == 0  # what a caller waiting for completion sees
    flushed = threading.Event()
    flusher = threading.Thread(target=lambda: (ex.force_flush(), flushed.set()))
    flusher.start()
    assert not flushed.wait(0.5), "force_flush returned while a tick held spans not yet queued"
    release.set()
    ticker.join(30)
    flusher.join(30)
    assert flushed.is_set()
    assert len(tempo.got.spans) == SPANS  # all of them, when force_flush returned
