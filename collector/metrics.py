"""Collector self-metrics in the Prometheus text format, on `--metrics-listen HOST:PORT`.

In:  counts from the export stages, the spool's size, the shared `Drops`, and gauges any source
     offers (BPF map fill, kernel event counters).  Out: one `prometheus_client` registry per collector and,
     when asked, an HTTP server answering `/metrics`.

Names (shared with the aggregator where they mean the same):
  eastwest_records_in_total              records handed to the export sink
  eastwest_records_out_total             records the aggregator acknowledged (stored)
  eastwest_dropped_total{stage,reason}   everything dropped, from `eastwest.drops.Drops`
  eastwest_spool_bytes, eastwest_spool_batches, eastwest_spool_records
  eastwest_export_batch_seconds          spool -> acknowledged, per batch (retries included)
  eastwest_export_attempts_total, eastwest_export_failures_total{outcome}
  eastwest_export_retries_total{reason}  attempts answered "not now", by the transport's reason
                                         (collector/transport.py: http_503, nats_timeout...)
  eastwest_export_nats_subshares_total, eastwest_export_nats_resplit_shares_total,
  eastwest_export_nats_resplit_maybe_doubled_total
                                         the NATS sender's splits of shares over max_payload
                                         (collector/transport_nats.py)
  eastwest_probe_map_entries{map}, eastwest_probe_map_capacity{map},
  eastwest_probe_kernel_events_total{event}, eastwest_probe_map_memory_bytes{map}
                                         from sources exposing `gauges()` (collector/probes)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eastwest.drops import Drops
from eastwest.errors import ConfigError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SpoolLike(Protocol):
    bytes: int

    def __len__(self) -> int: ...
    def records(self) -> int: ...


# A source's gauges: {(metric name, ((label, value), ...)): value}
Gauges = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class _Callbacks(Collector):
    def __init__(self, drops: Drops) -> None:
        self.drops = drops
        self.spool: SpoolLike | None = None
        self.sources: list[Callable[[], Gauges]] = []

    def collect(self) -> Iterator[Any]:
        fam = CounterMetricFamily("eastwest_dropped", "records dropped, by stage and reason",
                                  labels=["stage", "reason"])
        for (stage, reason), n in sorted(self.drops.snapshot().items()):
            fam.add_metric([stage, reason], n)
        yield fam
        if self.spool is not None:
            yield GaugeMetricFamily("eastwest_spool_bytes", "bytes of batches in the spool",
                                    value=self.spool.bytes)
            yield GaugeMetricFamily("eastwest_spool_batches", "batches in the spool",
                                    value=len(self.spool))
            yield GaugeMetricFamily("eastwest_spool_records", "records in spooled batches",
                                    value=self.spool.records())
        merged: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
        for fn in self.sources:
            for (name, labels), value in fn().items():
                merged.setdefault(name, []).append((labels, value))
        for name, samples in sorted(merged.items()):
            keys = [k for k, _ in samples[0][0]]
            if name.endswith("_total"):
                fam = CounterMetricFamily(name.removesuffix("_total"), name, labels=keys)
            else:
                fam = GaugeMetricFamily(name, name, labels=keys)  # type: ignore[assignment]
            for labels, value in samples:
                fam.add_metric([v for _, v in labels], value)
            yield fam


class CollectorMetrics:
    def __init__(self, drops: Drops) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_in = Counter("eastwest_records_in", "records handed to the export sink",
                                  registry=r)
        self.records_out = Counter("eastwest_records_out", "records acknowledged by the "
                                   "aggregator", registry=r)
        self.attempts = Counter("eastwest_export_attempts", "send attempts (HTTP POSTs or NATS "
                                "publishes)", registry=r)
        self.retries = Counter("eastwest_export_retries", "send attempts answered 'not now' "
                               "(the batch stays spooled), by the transport's reason", ["reason"],
                               registry=r)
        self.failures = Counter("eastwest_export_failures", "batches not delivered in one send "
                                "round (they stay spooled), by outcome", ["outcome"], registry=r)
        self.latency = Histogram("eastwest_export_batch_seconds", "spool to acknowledgement, per "
                                 "batch, retries included", registry=r,
                                 buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 5, 30))
        self._cb = _Callbacks(drops)
        r.register(self._cb)

    def watch_spool(self, spool: SpoolLike) -> None:
        self._cb.spool = spool

    def watch_source(self, gauges: Callable[[], Gauges]) -> None:
        """Export a source's gauges (e.g. BPF map fill, lost events) on every scrape."""
        self._cb.sources.append(gauges)

    def watch_sources(self, sources: Iterable[object]) -> None:
        """`watch_source` for every source that has a `gauges()` (the socket probes do)."""
        for src in sources:
            gauges = getattr(src, "gauges", None)
            if callable(gauges):
                self.watch_source(gauges)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, listen: str) -> Any:
        """Serve /metrics on HOST:PORT in a daemon thread; returns the server (`.shutdown()`)."""
        from prometheus_client import start_http_server

        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError("--metrics-listen", listen, "expected HOST:PORT, e.g. 127.0.0.1:9470")
        try:
            server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                                registry=self.registry)
        except OSError as exc:
            raise ConfigError("--metrics-listen", listen, f"cannot listen: {exc.strerror}") from None
        return server
