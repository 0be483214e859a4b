"""Per-edge Prometheus series on the aggregator's /metrics, beside its self-metrics.

Stage: exporters. In: the byte and retransmit deltas and the openings of connections whose names
are final (aggregator/exporters/named.py: a counter cannot move what it counted, so it waits the
few seconds in which a connection's names may still change), and each completed connection
(aggregator/exporters/completion.py: failures, RTT). Out: series in the app's `prometheus_client` registry (aggregator/metrics.py):

  eastwest_edge_bytes_total{<edge>,direction="c2s"|"s2c"}  payload bytes, client->server and back
  eastwest_edge_connections_total{<edge>}                  connections opened
  eastwest_edge_failures_total{<edge>,reason}              refused | reset | timeout (when complete)
  eastwest_edge_retransmits_total{<edge>}                  TCP retransmitted segments
  eastwest_edge_rtt_seconds{<edge>}                        histogram: smoothed RTT per connection
  eastwest_edge_series, eastwest_edge_series_folded_total  the cardinality budget at work

<edge> = client, client_namespace, server, server_namespace, server_port, protocol (edges.py),
folded into client="other",server="other" past the budget (--edge-budget).

The byte counters add exactly the deltas the store adds to the rollups, under the names the
connection ends with, so `increase()` over a window equals the bytes of GET /api/v1/graph for
it once the names have settled (a connection counts once, whoever observed it).
Counters restart at zero when the aggregator restarts, as Prometheus expects of counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aggregator.connection import Connection
from aggregator.exporters.edges import EDGE_LABELS, EdgeKey, EdgeLabels
from aggregator.exporters.named import Release
from eastwest.filters import outcome_of

# RTT inside a data centre is 50 µs .. a few ms; across regions up to a few 100 ms
RTT_BUCKETS = (.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0)
FAILED = ("refused", "reset", "timeout")
# every name this module defines: dashboards may use only names defined in code (a test checks)
METRIC_NAMES = ("eastwest_edge_bytes_total", "eastwest_edge_connections_total",
                "eastwest_edge_failures_total", "eastwest_edge_retransmits_total",
                "eastwest_edge_rtt_seconds", "eastwest_edge_series",
                "eastwest_edge_series_folded_total")


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry, labels: EdgeLabels) -> None:
        self.labels = labels
        L = list(EDGE_LABELS)
        r = registry
        self.bytes = Counter("eastwest_edge_bytes", "payload bytes of the edge's connections, "
                             "c2s = client to server, s2c = server to client", [*L, "direction"],
                             registry=r)
        self.connections = Counter("eastwest_edge_connections", "connections opened on the edge",
                                   L, registry=r)
        self.failures = Counter("eastwest_edge_failures", "connections that failed (refused, "
                                "reset, timeout), counted when complete", [*L, "reason"],
                                registry=r)
        self.retransmits = Counter("eastwest_edge_retransmits", "TCP segments retransmitted on "
                                   "the edge's connections", L, registry=r)
        self.rtt = Histogram("eastwest_edge_rtt_seconds", "smoothed round-trip time of each "
                             "completed TCP connection", L, buckets=RTT_BUCKETS, registry=r)
        r.register(_BudgetCollector(labels))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def on_released(self, releases: Iterable[Release]) -> None:
        """Count connections whose names are final (aggregator/exporters/named.py): their
        bytes, retransmits and openings, summed per edge first (one `inc` per series)."""
        child = self._child
        of = self.labels.of
        sums: dict[EdgeKey, list[int]] = {}
        for conn, counters, opened in releases:
            edge = of(conn.client, conn.server, conn.server_port, conn.protocol)
            acc = sums.get(edge)
            if acc is None:
                acc = sums[edge] = [0, 0, 0, 0, 0]
            acc[0] += counters[0]
            acc[1] += counters[1]
            acc[2] += counters[4]
            acc[3] += opened
            acc[4] += any(counters)
        for edge, (c2s, s2c, retrans, opened_n, moved) in sums.items():
            if moved:  # touch every volume series of the edge, zero or not: a rate over a
                # quiet edge is 0, not absent (an edge of refused calls only has no volumes)
                child(self.bytes, (*edge, "c2s")).inc(c2s)
                child(self.bytes, (*edge, "s2c")).inc(s2c)
                child(self.retransmits, edge).inc(retrans)
            if opened_n:
                child(self.connections, edge).inc(opened_n)

    def on_complete(self, conns: Iterable[Connection]) -> None:
        child = self._child
        failed: dict[tuple[str, ...], int] = {}
        of = self.labels.of
        for c in conns:
            edge = of(c.client, c.server, c.server_port, c.protocol)
            outcome = outcome_of(c.connect, c.best()[5])
            if outcome in FAILED:
                fkey = (*edge, outcome)
                failed[fkey] = failed.get(fkey, 0) + 1
            rtt = c.rtt
            if rtt is not None:
                child(self.rtt, edge).observe(rtt[1] / 1e6)
        for values, n in failed.items():
            child(self.failures, values).inc(n)

    def _child(self, metric: Any, values: tuple[str, ...]) -> Any:
        """`metric.labels(*values)`, remembered: prometheus_client's `labels` validates and locks
        on every call (~3 µs), and these run for every connection. Series are never removed."""
        key = (id(metric), values)
        got = self._children.get(key)
        if got is None:
            got = self._children[key] = metric.labels(*values)
        return got


class _BudgetCollector(Collector):
    def __init__(self, labels: EdgeLabels) -> None:
        self.labels = labels

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily("eastwest_edge_series", "distinct edges with series of their own "
                                "(at most --edge-budget - 1; the rest share 'other')",
                                value=len(self.labels))
        yield CounterMetricFamily("eastwest_edge_series_folded", "edge updates folded into "
                                  "other -> other because the budget was full",
                                  value=self.labels.folded)
