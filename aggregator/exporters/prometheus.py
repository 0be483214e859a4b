"""Per-edge Prometheus series on the aggregator's /metrics, beside its self-metrics.

Stage: exporters. In: the byte and retransmit deltas and the openings of connections whose names
are final (aggregator/exporters/named.py: a counter cannot move what it counted, so it waits the
few seconds in which a connection's names may still change), and each completed connection
(aggregator/exporters/completion.py: failures, RTT). Out: series in the app's `prometheus_client` registry (aggregator/metrics.py):

  eastwest_edge_bytes_total{<edge>,direction="c2s"|"s2c"}  payload bytes, client->server and back
  eastwest_edge_connections_total{<edge>}                  connections opened
  eastwest_edge_failures_total{<edge>,reason}              refused | reset | timeout | dropped
                                                           (when complete)
  eastwest_edge_drops_total{<edge>,reason}                 packets the kernel dropped, by its drop
                                                           reason (when complete; collector --drops)
  eastwest_edge_retransmits_total{<edge>}                  TCP retransmitted segments
  eastwest_edge_rtt_seconds{<edge>}                        histogram: smoothed RTT per connection
  eastwest_edge_series, eastwest_edge_series_folded_total  the cardinality budget at work

<edge> = client, client_namespace, server, server_namespace, server_port, protocol (edges.py),
folded into client="other",server="other" past the budget (--edge-budget). A drop `reason` is a
name of the kernel's `enum skb_drop_reason` (about 100 on Linux 6.x, a handful seen in
practice), so the drops series are at most the edge budget x the reasons seen.

The byte counters add exactly the deltas the store adds to the rollups, under the names the
connection ends with, so `increase()` over a window equals the bytes of GET /api/v1/graph for
it once the names have settled (a connection counts once, whoever observed it).
Counters restart at zero when the aggregator restarts, as Prometheus expects of counters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from aggregator.exporters.edges import EDGE_LABELS, ROW_LABELS, EdgeKey, EdgeLabels
from aggregator.store.derived import parse_drop_reasons

# RTT inside a data centre is 50 µs .. a few ms; across regions up to a few 100 ms
RTT_BUCKETS = (.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0)
FAILED = ("refused", "reset", "timeout", "dropped")
# every name this module defines: dashboards may use only names defined in code (a test checks)
METRIC_NAMES = ("eastwest_edge_bytes_total", "eastwest_edge_connections_total",
                "eastwest_edge_failures_total", "eastwest_edge_retransmits_total",
                "eastwest_edge_rtt_seconds", "eastwest_edge_series", "eastwest_edge_drops_total",
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
                                "reset, timeout, dropped), counted when complete", [*L, "reason"],
                                registry=r)
        self.drops = Counter("eastwest_edge_drops", "packets of the edge's connections the "
                             "kernel dropped, by drop reason, counted when complete",
                             [*L, "reason"], registry=r)
        self.retransmits = Counter("eastwest_edge_retransmits", "TCP segments retransmitted on "
                                   "the edge's connections", L, registry=r)
        self.rtt = EdgeHistograms("eastwest_edge_rtt_seconds", "smoothed round-trip time of "
                                  "each completed TCP connection", L, RTT_BUCKETS)
        r.register(self.rtt)
        r.register(_BudgetCollector(labels))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def on_released(self, released: pa.Table | None) -> None:
        """Count connections whose names are final (aggregator/exporters/named.py, one row a
        connection): their bytes, retransmits and openings, summed per edge (one `inc` a
        series)."""
        if released is None:
            return
        child = self._child
        for edge, (c2s, s2c, retrans, opened_n, moved) in self.labels.per_edge(
                released, ("c2s", "s2c", "retrans"), ("opened", "moved")):
            if moved:  # touch every volume series of the edge, zero or not: a rate over a
                # quiet edge is 0, not absent (an edge of refused calls only has no volumes)
                child(self.bytes, (*edge, "c2s")).inc(c2s)
                child(self.bytes, (*edge, "s2c")).inc(s2c)
                child(self.retransmits, edge).inc(retrans)
            if opened_n:
                child(self.connections, edge).inc(opened_n)

    def on_complete(self, done: pa.Table) -> None:
        """Completed connections (aggregator/exporters/completion.py, their rows): failures by
        reason per edge, and each one's RTT."""
        for edge, reason, n in self.labels.count_per_edge(done, "outcome", FAILED):
            self._child(self.failures, (*edge, reason)).inc(n)
        for edge, reason, n in self._drops_per_edge(done):
            self._child(self.drops, (*edge, reason)).inc(n)
        self.rtt.observe_rows(self.labels, done, "rtt_avg_us", 1e6)

    def _drops_per_edge(self, done: pa.Table) -> list[tuple[EdgeKey, str, int]]:
        """Dropped packets per edge and reason of completed connections (few have any: one
        row per connection and reason, from their `drop_reasons`)."""
        if "dropped" not in done.column_names:
            return []
        hit = done.filter(pc.is_valid(done.column("dropped")))
        if hit.num_rows == 0:
            return []
        labels = {n: hit.column(n).to_pylist() for n in ROW_LABELS}
        per_reason: dict[str, dict[str, list[Any]]] = {}
        for i, text in enumerate(hit.column("drop_reasons").to_pylist()):
            for reason, n in parse_drop_reasons(text).items():
                t = per_reason.setdefault(reason, {k: [] for k in (*ROW_LABELS, "_n")})
                for k in ROW_LABELS:
                    t[k].append(labels[k][i])
                t["_n"].append(n)
        out = []
        for reason, cols in sorted(per_reason.items()):
            table = pa.table({k: pa.array(v, hit.schema.field(k).type) if k != "_n"
                              else pa.array(v, pa.int64()) for k, v in cols.items()})
            out += [(edge, reason, n) for edge, (n,) in self.labels.per_edge(table, ("_n",))]
        return out

    def _child(self, metric: Any, values: tuple[str, ...]) -> Any:
        """`metric.labels(*values)`, remembered: prometheus_client's `labels` validates and locks
        on every call (~3 µs), and these run for every connection. Series are never removed."""
        key = (id(metric), values)
        got = self._children.get(key)
        if got is None:
            got = self._children[key] = metric.labels(*values)
        return got


