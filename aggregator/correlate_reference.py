"""The reference correlator behind the columnar correlator's engine interface.

Stage: correlation, when the C core is not available (no compiler, a refused build,
`EASTWEST_CORRELATE_NATIVE=0`). In: a flat table (turned back into records by `record_of`) or
records. Out: the reference `Plan` (aggregator/correlate.py) as a `ColumnPlan`, through
`Derived` (aggregator/correlate_plan.py `from_reference`). Same results as the C core, slower.
`Engine` is the interface both engines give `ColumnCorrelator` (aggregator/correlate_columns.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import pyarrow as pa

from aggregator.connection import Connection
from aggregator.correlate import Correlator
from aggregator.correlate_core import Counters, IdSource, Key, StalePlan
from aggregator.correlate_plan import ColumnPlan, from_reference
from aggregator.identity import IdentityResolver
from aggregator.store.columns import READ_COLUMNS, record_of
from eastwest.record import FlowRecord


class Engine(Protocol):
    """What `ColumnCorrelator` asks of an engine."""

    @property
    def settled(self) -> list[str]: ...
    def plan(self, table: pa.Table, collector: str | None, at: datetime) -> ColumnPlan: ...
    def plan_records(self, records: Sequence[FlowRecord], at: datetime) -> ColumnPlan: ...
    def commit(self, plan: ColumnPlan) -> None: ...
    def rollback(self, plan: ColumnPlan) -> None: ...
    def prune(self) -> int: ...
    def reset(self) -> None: ...
    def load(self, connections: Iterable[Connection]) -> int: ...
    def refresh(self, fresh: Mapping[Key, list[Connection]]) -> None: ...
    def connections(self) -> list[Connection]: ...
    def counters(self) -> Counters: ...
    def stats(self) -> dict[str, int]: ...


class _Correlator(Correlator):
    """The reference correlator, its connection ids drawn from `ids` when given."""

    def __init__(self, resolver: IdentityResolver, ids: IdSource | None, **kw: Any) -> None:
        super().__init__(resolver, **kw)
        self._source = ids
        self._pool = b""

    def _new_id(self) -> str:
        if self._source is None:
            return super()._new_id()
        if not self._pool:
            self._pool = self._source(1)
        raw, self._pool = self._pool[:16], self._pool[16:]
        return raw.hex()


class ReferenceEngine:
    def __init__(self, resolver: IdentityResolver, ids: IdSource | None, **kw: Any) -> None:
        self.ref = _Correlator(resolver, ids, **kw)

    @property
    def settled(self) -> list[str]:
        return self.ref.settled

    def plan(self, table: pa.Table, collector: str | None, at: datetime) -> ColumnPlan:
        return self.plan_records(records_of(table, collector), at)

    def plan_records(self, records: Sequence[FlowRecord], at: datetime) -> ColumnPlan:
        return from_reference(self.ref.plan(records))  # the reference reads its clock itself

    def commit(self, plan: ColumnPlan) -> None:
        if plan.reference is None:
            raise StalePlan("not a plan of the reference engine")
        self.ref.commit(plan.reference)

    def rollback(self, plan: ColumnPlan) -> None:
        """Nothing to undo: the reference's plan changed nothing but its counters."""

    def prune(self) -> int:
        return self.ref.prune()

    def reset(self) -> None:
        self.ref.index.clear()
        self.ref.high_water = None
        del self.ref.settled[:]

    def load(self, connections: Iterable[Connection]) -> int:
        return self.ref.load(connections)

    def refresh(self, fresh: Mapping[Key, list[Connection]]) -> None:
        self.ref.refresh(dict(fresh))

    def connections(self) -> list[Connection]:
        return [c for bucket in self.ref.index.values() for c in bucket]

    def counters(self) -> Counters:
        r = self.ref
        return Counters(len(r), r.renames, r.late_names, r.high_water)

    def stats(self) -> dict[str, int]:
        return {"connections": len(self.ref)}


def records_of(table: pa.Table, collector: str | None) -> list[FlowRecord]:
    """The records of a flat table, by `record_of` (with a `collector` column, or one for all)."""
    n = table.num_rows
    if "collector" in table.column_names:
        colls = table.column("collector").to_pylist()
    elif collector is not None:
        colls = [collector] * n
    else:
        raise ValueError("no 'collector' column and no collector given for the batch")
    cols = [colls]
    for name in READ_COLUMNS[1:]:
        if name.startswith("epoch_us("):
            col = table.column(name[len("epoch_us("):-1]).cast(pa.int64())
        else:
            col = table.column(name)
        cols.append(col.to_pylist())
    return [record_of(row) for row in zip(*cols, strict=True)]
