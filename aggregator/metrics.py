"""Aggregator self-metrics in the Prometheus text format, served on /metrics.

In:  events from ingest (batches, records, latency) and the store's size.  Out: one
`prometheus_client` registry per app (tests build many apps in one process).

Names shared with the collector so one dashboard reads both: `eastwest_records_in_total`
(records received), `eastwest_records_out_total` (records stored), `eastwest_dropped_total
{stage,reason}` (everything refused, from `eastwest.drops.Drops`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eastwest.drops import Drops

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _DropsCollector(Collector):
    def __init__(self, drops: Drops) -> None:
        self.drops = drops

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily("eastwest_dropped", "records or batches dropped, by stage and "
                                  "reason", labels=["stage", "reason"])
        for (stage, reason), n in sorted(self.drops.snapshot().items()):
            fam.add_metric([stage, reason], n)
        yield fam


class _StoreCollector(Collector):
    def __init__(self, records: Callable[[], int], size: Callable[[], int]) -> None:
        self.records, self.size = records, size

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("eastwest_store_records", "raw flow records in the store",
                                value=self.records())
        yield GaugeMetricFamily("eastwest_store_bytes", "bytes of the store's files on disk",
                                value=self.size())


class AggregatorMetrics:
    def __init__(self, drops: Drops) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_in = Counter("eastwest_records_in", "records received in ingest batches",
                                  registry=r)
        self.records_out = Counter("eastwest_records_out", "records stored", registry=r)
        self.batches = Counter("eastwest_ingest_batches", "ingest batches by result "
                               "(stored, duplicate, rejected)", ["result"], registry=r)
        self.bytes_in = Counter("eastwest_ingest_bytes", "request body bytes received on ingest",
                                registry=r)
        self.latency = Histogram("eastwest_ingest_batch_seconds", "time to decode, validate and "
                                 "durably store one batch", registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        r.register(_DropsCollector(drops))

    def watch_store(self, records: Callable[[], int], size: Callable[[], int]) -> None:
        self.registry.register(_StoreCollector(records, size))

    def render(self) -> bytes:
        return generate_latest(self.registry)
