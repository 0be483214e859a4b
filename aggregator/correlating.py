"""The correlating store: ingest -> durable raw store (acknowledged) -> correlation behind it.

Stage: wraps the `FlowStore` that ingest (aggregator/ingest.py) writes to, so ingest itself is
unchanged. In: a batch of validated records with its `(collector, batch_seq)`. Out: the raw
records stored durably (what the 200 acknowledges), then the batch's correlated connections,
rollup deltas and workloads (aggregator/store/derived.py); the correlator's memory advances and
the updated connections are published to the live stream (`LiveHub`, GET /api/v1/flows/stream).

Background mode (a store with `write_batches` and a `journal_dir`: DuckDB). `ingest` appends
the batch (its wire bytes) to the journal (aggregator/store/journal.py) and syncs it: the ack
means "durably stored, never lost", at the cost of a file append (~0.4 ms) instead of a store
transaction (~20 ms a batch of 5,000, competing with correlation for the database and the
cores). The worker drains the queue of accepted batches in the order they were journaled: the
batch at the head, with the batches waiting behind it up to `coalesce` records, in ONE plan
(records oldest first, as within a batch), then ONE store transaction that writes their raw
records, their marks and the derived tables; then the journal forgets them. The worker is two
threads: a planner (decode, plan, the correlator's memory advanced, tables built) and a writer
(the store transaction, then listeners and subscribers); the planner goes at most
`WRITE_AHEAD` steps ahead, so planning overlaps the store's work (DuckDB releases the GIL).
A failed write leaves the store untouched; every step not written goes back to the queue in
order, the correlator's memory is rebuilt from the store (as at a restart) and the batches are
retried a second later.
Grouping batches when behind writes a connection reported in several of them once, not once per
batch (1.5x the drain rate, bench/bench_store.py); the connections and their totals do not
depend on the grouping, only which minute of a rollup a delta lands in can (the minute of the
earliest record that raised a counter, within what one plan sees). The queue is bounded
(`max_pending` records): when the worker lags that far, `ingest` waits up to `admit_wait_s` for
room, then raises `Backlogged` (HTTP 429 with Retry-After: back-pressure to the collectors,
whose spools hold the rest, without holding a server thread per waiting collector). `lag()`
tells how far behind it is (Prometheus gauges).
Reads of what the worker writes (`records`, `connections`, `edge_*`, `workload_rows`,
`connection_count`, retention, checkpoint) first wait for the queue to drain (`flush`, at most
`read_wait_s`), so every answer includes every batch acknowledged before the read; `count()`
and `batch_applied()` answer at once, journal included. A batch is a duplicate when it is in
the journal or in the store. On start, the journal is replayed: what the store has not applied
is queued again, in order (a file written by an older version may also hold raw batches flagged
not correlated: they are queued first).

Synchronous mode (other backends, e.g. ClickHouse): order under one lock: duplicate check -> plan
(on copies) -> store commit of raw + derived -> correlator commit. A store failure leaves memory
untouched, so a retried batch correlates exactly as the first try would have.

Either way: the connections the correlator pruned (it will never change them again) go to the
store with the next write, in its transaction (DuckDB moves them out of its small table of
changing ones). At start the correlator's index is rebuilt from the store (restart safety).
Listeners (`add_listener`; the exporters of aggregator/exporters/) get each committed `Plan`, in
commit order, under the lock: they must be quick and must not raise (a failure is counted as
`exporters/listener_error` and logged, never fails the ingest).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aggregator.connection import Connection
from aggregator.correlate import Correlator, Plan
from aggregator.store.base import Backlogged, FlowStore, IngestResult, StoreError
from aggregator.store.columns import flat_table, gc_paused
from aggregator.store.derived import Derived, derived_of
from aggregator.store.journal import Entry, Journal
from aggregator.store.wire_columns import ColumnBatch, decode_columns
from eastwest import codec
from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops
from eastwest.record import FlowRecord

log = logging.getLogger("eastwest.aggregator")
RETENTION_EVERY_S = 600.0
MAX_PENDING = 500_000    # records accepted but not correlated yet, before ingest waits
COALESCE = 20_000        # records of waiting batches correlated in one plan and transaction
READ_WAIT_S = 30.0       # how long a read waits for correlation to catch up
ADMIT_WAIT_S = 2.0       # how long an ingest waits for room in a full backlog, then 429
WRITE_AHEAD = 2          # planned steps waiting for the store writer, at most
CACHE_RECORDS_BELOW = 50_000  # backlog (records) under which records given as objects stay cached
HOLD_S = 1.0             # the live stream holds a connection this long for the names of its ends
# reads of what correlation writes: they wait until the accepted batches are correlated
_AFTER_FLUSH = frozenset({"records", "connections", "connection_count", "edge_counts", "edge_volumes",
                          "edge_columns", "workload_rows", "recent_connections", "apply_retention",
                          "checkpoint"})



class _Step:
    """Batches planned by the worker's planner, for its writer."""

    __slots__ = ("take", "raw", "derived", "stored", "entries")

    def __init__(self, take: list[tuple[str, int, Pending, int, float]],
                 raw: list[tuple[str, int, Any, int]], derived: Derived,
                 stored: list[tuple[str, int]], entries: list[Entry]) -> None:
        self.take, self.raw, self.derived = take, raw, derived
        self.stored, self.entries = stored, entries


