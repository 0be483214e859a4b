"""The store interface: what ingest (and later correlation, the graph and the API) may ask of
any flow store backend. Backend SQL lives only in the backends (aggregator/store/duckdb.py today,
ClickHouse with the scale-out issue).

In:  decoded, validated batches of `FlowRecord`s with their idempotency key
     `(collector, batch_seq)`.
Out: `IngestResult` (stored, or a duplicate of a batch already applied), and raw records back
     by time range.

Contract every backend keeps (the store tests run against each backend):
- `ingest` is atomic: the records of a batch and its `(collector, batch_seq)` mark are
  committed together or not at all, so a batch is applied exactly once, across restarts.
- `ingest` returns only after the commit is durable: what was acknowledged survives kill -9.
- Writes are bulk (columns), never one INSERT per record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from eastwest.errors import EastwestError
from eastwest.record import FlowRecord

if TYPE_CHECKING:
    from aggregator.connection import Connection
    from aggregator.store.derived import Derived


class StoreError(EastwestError):
    """The backend failed (disk full, file locked, corrupt file): names the backend and path."""


class Backlogged(StoreError):
    """The store is a whole backlog behind (`--correlation-backlog`): retry later. Ingest
    answers 429 with Retry-After; the JetStream consumer naks the message."""


@dataclass(frozen=True)
class IngestResult:
    collector: str
    batch_seq: int
    stored: int          # records written by this call (0 for a duplicate)
    duplicate: bool      # the batch had been applied before: nothing written


@runtime_checkable
class FlowStore(Protocol):
    """A durable store of raw flow records, idempotent per `(collector, batch_seq)`."""

    def ingest(self, collector: str, batch_seq: int, records: Sequence[FlowRecord],
               derived: Derived | None = None) -> IngestResult:
        """Store the records and the batch mark in one transaction; a batch applied before is
        not applied again (`duplicate=True`). Durable when it returns. `derived` (the
        correlated connections, rollup deltas and workloads of the batch, issue #6) is
        written in the same transaction."""

    def batch_applied(self, collector: str, batch_seq: int) -> bool:
        """Whether `(collector, batch_seq)` was applied."""

    def records(self, since: datetime | None = None, until: datetime | None = None, *,
                collector: str | None = None, limit: int | None = None) -> list[FlowRecord]:
        """Raw records whose `end` is in [since, until), oldest first (ties by record_id)."""

    def count(self) -> int:
        """Number of raw records stored."""

    def close(self) -> None:
        """Flush and release the backend; idempotent."""

    # -- correlated tables (issue #6; aggregator/store/duckdb_derived.py for DuckDB) ------------
    def recent_connections(self, horizon_s: float) -> list[Connection]:
        """Connections whose last record is within `horizon_s` of the newest (restart)."""

    def connections(self, where: str, params: Sequence[Any], *, order: str, limit: int,
                    columns: Sequence[str]) -> list[dict[str, Any]]:
        """Connection rows matching a compiled filter (`Filter.to_sql`), ordered, limited."""

    def edge_counts(self, since: datetime, until: datetime, group_by: str, where: str,
                    params: Sequence[Any]) -> list[dict[str, Any]]:
        """Per edge of the window: connections opened, active, closed, failed, ..."""

    def edge_volumes(self, since: datetime, until: datetime, group_by: str, where: str,
                     params: Sequence[Any]) -> list[dict[str, Any]]:
        """Per edge of the window: the minute rollups' byte/packet/retransmit deltas."""

    def workload_rows(self) -> list[dict[str, Any]]:
        """Every workload seen, with first_seen and last_seen."""

    def apply_retention(self, cutoff: datetime) -> dict[str, int]:
        """Delete what ended before `cutoff`; rows deleted per table."""