class EdgeHistograms(Collector):
    """A histogram per edge, observed a table at a time: bucket counts per edge by numpy
    (prometheus_client's Histogram takes one value a call, ~3 µs each). Exposed exactly as a
    prometheus_client Histogram is (`_bucket{le}` cumulative, `_sum`, `_count`)."""

    def __init__(self, name: str, doc: str, labels: list[str], bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = np.array(bounds, float)
        self._edges: dict[tuple[str, ...], list[Any]] = {}  # edge -> [counts, sum]
        self._lock = threading.Lock()

    def observe_rows(self, labels: EdgeLabels, t: pa.Table, column: str, divisor: float) -> None:
        """Observe `t[column] / divisor` of every row where it is not null, under its edge."""
        t = t.filter(pc.is_valid(t.column(column)))
        if t.num_rows == 0:
            return
        values = t.column(column).to_numpy(zero_copy_only=False).astype(float) / divisor
        bucket = np.searchsorted(self.bounds, values, side="left")  # le: the first bound >= v
        enc = pc.dictionary_encode(pc.binary_join_element_wise(
            *(pc.fill_null(pc.cast(t.column(n), pa.string()), "") for n in ROW_LABELS),
            "\x1f")).combine_chunks()
        idx = enc.indices.to_numpy()
        n_edges = len(enc.dictionary)
        counts = np.zeros((n_edges, len(self.bounds) + 1), np.int64)
        np.add.at(counts, (idx, bucket), 1)
        sums = np.bincount(idx, weights=values, minlength=n_edges)
        first = np.unique(idx, return_index=True)[1]  # a row of each edge, for its labels
        cols = [t.column(n).take(pa.array(first)).to_pylist() for n in ROW_LABELS]
        with self._lock:
            for e in range(n_edges):
                edge = labels.of_names(*(c[e] for c in cols))
                acc = self._edges.get(edge)
                if acc is None:
                    acc = self._edges[edge] = [np.zeros(len(self.bounds) + 1, np.int64), 0.0]
                acc[0] += counts[e]
                acc[1] += float(sums[e])

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        with self._lock:
            for edge, (counts, total) in self._edges.items():
                cum = np.cumsum(counts).tolist()
                buckets = [(_le(b), c) for b, c in zip(self.bounds.tolist(), cum, strict=False)]
                buckets.append(("+Inf", cum[-1]))
                fam.add_metric(list(edge), buckets, total)
        yield fam

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.doc, labels=self.labels)


def _le(bound: float) -> str:
    """A bucket's `le` as prometheus_client writes it (floatToGoString: 5e-05, 0.0001, 1.0)."""
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(bound))


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
