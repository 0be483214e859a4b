"""The aggregator's exporters: Prometheus edge series and OTLP traces/metrics (issue #7).

Stage: after correlation. In: every step the correlation worker has written, as columns
(`Changes`, aggregator/changes.py; a listener of the fan-out, aggregator/fanout.py). Out: per-edge series on /metrics (prometheus.py), and when OTLP is
configured (otlp_config.py) spans and metrics to an OTLP receiver (otlp.py).

Wiring: aggregator/pipeline.py builds them and adds `on_changes` to the fan-out's listeners. Byte, retransmit and connection
counts move once a connection's names are final (named.py: at once when they are, else within
the correlator's settle time); failures, RTT and spans when a connection is complete
(completion.py: closed, quiet, and its names final), which a ticker thread checks twice a second
while the app runs (started and stopped by the app's lifespan; `tick()` by hand in tests).
Link-local and multicast connections are left out unless `--export-link-local`.

Across a restart: at shutdown the connections told lately are written to the data folder
(`exporters-told.json`: connection id -> whether its span pair was whole); the next process
reads it, so a later record of such a connection (a server's or the wire's final, delivered
after the restart) tells nothing twice: no failure or RTT counted again, and OTLP sends only
the SERVER span that was missing (Tempo pairs it with the CLIENT span it holds; a pair sent twice
would be counted twice). A crash writes nothing: then such connections may be told again.
Docs: docs/integrations.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aggregator.changes import Changes
from aggregator.exporters.completion import Completions
from aggregator.exporters.edges import EdgeLabels
from aggregator.exporters.named import NamedDeltas, link_local_mask
from aggregator.exporters.otlp_config import LATE_REASONS, OtlpConfig
from aggregator.exporters.prometheus import EdgeMetrics
from aggregator.settings import AggregatorSettings
from aggregator.store.derived import DUCKDB_CONN_SCHEMA
from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops

log = logging.getLogger("eastwest.exporters")
STATE_FILE = "exporters-told.json"
MAX_TOLD = 200_000
TICK_S = 0.5
EMPTY = pa.Table.from_batches([], schema=DUCKDB_CONN_SCHEMA)
# self-metrics of this package (dashboards may only use names defined in code)
METRIC_NAMES = ("eastwest_export_pending_connections", "eastwest_export_completed_connections_total",
                "eastwest_otlp_queue_spans", "eastwest_otlp_spans_exported_total",
                "eastwest_otlp_export_requests_total", "eastwest_otlp_connections_total",
                "eastwest_otlp_late_spans_total", "eastwest_otlp_folded_connections_total")


class Exporters:
    def __init__(self, settings: AggregatorSettings, registry: CollectorRegistry, drops: Drops, *,
                 env: Mapping[str, str] | None = None, clock: Clock | None = None,
                 before_tick: Callable[[], object] | None = None,
                 otlp_kwargs: Mapping[str, Any] | None = None) -> None:
        self.drops = drops
        clock = clock or SystemClock()
        self.before_tick = before_tick  # correlation catches up first: every ack is told
        self.labels = EdgeLabels(max(2, settings.edge_budget))
        self.completions = Completions(settings.export_settle_s, drops, clock=clock)
        self.link_local = settings.export_link_local
        self.named = NamedDeltas(drops, link_local=self.link_local, clock=clock)
        self.prometheus = EdgeMetrics(registry, self.labels)
        self.otlp = None
        config = OtlpConfig.resolve(settings, env)
        if config is not None:
            from aggregator.exporters.otlp import OtlpExporter

            self.otlp = OtlpExporter(config, drops, self.labels,
                                     **{"clock": clock, **dict(otlp_kwargs or {})})
        self._state: Path | None = (Path(settings.data_dir) / STATE_FILE
                                    if settings.data_dir is not None else None)
        self.previous: dict[str, bool] = self._load()
        registry.register(_SelfMetrics(self))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # -- in -------------------------------------------------------------------------------------
    def on_changes(self, ch: Changes) -> None:
        """A written step's changes (aggregator/changes.py), in commit order."""
        with self._tick_lock:
            self._released(self.named.on_changes(ch))
        self.completions.update(ch)

    def _released(self, released: pa.Table | None) -> None:
        if released is not None and released.num_rows:
            self.prometheus.on_released(released)
            if self.otlp is not None:
                self.otlp.on_released(released)

    def tick(self, now: float | None = None, *, everything_closed: bool = False) -> pa.Table:
        """Count the connections whose names became final, and tell the exporters about the
        connections complete by now; returns their rows."""
        if self.before_tick is not None:
            self.before_tick()
        with self._tick_lock:
            self._released(self.named.due(everything=everything_closed))
            done = self.completions.due(now, everything_closed=everything_closed)
            if done is None:
                return EMPTY
            if not self.link_local:
                done = done.filter(pa.array(~link_local_mask(done)))
            fresh, spans, redo = self._not_told_before(done)
            if fresh.num_rows:
                self.prometheus.on_complete(fresh)
            if self.otlp is not None and spans.num_rows:
                self.otlp.on_complete(spans, frozenset(redo))
            return fresh

    def _not_told_before(self, done: pa.Table) -> tuple[pa.Table, pa.Table, set[str]]:
        """`done` less what an earlier process told (exporters-told.json); the rows for OTLP
        (those, and the ones an earlier process told without their SERVER span); the ids of
        the latter."""
        if not self.previous or not done.num_rows:
            return done, done, set()
        ids = done.column("conn_id").to_pylist()
        before = [self.previous.pop(cid, None) for cid in ids]
        if all(b is None for b in before):
            return done, done, set()
        redo = {cid for cid, b in zip(ids, before, strict=True) if b is False}
        fresh = done.filter(pa.array([b is None for b in before]))
        spans = done.filter(pa.array([b is not True for b in before])) if redo else fresh
        return fresh, spans, redo

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="exporters", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep exporting; the cause is logged
                log.exception("exporters: tick failed")
                self.drops.count("exporters", "tick_error")

    def force_flush(self) -> None:
        """Export everything told so far, also what a tick in progress (the ticker thread) has
        taken from the completions and not yet handed to OTLP: the tick lock is waited for,
        not held across the export (the fan-out, and so the writer, takes it too)."""
        with self._tick_lock:
            pass
        if self.otlp is not None:
            self.otlp.force_flush()

    def shutdown(self) -> None:
        """Stop ticking, tell every closed connection now, drain the OTLP queue, close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.tick(everything_closed=True)
        if self.otlp is not None:
            self.otlp.shutdown()
        self._save()

    # -- across a restart -----------------------------------------------------------------------
    def _load(self) -> dict[str, bool]:
        if self._state is None:
            return {}
        try:
            got = json.loads(self._state.read_text())
            return {str(k): bool(v) for k, v in got.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("exporters: %s unreadable (%r); connections told before the restart "
                        "may be told again", self._state, exc)
            self.drops.count("exporters", "told_state_unreadable")
            return {}

    def _save(self) -> None:
        if self._state is None:
            return
        told: dict[str, bool] = dict(self.previous)  # not seen again: kept for the next one
        if self.otlp is not None:
            told.update(self.otlp.told)
        else:
            told.update(dict.fromkeys(self.completions.told_ids(), True))
        items = list(told.items())[-MAX_TOLD:]
        tmp = self._state.with_suffix(".tmp")
        try:
            self._state.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(dict(items), separators=(",", ":")))
            os.replace(tmp, self._state)
        except OSError as exc:
            log.warning("exporters: cannot write %s: %r", self._state, exc)


class _SelfMetrics(Collector):
    def __init__(self, ex: Exporters) -> None:
        self.ex = ex

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ex = self.ex
        yield GaugeMetricFamily("eastwest_export_pending_connections", "connections waiting to "
                                "be complete (closed and settled) before spans, failures and RTT",
                                value=ex.completions.pending)
        yield CounterMetricFamily("eastwest_export_completed_connections", "connections told "
                                  "to the exporters as complete", value=ex.completions.told)
        otlp = ex.otlp
        spans = otlp.spans if otlp is not None else None
        yield GaugeMetricFamily("eastwest_otlp_queue_spans", "spans waiting for OTLP export",
                                value=len(spans) if spans is not None else 0)
        yield CounterMetricFamily("eastwest_otlp_spans_exported", "spans the OTLP receiver "
                                  "accepted", value=spans.exported if spans is not None else 0)
        req = CounterMetricFamily("eastwest_otlp_export_requests", "OTLP span export requests "
                                  "(retries inside one request not counted), by result",
                                  labels=["result"])
        ok = (spans.export_requests - spans.failed_requests) if spans is not None else 0
        req.add_metric(["ok"], ok)
        req.add_metric(["failed"], spans.failed_requests if spans is not None else 0)
        yield req
        conns = CounterMetricFamily("eastwest_otlp_connections", "completed connections, by "
                                    "what OTLP did with them (queued as spans, filtered out by "
                                    "--otlp-filter, sampled out)", labels=["result"])
        for k in ("queued", "filtered", "sampled_out"):
            conns.add_metric([k], otlp.connections[k] if otlp is not None else 0)
        yield conns
        late = CounterMetricFamily("eastwest_otlp_late_spans", "spans older than --otlp-late-after "
                                   "(Tempo's ingestion slack) when queued or sent: Tempo keeps the "
                                   "trace but draws no edge from it; by reason", labels=["reason"])
        counts = otlp.late_counts() if otlp is not None else {}
        for k in LATE_REASONS:
            late.add_metric([k], counts.get(k, 0))
        yield late
        yield CounterMetricFamily("eastwest_otlp_folded_connections", "connections past the edge "
                                  "budget whose external ends were exported as `external`",
                                  value=otlp.folded if otlp is not None else 0)
