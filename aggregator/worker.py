"""The correlation worker: accepted batches -> correlated connections, stored, then told.

Stage: between intake (aggregator/intake.py) and fan-out (aggregator/fanout.py), wired in
aggregator/pipeline.py. In: `Accepted` batches (the good records, as the wire's bytes, columns or
objects). Out: each batch's raw records, marks and derived tables (connections, rollups,
workloads) in the store through its write interface; each committed plan to the fan-out.

Two forms of one interface (`Correlation`), chosen by the store:
- `JournaledCorrelation`, for a store of this aggregator with a local journal (DuckDB):
  `accept` appends the batch (its wire bytes) to the journal (aggregator/store/journal.py) and
  syncs it: the ack means "durably stored, never lost", at the cost of a file append (~0.4 ms)
  instead of a store transaction (~20 ms a batch of 5,000). A planner thread takes the queue in
  journal order: the batch at the head with those waiting behind it, up to `coalesce` records,
  in ONE plan (records oldest first, as within a batch), the correlator's memory advanced, the
  tables built; a writer thread writes each planned step in ONE store transaction, then tells
  the fan-out and releases the journal entries. The planner goes at most `WRITE_AHEAD` steps
  ahead (the store's transaction releases the GIL: both run at once). A failed write leaves the
  store untouched: every step not written goes back to the head of the queue in order, the
  correlator's memory is reloaded from the store (as at a restart), and the batches are retried
  a second later. Back-pressure: when `max_pending` records wait, `accept` waits up to
  `admit_wait_s` for room, then raises `Backlogged` (HTTP 429: the collectors' spools hold the
  rest). At start, the journal is replayed: what the store has not applied is queued again in
  order (a file of an older version may also hold raw batches not correlated: queued first).
- `InlineCorrelation`, for a store shared by several aggregators (ClickHouse): in the caller's
  thread, under the correlator's lock: duplicate check, the batch's keys reloaded from the store
  (what another aggregator wrote since), plan on copies, ONE store write of raw + derived, then
  the correlator's commit. A store failure leaves memory untouched: a retry correlates exactly
  as the first try would have.

Grouping batches when behind writes a connection reported in several of them once, not once per
batch (1.5x the drain rate, bench/bench_store.py); the connections and their totals do not
depend on the grouping, only which minute of a rollup a delta lands in can (the minute of the
earliest record that raised a counter, within what one plan sees).

Read-after-write: `applied(timeout)` waits until every batch accepted before the call is stored
and correlated (not those accepted meanwhile: under a steady stream the queue never empties).
The read routes call it first (aggregator/api/state.py), so every answer includes every batch
acknowledged before the read.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import pyarrow as pa

from aggregator.changes import Changes, changes_of_columns
from aggregator.connection import Connection
from aggregator.correlate import key_of
from aggregator.correlate_columns import ColumnCorrelator
from aggregator.correlate_core import Key
from aggregator.correlate_plan import ColumnDerived
from aggregator.fanout import FanOut
from aggregator.retention import Retention
from aggregator.store.base import (
    Backlogged,
    GroupShare,
    IngestResult,
    RawBatch,
    StoreError,
    WriteStep,
    WriteStore,
)
from aggregator.store.columns import FLAT_COLUMNS, flat_table, gc_paused
from aggregator.store.journal import Entry, Journal
from aggregator.store.wire_columns import ColumnBatch, decode_columns
from eastwest import codec
from eastwest.clock import Clock
from eastwest.drops import Drops
from eastwest.record import FlowRecord

log = logging.getLogger("eastwest.aggregator")
MAX_PENDING = 500_000    # records accepted but not correlated yet, before accept waits
COALESCE = 60_000        # records of waiting batches correlated in one plan and transaction
READ_WAIT_S = 30.0       # how long a read waits for correlation to catch up
ADMIT_WAIT_S = 2.0       # how long an accept waits for room in a full backlog, then Backlogged
WRITE_AHEAD = 2          # planned steps waiting for the store writer, at most


@dataclass
class Accepted:
    """A batch intake accepted: its envelope, how many good records, the indices it rejected,
    and the good records in the forms at hand: the wire bytes (`body`, the binary form: the
    journal keeps them), columns (`table`, the `flat_table` layout), objects (`records`: the
    JSON form and the NATS consumer decode them)."""

    collector: str
    batch_seq: int
    n: int
    rejected: list[int] = field(default_factory=list)
    body: bytes | None = None
    table: pa.Table | None = None
    records: list[FlowRecord] | None = None
    decode: Callable[[], list[FlowRecord]] | None = field(default=None, repr=False)

    def good_records(self) -> list[FlowRecord]:
        if self.records is None:
            self.records = self.decode() if self.decode is not None else []
        return self.records


class Correlation(Protocol):
    """What the intake and the read path need of the correlation stage."""

    def start(self) -> None: ...

    def accept(self, batch: Accepted) -> IngestResult:
        """Journal (or store) the batch; a batch seen before is a duplicate. Raises
        `Backlogged` (retry later) or `StoreError`."""

    def accept_group(self, batches: Sequence[Accepted],
                     still_owned: Callable[[], bool] | None = None) -> list[IngestResult]:
        """Several batches in their order, as `accept` of each would (one result each); a
        store written before the ack takes them in one correlation step and ONE write, and
        only while `still_owned()` (a partition's lease, aggregator/consume.py). Raises
        `Backlogged` or `StoreError` for the whole group: nothing of it is acknowledged."""

    def applied(self, timeout: float | None = None) -> bool:
        """Wait until every batch accepted before this call is stored and correlated; False
        on timeout (the store failing)."""

    def batch_applied(self, collector: str, batch_seq: int) -> bool: ...

    def count(self) -> int:
        """Records stored durably (in the store, and journaled not applied yet)."""

    def lag(self) -> dict[str, float]:
        """How far correlation is behind: batches, records, seconds (the oldest's age)."""

    def journal_bytes(self) -> int: ...

    @property
    def version(self) -> int:
        """Changes whenever stored state may have changed (the live graph's cache)."""

    def close(self) -> None: ...


# what waits for the worker: a journaled batch, or (a file of an older version) a batch stored
# raw and not correlated
class StoredBatch:
    """A batch stored raw but not correlated when the aggregator stopped: its records are read
    back from the store when its turn comes (not all of the backlog at start)."""

    __slots__ = ("store", "collector", "batch_seq")

    def __init__(self, store: WriteStore, collector: str, batch_seq: int) -> None:
        self.store, self.collector, self.batch_seq = store, collector, batch_seq

    def records(self) -> list[FlowRecord]:
        return self.store.batch_records(self.collector, self.batch_seq)


Pending = Entry | StoredBatch
Queued = tuple[str, int, Pending, int, float]  # collector, batch_seq, what, records, since
_RECORDS_FORM = -1  # an Entry's `rejected` is [_RECORDS_FORM]: its body encodes records as given
# a step of batches without a good record: the flat layout, `extra` and the collector
EMPTY_STEP = pa.schema([*((n, t) for n, t, _ in FLAT_COLUMNS), ("extra", pa.binary()),
                        ("collector", pa.string())]).empty_table()


def journal_form(records: Sequence[FlowRecord], collector: str, batch_seq: int) -> bytes:
    """Records handed over as objects (JSON ingest, JetStream, tests) in the journal's form: a
    wire batch of exactly these records (no collector check: intake did its own)."""
    return codec.encode_batch(codec.Batch(collector, batch_seq, datetime.now(UTC), list(records)))


def entry_batch(entry: Entry) -> ColumnBatch:
    """A journaled batch's good records as columns: its wire bytes decode as they did at intake
    (the same bytes give the same records and the same rejections; the journal's form of
    records given as objects is a wire batch of exactly them)."""
    return decode_columns(entry.body)


def with_collector(table: pa.Table, collector: str) -> pa.Table:
    """The batch's table with its collector as a column: a step takes several batches."""
    return table.append_column("collector", pa.array([collector] * table.num_rows, pa.string()))


class _Step:
    """Batches planned by the planner, for the writer: what to write, and what it changes."""

    __slots__ = ("take", "write", "changes", "entries")

    def __init__(self, take: list[Queued], write: WriteStep, changes: Changes,
                 entries: list[Entry]) -> None:
        self.take, self.write, self.changes, self.entries = take, write, changes, entries


@dataclass(frozen=True)
class WorkerSettings:
    max_pending: int = MAX_PENDING
    coalesce: int = COALESCE
    read_wait_s: float = READ_WAIT_S
    admit_wait_s: float = ADMIT_WAIT_S


class JournaledCorrelation:
    """`Correlation` behind a local journal: acknowledged at the journal's sync, stored and
    correlated by a planner and a writer thread (the module docstring)."""

    def __init__(self, store: WriteStore, correlator: ColumnCorrelator, fanout: FanOut, drops: Drops,
                 retention: Retention, clock: Clock,
                 settings: WorkerSettings = WorkerSettings()) -> None:
        if store.journal_dir is None:
            raise ValueError("a journaled correlation needs a store with a journal_dir")
        self.store, self.correlator, self.fanout = store, correlator, fanout
        self.drops, self.retention, self.clock, self.settings = drops, retention, clock, settings
        self.journal = Journal(store.journal_dir)
        self._cond = threading.Condition()
        self._queue: deque[Queued] = deque()
        self._pending = 0          # records accepted and not yet applied (queued or in flight)
        self._in_flight = 0        # batches taken by the planner, not written yet
        self._flight_records = 0   # journaled records among them
        self._journaled: set[tuple[str, int]] = set()  # in the journal, not applied yet
        self._max_seq: dict[str, int] = {}  # per collector: the highest batch_seq journaled or stored
        self._stopping = False
        self._ack_lock = threading.Lock()  # duplicate check, journal append, queue: one order
        self._writer: threading.Thread | None = None
        self._planner: threading.Thread | None = None
        self._writes: deque[_Step] = deque()  # planned, not written yet, in order
        self._failed: Exception | None = None  # a write failed: the planner resets
        self._version = 0
        self.correlated_batches = 0
        self._accepted = 0         # batches ever queued; the worker takes them in this order
        horizon = correlator.keep_open.total_seconds()
        self.loaded = correlator.load(store.recent_connections(horizon))
        if self.loaded:
            log.info("correlator: %d recent connections reloaded from the store", self.loaded)
        relearn_nat(correlator, store)
        self._requeue()

    def start(self) -> None:
        if self._planner is not None:
            return
        self._planner = threading.Thread(target=self._run, name="eastwest-correlator",
                                         daemon=True)
        self._writer = threading.Thread(target=self._write, name="eastwest-store-writer",
                                        daemon=True)
        self._planner.start()
        self._writer.start()
        with self.correlator.lock:
            self.retention.maybe_run()

    @property
    def version(self) -> int:
        return self._version

    def _requeue(self) -> None:
        """At start: batches a file of an older version stored raw and did not correlate, then
        the journal's entries the store has not applied, in the order they came."""
        now = self.clock.monotonic()
        for coll, seq, n in self.store.uncorrelated_batches():
            self._queue.append((coll, seq, StoredBatch(self.store, coll, seq), n, now))
            self._pending += n
            self._accepted += 1
        entries = list(self.journal.replay())
        applied = self.store.applied_marks([(e.collector, e.batch_seq) for e in entries])
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
                self._max_seq[e.collector] = self.store.max_batch_seq(e.collector)
            self._max_seq[e.collector] = max(self._max_seq[e.collector], e.batch_seq)
        self.journal.release(done)
        if self.journal.corrupt:
            self.drops.count("journal", "damaged_entry", self.journal.corrupt,
                             detail=f"journal {self.journal.dir}: see the log")
        if self._queue:
            log.info("store: %d batches (%d records) acknowledged before the stop and not "
                     "applied yet: queued", len(self._queue), self._pending)

    # -- accept (the ack path) ------------------------------------------------------------------
    def accept(self, batch: Accepted) -> IngestResult:
        if batch.body is not None:  # the wire's bytes: decoded again behind the ack
            return self._journal(batch.collector, batch.batch_seq, batch.n, batch.rejected,
                                 lambda: batch.body or b"")
        recs = batch.good_records()
        return self._journal(batch.collector, batch.batch_seq, len(recs), [_RECORDS_FORM],
                             lambda: journal_form(recs, batch.collector, batch.batch_seq))

    def accept_group(self, batches: Sequence[Accepted],
                     still_owned: Callable[[], bool] | None = None) -> list[IngestResult]:
        """Each batch journaled in turn (the planner coalesces behind the ack anyway)."""
        return [self.accept(b) for b in batches]

    def _journal(self, collector: str, batch_seq: int, n: int, rejected: list[int],
                 body: Callable[[], bytes]) -> IngestResult:
        key = (collector, batch_seq)
        s = self.settings
        with self._cond:  # back-pressure: the worker is `max_pending` records behind
            deadline = self.clock.monotonic() + s.admit_wait_s
            while self._pending >= s.max_pending and not self._stopping:
                left = deadline - self.clock.monotonic()
                if left <= 0:  # answered, not held: a fleet of senders would hold every thread
                    self.drops.count("ingest", "backlogged", n)
                    raise Backlogged(f"the aggregator is {self._pending:,} records behind "
                                     f"(--correlation-backlog {s.max_pending:,}): retry later")
                self._cond.wait(left)
        with self._ack_lock:
            with self._cond:
                journaled = key in self._journaled
            # in the journal, or applied (the worker forgets a key only once it is applied)
            if journaled or self._stored(collector, batch_seq):
                return IngestResult(collector, batch_seq, 0, True)
            entry = self.journal.append(collector, batch_seq, n, rejected, body())  # durable
            if batch_seq > self._max_seq[collector]:
                self._max_seq[collector] = batch_seq
            with self._cond:
                self._journaled.add(key)
                self._queue.append((collector, batch_seq, entry, n, self.clock.monotonic()))
                self._pending += n
                self._accepted += 1
                self._version += 1
                self._cond.notify_all()
        return IngestResult(collector, batch_seq, n, False)

    def _stored(self, collector: str, batch_seq: int) -> bool:
        """Whether the store has applied this batch, without asking it in the common case: a
        collector numbers its batches upwards, so a `batch_seq` above every one journaled or
        stored for it is new (the store is asked once per collector, then for retries only).
        Called under `_ack_lock`: only the ack path journals."""
        top = self._max_seq.get(collector)
        if top is None:
            top = self._max_seq[collector] = self.store.max_batch_seq(collector)
        return batch_seq <= top and self.store.batch_applied(collector, batch_seq)

    def count(self) -> int:
        with self._cond:
            journaled = sum(n for _, _, p, n, _ in self._queue if isinstance(p, Entry))
            journaled += self._flight_records
        return self.store.count() + journaled

    def batch_applied(self, collector: str, batch_seq: int) -> bool:
        with self._cond:
            if (collector, batch_seq) in self._journaled:
                return True
        return self.store.batch_applied(collector, batch_seq)

    # -- the planner ----------------------------------------------------------------------------
    # It decodes the batches it takes, plans them and advances the correlator's memory at once
    # (optimistically), then hands the step to the writer and takes the next batches while the
    # writer's transaction runs. When a write fails, memory is ahead of the store: the planner
    # puts every step not written back at the head of the queue, in order, reloads the
    # correlator's memory from the store and goes on after a second.
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
                    while self._queue and n + self._queue[0][3] <= self.settings.coalesce:
                        n += self._queue[0][3]
                        take.append(self._queue.popleft())
                    self._in_flight += len(take)
                    self._flight_records += sum(t[3] for t in take if isinstance(t[2], Entry))
            if reset:
                self._reload()
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
        """Count and log a failed step; False when the worker must stop, else True after a
        pause."""
        self.drops.count("correlate", "store_unavailable", records, detail=repr(exc))
        if not isinstance(exc, StoreError):
            log.error("the worker failed on %d batches", batches, exc_info=exc)
        if self._stopping:
            return False  # in the journal (or flagged not correlated): done at the next start
        self.clock.sleep(1.0)
        return True

    def _reload(self) -> None:
        """After a failed write: the correlator's memory again as the store has it."""
        while True:
            try:
                with self.correlator.lock:
                    self.correlator.reset()
                    self.correlator.load(self.store.recent_connections(
                        self.correlator.keep_open.total_seconds()))
                    relearn_nat(self.correlator, self.store)
                break
            except Exception as exc:  # noqa: BLE001 - the store still failing
                if not self._failed_step(exc, 0, 0):
                    return
        self.clock.sleep(1.0)
        with self._cond:
            self._failed = None
            self._cond.notify_all()

    def _correlate(self, take: list[Queued]) -> None:
        """The planner's step: the batches taken, decoded into columns and planned on columns
        (the correlator's memory advances), their tables built; then handed to the writer."""
        entries = [p for _, _, p, _, _ in take if isinstance(p, Entry)]
        # applied already: only when a stop fell between the store's commit and the journal's
        # release and the replay raced it; cheap (one query), and it keeps a retry exact
        applied = self.store.applied_marks([(e.collector, e.batch_seq) for e in entries])
        tables: list[pa.Table] = []
        raw: list[RawBatch] = []
        stored: list[tuple[str, int]] = []
        with gc_paused():
            for coll, seq, p, _, _ in take:
                if isinstance(p, Entry):
                    if (coll, seq) in applied:
                        continue
                    cb = entry_batch(p)
                    table: pa.Table | None = cb.table if cb.table.num_rows else None
                    raw.append(RawBatch(coll, seq, cb.table.num_rows, table, decode=cb.records))
                else:
                    recs = p.records()
                    table = flat_table(recs) if recs else None
                    stored.append((coll, seq))
                if table is not None:
                    tables.append(with_collector(table, coll))
        step = pa.concat_tables(tables) if tables else EMPTY_STEP
        with self.correlator.lock, gc_paused():
            plan = self.correlator.plan(step)
            settled = list(self.correlator.settled)
            derived = ColumnDerived(plan, settled)
            changes = changes_of_columns(plan)  # nothing after this can fail: memory advances
            del self.correlator.settled[:len(settled)]
            self.correlator.commit(plan)
        with self._cond:
            self._writes.append(_Step(take, WriteStep(raw, derived, stored), changes, entries))
            self._cond.notify_all()

    # -- the writer -----------------------------------------------------------------------------
    def _write(self) -> None:
        """Each planned step in one store transaction, in order; then the fan-out."""
        while True:
            with self._cond:
                while not self._writes or self._failed is not None:
                    if self._stopping and (not self._writes or self._failed is not None) and (
                            self._planner is None or not self._planner.is_alive()):
                        return
                    self._cond.wait()
                step = self._writes[0]
            try:
                self.store.write_batches(step.write)
            except Exception as exc:  # noqa: BLE001 - a StoreError, or a bug: never lose batches
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()
                n = sum(t[3] for t in step.take)
                if not self._failed_step(exc, n, len(step.take)):
                    return
                continue
            self.fanout.tell(step.changes)
            self.journal.release(step.entries)
            with self._cond:
                self._writes.popleft()
                self._pending -= sum(t[3] for t in step.take)
                self._in_flight -= len(step.take)
                self._flight_records -= sum(t[3] for t in step.take if isinstance(t[2], Entry))
                self._journaled.difference_update((c, q) for c, q, _, _, _ in step.take)
                self.correlated_batches += len(step.take)
                self._version += 1
                self._cond.notify_all()
            try:
                with self.correlator.lock:
                    self.retention.maybe_run()
            except StoreError as exc:
                self.drops.count("correlate", "retention_failed", detail=str(exc))

    # -- reads, lag, stop -----------------------------------------------------------------------
    def applied(self, timeout: float | None = None) -> bool:
        """Wait until every batch accepted before this call is correlated and stored (batches
        accepted meanwhile are not waited for); False on timeout. Immediate on the worker's
        own threads."""
        if threading.current_thread() in (self._writer, self._planner):
            return True
        with self._cond:
            target = self._accepted  # FIFO: done when this many batches are correlated
            return self._cond.wait_for(
                lambda: self.correlated_batches >= target
                or (self._stopping and (self._writer is None or not self._writer.is_alive())
                    and (self._planner is None or not self._planner.is_alive())),
                timeout)

    def lag(self) -> dict[str, float]:
        with self._cond:
            oldest = self._queue[0][4] if self._queue else None
            return {"batches": len(self._queue) + self._in_flight, "records": self._pending,
                    "seconds": self.clock.monotonic() - oldest if oldest is not None else 0.0}

    def journal_bytes(self) -> int:
        return self.journal.bytes()

    def close(self) -> None:
        """Correlate what was accepted (at most `read_wait_s`), stop the threads, close the
        journal; what is left stays in the journal for the next start."""
        if self._writer is not None:
            self.applied(self.settings.read_wait_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in (self._writer, self._planner):
            if t is not None:
                t.join(self.settings.read_wait_s)
        self.journal.close()


class WrittenBeforeAck:
    """What a `Correlation` that writes each batch before acknowledging it answers about its
    (absent) backlog: nothing waits, nothing is journaled. Needs `self.store`."""

    store: WriteStore

    def applied(self, timeout: float | None = None) -> bool:
        return True  # written before it was acknowledged

    def batch_applied(self, collector: str, batch_seq: int) -> bool:
        return self.store.batch_applied(collector, batch_seq)

    def count(self) -> int:
        return self.store.count()

    def lag(self) -> dict[str, float]:
        return {"batches": 0, "records": 0, "seconds": 0.0}

    def journal_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass


def relearn_nat(correlator: ColumnCorrelator, store: WriteStore,
                keep_key: Callable[[Key], bool] | None = None) -> int:
    """After the connections were (re)loaded: the NodePort aliases learnt again from the
    stored middle records (aggregator/nodeport.py) of the same horizon, `keep_open` before the
    newest connection reloaded (those of this partition only with `keep_key`)."""
    hw = correlator.high_water
    if hw is None:
        return 0
    recs = store.nat_records(hw - correlator.keep_open)
    if keep_key is not None:
        recs = [r for r in recs if keep_key(key_of(r))]
    n = correlator.learn_nat(recs)
    if n:
        log.info("correlator: %d NodePort aliases learnt again from the store", n)
    return n


class InlineCorrelation(WrittenBeforeAck):
    """`Correlation` for a store shared by several aggregators: each batch planned, written and
    committed in the caller's thread, under the correlator's lock (the module docstring)."""

    def __init__(self, store: WriteStore, correlator: ColumnCorrelator, fanout: FanOut, drops: Drops,
                 retention: Retention, clock: Clock,
                 keep: Callable[[Connection], bool] | None = None,
                 keep_key: Callable[[Key], bool] | None = None) -> None:
        """`keep`: which of the store's recent connections this correlator holds (one
        partition's, aggregator/partitioned.py); all of them without it. `keep_key`: the same
        by key, for the NodePort aliases learnt again (`relearn_nat`)."""
        self.store, self.correlator, self.fanout = store, correlator, fanout
        self.drops, self.retention, self.clock = drops, retention, clock
        self.keep, self.keep_key = keep, keep_key
        self._version = 0
        self._stale = False  # memory ahead of the store (a group's write failed): reload first
        self.groups = 0      # coalesced writes made (groups of two shares or more)
        self.loaded = self._load()

    def _load(self) -> int:
        """The correlator's memory as the store has it (this correlator's connections)."""
        horizon = self.correlator.keep_open.total_seconds()
        recent = self.store.recent_connections(horizon)
        keep = self.keep
        n = self.correlator.load(recent if keep is None else [c for c in recent if keep(c)])
        relearn_nat(self.correlator, self.store, self.keep_key)
        return n

    def _reload(self) -> None:
        """After a group's failed write (memory committed ahead of the store): forget and load
        again, now or (the store failing) before the next batch."""
        self._stale = True
        self.correlator.reset()
        self._load()
        self._stale = False

    def start(self) -> None:
        with self.correlator.lock:
            self.retention.maybe_run()

    @property
    def version(self) -> int:
        return self._version

    def accept(self, batch: Accepted) -> IngestResult:
        records = batch.good_records()
        with self.correlator.lock, gc_paused():
            if self._stale:
                self._reload()
            if self.store.batch_applied(batch.collector, batch.batch_seq):
                return IngestResult(batch.collector, batch.batch_seq, 0, True)
            if self.store.shared and records:  # what another aggregator wrote since
                self.correlator.refresh(self.store.connections_for_keys(
                    {key_of(r) for r in records}))
            plan = (self.correlator.plan(batch.table, collector=batch.collector)
                    if batch.table is not None else self.correlator.plan_records(records))
            settled = list(self.correlator.settled)
            derived = ColumnDerived(plan, settled)
            try:
                result = self.store.ingest(batch.collector, batch.batch_seq, records,
                                           derived=derived)
            except BaseException:
                self.correlator.rollback(plan)  # memory as before: a retry plans the same
                raise
            if result.duplicate:
                self.correlator.rollback(plan)
            else:
                del self.correlator.settled[:len(settled)]  # handed over with this batch
                self.correlator.commit(plan)
                self._version += 1
                self.fanout.tell(changes_of_columns(plan))
            try:
                self.retention.maybe_run()
            except StoreError as exc:
                self.drops.count("correlate", "retention_failed", detail=str(exc))
        return result

    def accept_group(self, batches: Sequence[Accepted],
                     still_owned: Callable[[], bool] | None = None) -> list[IngestResult]:
        """Batches of one partition in stream order, coalesced: one query for their marks,
        one reload of their keys, each new batch planned and committed in turn (as if applied
        alone: its rollup deltas are its own), then ONE store write of all of them
        (`write_group`: raw records, rollups, workloads, connections, marks) if `still_owned()`.
        Memory runs ahead of the store until the write returns: when it fails (or ownership
        is gone) the correlator is reloaded from the store before anything else is planned."""
        if len(batches) == 1 and still_owned is None:
            return [self.accept(batches[0])]
        with self.correlator.lock, gc_paused():
            if self._stale:
                self._reload()
            keys = [(b.collector, b.batch_seq) for b in batches]
            seen = set(self.store.applied_marks(keys))
            results: list[IngestResult | None] = [None] * len(batches)
            todo: list[int] = []
            for i, key in enumerate(keys):
                if key in seen:  # applied before, or twice in this group
                    results[i] = IngestResult(key[0], key[1], 0, True)
                else:
                    seen.add(key)
                    todo.append(i)
            if todo:
                self._coalesce([batches[i] for i in todo], still_owned)
                for i in todo:
                    b = batches[i]
                    results[i] = IngestResult(b.collector, b.batch_seq, len(b.good_records()),
                                              False)
            try:
                self.retention.maybe_run()
            except StoreError as exc:
                self.drops.count("correlate", "retention_failed", detail=str(exc))
        return [r for r in results if r is not None]

    def _coalesce(self, batches: list[Accepted], still_owned: Callable[[], bool] | None) -> None:
        """Plan, commit and write new batches (under the correlator's lock)."""
        if self.store.shared:  # what another aggregator wrote since, for every batch at once
            ks = {key_of(r) for b in batches for r in b.good_records()}
            if ks:
                self.correlator.refresh(self.store.connections_for_keys(ks))
        shares: list[GroupShare] = []
        changes: list[Changes] = []
        try:
            for b in batches:
                records = b.good_records()
                plan = (self.correlator.plan(b.table, collector=b.collector)
                        if b.table is not None else self.correlator.plan_records(records))
                settled = list(self.correlator.settled)
                changes.append(changes_of_columns(plan))
                del self.correlator.settled[:len(settled)]  # handed over with this batch
                self.correlator.commit(plan)
                shares.append(GroupShare(
                    RawBatch(b.collector, b.batch_seq, len(records), b.table,
                             decode=b.good_records),
                    ColumnDerived(plan, settled)))
            if still_owned is not None and not still_owned():
                raise Backlogged(f"partition of batches ({batches[0].collector!r}, "
                                 f"{batches[0].batch_seq}) .. is not owned here any more: "
                                 "not written")
            self.store.write_group(shares)
        except BaseException:
            try:
                self._reload()
            except StoreError as exc:  # reloaded before the next batch
                log.warning("correlator not reloaded after a failed write (%s): at the next "
                            "batch", exc)
            raise
        if len(shares) > 1:
            self.groups += 1
        self._version += 1
        for c in changes:
            self.fanout.tell(c)
