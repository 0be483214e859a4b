"""Correlation per partition: one correlator for each partition this replica owns.

Stage: the correlation stage of an aggregator replica consuming partitions from NATS into a
shared store (aggregator/consume.py, aggregator/leases.py; wired in aggregator/pipeline.py).
In: accepted batches, each a share (or a sub-share) of one partition (its mark sequence names
the partition, eastwest/partition.py `mark_partition`). Out: the batch correlated by that partition's own `InlineCorrelation`
(aggregator/worker.py) and its own `ColumnCorrelator`: replicas never need each other's memory,
since every record of a connection is in one partition.

Taking a partition over (`take`) builds its correlator and loads the store's recent connections
of that partition (what the previous owner wrote, open or closed within `keep_open`) before the
first batch; giving it up (`drop`) forgets them. A batch of a partition not owned here (a
hand-over in between) is `Backlogged`: the consumer naks it, and its owner takes it.

Coalescing (`accept_group`): the consumer hands over the shares of a partition that were
waiting (up to `--nats-coalesce` messages and `--nats-coalesce-records` records), in stream
order; the partition's correlator plans each in turn and the store writes them all at once
(aggregator/worker.py `InlineCorrelation.accept_group`, the store's `write_group`), only while
the consumer still holds the partition's lease. Each such write is counted (`group_writes`,
with the shares and records it held and a histogram of its shares: the `eastwest_nats_group_*`
metrics, aggregator/pipeline.py).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

from aggregator.correlate_columns import ColumnCorrelator
from aggregator.fanout import FanOut
from aggregator.retention import Retention
from aggregator.store.base import Backlogged, IngestResult, WriteStore
from aggregator.worker import Accepted, InlineCorrelation, WrittenBeforeAck
from eastwest.clock import Clock
from eastwest.drops import Drops
from eastwest.partition import key_partition, mark_partition

GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # shares per coalesced write (histogram)


class PartitionedCorrelation(WrittenBeforeAck):
    """`Correlation` (aggregator/worker.py) over the partitions owned here, and the consumer's
    `PartitionHooks` (take, drop)."""

    def __init__(self, store: WriteStore, make_correlator: Callable[[], ColumnCorrelator],
                 fanout: FanOut, drops: Drops, retention: Retention, clock: Clock,
                 partitions: int) -> None:
        self.store, self.make_correlator, self.fanout = store, make_correlator, fanout
        self.drops, self.retention, self.clock = drops, retention, clock
        self.partitions = partitions
        self.parts: dict[int, InlineCorrelation] = {}
        self._lock = threading.Lock()
        self._version = 0
        self._current = threading.local()  # the partition whose step is being told
        self.loaded = 0  # connections reloaded at take-overs, in all
        # coalesced writes (one store write of a partition's waiting shares each), for
        # /metrics: kept here, not in the partitions' correlators (a hand-over forgets those)
        self.group_writes = 0
        self.group_shares = 0
        self.group_records = 0
        self.group_sizes = [0] * (len(GROUP_BUCKETS) + 1)  # writes by shares, per bucket

    # -- the consumer's hooks -------------------------------------------------------------------
    def take(self, partition: int) -> None:
        p = self.partitions
        part = InlineCorrelation(self.store, self.make_correlator(), self.fanout, self.drops,
                                 self.retention, self.clock,
                                 keep=lambda c: key_partition(c.key, p) == partition,
                                 keep_key=lambda k: key_partition(k, p) == partition)
        with self._lock:
            self.parts[partition] = part
            self.loaded += part.loaded

    def drop(self, partition: int) -> None:
        with self._lock:
            self.parts.pop(partition, None)

    def current(self) -> int | None:
        """The partition being correlated on this thread (what the fan-out's listeners are
        told about: aggregator/live_fanin.py), None outside a step."""
        return getattr(self._current, "k", None)

    def owned(self) -> list[int]:
        with self._lock:
            return sorted(self.parts)

    # -- Correlation ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self.retention.maybe_run()

    @property
    def version(self) -> int:
        return self._version

    def accept(self, batch: Accepted) -> IngestResult:
        k = mark_partition(batch.batch_seq, self.partitions)
        with self._lock:
            part = self.parts.get(k)
        if part is None:
            raise Backlogged(f"partition {k} of batch ({batch.collector!r}, {batch.batch_seq}) "
                             "is not owned by this replica (now)")
        self._current.k = k
        try:
            result = part.accept(batch)
        finally:
            self._current.k = None
        if not result.duplicate:
            self._version += 1
        return result

    def accept_group(self, batches: Sequence[Accepted],
                     still_owned: Callable[[], bool] | None = None) -> list[IngestResult]:
        """Batches in stream order, each run of one partition coalesced by that partition's
        correlator (`InlineCorrelation.accept_group`: one step, one write), written only while
        `still_owned()`. A partition consumer's group is all one partition; a run of a
        partition not owned here raises `Backlogged` before anything of it is written."""
        out: list[IngestResult] = []
        i = 0
        while i < len(batches):
            k = mark_partition(batches[i].batch_seq, self.partitions)
            j = i + 1
            while j < len(batches) and mark_partition(batches[j].batch_seq, self.partitions) == k:
                j += 1
            with self._lock:
                part = self.parts.get(k)
            if part is None:
                raise Backlogged(f"partition {k} of batch ({batches[i].collector!r}, "
                                 f"{batches[i].batch_seq}) is not owned by this replica (now)")
            self._current.k = k
            try:
                results = part.accept_group(batches[i:j], still_owned)
            finally:
                self._current.k = None
            written = [r for r in results if not r.duplicate]
            if written:  # one store write held them (InlineCorrelation.accept_group)
                self._version += 1
                self._count_group(len(written), sum(r.stored for r in written))
            out += results
            i = j
        return out

    def _count_group(self, shares: int, records: int) -> None:
        with self._lock:
            self.group_writes += 1
            self.group_shares += shares
            self.group_records += records
            self.group_sizes[bisect.bisect_left(GROUP_BUCKETS, shares)] += 1

    def group_counts(self) -> tuple[int, int, int, list[tuple[str, int]]]:
        """(writes, shares, records, histogram) of the coalesced writes, read at once; the
        histogram: cumulative (le, writes) of the shares per write, Prometheus style."""
        with self._lock:
            counts = list(self.group_sizes)
            writes, shares, records = self.group_writes, self.group_shares, self.group_records
        out, total = [], 0
        for le, n in zip([*map(str, GROUP_BUCKETS), "+Inf"], counts, strict=True):
            total += n
            out.append((le, total))
        return writes, shares, records, out

    @property
    def groups(self) -> int:
        """Coalesced writes made by the partitions owned now."""
        with self._lock:
            return sum(p.groups for p in self.parts.values())

    # -- what the metrics read of "the correlator" ----------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return sum(len(p.correlator) for p in self.parts.values())

    @property
    def renames(self) -> int:
        with self._lock:
            return sum(p.correlator.renames for p in self.parts.values())

    @property
    def late_names(self) -> int:
        with self._lock:
            return sum(p.correlator.late_names for p in self.parts.values())
