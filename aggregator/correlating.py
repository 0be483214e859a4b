"""The correlating store: ingest -> correlate -> one transaction in the store -> live subscribers.

Stage: wraps the `FlowStore` that ingest (aggregator/ingest.py) writes to, so ingest itself is
unchanged. In: a batch of validated records with its `(collector, batch_seq)`. Out: the raw
records AND the batch's correlated connections, rollup deltas and workloads committed together
(aggregator/store/derived.py); then the correlator's memory advances and the updated connections
are published to the live stream (`LiveHub`, used by GET /api/v1/flows/stream).

Order under one lock: duplicate check -> plan (on copies) -> store commit -> correlator commit.
The connections the correlator pruned (it will never change them again) go to the store with the
next batch, in its transaction (DuckDB moves them out of its small table of changing ones).
A store failure leaves memory untouched, so a retried batch correlates exactly as the first try
would have. At start the correlator's index is rebuilt from the store (restart safety).
Listeners (`add_listener`; the exporters of aggregator/exporters/) get each committed `Plan`, in
commit order, under the lock: they must be quick and must not raise (a failure is counted as
`exporters/listener_error` and logged, never fails the ingest).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aggregator.connection import Connection
from aggregator.correlate import Correlator, Plan
from aggregator.store.base import FlowStore, IngestResult
from aggregator.store.columns import gc_paused
from aggregator.store.derived import derived_of
from eastwest.drops import Drops
from eastwest.record import FlowRecord

log = logging.getLogger("eastwest.aggregator")
RETENTION_EVERY_S = 600.0


class LiveHub:
    """Fan-out of updated connections to SSE subscribers; a slow subscriber loses events, and
    the loss is counted (`stream/subscriber_slow`), never blocks ingest."""

    def __init__(self, drops: Drops, queue_size: int = 10_000) -> None:
        self.drops = drops
        self.queue_size = queue_size
        self._subs: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Connection]]] = set()
        self._lock = threading.Lock()

    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue[Connection]]:
        queue: asyncio.Queue[Connection] = asyncio.Queue(self.queue_size)
        sub = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Connection]]) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, conns: Sequence[Connection]) -> None:
        with self._lock:
            subs = list(self._subs)
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(self._put, queue, list(conns))
            except RuntimeError:
                self.unsubscribe((loop, queue))  # its loop is gone

    def _put(self, queue: asyncio.Queue[Connection], conns: list[Connection]) -> None:
        for c in conns:
            try:
                queue.put_nowait(c)
            except asyncio.QueueFull:
                self.drops.count("stream", "subscriber_slow")


class CorrelatingStore:
    """A `FlowStore` whose ingest also correlates; every other call goes to the inner store."""

    def __init__(self, inner: FlowStore, correlator: Correlator, drops: Drops, *,
                 retention: timedelta | None = None) -> None:
        self.inner = inner
        self.correlator = correlator
        self.hub = LiveHub(drops)
        self.drops = drops
        self.listeners: list[Callable[[Plan], None]] = []
        self.retention = retention
        self._last_retention = 0.0
        horizon = correlator.keep_open.total_seconds()
        self.loaded = correlator.load(inner.recent_connections(horizon))
        if self.loaded:
            log.info("correlator: %d recent connections reloaded from the store", self.loaded)
        self.maybe_apply_retention()

    def ingest(self, collector: str, batch_seq: int, records: Sequence[FlowRecord],
               derived: Any = None) -> IngestResult:
        with self.correlator.lock, gc_paused():
            if self.inner.batch_applied(collector, batch_seq):
                return IngestResult(collector, batch_seq, 0, True)
            plan = self.correlator.plan(records)
            settled = list(self.correlator.settled)
            result = self.inner.ingest(collector, batch_seq, records,
                                       derived=derived_of(plan, settled))
            if not result.duplicate:
                del self.correlator.settled[:len(settled)]  # handed over with this batch
                self.correlator.commit(plan)
                self._notify(plan)
        if not result.duplicate and plan.connections and self.hub.subscribers:
            self.hub.publish(list(plan.connections.values()))
        self.maybe_apply_retention()
        return result

    def add_listener(self, fn: Callable[[Plan], None]) -> None:
        """Call `fn(plan)` after each committed batch (in commit order, under the lock)."""
        self.listeners.append(fn)

    def _notify(self, plan: Plan) -> None:
        for fn in self.listeners:
            try:
                fn(plan)
            except Exception as exc:  # noqa: BLE001 - an exporter never fails the ingest
                self.drops.count("exporters", "listener_error", detail=f"{fn!r}: {exc!r}")

    def maybe_apply_retention(self, now: datetime | None = None) -> dict[str, int]:
        if self.retention is None:
            return {}
        mono = time.monotonic()
        if now is None and mono - self._last_retention < RETENTION_EVERY_S and self._last_retention:
            return {}
        self._last_retention = mono
        cutoff = (now or datetime.now(UTC)) - self.retention
        return self.inner.apply_retention(cutoff)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
