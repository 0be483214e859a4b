"""The two declared store interfaces: the one the write path uses and the one the read path uses.

Backend SQL lives only in the backends (aggregator/store/duckdb*.py, clickhouse*.py); the
pipeline (aggregator/pipeline.py) and the API hold these interfaces, never a backend.

- `WriteStore` (intake, journal, correlation worker): batches and their marks, the derived
  tables of correlation (connections, rollups, workloads), the correlator's state at a restart,
  retention.
- `ReadStore` (the API): typed queries (aggregator/store/query.py) that each backend compiles in
  its own dialect.
- `Store` is both: what `open_store` returns.

Contract every backend keeps (the store tests run against each backend):
- `ingest` is atomic: the records of a batch and its `(collector, batch_seq)` mark are
  committed together or not at all, so a batch is applied exactly once, across restarts;
  `write_batches` writes a whole correlation step (raw batches, marks, derived tables) at once;
  `write_group` writes a coalesced group of shares (each with its own derived tables) at once.
- Both return only after the commit is durable: what was acknowledged survives kill -9.
- Writes are bulk (columns), never one INSERT per record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from aggregator.store.query import EVERY_RECORD, ConnectionQuery, EdgeQuery, RecordQuery
from eastwest.errors import EastwestError
from eastwest.record import FlowRecord

if TYPE_CHECKING:
    from aggregator.connection import Connection
    from aggregator.store.derived import DerivedTables

Key = tuple[str, str, int, str, int, int]  # a correlation key (aggregator/correlate.py)


class StoreError(EastwestError):
    """The backend failed (disk full, file locked, corrupt file): names the backend and path."""


class Backlogged(StoreError):
    """The aggregator is a whole backlog behind (`--correlation-backlog`): retry later. Ingest
    answers 429 with Retry-After; the JetStream consumer naks the message."""


@dataclass(frozen=True)
class IngestResult:
    collector: str
    batch_seq: int
    stored: int          # records written (or journaled) by this call (0 for a duplicate)
    duplicate: bool      # the batch had been applied before: nothing written


@dataclass
class RawBatch:
    """One accepted batch as the store writes it: its good records as a table in the
    `flat_table` layout (aggregator/store/columns.py; None when it has none) and, for a backend
    that keeps records whole, the records themselves (decoded on first use)."""

    collector: str
    batch_seq: int
    n: int
    table: pa.Table | None
    decode: Callable[[], list[FlowRecord]] = field(repr=False, default=list)
    _records: list[FlowRecord] | None = field(default=None, repr=False)

    def records(self) -> list[FlowRecord]:
        if self._records is None:
            self._records = self.decode()
        return self._records


@dataclass
class WriteStep:
    """What one correlation step writes in one transaction: new raw batches with their marks,
    the derived tables of their correlation, and batches stored raw earlier (a file of an older
    version) flagged correlated now."""

    raw: list[RawBatch]
    derived: DerivedTables
    correlated: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class GroupShare:
    """One share of a coalesced group (aggregator/worker.py `InlineCorrelation.accept_group`):
    its raw batch and mark, and the derived tables of its own plan (planned after the share
    before it in the group, as if it had been applied alone)."""

    raw: RawBatch
    derived: DerivedTables


class WriteStore(Protocol):
    # where the pipeline journals acknowledged batches before they are written here (a local
    # file store); None: a batch is written before it is acknowledged (a shared store)
    journal_dir: Path | None
    # written by several aggregators: correlation reloads the keys of a batch before planning
    shared: bool

    def ingest(self, collector: str, batch_seq: int, records: Sequence[FlowRecord],
               derived: DerivedTables | None = None) -> IngestResult:
        """Store the records, the batch mark and `derived` in one transaction; a batch applied
        before is not applied again (`duplicate=True`). Durable when it returns."""

    def write_batches(self, step: WriteStep) -> None:
        """A journaled correlation step in one durable transaction (its batches are new: the
        caller checked the marks)."""

    def write_group(self, shares: Sequence[GroupShare]) -> None:
        """Shares of one partition, in stream order, in ONE write (a transaction, or one
        insert per table): every share's records, rollup deltas and mark keyed by its own
        `(collector, batch_seq)`, the group's connections (each at its last state) and
        workloads. The shares are new (the caller checked the marks); durable when it returns."""

    def batch_applied(self, collector: str, batch_seq: int) -> bool: ...

    def applied_marks(self, keys: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of these `(collector, batch_seq)` were applied (one query)."""

    def max_batch_seq(self, collector: str) -> int:
        """The highest `batch_seq` applied for this collector (-1: none)."""

    def uncorrelated_batches(self) -> list[tuple[str, int, int]]:
        """Batches stored raw and not correlated (a file of an older version), in order."""

    def batch_records(self, collector: str, batch_seq: int) -> list[FlowRecord]: ...

    def recent_connections(self, horizon_s: float) -> list[Connection]:
        """The connections the correlator may still change (a restart reloads them)."""

    def nat_records(self, since: datetime) -> list[FlowRecord]:
        """The raw records ending at or after `since` whose NAT chain has an SNAT (the
        NodePort middle records a restart learns its aliases from, aggregator/nodeport.py)."""

    def connections_for_keys(self, keys: Iterable[Key]) -> dict[Key, list[Connection]]:
        """The stored connections of these correlation keys (a shared store: what another
        aggregator wrote since); a store of one aggregator answers from nothing."""

    def apply_retention(self, cutoff: datetime) -> dict[str, int]:
        """Delete what ended before `cutoff`; rows deleted per table."""

    def count(self) -> int:
        """Raw records stored."""

    def file_bytes(self) -> int:
        """The store's size on this machine's disk (0 when it is elsewhere)."""

    def close(self) -> None:
        """Flush and release the backend; idempotent."""


class ReadStore(Protocol):
    def records(self, q: RecordQuery = EVERY_RECORD) -> list[FlowRecord]:
        """Raw records whose `end` is in [since, until), oldest first (ties by record_id)."""

    def connections(self, q: ConnectionQuery) -> list[dict[str, Any]]:
        """Connection rows of the query's columns, filtered, ordered, limited."""

    def edges(self, q: EdgeQuery) -> dict[str, list[Any]]:
        """The window's edges as columns (aggregator/store/duckdb_edges.py `EDGE_COLUMNS`)."""

    def service_addresses(self, q: EdgeQuery) -> list[tuple[str, int]]:
        """The distinct (service_ip, service_port) the window's connections matching the
        filter dialled, sorted (the Service view names them before it groups)."""

    def workload_rows(self) -> list[dict[str, Any]]:
        """Every workload seen, with first_seen and last_seen."""

    def connection_count(self) -> int: ...

    def count(self) -> int: ...


class Store(WriteStore, ReadStore, Protocol):
    backend: str
