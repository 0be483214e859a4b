"""OTLP export of completed connections (traces) and per-edge metrics, through the OTel SDK.

Stage: exporters. In: the deltas of connections whose names are final (named.py) and completed connections
(aggregator/exporters/completion.py). Out: OTLP requests to Tempo, an OpenTelemetry Collector or
any OTLP receiver, over gRPC or HTTP/protobuf (otlp_config.py).

Traces: each completed connection that passes `--otlp-filter` and the `--otlp-sample` share
becomes a CLIENT span and, when a server saw it, a SERVER span (otlp_spans.py). A connection's
spans go into `SpanQueue` together: a bounded queue of such groups, drained in batches of whole
groups by one thread into the SDK's OTLP span exporter, which retries retryable failures (gRPC
UNAVAILABLE and friends, HTTP 429/502/503/504) with jittered exponential backoff inside its
timeout. A group that does not fit the queue, or whose batch still failed, is counted span by span
in `eastwest_dropped_total{stage="otlp",reason="queue_full"|"export_failed"}`: both spans of a
pair are sent in one request or neither, so Tempo never holds half a pair. Nothing on the ingest
path ever waits for the receiver. `force_flush()` exports what is queued; `shutdown()` drains,
then closes the exporter.

Lateness: Tempo's metrics-generator ignores spans whose end is older than its ingestion slack
(`metrics_ingestion_time_range_slack`, 30 s by default); such spans still reach Tempo's trace
store but make no edge. Spans older than `--otlp-late-after` when queued or sent are counted in
`eastwest_otlp_late_spans_total{reason}`: `ended_before_start` (the connection ended before this
aggregator started: a restart, a collector's spool replayed), `completed_late` (the connection
became complete too long after it ended: UDP and wire-only flows end by idle timeout, late
records, settle), `export_delay` (in time when queued, late when sent: a backlog, retries).

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
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
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
from aggregator.exporters.edges import OTHER, ROW_LABELS, EdgeKey, EdgeLabels
from aggregator.exporters.otlp_config import LATE_REASONS, OtlpConfig
from aggregator.exporters.otlp_spans import SpanFactory, end_ns, trace_id_of
from aggregator.exporters.prometheus import FAILED, RTT_BUCKETS
from aggregator.store.derived import connection_of
from eastwest import __version__
from eastwest.clock import Clock, SystemClock, unix_us
from eastwest.drops import Drops

log = logging.getLogger("eastwest.otlp")
STAGE = "otlp"
RANDOM_MASK = (1 << 56) - 1


class SpanQueue(SpanProcessor):
    """Groups of finished spans (a connection's) -> a bounded queue -> batches of whole groups ->
    `exporter`. Every span is exported once or counted as dropped, with the rest of its group.
    `now_ns` and `late_after_ns` (optional) count groups that became late while queued."""

    def __init__(self, exporter: SpanExporter, drops: Drops, *, max_queue: int = 8192,
                 max_batch: int = 512, schedule_s: float = 1.0, start: bool = True,
                 now_ns: Callable[[], int] | None = None, late_after_ns: int | None = None) -> None:
        self.exporter = exporter
        self.drops = drops
        self.max_queue, self.max_batch, self.schedule_s = max_queue, max_batch, schedule_s
        self.now_ns, self.late_after_ns = now_ns, late_after_ns
        self._queue: deque[tuple[int, Sequence[ReadableSpan]]] = deque()  # (end ns, spans)
        self._spans = 0
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.exported = 0
        self.export_requests = 0
        self.failed_requests = 0
        self.late_on_export = 0
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
            self._thread.start()

    # -- in ---------------------------------------------------------------------------------------
    def offer(self, spans: Sequence[ReadableSpan], end_ns: int = 0) -> bool:
        """Queue a connection's spans, all or none (`end_ns`: when it ended, 0: unknown)."""
        if not spans:
            return True
        if self._stop:
            self.drops.count(STAGE, "after_shutdown", len(spans))
            return False
        with self._lock:
            if self._spans + len(spans) > self.max_queue:
                self.drops.count(STAGE, "queue_full", len(spans),
                                 detail=f"{self.max_queue} spans waiting")
                return False
            self._queue.append((end_ns, tuple(spans)))
            self._spans += len(spans)
            full = self._spans >= self.max_batch
        if full:
            self._wake.set()
        return True

    # -- SpanProcessor (a span ended elsewhere is a group of one) --------------------------------
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.offer([span])

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
        return self._spans

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.schedule_s)
            self._wake.clear()
            if not self._stop:
                self._export_all()

    def _export_all(self) -> None:
        with self._export_lock:
            while True:
                batch: list[ReadableSpan] = []
                late = 0
                with self._lock:
                    # whole groups; one larger than a batch goes alone
                    while self._queue and (not batch or
                                           len(batch) + len(self._queue[0][1]) <= self.max_batch):
                        end, group = self._queue.popleft()
                        self._spans -= len(group)
                        batch += group
                        if end and self._late(end):
                            late += len(group)
                if not batch:
                    return
                self.late_on_export += late
                self._export(batch)

    def _late(self, end_ns: int) -> bool:
        return (self.now_ns is not None and self.late_after_ns is not None
                and self.now_ns() - end_ns > self.late_after_ns)

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
    exporters the config would build (tests); `clock` tells lateness (wall time)."""

    def __init__(self, config: OtlpConfig, drops: Drops, labels: EdgeLabels, *,
                 span_exporter: SpanExporter | None = None,
                 metric_exporter: MetricExporter | None = None,
                 clock: Clock | None = None) -> None:
        self.config, self.drops, self.labels = config, drops, labels
        self.clock: Clock = clock or SystemClock()
        self.started_ns = self._now_ns()
        self.late_after_ns = int(config.late_after_s * 1e9)
        self.spans: SpanQueue | None = None
        self.factory: SpanFactory | None = None
        self.metrics: OtlpEdgeMetrics | None = None
        self.connections = {"queued": 0, "filtered": 0, "sampled_out": 0}
        self.late = dict.fromkeys(LATE_REASONS, 0)
        self.folded = 0
        # connection -> whether its SERVER span went too (or nothing was due: filtered, sampled
        # out); kept across a restart by the caller (Exporters), so a later process adds only a
        # missing SERVER span and never sends a pair twice (Tempo would count it twice)
        self.told: OrderedDict[str, bool] = OrderedDict()
        self.max_told = 200_000
        self._threshold = int(config.sample * (RANDOM_MASK + 1))
        if "traces" in config.signals:
            self.spans = SpanQueue(span_exporter or config.span_exporter(), drops,
                                   max_queue=config.queue_size, max_batch=config.batch_size,
                                   schedule_s=config.schedule_s, now_ns=self._now_ns,
                                   late_after_ns=self.late_after_ns)
            self.factory = SpanFactory(self._queue, naming=config.service_name,
                                       sample_ratio=config.sample)
        if "metrics" in config.signals:
            self.metrics = OtlpEdgeMetrics(metric_exporter or config.metric_exporter(), drops,
                                           labels, config.metrics_interval_s)
        self._end_ns = 0

    def _now_ns(self) -> int:
        return unix_us(self.clock.now()) * 1000

    def late_counts(self) -> dict[str, int]:
        out = dict(self.late)
        if self.spans is not None:
            out["export_delay"] += self.spans.late_on_export
        return out

    def on_released(self, released: pa.Table | None) -> None:
        if self.metrics is not None:
            self.metrics.on_released(released)

    def sampled(self, conn: Connection) -> bool:
        # the trace id's rightmost 7 bytes against the share (W3C Trace Context level 2: the
        # random part). Not the low 64 bits as TraceIdRatioBased: a version-4 UUID's variant
        # bits set the top bit of byte 8, which kept no connection at all below a share of 0.5
        return (trace_id_of(conn.conn_id) & RANDOM_MASK) < self._threshold or self.config.sample >= 1.0

    def names(self, c: Connection) -> tuple[str, str] | None:
        """Past the edge budget, external ends are named `external` (one Tempo node, not one
        per address); None: the connection's own names."""
        if self.labels.of(c.client, c.server, c.server_port, c.protocol, count=False) != OTHER:
            return None
        ext = [i.source == "external" for i in (c.client, c.server)]
        if not any(ext):
            return None
        self.folded += 1
        return ("external" if ext[0] else c.client.name, "external" if ext[1] else c.server.name)

    def _queue(self, spans: Sequence[ReadableSpan]) -> None:
        assert self.spans is not None
        self.spans.offer(spans, self._end_ns)

    def on_complete(self, done: pa.Table, server_only: frozenset[str] = frozenset()) -> None:
        """Completed connections' rows: metrics per edge; a span pair for each connection the
        filter and the sample keep (built as a `Connection` from its row: spans are objects).
        `server_only`: connections an earlier process told without their SERVER span (and
        counted in its metrics): their SERVER span alone, when a server was seen now."""
        if self.metrics is not None:
            self.metrics.on_complete(done.filter(pa.array(
                [cid not in server_only for cid in done.column("conn_id").to_pylist()]))
                if server_only else done)
        if self.factory is None:
            return
        flt = self.config.filter
        now = self._now_ns()
        for c in (connection_of(r) for r in done.to_pylist()):
            redo = c.conn_id in server_only
            if not redo and not flt.empty and not flt.matches(connection_view(c)):
                self.connections["filtered"] += 1
                self._told(c.conn_id, True)
            elif not redo and not self.sampled(c):
                self.connections["sampled_out"] += 1
                self._told(c.conn_id, True)
            else:
                end = end_ns(c)
                late = now - end > self.late_after_ns
                # a group late already is counted here, once; one in time is looked at again
                # when it is sent (export_delay)
                self._end_ns = 0 if late else end
                n = self.factory.emit(c, self.names(c), server_only=redo)
                if late and n:
                    reason = "ended_before_start" if end < self.started_ns else "completed_late"
                    self.late[reason] += n
                if not redo:
                    self.connections["queued"] += 1
                self._told(c.conn_id, redo or n == 2)

    def _told(self, cid: str, whole: bool) -> None:
        self.told[cid] = whole
        self.told.move_to_end(cid)
        if len(self.told) > self.max_told:
            self.told.popitem(last=False)

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
        "outcome": c.outcome(), "observers": set(c.observed_by),
        "vni": c.tunnel.vni if c.tunnel else None,
        "client_workload": c.client.name, "server_workload": c.server.name,
        "client_namespace": c.client.namespace, "server_namespace": c.server.namespace,
    }
