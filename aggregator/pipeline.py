"""The aggregator's pipeline: every stage, wired here and only here, from the typed settings.

```
 HTTP POST /api/v1/ingest ─┐                                   (aggregator/ingest.py)
 NATS JetStream consumer ──┴─▶ intake ──▶ correlation ──▶ store writer ──▶ fan-out
                               accept()   (journal, planner)   (one transaction   (exporters,
                               one set of  or inline for a      a step: raw rows,   live SSE hub)
                               rules and   shared store)        marks, connections,
                               drop reasons                     rollups, workloads)
 read API (aggregator/api/) ──▶ pipeline.read() ──▶ ReadStore (typed queries)
```

| stage | module | in | out |
|---|---|---|---|
| intake | aggregator/intake.py | a batch's bytes (HTTP body, NATS message) | `Accepted` (good records, rejections counted) |
| correlation | aggregator/worker.py | `Accepted` | a `Plan` per step (aggregator/correlate.py), its `WriteStep` |
| store writer | the store's `WriteStore` (aggregator/store/base.py) | `WriteStep` | durable rows |
| fan-out | aggregator/fanout.py | each written `Plan`, in order | exporters (aggregator/exporters/), SSE hub |
| live fan-in (NATS replicas) | aggregator/live_fanin.py | this replica's written rows; its peers' | the peers' SSE hubs; this one's |
| retention | aggregator/retention.py | the clock | old rows deleted |

The store decides the form of the correlation stage: a store with a local journal (DuckDB:
one aggregator) gets `JournaledCorrelation` (acknowledged at the journal's sync, correlated and
written behind it); a shared store (ClickHouse: several aggregators) gets `InlineCorrelation`
(written before the ack, each batch's keys reloaded first); a shared store fed by NATS gets
`PartitionedCorrelation` (aggregator/partitioned.py: an `InlineCorrelation` per partition this
replica owns, aggregator/leases.py). The read path never installs the
write path: the API reads `pipeline.read()`, which first waits until every batch acknowledged
before the read is applied (read-after-write), then answers from the store's read interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from aggregator.arrow_memory import use_returning_pool
from aggregator.consume import ConsumerSettings, JetStreamConsumer
from aggregator.correlate_columns import ColumnCorrelator
from aggregator.correlate_core import IdSource
from aggregator.exporters import Exporters
from aggregator.fanout import FanOut
from aggregator.identity import (
    IdentityResolver,
    IdentitySource,
    PodNetworkSource,
    StaticMap,
    parse_cidr_groups,
    system_reverse_dns,
)
from aggregator.intake import Intake
from aggregator.live_fanin import LiveFanIn
from aggregator.metrics import AggregatorMetrics
from aggregator.partitioned import PartitionedCorrelation
from aggregator.retention import Retention
from aggregator.settings import AggregatorSettings
from aggregator.store import Store, open_store
from aggregator.store.base import ReadStore
from aggregator.worker import (
    READ_WAIT_S,
    Correlation,
    InlineCorrelation,
    JournaledCorrelation,
    WorkerSettings,
)
from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops

if TYPE_CHECKING:
    from aggregator.k8s import KubernetesIdentity

METRICS_WAIT_S = 5.0  # a scrape or an exporter tick waits at most this long for correlation


def kubernetes_from(settings: AggregatorSettings) -> KubernetesIdentity | None:
    """The Kubernetes identity layer (not started), None when no cluster is configured."""
    cluster = settings.k8s_cluster()
    if cluster is None:
        return None
    from aggregator.k8s import KubernetesIdentity

    return KubernetesIdentity.from_config(cluster, keep_deleted_s=settings.k8s_keep_deleted_s)


def resolver_from(settings: AggregatorSettings,
                  kubernetes: IdentitySource | None = None) -> IdentityResolver:
    static = StaticMap.load(settings.workload_map) if settings.workload_map else None
    sources = [kubernetes] if kubernetes is not None else []
    return IdentityResolver(static, sources, parse_cidr_groups(settings.cidr_groups),
                            system_reverse_dns if settings.reverse_dns else None,
                            [s for s in sources if isinstance(s, PodNetworkSource)])


class Pipeline:
    """The stages of one aggregator process (the module docstring), built by `build`."""

    def __init__(self, settings: AggregatorSettings, store: Store, correlator: ColumnCorrelator,
                 fanout: FanOut, correlation: Correlation, intake: Intake,
                 exporters: Exporters, retention: Retention, drops: Drops,
                 metrics: AggregatorMetrics, clock: Clock) -> None:
        self.settings, self.store, self.correlator = settings, store, correlator
        self.fanout, self.correlation, self.intake = fanout, correlation, intake
        self.exporters, self.retention = exporters, retention
        self.drops, self.metrics, self.clock = drops, metrics, clock
        self.consumer: JetStreamConsumer | None = None
        self.fanin: LiveFanIn | None = None  # the live stream of every replica's partitions
        self._partition_metrics: _PartitionMetrics | None = None
        self.kubernetes: KubernetesIdentity | None = None  # its status: GET /api/v1/status
        self._owned = True

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """The exporters' ticker and the NATS consumer (the correlation stage runs from
        `build` on: batches are taken as soon as the pipeline exists)."""
        self.exporters.start()
        if self.settings.nats is not None:  # NATS JetStream intake (docs/scale-out.md)
            s = self.settings
            cfg = ConsumerSettings(s.nats, s.nats_durable, s.nats_ack_wait_s,
                                   lease_s=s.nats_lease_s, coalesce=s.nats_coalesce,
                                   coalesce_records=s.nats_coalesce_records,
                                   coalesce_wait_s=s.nats_coalesce_wait_s)
            if s.nats_replica:
                cfg = dataclasses.replace(cfg, replica=s.nats_replica)
            hooks = (self.correlation if isinstance(self.correlation, PartitionedCorrelation)
                     else None)
            consumer = self.consumer = JetStreamConsumer(cfg, self.intake, self.drops, hooks)
            if hooks is not None and s.live_fanin:  # aggregator/live_fanin.py
                def revision(k: int) -> int | None:
                    return None if consumer.leases is None else consumer.leases.owned.get(k)

                self.fanin = LiveFanIn(s.nats, cfg.replica, self.fanout.hub, self.drops,
                                       hooks.current, revision)
                self.fanout.add_listener(self.fanin.on_changes)
                self.fanin.start()
            self._partition_metrics = _PartitionMetrics(self.consumer, self.fanin, hooks)
            self.metrics.registry.register(self._partition_metrics)
            self.consumer.start()

    def stop(self) -> None:
        """Stop taking NATS batches, correlate what was accepted, tell the exporters of every
        closed connection; then, when the pipeline opened its store itself, stop the
        correlation stage and close the store (a store handed over stays open, and its
        pipeline keeps correlating: a test's app may run its lifespan many times)."""
        if self.consumer is not None:
            self.consumer.stop()
            self.consumer = None
        if self.fanin is not None:
            self.fanout.listeners.remove(self.fanin.on_changes)
            self.fanin.stop()
            self.fanin = None
        if self._partition_metrics is not None:
            self.metrics.registry.unregister(self._partition_metrics)
            self._partition_metrics = None
        self.correlation.applied(READ_WAIT_S)
        self.exporters.shutdown()  # closed connections told, OTLP queue drained
        if self._owned:
            if self.kubernetes is not None:
                self.kubernetes.stop()
            self.correlation.close()
            self.store.close()

    # -- the read path --------------------------------------------------------------------------
    def read(self, timeout: float = READ_WAIT_S) -> ReadStore:
        """The store's read interface, once every batch acknowledged before this call is
        applied (at most `timeout`: then what is applied so far)."""
        self.correlation.applied(timeout)
        return self.store

    @property
    def version(self) -> int:
        """Changes whenever what a read may see may have changed (the live graph's cache)."""
        return self.correlation.version


def build(settings: AggregatorSettings, *, store: Store | None = None, own_store: bool = False,
          drops: Drops | None = None, metrics: AggregatorMetrics | None = None,
          clock: Clock | None = None, resolver: IdentityResolver | None = None,
          env: Mapping[str, str] | None = None, worker: WorkerSettings | None = None,
          ids: IdSource | None = None,
          exporter_kwargs: Mapping[str, Any] | None = None,
          kubernetes: KubernetesIdentity | None = None) -> Pipeline:
    """Every stage from the settings. For tests and benchmarks: a `store` opened by the caller
    (closed by `stop` only with `own_store`), a `resolver` (with the `kubernetes` layer it
    holds, if any, for the status), a `clock`, the environment `env` (OTLP's variables), the
    worker's limits, the source of connection ids (`ids`). The Kubernetes layer starts
    listing and watching here, in its own threads; correlation never waits for it."""
    use_returning_pool()
    drops = drops or Drops()
    metrics = metrics or AggregatorMetrics(drops)
    clock = clock or SystemClock()
    owned = store is None or own_store
    # the workload map and the CIDR groups first: a bad one is refused before the store opens
    if resolver is None:
        kubernetes = kubernetes_from(settings)
        resolver = resolver_from(settings, kubernetes)
    the_store: Store = store if store is not None else open_store(
        settings.store, settings.clickhouse_url or settings.data_dir)
    def make_correlator() -> ColumnCorrelator:
        return ColumnCorrelator(resolver, slack=timedelta(seconds=settings.correlation_slack_s),
                                settle=timedelta(seconds=settings.identity_settle_s),
                                clock=clock, ids=ids)

    correlator = make_correlator()
    fanout = FanOut(drops)
    retention = Retention(the_store, settings.retention, clock)
    correlation: Correlation
    if the_store.journal_dir is not None:
        correlation = JournaledCorrelation(
            the_store, correlator, fanout, drops, retention, clock,
            worker or WorkerSettings(max_pending=settings.correlation_backlog))
    elif settings.nats is not None:  # replicas sharing the partitions of a stream
        correlation = PartitionedCorrelation(the_store, make_correlator, fanout, drops,
                                             retention, clock, settings.nats.partitions)
    else:
        correlation = InlineCorrelation(the_store, correlator, fanout, drops, retention, clock)
    intake = Intake(correlation, drops, metrics, max_batch_records=settings.max_batch_records)
    exporters = Exporters(settings, metrics.registry, drops, env=env, clock=clock,
                          before_tick=lambda: correlation.applied(METRICS_WAIT_S),
                          **dict(exporter_kwargs or {}))
    fanout.add_listener(exporters.on_changes)
    metrics.watch_store(correlation.count, the_store.file_bytes)
    metrics.registry.register(_CorrelationMetrics(
        correlation, correlation if isinstance(correlation, PartitionedCorrelation)
        else correlator, fanout))
    p = Pipeline(settings, the_store, correlator, fanout, correlation, intake, exporters,
                 retention, drops, metrics, clock)
    p._owned = owned
    p.kubernetes = kubernetes
    if kubernetes is not None:
        metrics.registry.register(_KubernetesMetrics(kubernetes))
        kubernetes.start()
    correlation.start()
    return p


class _CorrelationMetrics(Collector):
    """How far correlation runs behind the acknowledged batches, and what it holds."""

    def __init__(self, correlation: Correlation,
                 correlator: ColumnCorrelator | PartitionedCorrelation, fanout: FanOut) -> None:
        self.correlation, self.correlator, self.fanout = correlation, correlator, fanout

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        lag = self.correlation.lag()
        for key, what in (("batches", "batches"), ("records", "records"),
                          ("seconds", "age in seconds of the oldest")):
            yield GaugeMetricFamily(f"eastwest_correlation_lag_{key}", f"{what} acknowledged "
                                    "(stored durably) and not correlated yet", value=lag[key])
        yield GaugeMetricFamily("eastwest_journal_bytes", "bytes of the ingest journal: "
                                "batches acknowledged and not applied to the store yet",
                                value=self.correlation.journal_bytes())
        yield GaugeMetricFamily("eastwest_correlator_connections", "connections held by the "
                                "correlator's index (open, or closed in the last minutes)",
                                value=len(self.correlator))
        yield GaugeMetricFamily("eastwest_stream_subscribers", "live flow stream subscribers",
                                value=self.fanout.hub.subscribers)
        yield CounterMetricFamily("eastwest_identity_renames", "ends of connections renamed by "
                                  "a later observer that knew them better (the server's own "
                                  "process, say); their volumes moved to the new name",
                                  value=self.correlator.renames)
        yield CounterMetricFamily("eastwest_identity_late_names", "records that knew an end "
                                  "better after its name was final (--identity-settle): the "
                                  "name was kept", value=self.correlator.late_names)


class _PartitionMetrics(Collector):
    """The NATS partitions this replica owns (aggregator/leases.py)."""

    def __init__(self, consumer: JetStreamConsumer, fanin: LiveFanIn | None,
                 correlation: PartitionedCorrelation | None = None) -> None:
        self.consumer, self.fanin, self.correlation = consumer, fanin, correlation

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily
                                  | HistogramMetricFamily]:
        yield GaugeMetricFamily("eastwest_nats_partitions_owned", "partitions of the NATS "
                                "stream this replica consumes now (its leases)",
                                value=len(self.consumer.owned))
        yield CounterMetricFamily("eastwest_nats_partitions_taken", "partitions this replica "
                                  "took over (each reloaded from the store first)",
                                  value=self.consumer.taken_over)
        if self.fanin is not None:  # its losses: eastwest_dropped_total{stage="stream"}
            yield CounterMetricFamily("eastwest_stream_fanin_published_rows", "connection rows "
                                      "this replica published to the other replicas' live "
                                      "streams (only while one has subscribers)",
                                      value=self.fanin.published_rows)
            yield CounterMetricFamily("eastwest_stream_fanin_received_rows", "connection rows "
                                      "of the other replicas' partitions received for this "
                                      "replica's live stream", value=self.fanin.received_rows)
        c = self.correlation
        if c is None:
            return
        # the coalesced writes of --nats-coalesce: mean shares per write = shares / writes
        writes, shares, records, buckets = c.group_counts()
        yield CounterMetricFamily("eastwest_nats_group_writes", "store writes of a partition's "
                                  "waiting shares (--nats-coalesce), one per coalesced group",
                                  value=writes)
        yield CounterMetricFamily("eastwest_nats_group_shares", "shares (NATS messages) those "
                                  "writes held, duplicates not included", value=shares)
        yield CounterMetricFamily("eastwest_nats_group_records", "records those writes held",
                                  value=records)
        yield HistogramMetricFamily("eastwest_nats_group_size_shares", "shares per coalesced "
                                    "write", buckets=buckets, sum_value=shares)


