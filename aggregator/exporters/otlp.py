"""OTLP export of completed connections (traces) and per-edge metrics, through the OTel SDK.

Stage: exporters. In: the deltas of connections whose names are final (named.py) and completed connections
(aggregator/exporters/completion.py). Out: OTLP requests to Tempo, an OpenTelemetry Collector or
any OTLP receiver, over gRPC or HTTP/protobuf (otlp_config.py).

Traces: each completed connection that passes `--otlp-filter` and the `--otlp-sample` share
becomes a CLIENT + SERVER span pair (otlp_spans.py). Finished spans go into `SpanQueue`, a bounded
queue drained in batches by one thread into the SDK's OTLP span exporter, which retries retryable
failures (gRPC UNAVAILABLE and friends, HTTP 429/502/503/504) with jittered exponential backoff
inside its timeout. A span that does not fit the queue, or whose batch still failed, is counted in
`eastwest_dropped_total{stage="otlp",reason="queue_full"|"export_failed"}`; nothing on the
ingest path ever waits for the receiver. `force_flush()` exports what is queued; `shutdown()`
drains, then closes the exporter.

Metrics: counters `eastwest.edge.bytes` (attribute `direction`), `eastwest.edge.connections`,
`eastwest.edge.failures` (`reason`), `eastwest.edge.retransmits` and the histogram
`eastwest.edge.rtt` (seconds), with attributes `client`, `client.namespace`, `server`,
`server.namespace`, `server.port`, `network.transport`, the same edges and budget as the
Prometheus series (edges.py), read by a `PeriodicExportingMetricReader` (cumulative temporality:
a failed export loses no count, the next one carries the totals; failures are still counted as
`otlp/metrics_export_failed`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from aggregator.connection import Connection
from aggregator.exporters.edges import ROW_LABELS, EdgeKey, EdgeLabels
from aggregator.exporters.otlp_config import OtlpConfig
from aggregator.exporters.otlp_spans import SpanFactory, trace_id_of
from aggregator.exporters.prometheus import FAILED, RTT_BUCKETS
from aggregator.store.derived import connection_of
from eastwest import __version__
from eastwest.drops import Drops
from eastwest.filters import outcome_of

log = logging.getLogger("eastwest.otlp")
STAGE = "otlp"


class SpanQueue(SpanProcessor):
    """Finished spans -> a bounded queue -> batches -> `exporter`. Every span is exported once or
    counted as dropped."""

    def __init__(self, exporter: SpanExporter, drops: Drops, *, max_queue: int = 8192,
                 max_batch: int = 512, schedule_s: float = 1.0, start: bool = True) -> None:
        self.exporter = exporter
        self.drops = drops
        self.max_queue, self.max_batch, self.schedule_s = max_queue, max_batch, schedule_s
        self._queue: deque[ReadableSpan] = deque()
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.exported = 0
        self.export_requests = 0
        self.failed_requests = 0
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
            self._thread.start()

    # -- SpanProcessor ----------------------------------------------------------------------------
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._stop:
            self.drops.count(STAGE, "after_shutdown")
            return
        with self._lock:
            if len(self._queue) >= self.max_queue:
                self.drops.count(STAGE, "queue_full", detail=f"{self.max_queue} spans waiting")
                return
            self._queue.append(span)
            full = len(self._queue) >= self.max_batch
        if full:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        self._export_all()
        return True

    def shutdown(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._export_all()
        self.exporter.shutdown()

    # -- the worker -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.schedule_s)
            self._wake.clear()
            if not self._stop:
                self._export_all()

    def _export_all(self) -> None:
        with self._export_lock:
            while True:
                with self._lock:
                    n = min(self.max_batch, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(n)]
                if not batch:
                    return
                self._export(batch)

    def _export(self, batch: Sequence[ReadableSpan]) -> None:
        self.export_requests += 1
        try:
            ok = self.exporter.export(batch) == SpanExportResult.SUCCESS
        except Exception as exc:  # noqa: BLE001 - an exporter bug must not stop the worker
            log.warning("OTLP span export raised: %r", exc)
            ok = False
        if ok:
            self.exported += len(batch)
        else:
            self.failed_requests += 1
            self.drops.count(STAGE, "export_failed", len(batch),
                             detail=f"{len(batch)} spans not accepted after retries")


class _CountingMetricExporter(MetricExporter):
    """Passes through to the OTLP metric exporter and counts the data points it failed to send."""

    def __init__(self, inner: MetricExporter, drops: Drops) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self.inner, self.drops = inner, drops
        self.exports = self.failures = 0

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        self.exports += 1
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("OTLP metric export raised: %r", exc)
            result = MetricExportResult.FAILURE
        if result != MetricExportResult.SUCCESS:
            self.failures += 1
            points = sum(len(m.data.data_points) for rm in metrics_data.resource_metrics
                         for sm in rm.scope_metrics for m in sm.metrics)
            self.drops.count(STAGE, "metrics_export_failed", points)
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return bool(self.inner.force_flush(timeout_millis=timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis)


def _attrs(edge: EdgeKey) -> dict[str, Any]:
    client, cns, server, sns, port, proto = edge
    a: dict[str, Any] = {"client": client, "server": server, "network.transport": proto}
    if cns:
        a["client.namespace"] = cns
    if sns:
        a["server.namespace"] = sns
    if port:
        a["server.port"] = int(port)
    return a


class OtlpEdgeMetrics:
    def __init__(self, exporter: MetricExporter, drops: Drops, labels: EdgeLabels,
                 interval_s: float) -> None:
        self.labels = labels
        self.exporter = _CountingMetricExporter(exporter, drops)
        self.reader = PeriodicExportingMetricReader(self.exporter,
                                                    export_interval_millis=interval_s * 1000)
        self.provider = MeterProvider(resource=Resource.create({"service.name": "eastwest-aggregator"}),
                                      metric_readers=[self.reader], shutdown_on_exit=False)
        m = self.provider.get_meter("eastwest.aggregator", __version__)
        self.bytes = m.create_counter("eastwest.edge.bytes", unit="By",
                                      description="payload bytes of the edge's connections")
        self.connections = m.create_counter("eastwest.edge.connections", unit="{connection}",
                                            description="connections opened on the edge")
        self.failures = m.create_counter("eastwest.edge.failures", unit="{connection}",
                                         description="connections refused, reset or timed out")
        self.retransmits = m.create_counter("eastwest.edge.retransmits", unit="{segment}",
                                            description="TCP segments retransmitted")
        self.rtt = m.create_histogram("eastwest.edge.rtt", unit="s",
                                      description="smoothed RTT of each completed TCP connection",
                                      explicit_bucket_boundaries_advisory=list(RTT_BUCKETS))

    def on_released(self, released: pa.Table | None) -> None:
        """Connections whose names are final (aggregator/exporters/named.py), summed per edge."""
        if released is None:
            return
        for edge, (c2s, s2c, retrans, opened_n, moved) in self.labels.per_edge(
                released, ("c2s", "s2c", "retrans"), ("opened", "moved")):
            a = _attrs(edge)
            if moved:
                self.bytes.add(c2s, {**a, "direction": "c2s"})
                self.bytes.add(s2c, {**a, "direction": "s2c"})
                self.retransmits.add(retrans, a)
            if opened_n:
                self.connections.add(opened_n, a)

    def on_complete(self, done: pa.Table) -> None:
        for edge, reason, n in self.labels.count_per_edge(done, "outcome", FAILED):
            self.failures.add(n, {**_attrs(edge), "reason": reason})
        rtt = done.filter(pc.is_valid(done.column("rtt_avg_us")))
        if rtt.num_rows:
            labels = [rtt.column(n).to_pylist() for n in ROW_LABELS]
            for i, us in enumerate(rtt.column("rtt_avg_us").to_pylist()):
                edge = self.labels.of_names(*(col[i] for col in labels))
                self.rtt.record(us / 1e6, _attrs(edge))

    def force_flush(self) -> bool:
        return bool(self.provider.force_flush())

    def shutdown(self) -> None:
        self.provider.shutdown()


class OtlpExporter:
    """Both OTLP signals, as the config asks. `span_exporter`/`metric_exporter` replace the SDK
    exporters the config would build (tests)."""

    def __init__(self, config: OtlpConfig, drops: Drops, labels: EdgeLabels, *,
                 span_exporter: SpanExporter | None = None,
                 metric_exporter: MetricExporter | None = None) -> None:
        self.config, self.drops = config, drops
        self.spans: SpanQueue | None = None
        self.factory: SpanFactory | None = None
        self.metrics: OtlpEdgeMetrics | None = None
        self.connections = {"queued": 0, "filtered": 0, "sampled_out": 0}
        self._threshold = int(config.sample * (1 << 64))
        if "traces" in config.signals:
            self.spans = SpanQueue(span_exporter or config.span_exporter(), drops,
                                   max_queue=config.queue_size, max_batch=config.batch_size,
                                   schedule_s=config.schedule_s)
            self.factory = SpanFactory(self.spans)
        if "metrics" in config.signals:
            self.metrics = OtlpEdgeMetrics(metric_exporter or config.metric_exporter(), drops,
                                           labels, config.metrics_interval_s)

    def on_released(self, released: pa.Table | None) -> None:
        if self.metrics is not None:
            self.metrics.on_released(released)

    def sampled(self, conn: Connection) -> bool:
        # the low 64 bits of the trace id against the share, as TraceIdRatioBased does
        return (trace_id_of(conn.conn_id) & ((1 << 64) - 1)) < self._threshold or self.config.sample >= 1.0

    def on_complete(self, done: pa.Table) -> None:
        """Completed connections' rows: metrics per edge; a span pair for each connection the
        filter and the sample keep (built as a `Connection` from its row: spans are objects)."""
        if self.metrics is not None:
            self.metrics.on_complete(done)
        if self.factory is None:
            return
        flt = self.config.filter
        for c in (connection_of(r) for r in done.to_pylist()):
            if not flt.empty and not flt.matches(connection_view(c)):
                self.connections["filtered"] += 1
            elif not self.sampled(c):
                self.connections["sampled_out"] += 1
            else:
                self.factory.emit(c)
                self.connections["queued"] += 1

    def force_flush(self) -> None:
        if self.spans is not None:
            self.spans.force_flush()
        if self.metrics is not None:
            self.metrics.force_flush()

    def shutdown(self) -> None:
        if self.spans is not None:
            self.spans.shutdown()
        if self.metrics is not None:
            self.metrics.shutdown()


def connection_view(c: Connection) -> dict[str, Any]:
    """The filter language's view keys (eastwest.filters) of a correlated connection."""
    return {
        "client_ip": c.client_ip, "server_ip": c.server_ip, "client_port": c.client_port,
        "server_port": c.server_port, "protocol": c.protocol,
        "outcome": outcome_of(c.connect, c.best()[5]), "observers": set(c.observed_by),
        "vni": c.tunnel.vni if c.tunnel else None,
        "client_workload": c.client.name, "server_workload": c.server.name,
        "client_namespace": c.client.namespace, "server_namespace": c.server.namespace,
    }
