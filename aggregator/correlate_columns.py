"""Correlation on columns: `ColumnCorrelator`, the reference correlator's rules with a C core.

Stage: ingest -> correlate -> store, like aggregator/correlate.py (the reference, and the
specification: its docstring states the rules). In: a batch as a `pyarrow.Table` in the flat
layout (aggregator/store/columns.py `flat_table`, what aggregator/store/wire_columns.py
`decode_columns` gives), any row order, records taken by `end` (stable), with each record's
collector (a `collector` column, or `collector=` for a one-collector batch). Out: a
`ColumnPlan` (aggregator/correlate_plan.py): the touched connections as the store's rows, the
rollup and workload rows, per-connection deltas and flags; `commit`/`rollback` it.

Two engines, the same results (tests/unit/test_correlate_columns.py compares them field by
field with the reference on generated workloads):
- native (aggregator/correlate_native*.c via aggregator/correlate_core.py): the connections
  live in C structures, the batch is read from numpy/Arrow buffers without the GIL, strings and
  identities are integer ids (aggregator/correlate_registry.py), rows come back as columns;
- reference: `aggregator.correlate.Correlator` on the records, its plan turned into columns by
  `Derived`. Used when the library is missing (no compiler), refused (stale), or disabled
  (`EASTWEST_CORRELATE_NATIVE=0`).

Built by `python -m aggregator.correlate_columns [--quiet]` (scripts/setup-venv.sh).

Connection ids are RFC 4122 version-4 UUIDs as 32 hex digits, like the reference's; `ids=` (a
function n -> 16 * n bytes) replaces their source (tests give both correlators a counter).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

import pyarrow as pa

from aggregator import correlate_native as native
from aggregator.connection import Connection
from aggregator.correlate import SETTLE
from aggregator.correlate_core import IdSource, Key, NativeCore
from aggregator.correlate_plan import ColumnPlan
from aggregator.correlate_reference import Engine, ReferenceEngine, records_of
from aggregator.identity import IdentityResolver
from aggregator.nodeport import NodePortJoin
from aggregator.nodeport_columns import negative_rollups, table_wants
from eastwest import native_build
from eastwest.clock import Clock, SystemClock
from eastwest.record import FlowRecord

LIMIT = timedelta(days=365_000)  # durations beyond 1000 years are refused (int64 µs sums)


class ColumnCorrelator:
    """The correlator of aggregator/correlate.py on columns (see the module docstring)."""

    def __init__(self, resolver: IdentityResolver, *, slack: timedelta = timedelta(seconds=5),
                 keep_closed: timedelta = timedelta(minutes=5),
                 keep_open: timedelta = timedelta(minutes=30), settle: timedelta = SETTLE,
                 clock: Clock | None = None, ids: IdSource | None = None,
                 native_core: bool | None = None) -> None:
        if settle < timedelta(0):
            raise ValueError(f"settle {settle}: must be >= 0")
        for name, value in (("slack", slack), ("keep_closed", keep_closed),
                            ("keep_open", keep_open), ("settle", settle)):
            if abs(value) > LIMIT:
                raise ValueError(f"{name} {value}: must be within 1000 years")
        self.resolver = resolver
        self.slack, self.keep_closed, self.keep_open, self.settle = (
            slack, keep_closed, keep_open, settle)
        self.clock: Clock = clock or SystemClock()
        self.lock = threading.Lock()  # callers hold it across plan -> store -> commit
        self._commits = 0  # a stamp that changes whenever stored state may have (graph cache)
        lib, layout, why = native.load() if native_core is not False else (None, None, "off")
        if native_core and lib is None:
            raise RuntimeError(f"the native correlator is not available: {why}")
        self.why_not_native = why
        self.core: NativeCore | None = None  # the C core (tests, diagnostics), None without
        self._engine: Engine
        # the NodePort halves' aliases (aggregator/nodeport.py): the reference engine's
        # Correlator keeps its own, this one serves the C core
        self.nodeport = NodePortJoin(slack, keep_open)
        self._np_commits = 0
        # the pending plan's merged halves, taken out of the C core before it planned (key, the
        # key's connections before, its seq): put back if the plan is not committed
        self._taken: list[tuple[Key, list[Connection], int]] = []
        if lib is not None and layout is not None:
            self.core = self._engine = NativeCore(
                lib, layout, resolver, slack=us_of(slack), keep_closed=us_of(keep_closed),
                keep_open=us_of(keep_open), settle=us_of(settle), ids=ids)
        else:
            self._engine = ReferenceEngine(resolver, ids, slack=slack, keep_closed=keep_closed,
                                           keep_open=keep_open, settle=settle, clock=self.clock)

    @property
    def native(self) -> bool:
        return self.core is not None

    # -- state --------------------------------------------------------------------------------
    @property
    def settled(self) -> list[str]:
        """Forgotten by prune, never to change again (the store may settle them; the caller
        deletes what it handed over)."""
        return self._engine.settled

    @property
    def renames(self) -> int:
        """Ends renamed by a later observer's knowledge (committed or not, as the reference)."""
        return self._engine.counters().renames

    @property
    def late_names(self) -> int:
        """Records that knew an end better after its name was final."""
        return self._engine.counters().late_names

    @property
    def high_water(self) -> datetime | None:
        return self._engine.counters().high_water

    def __len__(self) -> int:
        return self._engine.counters().held  # committed connections, as the reference's index

    def load(self, connections: Iterable[Connection]) -> int:
        """Rebuild the index (after a restart) from the store's recent connections."""
        self._put_back()
        return self._engine.load(connections)

    def refresh(self, fresh: Mapping[Key, list[Connection]]) -> None:
        """Replace what is held of these keys by the store's connections of them (a store
        shared by several aggregators: what another one wrote since); an empty list drops it."""
        self._put_back()
        self._engine.refresh(fresh)

    def reset(self) -> None:
        """Forget every connection, the high water and `settled` (before `load` again)."""
        self._taken = []
        self._engine.reset()

    def learn_nat(self, records: Iterable[FlowRecord]) -> int:
        """Learn the NodePort aliases of these records (after a restart: the stored records
        with a NAT chain of the reload horizon, aggregator/nodeport.py); how many."""
        if isinstance(self._engine, ReferenceEngine):
            return self._engine.ref.learn_nat(records)
        return len(self.nodeport.learn(records))

    def connections(self) -> list[Connection]:
        """Every held connection, in the index's order (tests, restarts)."""
        self._put_back()
        return self._engine.connections()

    def touch(self) -> None:
        """A batch was accepted that is not correlated yet: caches keyed by `_commits` expire."""
        self._commits += 1

    # -- the join -----------------------------------------------------------------------------
    def plan(self, table: pa.Table, *, collector: str | None = None) -> ColumnPlan:
        """What this batch changes; nothing is kept until `commit` (`rollback` undoes it)."""
        self._put_back()
        if self.core is not None and table_wants(table, self.nodeport):
            # a NodePort piece (aggregator/nodeport.py): the batch as records, like the reference
            return self._plan_nodeport(records_of(table, collector), self.clock.now())
        return self._engine.plan(table, collector, self.clock.now())

    def plan_records(self, records: Sequence[FlowRecord]) -> ColumnPlan:
        """`plan(flat_table(records))` with each record's collector."""
        self._put_back()
        if self.core is not None and self.nodeport.wants_records(records):
            return self._plan_nodeport(records, self.clock.now())
        return self._engine.plan_records(records, self.clock.now())

    def _plan_nodeport(self, records: Sequence[FlowRecord], at: datetime) -> ColumnPlan:
        """The C core's plan of a batch with NodePort pieces: halves rewritten to their real
        key, held halves merged (their views replayed as records, their volumes taken back
        from their names, their rows deleted), as `Correlator._nodeport` does."""
        core = self.core
        assert core is not None
        merge = self.nodeport.prepare(records, core.connections_of)
        for cid, c in merge.removed.items():  # no record of the batch joins a merged half
            self._taken.append((c.key, *core.take_out(c.key, cid)))
        try:
            plan = core.plan_records(merge.records, at)
        except BaseException:
            self._put_back()
            raise
        if merge.removed:
            plan.removed = {cid: c.key for cid, c in merge.removed.items()}
            plan.rollups = negative_rollups(list(merge.removed.values()), plan.rollups)
        return plan

    def commit(self, plan: ColumnPlan) -> None:
        self._engine.commit(plan)
        self._taken = []  # the merged halves stay out
        if self.core is not None:  # the reference engine's Correlator prunes its own
            self._np_commits += 1
            if self._np_commits >= 50:  # when the C core prunes (as Correlator.commit)
                self._np_commits = 0
                self.nodeport.prune(self.high_water)
        self._commits += 1

    def rollback(self, plan: ColumnPlan) -> None:
        """Undo an uncommitted plan: the state is exactly as before it."""
        self._engine.rollback(plan)
        self._put_back()

    def _put_back(self) -> None:
        """The merged halves of a plan not committed, held again as they were."""
        if self._taken and self.core is not None:
            self.core.rollback_pending()
            for key, conns, seq in reversed(self._taken):
                self.core.put_back(key, conns, seq)
        self._taken = []

    def prune(self) -> int:
        """Forget connections that can no longer be joined (Correlator.prune); how many."""
        self._put_back()
        gone = self._engine.prune()
        self.nodeport.prune(self.high_water)
        return gone

    def stats(self) -> dict[str, int]:
        """Connections held; with the C core also views, volume minutes, keys, the bytes of
        its structures and the resolver calls made."""
        return self._engine.stats()


def us_of(d: timedelta) -> int:
    return d // timedelta(microseconds=1)


def main(argv: list[str] | None = None) -> int:
    """`python -m aggregator.correlate_columns [--force] [--output FILE] [--quiet]`: build the
    native correlator into the venv (scripts/setup-venv.sh)."""
    return native_build.main(native.SPEC, argv, what="native correlator",
                             fallback="the aggregator correlates with the reference Correlator")


if __name__ == "__main__":
    sys.exit(main())
