"""What one written correlation step changed, as columns: the fan-out's input.

Stage: between the correlation worker (aggregator/worker.py) and the fan-out (aggregator/fanout.py:
exporters, live hub). In: a correlation plan (the reference `Plan` of aggregator/correlate.py, or
a plan on columns) and the rows the store wrote for it. Out: `Changes`, one row per connection the
step touched, in the store's row layout (aggregator/store/derived.py, DuckDB's: every shown column
and `views`), with what the rows do not say: whether the step created the connection, the
increase of its counters in this step, when its names are final, whether both ends are named by
their own observers. Consumers work on the columns (per edge, per due connection); a `Connection`
object is built only for a consumer that needs one (OTLP spans), with `connection_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.connection import Connection
from aggregator.correlate import Plan
from aggregator.correlate_plan import ColumnPlan
from aggregator.store.derived import DUCKDB_CONN_SCHEMA, connection_of
from eastwest.clock import unix_us

_EMPTY = pa.Table.from_batches([], schema=DUCKDB_CONN_SCHEMA)


@dataclass
class Changes:
    at: datetime                 # the aggregator's wall clock when the step was planned
    rows: pa.Table               # DUCKDB_CONN_SCHEMA, one row per touched connection
    created: np.ndarray          # bool (n,): the step created the connection
    deltas: np.ndarray           # int64 (n, 6): bytes c2s, s2c, packets c2s, s2c, retransmits, resets
    names_until_us: np.ndarray   # int64 (n,): µs since the epoch when names are final (0: final)
    ends_known: np.ndarray       # bool (n,): each end named by its own observer or the static map
    _objects: list[Connection] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.rows.num_rows)

    def connections(self, index: Sequence[int] | None = None) -> list[Connection]:
        """The touched connections as objects (all, or those at `index`): built from the rows
        on demand, for a consumer that cannot work on columns."""
        if self._objects is not None:
            return self._objects if index is None else [self._objects[i] for i in index]
        rows = self.rows if index is None else self.rows.take(pa.array(index, pa.int64()))
        return [connection_of(r) for r in rows.to_pylist()]

    @classmethod
    def empty(cls, at: datetime) -> Changes:
        return cls(at, _EMPTY, np.zeros(0, bool), np.zeros((0, 6), np.int64),
                   np.zeros(0, np.int64), np.zeros(0, bool))


def changes_of_columns(plan: ColumnPlan) -> Changes:
    """A plan on columns (aggregator/correlate_plan.py) as `Changes`, without a Python step per
    connection: a connection's ends are known when its names are final, or each end is named by
    the static map or its own socket observer has reported (`Connection.ends_known`)."""
    at = plan.at or datetime.now(UTC)
    if not len(plan):
        return Changes.empty(at)
    rows = plan.rows
    left = plan.names_final_in_s
    until = np.where(left > 0, unix_us(at) + np.rint(left * 1e6).astype(np.int64), 0)
    observed = rows.column("observed_by")

    def known(side: str) -> np.ndarray:
        static = pc.equal(rows.column(f"{side}_id_source"), "static")
        seen = pc.match_substring(observed, f",{side},")
        return pc.fill_null(pc.or_(static, seen), False).to_numpy(zero_copy_only=False)

    ends = (left <= 0) | (known("client") & known("server"))
    objects = list(plan._objects.values()) if plan._objects is not None else None
    return Changes(at, rows, plan.created, plan.deltas, until.astype(np.int64), ends, objects)


def changes_of_plan(plan: Plan, rows: pa.Table | None) -> Changes:
    """The reference correlator's plan as `Changes`: `rows` are the DuckDB rows of
    `plan.connections`, in their order (Derived.connection_rows)."""
    at = plan.at or datetime.now(UTC)
    conns = list(plan.connections.values())
    if not conns or rows is None:
        return Changes.empty(at)
    created = np.fromiter((c.conn_id in plan.created for c in conns), bool, len(conns))
    zero = (0, 0, 0, 0, 0, 0)
    deltas = np.array([plan.deltas.get(c.conn_id, zero) for c in conns], np.int64).reshape(-1, 6)
    until = np.fromiter((0 if c.naming is None else unix_us(c.naming.until) for c in conns),
                        np.int64, len(conns))
    known = np.fromiter((c.ends_known() for c in conns), bool, len(conns))
    return Changes(at, rows, created, deltas, until, known, conns)