class _KubernetesMetrics(Collector):
    """The Kubernetes identity layer per resource (aggregator/k8s/watch.py): for alerts, what
    GET /api/v1/status shows in detail."""

    def __init__(self, kubernetes: KubernetesIdentity) -> None:
        self.kubernetes = kubernetes

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        k = self.kubernetes
        synced = GaugeMetricFamily("eastwest_kubernetes_synced", "1 once the resource was "
                                   "listed (until then its lookups answer nothing and lower "
                                   "layers name the ends)", labels=["resource"])
        healthy = GaugeMetricFamily("eastwest_kubernetes_connected", "1 while the resource's "
                                    "list/watch works (0 after an error until a list succeeds)",
                                    labels=["resource"])
        objects = GaugeMetricFamily("eastwest_kubernetes_objects", "objects of the resource "
                                    "indexed now", labels=["resource"])
        errors = CounterMetricFamily("eastwest_kubernetes_errors", "failed lists and watches "
                                     "(TLS, 401, 403, network, 5xx), each followed by a "
                                     "backoff and a new list", labels=["resource"])
        lists = CounterMetricFamily("eastwest_kubernetes_lists", "full lists, by why",
                                    labels=["resource", "reason"])
        events = CounterMetricFamily("eastwest_kubernetes_events", "watch events applied "
                                     "(ADDED, MODIFIED, DELETED)", labels=["resource"])
        for r, st in k.state.items():
            synced.add_metric([r], float(st.synced))
            healthy.add_metric([r], float(st.synced and st.last_error is None))
            objects.add_metric([r], k.index.objects.get(r, 0))
            errors.add_metric([r], st.errors)
            lists.add_metric([r, "gone"], st.relists_gone)
            lists.add_metric([r, "start_or_error"], max(0, st.lists - st.relists_gone))
            events.add_metric([r], st.events)
        yield from (synced, healthy, objects, errors, lists, events)