class StoredBatch:
    """A batch stored raw but not correlated when the aggregator stopped: its records are read
    back from the store when its turn comes (not all of the backlog at start)."""

    __slots__ = ("store", "collector", "batch_seq")

    def __init__(self, store: Any, collector: str, batch_seq: int) -> None:
        self.store, self.collector, self.batch_seq = store, collector, batch_seq

    def records(self) -> list[FlowRecord]:
        return self.store.batch_records(self.collector, self.batch_seq)  # type: ignore[no-any-return]


# what waits for the worker: a journaled batch, or (a file of an older version) a batch stored
# raw and not correlated
Pending = Entry | StoredBatch
_RECORDS_FORM = -1  # an Entry's `rejected` is [_RECORDS_FORM]: its body encodes records as given


def journal_form(records: Sequence[FlowRecord], collector: str, batch_seq: int) -> bytes:
    """Records handed over as objects (JSON ingest, JetStream, tests) in the journal's form: a
    wire batch of exactly these records (no collector check: ingest did its own)."""
    return codec.encode_batch(codec.Batch(collector, batch_seq, datetime.now(UTC), list(records)))


def entry_contents(entry: Entry) -> tuple[list[FlowRecord], Any]:
    """A journaled batch's records and its raw rows (`flat_table` layout, or None)."""
    if entry.cached is not None:
        recs: list[FlowRecord] = entry.cached
    elif list(entry.rejected) == [_RECORDS_FORM]:
        recs = codec.decode_batch(entry.body).records
    else:
        cb = decode_columns(entry.body)  # the same bytes decode as they did at ingest
        return cb.records(), cb.table
    return recs, (flat_table(recs) if recs else None)


