"""Tempo's service-graph processor, as a test double: the rules by which real Tempo turns spans
into `traces_service_graph_*` series, ported as facts (not code) from grafana/tempo at commit
ad33aa8fafc41a4ea58519f7b7a88b1aa1383224 (2026-08-21): modules/generator/processor/servicegraphs/
(servicegraphs.go, config.go, store/store.go, store/edge.go), modules/generator/processor/util/
util.go (service name, attribute lookup, span multiplier), modules/generator/instance.go and
config.go (the ingestion time window). Tempo is AGPL-3.0; nothing here is copied from it. The
cases of its own tests are re-expressed in tests/unit/test_tempo_servicegraph.py.

The facts:

- Only CLIENT, PRODUCER (client side) and SERVER, CONSUMER (server side) spans count; a resource
  without `service.name` is skipped whole. A node is named by the resource's `service.name` and
  nothing else: `service.namespace` is NOT part of the name.
- An edge is keyed by (trace id, span id) of the client side and (trace id, parent span id) of
  the server side. A key whose span id is empty is a root (a server span without parent).
- The client side sets: client service, client latency (end - start, 0 if negative), its end
  time, failed |= status ERROR, its dimensions, the span multiplier, the peer node (first of
  `peer_attributes` found on the span: peer.service, db.name, db.system, db.system.name), then
  the database rule: if one of `database_name_attributes` (db.namespace, db.name, db.system,
  db.system.name; resource first, then span) is present the edge is a `database` edge, its server
  latency is the client span's, and its server is named by peer.service, else server.address,
  else network.peer.address[:network.peer.port], else that database name. A PRODUCER sets
  connection type `messaging_system`, a CLIENT resets it to unset.
- The server side sets: server service, server latency, its start time, failed |= ERROR, its
  dimensions, the span multiplier, the peer node; CONSUMER -> `messaging_system`, SERVER -> unset.
- The edge is complete as soon as both service names are non-empty: it is counted at once and
  removed from the store. A later span with the same key (a duplicate) starts a new edge.
- Edges wait at most `wait` (default 10 s; expiry is on whole seconds of the creation time plus
  wait, checked every 2 s by Tempo's ticker). On expiry the edge becomes a `virtual_node` edge:
  no client but a root key -> client = the peer node or "user"; a client, no server, and a peer
  node -> server = the peer node; otherwise it is counted as expired by the kind of its last span.
  With `enable_virtual_node_label` a `virtual_node` label says which side ("client"/"server").
- `max_items` (default 10 000) bounds the waiting edges: a new edge that is not complete at once
  when the store is full is dropped (its span counted in dropped_spans).
- Labels: client, server, connection_type (empty values are absent, as in Prometheus), plus
  each of `dimensions` looked up on the resource first, then the span, under its sanitized name
  (`service.namespace` -> `service_namespace`); with `enable_client_server_prefix` the client's
  value goes to `client_<dim>` and the server's to `server_<dim>`; without it both write the one
  label and the side processed last wins.
- Counters `traces_service_graph_request_total` and `..._request_failed_total` grow by the span
  multiplier; histograms `..._request_server_seconds` and `..._request_client_seconds` (buckets
  default 0.1 s * 2^i, i < 8: 0.1 .. 12.8 s) observe the latencies with that weight;
  `..._request_messaging_system_seconds` (opt-in) observes server start - client end for
  messaging edges (not when that is 0).
- The span multiplier (`span_multiplier_key`, off by default) is 1 / the value of that attribute
  when it is a DOUBLE > 0, looked up on the span first, then the resource; else 1. The side
  processed last sets it for the edge.
- Before any processor, the generator drops every span whose END time lies outside now +- the
  ingestion slack (`metrics_ingestion_time_range_slack`, default 30 s; per tenant
  `metrics_generator.ingestion_time_range_slack`), counted as
  `tempo_metrics_generator_spans_discarded_total{reason="outside_metrics_ingestion_slack"}`.
- Not ported: span filter policies, exemplars, native histograms, `connection_info`.

The OpenTelemetry Collector's `servicegraph` connector follows the same pairing with other
defaults (`store.ttl` 2 s, `store.max_items` 1000, dimensions always prefixed client_/server_,
no ingestion window): `ServiceGraphConfig.collector_connector()`.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

# OTLP span kinds and status codes (opentelemetry-proto trace.proto)
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = 1, 2, 3, 4, 5
KIND_NAMES = {0: "SPAN_KIND_UNSPECIFIED", 1: "SPAN_KIND_INTERNAL", 2: "SPAN_KIND_SERVER",
              3: "SPAN_KIND_CLIENT", 4: "SPAN_KIND_PRODUCER", 5: "SPAN_KIND_CONSUMER"}
STATUS_ERROR = 2

REQUEST_TOTAL = "traces_service_graph_request_total"
REQUEST_FAILED = "traces_service_graph_request_failed_total"
SERVER_SECONDS = "traces_service_graph_request_server_seconds"
CLIENT_SECONDS = "traces_service_graph_request_client_seconds"
MESSAGING_SECONDS = "traces_service_graph_request_messaging_system_seconds"
HISTOGRAMS = (SERVER_SECONDS, CLIENT_SECONDS, MESSAGING_SECONDS)
DEFAULT_BUCKETS = tuple(0.1 * 2 ** i for i in range(8))
VIRTUAL_NODE = "virtual_node"
DATABASE, MESSAGING = "database", "messaging_system"


class SpanLike(Protocol):
    resource: dict[str, Any]
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    kind: int
    attributes: dict[str, Any]
    status: int
    start_ns: int
    end_ns: int


@dataclass
class Span:
    """A span as the processor reads it (tests build these; received spans fit too)."""

    resource: dict[str, Any]
    kind: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes = b""
    attributes: dict[str, Any] = field(default_factory=dict)
    status: int = 0
    start_ns: int = 1
    end_ns: int = 2


@dataclass(frozen=True)
class ServiceGraphConfig:
    wait_s: float = 10.0
    max_items: int = 10_000
    dimensions: tuple[str, ...] = ()
    enable_client_server_prefix: bool = False
    enable_virtual_node_label: bool = False
    enable_messaging_system_latency_histogram: bool = False
    peer_attributes: tuple[str, ...] = ("peer.service", "db.name", "db.system", "db.system.name")
    database_name_attributes: tuple[str, ...] = ("db.namespace", "db.name", "db.system",
                                                 "db.system.name")
    span_multiplier_key: str = ""
    histogram_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    ingestion_slack_s: float | None = 30.0   # None: no window (the Collector connector)

    @classmethod
    def collector_connector(cls, **over: Any) -> ServiceGraphConfig:
        return replace(cls(wait_s=2.0, max_items=1000, enable_client_server_prefix=True,
                           ingestion_slack_s=None), **over)


def stringify(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if not v.is_integer() else str(int(v))
    return "" if v is None else str(v)


def find(key: str, *maps: Mapping[str, Any]) -> str | None:
    for m in maps:
        if key in m:
            return stringify(m[key])
    return None


def sanitize(name: str) -> str:
    out = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return "_" + out if out[:1].isdigit() else out


def multiplier(key: str, span: SpanLike) -> float:
    if key:
        for attrs in (span.attributes, span.resource):
            v = attrs.get(key)
            if isinstance(v, float) and not isinstance(v, bool) and v > 0:
                return 1.0 / v
    return 1.0


def _seconds(start_ns: int, end_ns: int) -> float:
    return 0.0 if start_ns > end_ns else (end_ns - start_ns) / 1e9


@dataclass
class Edge:
    key: tuple[bytes, bytes]
    expiration: int
    trace_id: bytes = b""
    connection_type: str = ""
    client: str = ""
    server: str = ""
    client_latency: float = 0.0
    server_latency: float = 0.0
    client_end_ns: int = 0
    server_start_ns: int = 0
    span_kind: int = 0
    failed: bool = False
    dimensions: dict[str, str] = field(default_factory=dict)
    peer: str = ""
    multiplier: float = 1.0

    @property
    def complete(self) -> bool:
        return bool(self.client) and bool(self.server)

    @property
    def root(self) -> bool:
        return self.key[1] == b""


LabelSet = frozenset[tuple[str, str]]


@dataclass
class _Histogram:
    buckets: list[float]
    sum: float = 0.0
    count: float = 0.0


class ServiceGraph:
    """The processor: `push()` a request's spans, `expire()` as Tempo's ticker does, read the
    series with `query()`/`series()`. Thread-safe; the clock is injected (wall seconds)."""

    def __init__(self, config: ServiceGraphConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config or ServiceGraphConfig()
        self.clock = clock
        self._store: OrderedDict[tuple[bytes, bytes], Edge] = OrderedDict()
        self.counters: dict[str, dict[LabelSet, float]] = {REQUEST_TOTAL: {}, REQUEST_FAILED: {}}
        self.histograms: dict[str, dict[LabelSet, _Histogram]] = {h: {} for h in HISTOGRAMS}
        # the processor's and the generator's own counters
        self.total_edges = 0
        self.dropped_spans = 0
        self.expired_edges: dict[str, int] = {}
        self.discarded_spans: dict[str, int] = {}
        self._lock = threading.RLock()
        dims = list(self.config.dimensions)
        if self.config.enable_virtual_node_label:
            dims.append(VIRTUAL_NODE)
        self._dims = dims

    # -- in -----------------------------------------------------------------------------------
    def push(self, spans: Iterable[SpanLike], now: float | None = None) -> int:
        """One push request: the ingestion window first, then the processor. Returns how many
        spans were discarded as outside the window."""
        now = self.clock() if now is None else now
        slack = self.config.ingestion_slack_s
        kept: list[SpanLike] = []
        outside = 0
        for s in spans:
            if slack is not None and not (now - slack) * 1e9 <= s.end_ns <= (now + slack) * 1e9:
                outside += 1
            else:
                kept.append(s)
        with self._lock:
            if outside:
                self._inc(self.discarded_spans, "outside_metrics_ingestion_slack", outside)
            for s in kept:
                self._consume(s, now)
        return outside

    def _consume(self, span: SpanLike, now: float) -> None:
        if "service.name" not in span.resource:
            return
        svc = stringify(span.resource["service.name"])
        kind = span.kind
        if kind not in (KIND_CLIENT, KIND_PRODUCER, KIND_SERVER, KIND_CONSUMER):
            return
        cfg = self.config
        mult = multiplier(cfg.span_multiplier_key, span) if cfg.span_multiplier_key else 1.0
        failed = span.status == STATUS_ERROR
        if kind in (KIND_CLIENT, KIND_PRODUCER):
            def update(e: Edge) -> None:
                e.trace_id = span.trace_id
                e.span_kind = kind
                e.connection_type = MESSAGING if kind == KIND_PRODUCER else ""
                e.client = svc
                e.client_latency = _seconds(span.start_ns, span.end_ns)
                e.client_end_ns = span.end_ns
                e.failed = e.failed or failed
                self._dimensions(True, e, span)
                e.multiplier = mult
                self._peer(e, span)
                self._database(e, span)
            self._upsert((span.trace_id, span.span_id), update, now)
        else:
            def update(e: Edge) -> None:
                e.span_kind = kind
                if not span.parent_span_id:
                    e.trace_id = span.trace_id
                e.connection_type = MESSAGING if kind == KIND_CONSUMER else ""
                e.server = svc
                e.server_latency = _seconds(span.start_ns, span.end_ns)
                e.server_start_ns = span.start_ns
                e.failed = e.failed or failed
                self._dimensions(False, e, span)
                e.multiplier = mult
                self._peer(e, span)
            self._upsert((span.trace_id, span.parent_span_id), update, now)

    def _upsert(self, key: tuple[bytes, bytes], update: Callable[[Edge], None],
                now: float) -> None:
        e = self._store.get(key)
        if e is not None:
            update(e)
            if e.complete:
                self._complete(e)
                del self._store[key]
            return
        e = Edge(key, int(math.floor(now + self.config.wait_s)))
        update(e)
        if e.complete:
            self._complete(e)
            self.total_edges += 1
            return
        if len(self._store) >= self.config.max_items:
            self.dropped_spans += 1
            return
        self._store[key] = e
        self.total_edges += 1

    def _dimensions(self, client: bool, e: Edge, span: SpanLike) -> None:
        for dim in self.config.dimensions:
            v = find(dim, span.resource, span.attributes)
            if v is not None:
                key = dim
                if self.config.enable_client_server_prefix:
                    key = ("client_" if client else "server_") + dim
                e.dimensions[key] = v

    def _peer(self, e: Edge, span: SpanLike) -> None:
        for k in self.config.peer_attributes:
            v = find(k, span.attributes)
            if v is not None:
                e.peer = v
                return

    def _database(self, e: Edge, span: SpanLike) -> None:
        name = None
        for k in self.config.database_name_attributes:
            name = find(k, span.resource, span.attributes)
            if name is not None:
                break
        if name is None:
            return
        e.connection_type = DATABASE
        e.server_latency = _seconds(span.start_ns, span.end_ns)
        maps = (span.resource, span.attributes)
        for k in ("peer.service", "server.address"):
            v = find(k, *maps)
            if v is not None:
                e.server = v
                return
        host = find("network.peer.address", *maps)
        if host is not None:
            port = find("network.peer.port", *maps)
            e.server = host if port is None else f"{host}:{port}"
            return
        if name:
            e.server = name

    # -- expiry ---------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> None:
        """Tempo's ticker (every 2 s): edges waiting since before now - wait, oldest first."""
        now = self.clock() if now is None else now
        with self._lock:
            while self._store:
                key, e = next(iter(self._store.items()))
                if int(math.floor(now)) < e.expiration:
                    break
                del self._store[key]
                self._expired(e)

    def _expired(self, e: Edge) -> None:
        e.connection_type = VIRTUAL_NODE
        if not e.client:
            if e.root:
                e.client = e.peer or "user"
                if self.config.enable_virtual_node_label:
                    e.dimensions[VIRTUAL_NODE] = "client"
                self._complete(e)
                return
        elif not e.server and e.peer:
            e.server = e.peer
            if self.config.enable_virtual_node_label:
                e.dimensions[VIRTUAL_NODE] = "server"
            self._complete(e)
            return
        self._inc(self.expired_edges, KIND_NAMES.get(e.span_kind, str(e.span_kind)), 1)

    @property
    def waiting(self) -> int:
        return len(self._store)

    # -- out ------------------------------------------------------------------------------------
    def labels_of(self, e: Edge) -> LabelSet:
        cfg = self.config
        lab = {"client": e.client, "server": e.server, "connection_type": e.connection_type}
        for dim in self._dims:
            if cfg.enable_client_server_prefix:
                if cfg.enable_virtual_node_label and dim == VIRTUAL_NODE:
                    lab[VIRTUAL_NODE] = e.dimensions.get(VIRTUAL_NODE, "")
                    continue
                lab[sanitize("client_" + dim)] = e.dimensions.get("client_" + dim, "")
                lab[sanitize("server_" + dim)] = e.dimensions.get("server_" + dim, "")
            else:
                lab[sanitize(dim)] = e.dimensions.get(dim, "")
        return frozenset((k, v) for k, v in lab.items() if v != "")

    def _complete(self, e: Edge) -> None:
        lab = self.labels_of(e)
        m = e.multiplier
        self._inc(self.counters[REQUEST_TOTAL], lab, m)
        if e.failed:
            self._inc(self.counters[REQUEST_FAILED], lab, m)
        self._observe(SERVER_SECONDS, lab, e.server_latency, m)
        self._observe(CLIENT_SECONDS, lab, e.client_latency, m)
        if self.config.enable_messaging_system_latency_histogram and \
                e.connection_type == MESSAGING:
            lat = _seconds(e.client_end_ns, e.server_start_ns)
            if lat != 0:
                self._observe(MESSAGING_SECONDS, lab, lat, m)

    def _observe(self, name: str, lab: LabelSet, value: float, weight: float) -> None:
        h = self.histograms[name].get(lab)
        if h is None:
            h = self.histograms[name][lab] = _Histogram([0.0] * len(self.config.histogram_buckets))
        h.count += weight
        h.sum += value * weight
        for i, le in enumerate(self.config.histogram_buckets):
            if value <= le:
                h.buckets[i] += weight

    @staticmethod
    def _inc(d: dict[Any, Any], key: Any, by: float) -> None:
        d[key] = d.get(key, 0) + by

    def series(self) -> dict[str, dict[LabelSet, float]]:
        """Every series as Prometheus would store it: name -> {labels: value}, histograms as
        _bucket (with le, cumulative, +Inf), _sum and _count."""
        with self._lock:
            out: dict[str, dict[LabelSet, float]] = {n: dict(v) for n, v in self.counters.items()}
            for name, per in self.histograms.items():
                for lab, h in per.items():
                    for le, n in zip(self.config.histogram_buckets, h.buckets, strict=True):
                        out.setdefault(name + "_bucket", {})[lab | {("le", _le(le))}] = n
                    out.setdefault(name + "_bucket", {})[lab | {("le", "+Inf")}] = h.count
                    out.setdefault(name + "_sum", {})[lab] = h.sum
                    out.setdefault(name + "_count", {})[lab] = h.count
            return out

    def query(self, name: str, labels: Mapping[str, str]) -> float:
        """The value of the series `name` with exactly these labels (empty values dropped), 0
        when absent (as Tempo's test registry answers)."""
        lab = frozenset((k, v) for k, v in labels.items() if v != "")
        return self.series().get(name, {}).get(lab, 0.0)

    def edges(self, name: str = REQUEST_TOTAL) -> dict[tuple[str, str], float]:
        """client -> server totals of `name`, summed over the other labels."""
        out: dict[tuple[str, str], float] = {}
        for lab, v in self.series().get(name, {}).items():
            d = dict(lab)
            k = (d.get("client", ""), d.get("server", ""))
            out[k] = out.get(k, 0.0) + v
        return out


def _le(v: float) -> str:
    """A bucket bound as the `le` label value (Go's shortest float form: 0.1, 1, +Inf)."""
    if math.isinf(v):
        return "+Inf"
    r = repr(float(v))
    return r[:-2] if r.endswith(".0") else r
