"""A fake Tempo for tests: an OTLP gRPC receiver built from opentelemetry-proto's service
definitions (TraceService, MetricsService servicers on grpcio), an OTLP/HTTP receiver on the
standard library, and Tempo's service-graph processor as a double (tests/unit/tempo_servicegraph.py,
ported as facts from grafana/tempo and proven with Tempo's own cases).

Every trace request a receiver accepts is pushed, as it arrives and on the real clock, through
that double (`got.tempo`): the ingestion window of now +- 30 s, pairing by (trace id, client span
id) = (trace id, server parent span id), names from `service.name` only, virtual nodes on expiry
(`got.tempo.expire()`), with the configuration docs/integrations.md recommends for eastwest
(`RECOMMENDED`: `service.namespace` as a prefixed dimension, the sample-ratio attribute as
`span_multiplier_key`). `service_graph(spans)` pairs a list of spans after the fact with the
same rules but no ingestion window (for tests whose records carry fixed past times).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as msvc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.unit.tempo_servicegraph import (
    REQUEST_FAILED,
    REQUEST_TOTAL,
    ServiceGraphConfig,
)
from tests.unit.tempo_servicegraph import ServiceGraph as TempoServiceGraph

KIND_CLIENT, KIND_SERVER = Span.SPAN_KIND_CLIENT, Span.SPAN_KIND_SERVER
SAMPLE_RATIO = "eastwest.sample.ratio"  # aggregator/exporters/otlp_spans.py
# Tempo as docs/integrations.md configures it for eastwest
RECOMMENDED = ServiceGraphConfig(dimensions=("service.namespace",), enable_client_server_prefix=True,
                                 span_multiplier_key=SAMPLE_RATIO)


def value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    resource: dict[str, Any]
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    kind: int
    name: str
    attributes: dict[str, Any]
    status: int
    start_ns: int
    end_ns: int
    scope: str


@dataclass
class Received:
    """Everything a receiver got, thread-safe; `wait(pred)` waits for a condition on it."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    metric_requests: list[Any] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    cond: threading.Condition = field(default_factory=threading.Condition)
    tempo: TempoServiceGraph = field(default_factory=lambda: TempoServiceGraph(RECOMMENDED))
    requests: int = 0

    def add_traces(self, req: tsvc.ExportTraceServiceRequest) -> None:
        out = []
        for rs in req.resource_spans:
            res = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(ReceivedSpan(res, s.trace_id, s.span_id, s.parent_span_id, s.kind,
                                            s.name, attrs(s.attributes), s.status.code,
                                            s.start_time_unix_nano, s.end_time_unix_nano,
                                            ss.scope.name))
        self.tempo.push(out, now=time.time())  # as Tempo's generator sees it, on arrival
        with self.cond:
            self.spans += out
            self.requests += 1
            self.cond.notify_all()

    def add_metrics(self, req: msvc.ExportMetricsServiceRequest) -> None:
        with self.cond:
            self.metric_requests.append(req)
            self.cond.notify_all()

    def wait(self, pred: Callable[[Received], bool], timeout: float = 60.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self), timeout)

    def latest_points(self, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """Cumulative metric `name`: the newest data point per attribute set."""
        out: dict[tuple[tuple[str, Any], ...], Any] = {}
        with self.cond:
            reqs = list(self.metric_requests)
        for req in reqs:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name != name:
                            continue
                        kind = m.WhichOneof("data")
                        for p in getattr(m, kind).data_points:
                            key = tuple(sorted(attrs(p.attributes).items()))
                            old = out.get(key)
                            if old is None or p.time_unix_nano >= old.time_unix_nano:
                                out[key] = p
        return out


class _Traces(tgrpc.TraceServiceServicer):
    def __init__(self, rx: FakeTempo) -> None:
        self.rx = rx

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's name
        self.rx.got.calls["traces"] += 1
        if self.rx.refuse():
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake tempo: down on purpose")
        self.rx.got.add_traces(request)
        return tsvc.ExportTraceServiceResponse()


class _Metrics(mgrpc.MetricsServiceServicer):
    def __init__(self, rx: FakeTempo) -> None:
        self.rx = rx

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.rx.got.calls["metrics"] += 1
        if self.rx.refuse():
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake tempo: down on purpose")
        self.rx.got.add_metrics(request)
        return msvc.ExportMetricsServiceResponse()


class FakeTempo:
    """OTLP gRPC receiver on 127.0.0.1. `unavailable = N` answers the next N calls UNAVAILABLE
    (a retryable code); `down = True` answers every call so."""

    def __init__(self) -> None:
        self.got = Received()
        self.unavailable = 0
        self.down = False
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        tgrpc.add_TraceServiceServicer_to_server(_Traces(self), self.server)
        mgrpc.add_MetricsServiceServicer_to_server(_Metrics(self), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def refuse(self) -> bool:
        with self._lock:
            if self.down:
                return True
            if self.unavailable > 0:
                self.unavailable -= 1
                return True
            return False

    def __enter__(self) -> FakeTempo:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)


class FakeOtlpHttp:
    """OTLP/HTTP (protobuf) receiver on 127.0.0.1: POST /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.got = Received()
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                got.calls[self.path] += 1
                if self.path == "/v1/traces":
                    req = tsvc.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    got.add_traces(req)
                    resp = tsvc.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    mreq = msvc.ExportMetricsServiceRequest()
                    mreq.ParseFromString(body)
                    got.add_metrics(mreq)
                    resp = msvc.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(resp)))
                self.end_headers()
                self.wfile.write(resp)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOtlpHttp:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def workload(resource: dict[str, Any]) -> str:
    ns = resource.get("service.namespace")
    return f"{ns}/{resource['service.name']}" if ns else resource["service.name"]


def node(labels: dict[str, str], side: str) -> str:
    """A Tempo series' node as eastwest names workloads: namespace/name when the series carries
    the namespace dimension (RECOMMENDED), else the bare service name."""
    ns = labels.get(f"{side}_service_namespace")
    name = labels[side]
    return f"{ns}/{name}" if ns and "/" not in name else name


def tempo_edges(g: TempoServiceGraph) -> dict[tuple[str, str], dict[str, float]]:
    """client -> server requests and failed requests of the double's series."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    series = g.series()
    for metric, key in ((REQUEST_TOTAL, "requests"), (REQUEST_FAILED, "failed")):
        for lab, v in series.get(metric, {}).items():
            d = dict(lab)
            e = out.setdefault((node(d, "client"), node(d, "server")),
                               {"requests": 0.0, "failed": 0.0})
            e[key] += v
    return out


@dataclass
class ServiceGraph:
    edges: dict[tuple[str, str], dict[str, int]]
    unpaired_client: int
    unpaired_server: int


def service_graph(spans: list[ReceivedSpan],
                  config: ServiceGraphConfig = RECOMMENDED) -> ServiceGraph:
    """The double's pairing of `spans` pushed at once, without the ingestion window, then every
    edge left waiting expired (virtual nodes): edges "ns/name" -> {requests, failed}; the halves
    that expired unpaired, by side."""
    from dataclasses import replace

    g = TempoServiceGraph(replace(config, ingestion_slack_s=None))
    g.push(spans)
    g.expire(time.time() + 1e9)  # long after any `wait`
    edges = {k: {n: int(v) for n, v in e.items()} for k, e in tempo_edges(g).items()}
    client = sum(v for k, v in g.expired_edges.items() if k in ("SPAN_KIND_CLIENT",
                                                                 "SPAN_KIND_PRODUCER"))
    return ServiceGraph(edges, client, sum(g.expired_edges.values()) - client)