class LiveHub:
    """Fan-out of updated connections to SSE subscribers; a slow subscriber loses events, and
    the loss is counted (`stream/subscriber_slow`), never blocks ingest.

    A connection whose ends are not both named by what their best-placed observers know yet
    (`Connection.ends_known`: the client's or the server's own record has not arrived, so an
    end may still be renamed, aggregator/correlate.py) is held up to `hold_s` (1 s) for it:
    a newer version replaces the held one, and it is sent once it knows its ends or the second
    is up. The stream so shows a connection under the names it keeps, unless an observer
    reports more than a second after another (then the later event carries the new names,
    with the same `id`)."""

    def __init__(self, drops: Drops, queue_size: int = 10_000, *, hold_s: float = HOLD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.drops = drops
        self.queue_size = queue_size
        self.hold_s = hold_s
        self.clock = clock
        self._subs: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Connection]]] = set()
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Connection, float]] = {}  # conn_id -> (latest, held since)
        self._releaser: threading.Thread | None = None

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

    @property
    def held(self) -> int:
        return len(self._held)

    def publish(self, conns: Sequence[Connection]) -> None:
        now = self.clock()
        ready: list[Connection] = []
        with self._lock:
            held = self._held
            for c in conns:
                since = held.get(c.conn_id)
                t0 = since[1] if since is not None else now
                if self.hold_s <= 0 or c.ends_known() or now - t0 >= self.hold_s:
                    if since is not None:
                        del held[c.conn_id]
                    ready.append(c)
                else:
                    held[c.conn_id] = (c, t0)
            if held and (self._releaser is None or not self._releaser.is_alive()):
                self._releaser = threading.Thread(target=self._release_held,
                                                  name="eastwest-stream-hold", daemon=True)
                self._releaser.start()
        self._send(ready)

    def release(self, now: float | None = None) -> int:
        """Send the held connections whose second is up by `now`; how many are still held."""
        now = self.clock() if now is None else now
        with self._lock:
            due = [cid for cid, (_, t0) in self._held.items() if now - t0 >= self.hold_s]
            ready = [self._held.pop(cid)[0] for cid in due]
            left = len(self._held)
        self._send(ready)
        return left

    def _release_held(self) -> None:
        while self.release():
            time.sleep(min(0.1, self.hold_s / 4))

    def _send(self, conns: list[Connection]) -> None:
        if not conns:
            return
        with self._lock:
            subs = list(self._subs)
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(self._put, queue, conns)
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
                 retention: timedelta | None = None, background: bool | None = None,
                 max_pending: int = MAX_PENDING, coalesce: int = COALESCE,
                 read_wait_s: float = READ_WAIT_S, admit_wait_s: float = ADMIT_WAIT_S,
                 clock: Clock | None = None) -> None:
        self.inner = inner
        self.clock = clock or SystemClock()  # wall time for retention's cutoff
        self.correlator = correlator
        self.hub = LiveHub(drops)
        self.drops = drops
        self.listeners: list[Callable[[Plan], None]] = []
        self.retention = retention
        self._last_retention = 0.0
        self.background = (hasattr(inner, "write_batches") and hasattr(inner, "journal_dir")
                           if background is None else background)
        self.max_pending = max_pending
        self.coalesce = coalesce
        self.read_wait_s = read_wait_s
        self.admit_wait_s = admit_wait_s
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, int, Pending, int, float]] = deque()
        self._pending = 0          # records accepted and not yet applied (queued or in flight)
        self._in_flight = 0        # batches taken by the worker, not committed yet
        self._flight_records = 0   # journaled records among them
        self._journaled: set[tuple[str, int]] = set()  # in the journal, not applied yet
        self._max_seq: dict[str, int] = {}  # per collector: the highest batch_seq journaled or stored
        self._stopping = False
        self._ack_lock = threading.Lock()  # duplicate check, journal append, queue: one order
        self._worker: threading.Thread | None = None   # the writer
        self._planner: threading.Thread | None = None
        self._writes: deque[_Step] = deque()  # planned, not written yet, in order
        self._failed: Exception | None = None  # a write failed: the planner resets
        self.correlated_batches = 0
        self._accepted = 0         # batches ever queued; the worker takes them in this order
        self.journal: Journal | None = None
        horizon = correlator.keep_open.total_seconds()
        self.loaded = correlator.load(inner.recent_connections(horizon))
        if self.loaded:
            log.info("correlator: %d recent connections reloaded from the store", self.loaded)
        if self.background:
            self.journal = Journal(inner.journal_dir)  # type: ignore[attr-defined]
            self._requeue()
            self._planner = threading.Thread(target=self._run, name="eastwest-correlator",
                                             daemon=True)
            self._worker = threading.Thread(target=self._write, name="eastwest-store-writer",
                                            daemon=True)
            self._planner.start()
            self._worker.start()
        self._maybe_retention()

    def _requeue(self) -> None:
        """At start: batches a file of an older version stored raw and did not correlate, then
        the journal's entries the store has not applied, in the order they came."""
        assert self.journal is not None
        now = time.monotonic()
        for coll, seq, n in self.inner.uncorrelated_batches():  # type: ignore[attr-defined]
            self._queue.append((coll, seq, StoredBatch(self.inner, coll, seq), n, now))
            self._pending += n
            self._accepted += 1
        entries = list(self.journal.replay())
        applied = self.inner.applied_marks(  # type: ignore[attr-defined]
            [(e.collector, e.batch_seq) for e in entries])
        done = []
        for e in entries:
            key = (e.collector, e.batch_seq)
            if key in applied or key in self._journaled:
                done.append(e)  # applied before the stop, not forgotten yet
                continue
            self._journaled.add(key)
            self._queue.append((e.collector, e.batch_seq, e, e.records, now))
            self._pending += e.records
            self._accepted += 1
            if e.collector not in self._max_seq:  # the store's highest first, then the journal's
                self._max_seq[e.collector] = self.inner.max_batch_seq(  # type: ignore[attr-defined]
                    e.collector)
            self._max_seq[e.collector] = max(self._max_seq[e.collector], e.batch_seq)
        self.journal.release(done)
        if self.journal.corrupt:
            self.drops.count("journal", "damaged_entry", self.journal.corrupt,
                             detail=f"journal {self.journal.dir}: see the log")
        if self._queue:
            log.info("store: %d batches (%d records) acknowledged before the stop and not "
                     "applied yet: queued", len(self._queue), self._pending)

    # -- ingest -------------------------------------------------------------------------------
    def ingest(self, collector: str, batch_seq: int, records: Sequence[FlowRecord],
               derived: Any = None) -> IngestResult:
        if not self.background:
            return self._ingest_sync(collector, batch_seq, records)
        recs = list(records)
        return self._accept(collector, batch_seq, len(recs), [_RECORDS_FORM],
                            lambda: journal_form(recs, collector, batch_seq), recs)

    def ingest_columns(self, batch: ColumnBatch, body: bytes | None = None) -> IngestResult:
        """A batch decoded straight into columns (aggregator/store/wire_columns.py): the journal
        takes `body` (the batch's wire bytes) and the indices of the records ingest rejected;
        the worker decodes it again behind the ack. Synchronous mode (or no body) takes the
        records now."""
        if not self.background or body is None:
            return self.ingest(batch.collector, batch.batch_seq, batch.records())
        return self._accept(batch.collector, batch.batch_seq, batch.table.num_rows,
                            [i for i, _, _ in batch.rejected], lambda: body, None)

    def _accept(self, collector: str, batch_seq: int, n: int, rejected: list[int],
                body: Callable[[], bytes], cached: list[FlowRecord] | None) -> IngestResult:
        assert self.journal is not None
        key = (collector, batch_seq)
        with self._cond:  # back-pressure: the worker is `max_pending` records behind
            deadline = time.monotonic() + self.admit_wait_s
            while self._pending >= self.max_pending and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:  # answered, not held: a fleet of senders would hold every thread
                    self.drops.count("ingest", "backlogged", n)
                    raise Backlogged(f"the aggregator is {self._pending:,} records behind "
                                     f"(--correlation-backlog {self.max_pending:,}): retry later")
                self._cond.wait(left)
        with self._ack_lock:
            with self._cond:
                journaled = key in self._journaled
            # in the journal, or applied (the worker forgets a key only once it is applied)
            if journaled or self._applied(collector, batch_seq):
                return IngestResult(collector, batch_seq, 0, True)
            entry = self.journal.append(collector, batch_seq, n, rejected, body())  # durable
            # records handed over as objects stay in memory while the backlog is short (~1 KB a
            # record); behind a deep one they are decoded from the journal's bytes when due
            entry.cached = cached if self._pending < CACHE_RECORDS_BELOW else None
            if batch_seq > self._max_seq[collector]:
                self._max_seq[collector] = batch_seq
            with self._cond:
                self._journaled.add(key)
                self._queue.append((collector, batch_seq, entry, n, time.monotonic()))
                self._pending += n
                self._accepted += 1
                self.correlator.touch()
                self._cond.notify_all()
        return IngestResult(collector, batch_seq, n, False)

    def _applied(self, collector: str, batch_seq: int) -> bool:
        """Whether the store has applied this batch, without asking it in the common case: a
        collector numbers its batches upwards, so a `batch_seq` above every one journaled or
        stored for it is new (the store is asked once per collector, then for retries only).
        Called under `_ack_lock`: only the ack path journals."""
        top = self._max_seq.get(collector)
        if top is None:
            top = self._max_seq[collector] = int(self.inner.max_batch_seq(  # type: ignore[attr-defined]
                collector))
        return batch_seq <= top and bool(self.inner.batch_applied(collector, batch_seq))

    def count(self) -> int:
        """Records stored durably: in the store, and journaled not applied yet."""
        with self._cond:
            journaled = sum(n for _, _, p, n, _ in self._queue if isinstance(p, Entry))
            journaled += self._flight_records
        return int(self.inner.count()) + journaled

    def batch_applied(self, collector: str, batch_seq: int) -> bool:
        with self._cond:
            if (collector, batch_seq) in self._journaled:
                return True
        return bool(self.inner.batch_applied(collector, batch_seq))

    def _ingest_sync(self, collector: str, batch_seq: int,
                     records: Sequence[FlowRecord]) -> IngestResult:
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
        self._maybe_retention()
        return result

    # -- the worker (background mode): a planner and a writer -----------------------------------
    # The planner decodes the batches it takes, plans them and advances the correlator's memory
    # at once (optimistically), then hands the step to the writer and takes the next batches
    # while the writer's transaction runs (DuckDB releases the GIL: the two overlap on two
    # cores). At most `WRITE_AHEAD` steps wait for the writer. When a write fails, memory is
    # ahead of the store: the planner puts every step not written back at the head of the
    # queue, in order, rebuilds the correlator's memory from the store (as a restart does) and
    # goes on after a second. Listeners and subscribers hear of a step once it is written.
    def _run(self) -> None:
        try:
            self._plan_steps()
        finally:
            with self._cond:
                self._cond.notify_all()  # the writer waits for the planner's end to stop

    def _plan_steps(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._failed is not None
                                              or len(self._writes) >= WRITE_AHEAD):
                    if self._failed is not None:
                        break
                    self._cond.wait()
                if self._failed is not None:
                    if self._stopping:
                        return  # what is left is in the journal: done at the next start
                    steps = list(self._writes)
                    self._writes.clear()
                    for step in reversed(steps):
                        self._queue.extendleft(reversed(step.take))
                    self._in_flight = self._flight_records = 0
                    self._cond.notify_all()
                    reset = True
                elif not self._queue:
                    return  # stopping, nothing left
                else:
                    reset = False
                    # behind: the waiting batches (up to `coalesce` records) in one plan and one
                    # transaction: a connection reported in several of them is written once
                    take = [self._queue.popleft()]
                    n = take[0][3]
                    while self._queue and n + self._queue[0][3] <= self.coalesce:
                        n += self._queue[0][3]
                        take.append(self._queue.popleft())
                    self._in_flight += len(take)
                    self._flight_records += sum(t[3] for t in take if isinstance(t[2], Entry))
            if reset:
                self._reset_memory()
                continue
            try:
                self._correlate(take)
            except Exception as exc:  # noqa: BLE001 - a StoreError, or a bug: never lose batches
                with self._cond:
                    self._queue.extendleft(reversed(take))
                    self._in_flight -= len(take)
                    self._flight_records -= sum(t[3] for t in take if isinstance(t[2], Entry))
                    self._cond.notify_all()
                if not self._failed_step(exc, n, len(take)):
                    return

    def _failed_step(self, exc: Exception, records: int, batches: int) -> bool:
        """Count and log a failed step; False when the worker must stop (the store closed,
        or stopping), else True after a pause."""
        self.drops.count("correlate", "store_unavailable", records, detail=repr(exc))
        if not isinstance(exc, StoreError):
            log.error("the worker failed on %d batches", batches, exc_info=exc)
        if getattr(self.inner, "_closed", False) or self._stopping:
            return False  # in the journal (or flagged not correlated): done at the next start
        time.sleep(1.0)
        return True

    def _reset_memory(self) -> None:
        """After a failed write: the correlator's memory again as the store has it."""
        while True:
            try:
                with self.correlator.lock:
                    self.correlator.index.clear()
                    self.correlator.high_water = None
                    del self.correlator.settled[:]
                    self.correlator.load(self.inner.recent_connections(
                        self.correlator.keep_open.total_seconds()))
                break
            except Exception as exc:  # noqa: BLE001 - the store still failing
                if not self._failed_step(exc, 0, 0):
                    return
        time.sleep(1.0)
        with self._cond:
            self._failed = None
            self._cond.notify_all()

    def _correlate(self, take: list[tuple[str, int, Pending, int, float]]) -> None:
        """The planner's step: the batches taken, decoded and planned (the correlator's memory
        advances), their tables built; then handed to the writer."""
        entries = [p for _, _, p, _, _ in take if isinstance(p, Entry)]
        # applied already: only when a stop fell between the store's commit and the journal's
        # release and the replay raced it; cheap (one query), and it keeps a retry exact
        applied = self.inner.applied_marks(  # type: ignore[attr-defined]
            [(e.collector, e.batch_seq) for e in entries])
        records: list[FlowRecord] = []
        raw: list[tuple[str, int, Any, int]] = []
        stored: list[tuple[str, int]] = []
        with gc_paused():
            for coll, seq, p, _, _ in take:
                if isinstance(p, Entry):
                    if (coll, seq) in applied:
                        continue
                    recs, table = entry_contents(p)
                    raw.append((coll, seq, table, len(recs)))
                else:
                    recs = p.records()
                    stored.append((coll, seq))
                records.extend(recs)
        with self.correlator.lock, gc_paused():
            plan = self.correlator.plan(records)
            settled = list(self.correlator.settled)
            derived = derived_of(plan, settled)
            derived.prepare()  # nothing after this can fail: memory advances last
            del self.correlator.settled[:len(settled)]
            self.correlator.commit(plan)
        with self._cond:
            self._writes.append(_Step(take, raw, derived, stored, entries))
            self._cond.notify_all()

    def _write(self) -> None:
        """The writer: each planned step in one store transaction, in order."""
        while True:
            with self._cond:
                while not self._writes or self._failed is not None:
                    if self._stopping and (not self._writes or self._failed is not None) and (
                            self._planner is None or not self._planner.is_alive()):
                        return
                    self._cond.wait()
                step = self._writes[0]
            try:
                self.inner.write_batches(  # type: ignore[attr-defined]
                    step.raw, step.derived, step.stored)
            except Exception as exc:  # noqa: BLE001 - a StoreError, or a bug: never lose batches
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()
                n = sum(t[3] for t in step.take)
                if not self._failed_step(exc, n, len(step.take)):
                    return
                continue
            plan = step.derived.plan
            with self.correlator.lock:
                self._notify(plan)
            assert self.journal is not None
            self.journal.release(step.entries)
            with self._cond:
                self._writes.popleft()
                self._pending -= sum(t[3] for t in step.take)
                self._in_flight -= len(step.take)
                self._flight_records -= sum(t[3] for t in step.take if isinstance(t[2], Entry))
                self._journaled.difference_update((c, q) for c, q, _, _, _ in step.take)
                self.correlated_batches += len(step.take)
                self._cond.notify_all()
            if plan.connections and self.hub.subscribers:
                self.hub.publish(list(plan.connections.values()))
            try:
                self._maybe_retention()
            except StoreError as exc:
                self.drops.count("correlate", "retention_failed", detail=str(exc))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch accepted before this call is correlated and stored (batches
        accepted meanwhile are not waited for: under a steady stream the queue never empties,
        and a read must not wait for it to); False on timeout (the store failing). Immediate
        in synchronous mode and on the worker thread itself."""
        if not self.background or threading.current_thread() in (self._worker, self._planner):
            return True
        with self._cond:
            target = self._accepted  # FIFO: done when this many batches are correlated
            return self._cond.wait_for(
                lambda: self.correlated_batches >= target
                or (self._stopping and (self._worker is None or not self._worker.is_alive())
                    and (self._planner is None or not self._planner.is_alive())),
                timeout)

    def lag(self) -> dict[str, float]:
        """How far correlation is behind the acknowledged raw store."""
        with self._cond:
            oldest = self._queue[0][4] if self._queue else None
            return {"batches": len(self._queue) + self._in_flight, "records": self._pending,
                    "seconds": time.monotonic() - oldest if oldest is not None else 0.0}

    def journal_bytes(self) -> int:
        return self.journal.bytes() if self.journal is not None else 0

    def close(self) -> None:
        """Correlate what was accepted (at most `read_wait_s`), stop the worker, close the store;
        what is left stays stored raw, flagged not correlated, for the next start."""
        if self._worker is not None:
            self.flush(self.read_wait_s)
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._worker.join(self.read_wait_s)
            if self._planner is not None:
                self._planner.join(self.read_wait_s)
        if self.journal is not None:
            self.journal.close()
        self.inner.close()

    # -- listeners, retention -----------------------------------------------------------------
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
        self.flush(self.read_wait_s)
        return self._maybe_retention(now)

    def _maybe_retention(self, now: datetime | None = None) -> dict[str, int]:
        if self.retention is None:
            return {}
        mono = time.monotonic()
        if now is None and mono - self._last_retention < RETENTION_EVERY_S and self._last_retention:
            return {}
        self._last_retention = mono
        cutoff = (now or self.clock.now()) - self.retention
        with self.correlator.lock:
            return self.inner.apply_retention(cutoff)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in _AFTER_FLUSH and self.background:
            def after_flush(*args: Any, **kwargs: Any) -> Any:
                self.flush(self.read_wait_s)
                return attr(*args, **kwargs)
            return after_flush
        return attr
