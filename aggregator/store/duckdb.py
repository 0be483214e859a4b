"""The DuckDB flow store: one embedded database file under `--data DIR`.

In:  batches of validated `FlowRecord`s with their `(collector, batch_seq)`.
Out: raw records by time range; the idempotency marks of applied batches.

Each batch is written in one transaction: a bulk `INSERT ... SELECT` from an Arrow table (built
column by column in `aggregator.store.columns`, the batch's collector, sequence and time added as
parameters) plus one row in `ingested_batches`, whose primary key `(collector, batch_seq)` makes
a retried batch a no-op (a correlation step, `write_batches`, writes the raw rows of all its
batches in one INSERT and their marks in another). DuckDB writes its WAL and syncs it at COMMIT
(https://duckdb.org/docs/connect/concurrency, "ACID" in duckdb/src/storage/write_ahead_log), so a
batch acknowledged after `ingest` returns survives kill -9 of the aggregator; the WAL is replayed
when the file is opened again.

Raw records are stored as flat columns + `extra` (aggregator/store/columns.py) and rebuilt field
for field by `records()`. A file written before `extra` existed keeps its `record` column (the
whole record as msgpack, then NOT NULL): it is made nullable and still read for those rows.

One writer connection, serialised by a lock (FastAPI runs handlers in a thread pool); readers use
their own cursors.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from aggregator.store.base import GroupShare, IngestResult, RawBatch, StoreError, WriteStep
from aggregator.store.columns import (
    DUCKDB_COLUMNS,
    FLAT_NAMES,
    READ_COLUMNS,
    flat_table,
    gc_paused,
    record_of,
    record_of_blob,
)
from aggregator.store.derived import DerivedTables
from aggregator.store.duckdb_derived import (
    DERIVED_DDL,
    DerivedQueries,
    migrate_derived,
    write_derived,
)
from aggregator.store.duckdb_edges import EdgeQueries
from aggregator.store.query import EVERY_RECORD, RecordQuery
from eastwest.record import FlowRecord

FILE_NAME = "eastwest.duckdb"
MIGRATE_HORIZON_S = 1800.0  # an old file's connections this recent can still change (keep_open)
FLOW_NAMES = [c[0] for c in DUCKDB_COLUMNS]
_INSERT_FLOWS = (f"INSERT INTO flows (collector, batch_seq, ingested_at, {', '.join(FLAT_NAMES)}, "
                 f"extra) SELECT $1, $2, $3, {', '.join(FLAT_NAMES)}, extra FROM _ew_batch_table")

_INSERT_RAW = (f"INSERT INTO flows (collector, batch_seq, ingested_at, {', '.join(FLAT_NAMES)}, "
               f"extra) SELECT _ew_collector, _ew_seq, $1, {', '.join(FLAT_NAMES)}, extra "
               "FROM _ew_raw")

# DuckDB writes what the WAL holds into the file (a checkpoint) at the COMMIT that takes the WAL
# past `CHECKPOINT_THRESHOLD`, and every commit waits for it (also from other connections:
# tried). By default a checkpoint also vacuums: it rewrites every row group that has deleted
# rows. `connections_live` has deletes all over it (each step replaces the rows of the
# connections it changed and moves settled ones out), so with vacuum a checkpoint rewrote most of
# that table: 1.1-3.2 s pauses every ~5 s at 100,000 records/s, and a small threshold cost 3x the
# time; the same deletes checkpoint in 0.61 s instead of 4.71 s without it (docs/benchmarks.md,
# "Freshness"). Every row of that table leaves it (replaced or settled) and a row group whose
# rows are all deleted is dropped by a checkpoint without a vacuum task, so the table does not
# grow (tests/unit/test_store_connections.py). Without vacuum a checkpoint costs about what its
# WAL holds, so short ones are as cheap in total and keep the pauses short: 32 MB, a checkpoint
# of ~0.2 s every ~50,000 records (freshness p95 1.6 s instead of 3.5 s at 100,000 records/s,
# and no lower rate). What the WAL holds is also held in memory and replayed when the file is
# opened after a crash. `checkpoint()` and `close()` vacuum (DuckDB's default).
CHECKPOINT_THRESHOLD = "32MB"
VACUUM_TASKS_WRITING = 0
VACUUM_TASKS_AT_REST = 100


def _raw_table(raw: Sequence[RawBatch]) -> pa.Table | None:
    """The raw batches of a step as ONE table for one INSERT (half the time of an INSERT per
    batch): each row with its batch's collector (a dictionary column, one string per batch) and
    batch_seq. None when the batches' layouts differ (then an INSERT per batch)."""
    tables = [b.table for b in raw if b.table is not None]
    if len(tables) != len(raw) or any(t.schema != tables[0].schema for t in tables[1:]):
        return None
    sizes = np.array([t.num_rows for t in tables], dtype=np.int64)
    which = np.repeat(np.arange(len(tables), dtype=np.int32), sizes)
    collectors = pa.DictionaryArray.from_arrays(
        pa.array(which), pa.array([b.collector for b in raw], pa.string()))
    seqs = pa.array(np.repeat(np.array([b.batch_seq for b in raw], dtype=np.int64), sizes))
    t = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return t.append_column("_ew_collector", collectors).append_column("_ew_seq", seqs)


_DDL = [
    "CREATE TABLE IF NOT EXISTS flows ("
    + ", ".join(f"{name} {ddl}" for name, _, ddl in DUCKDB_COLUMNS) + ")",
    "CREATE TABLE IF NOT EXISTS ingested_batches ("
    " collector VARCHAR NOT NULL, batch_seq BIGINT NOT NULL, records INTEGER NOT NULL,"
    " ingested_at TIMESTAMPTZ NOT NULL, correlated BOOLEAN NOT NULL DEFAULT true,"
    " PRIMARY KEY (collector, batch_seq))",
    *DERIVED_DDL,  # correlated connections, minute rollups, workloads (issue #6)
]


class DuckDBStore(DerivedQueries, EdgeQueries):
    """`Store` (aggregator/store/base.py) on a DuckDB file. `data_dir` is the data directory
    (created if missing); the pipeline journals acknowledged batches in `journal_dir`."""

    backend = "duckdb"
    shared = False  # one aggregator process writes a DuckDB file

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"data directory {str(self.dir)!r} cannot be created: {exc}") from exc
        self.path = self.dir / FILE_NAME
        self.journal_dir: Path | None = self.dir / "journal"
        try:
            self._con = duckdb.connect(str(self.path))
            self._con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
            self._con.execute(f"SET max_vacuum_tasks = {VACUUM_TASKS_WRITING}")
            for stmt in _DDL:
                self._con.execute(stmt)
            self._legacy = self._migrate()
        except duckdb.Error as exc:
            raise StoreError(f"duckdb file {str(self.path)!r} cannot be opened: {exc}") from exc
        # two writers: raw batches (the ack path) on their own connection and lock, so that an
        # ingest never waits for correlation's longer transactions (derived tables) on the
        # other. They touch different rows (a raw batch inserts its flows and mark; correlation
        # writes connections, rollups, workloads and flags marks committed before); DuckDB's
        # optimistic concurrency lets both commit. Retention, checkpoint and close take both.
        self._lock = threading.Lock()
        self._raw_lock = threading.Lock()
        try:
            self._raw_con = self._con.cursor()
        except duckdb.Error as exc:
            raise StoreError(f"duckdb file {str(self.path)!r} cannot be opened: {exc}") from exc
        self._closed = False
        self._count = self._scalar("SELECT count(*) FROM flows")

    # -- writes -------------------------------------------------------------------------------
    def ingest(self, collector: str, batch_seq: int, records: Sequence[FlowRecord],
               derived: DerivedTables | None = None) -> IngestResult:
        with gc_paused():
            table = flat_table(records) if records else None
        return self.ingest_table(collector, batch_seq, table, len(records), derived)

    def ingest_table(self, collector: str, batch_seq: int, table: pa.Table | None, n: int,
                     derived: DerivedTables | None = None) -> IngestResult:
        """`ingest` of a batch already in columns: `table` in the `flat_table` layout (what
        aggregator/store/wire_columns.py decodes a wire batch into), `n` its rows (None or an
        empty table: a batch without records, still marked applied)."""
        now = datetime.now(UTC)
        if table is not None and table.num_rows == 0:
            table = None
        if derived is None:  # the raw store only: its own writer
            with self._raw_lock:
                return self._ingest_on(self._raw_writer(), collector, batch_seq, table, n, None,
                                       now)
        with self._raw_lock, self._lock:  # raw and derived in one transaction
            return self._ingest_on(self._writer(), collector, batch_seq, table, n, derived, now)

    def _ingest_on(self, con: duckdb.DuckDBPyConnection, collector: str, batch_seq: int,
                   table: pa.Table | None, n: int, derived: DerivedTables | None,
                   now: datetime) -> IngestResult:
        try:
            con.execute("BEGIN TRANSACTION")
            # the mark first: its primary key tells a batch applied before (one statement)
            fresh = con.execute(
                "INSERT INTO ingested_batches (collector, batch_seq, records, ingested_at, "
                "correlated) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING batch_seq",
                [collector, batch_seq, n, now, derived is not None]).fetchone()
            if fresh is None:
                con.execute("ROLLBACK")
                return IngestResult(collector, batch_seq, 0, True)
            if table is not None:
                # DuckDB finds the Arrow table by this local's name (a replacement scan): no
                # register/unregister round trips, ~1.5 ms a batch (docs/benchmarks.md)
                _ew_batch_table = table  # noqa: F841 - read by the SQL text
                con.execute(_INSERT_FLOWS, [collector, batch_seq, now])
            if derived is not None:
                write_derived(con, derived)
            con.execute("COMMIT")
        except duckdb.Error as exc:
            self._rollback(con)
            raise StoreError(f"duckdb {str(self.path)!r}: batch ({collector!r}, {batch_seq}) "
                             f"not stored: {exc}") from exc
        self._count += n
        return IngestResult(collector, batch_seq, n, False)

    def write_batches(self, step: WriteStep) -> None:
        """A correlation step behind the ack (aggregator/worker.py): its raw batches from the
        journal, each with its mark (batches applied before are left out by the caller), the
        derived tables of their correlation, and older raw batches (stored raw before, not
        correlated yet) flagged correlated, in ONE durable transaction."""
        now = datetime.now(UTC)
        raw = step.raw
        with self._raw_lock, self._lock:
            con = self._writer()
            try:
                con.execute("BEGIN TRANSACTION")
                if raw:
                    _ew_marks = pa.table({  # noqa: F841 - read by the SQL text
                        "collector": pa.array([b.collector for b in raw], pa.string()),
                        "batch_seq": pa.array([b.batch_seq for b in raw], pa.int64()),
                        "records": pa.array([b.n for b in raw], pa.int32())})
                    con.execute("INSERT INTO ingested_batches (collector, batch_seq, records, "
                                "ingested_at, correlated) SELECT collector, batch_seq, records, "
                                "$1, true FROM _ew_marks", [now])
                    full = [b for b in raw if b.table is not None and b.n]
                    _ew_raw = _raw_table(full) if full else None  # read by the SQL text
                    if _ew_raw is not None:
                        con.execute(_INSERT_RAW, [now])
                    else:
                        for b in full:
                            _ew_batch_table = b.table  # noqa: F841 - read by the SQL text
                            con.execute(_INSERT_FLOWS, [b.collector, b.batch_seq, now])
                write_derived(con, step.derived)
                if step.correlated:
                    self._flag_correlated(con, step.correlated)
                con.execute("COMMIT")
            except duckdb.Error as exc:
                self._rollback(con)
                raise StoreError(f"duckdb {str(self.path)!r}: {len(raw)} batches not stored: "
                                 f"{exc}") from exc
            self._count += sum(b.n for b in raw)

    def write_group(self, shares: Sequence[GroupShare]) -> None:
        """Coalesced shares (aggregator/worker.py `accept_group`) in ONE transaction: each
        share's mark, raw rows and derived tables in stream order, exactly what one `ingest`
        per share would have written (rollup deltas add up, a later share's connection rows
        replace an earlier one's)."""
        if not shares:
            return
        now = datetime.now(UTC)
        with self._raw_lock, self._lock:
            con = self._writer()
            try:
                con.execute("BEGIN TRANSACTION")
                for sh in shares:
                    b = sh.raw
                    con.execute("INSERT INTO ingested_batches (collector, batch_seq, records, "
                                "ingested_at, correlated) VALUES (?, ?, ?, ?, true)",
                                [b.collector, b.batch_seq, b.n, now])
                    table = b.table
                    if table is None and b.n:
                        with gc_paused():
                            table = flat_table(b.records())
                    if table is not None and table.num_rows:
                        _ew_batch_table = table  # noqa: F841 - read by the SQL text
                        con.execute(_INSERT_FLOWS, [b.collector, b.batch_seq, now])
                    write_derived(con, sh.derived)
                con.execute("COMMIT")
            except duckdb.Error as exc:
                self._rollback(con)
                raise StoreError(f"duckdb {str(self.path)!r}: group of {len(shares)} batches "
                                 f"not stored: {exc}") from exc
            self._count += sum(sh.raw.n for sh in shares)

    def applied_marks(self, keys: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of these `(collector, batch_seq)` were applied (one query)."""
        if not keys:
            return set()
        _ew_keys = pa.table({  # noqa: F841 - read by the SQL text
            "collector": pa.array([c for c, _ in keys], pa.string()),
            "batch_seq": pa.array([s for _, s in keys], pa.int64())})
        if self._closed:
            raise StoreError(f"duckdb {str(self.path)!r} is closed")
        try:
            cur = self._con.cursor()
            try:
                rows = cur.execute("SELECT b.collector, b.batch_seq FROM ingested_batches b "
                                   "JOIN _ew_keys k ON b.collector = k.collector AND "
                                   "b.batch_seq = k.batch_seq").fetchall()
            finally:
                cur.close()
        except duckdb.Error as exc:
            raise StoreError(f"duckdb {str(self.path)!r}: query failed: {exc}") from exc
        return {(c, s) for c, s in rows}

    @staticmethod
    def _flag_correlated(con: duckdb.DuckDBPyConnection, batches: Sequence[tuple[str, int]]) -> None:
        _ew_marks = pa.table({  # noqa: F841 - read by the SQL text
            "collector": pa.array([c for c, _ in batches], pa.string()),
            "batch_seq": pa.array([s for _, s in batches], pa.int64())})
        con.execute("UPDATE ingested_batches SET correlated = true FROM _ew_marks WHERE "
                    "ingested_batches.collector = _ew_marks.collector AND "
                    "ingested_batches.batch_seq = _ew_marks.batch_seq")

    def uncorrelated_batches(self) -> list[tuple[str, int, int]]:
        """The raw batches stored but not correlated yet (acknowledged, then the aggregator
        stopped), in the order they were stored, as (collector, batch_seq, records): their
        records are read one batch at a time (`batch_records`) when correlation gets to them,
        so a deep backlog is not all in memory at start."""
        return [(c, s, n) for c, s, n in self._query(
            "SELECT collector, batch_seq, records FROM ingested_batches WHERE NOT correlated "
            "ORDER BY ingested_at, rowid")]

    def batch_records(self, collector: str, batch_seq: int) -> list[FlowRecord]:
        """The stored records of one batch, oldest first."""
        rows = self._query(f"SELECT {', '.join(READ_COLUMNS)} FROM flows WHERE collector = ? AND "
                           "batch_seq = ? ORDER BY end_ts, record_id", [collector, batch_seq])
        return [record_of(r) for r in rows]

    # -- reads --------------------------------------------------------------------------------
    def max_batch_seq(self, collector: str) -> int:
        """The highest `batch_seq` applied for this collector (-1: none)."""
        rows = self._query("SELECT max(batch_seq) FROM ingested_batches WHERE collector = ?",
                           [collector])
        return -1 if not rows or rows[0][0] is None else int(rows[0][0])

    def batch_applied(self, collector: str, batch_seq: int) -> bool:
        return bool(self._scalar(
            "SELECT count(*) FROM ingested_batches WHERE collector = ? AND batch_seq = ?",
            [collector, batch_seq]))

    def records(self, q: RecordQuery = EVERY_RECORD) -> list[FlowRecord]:
        where: list[str] = []
        params: list[Any] = []
        if q.since is not None:
            where.append("end_ts >= ?")
            params.append(q.since)
        if q.until is not None:
            where.append("end_ts < ?")
            params.append(q.until)
        if q.collector is not None:
            where.append("collector = ?")
            params.append(q.collector)
        if q.server_port is not None:
            where.append("server_port = ?")
            params.append(int(q.server_port))
        sql = f"SELECT {', '.join(READ_COLUMNS)}{', record' if self._legacy else ''} FROM flows"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY end_ts, record_id"
        if q.limit is not None:
            sql += " LIMIT ?"
            params.append(int(q.limit))
        rows = self._query(sql, params)
        if self._legacy:
            return [record_of_blob(r[-1]) if r[-1] is not None else record_of(r[:-1]) for r in rows]
        return [record_of(r) for r in rows]

    def nat_records(self, since: datetime) -> list[FlowRecord]:
        """Records with an SNAT in their `nat` (in `extra`, whose msgpack holds the text), end
        at or after `since` (files of the one-column layout keep records whole: not read)."""
        rows = self._query(f"SELECT {', '.join(READ_COLUMNS)} FROM flows WHERE end_ts >= ? AND "
                           "extra IS NOT NULL AND contains(CAST(extra AS VARCHAR), 'snat') "
                           "ORDER BY end_ts, record_id", [since])
        return [r for r in map(record_of, rows) if r.nat is not None
                and any(n.type == "snat" for n in r.nat)]

    def count(self) -> int:
        return self._count

    def batches(self) -> int:
        return int(self._scalar("SELECT count(*) FROM ingested_batches"))

    def file_bytes(self) -> int:
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def checkpoint(self) -> None:
        """Write everything in the WAL into the database file (DuckDB does it by itself when the
        WAL grows past `wal_autocheckpoint`; benches call it so that no path leaves work behind),
        vacuuming the row groups with deleted rows, which the automatic checkpoints leave."""
        with self._raw_lock, self._lock:
            con = self._writer()
            try:
                con.execute(f"SET max_vacuum_tasks = {VACUUM_TASKS_AT_REST}")
                try:
                    con.execute("CHECKPOINT")
                finally:
                    con.execute(f"SET max_vacuum_tasks = {VACUUM_TASKS_WRITING}")
            except duckdb.Error as exc:
                raise StoreError(f"duckdb {str(self.path)!r}: checkpoint failed: {exc}") from exc

    def close(self) -> None:
        with self._raw_lock, self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._con.execute(f"SET max_vacuum_tasks = {VACUUM_TASKS_AT_REST}")
                    self._raw_con.close()
                    self._con.close()
                except duckdb.Error as exc:
                    raise StoreError(f"duckdb {str(self.path)!r}: close failed: {exc}") from exc

    # -- helpers ------------------------------------------------------------------------------
    def _migrate(self) -> bool:
        """Bring a file of an older layout up to this one; True when flows has the legacy
        `record` column (whole records as msgpack, read for the rows that have it).
        Connections: aggregator/store/duckdb_derived.py `migrate_derived`."""
        cols = {r[0] for r in self._con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'flows'").fetchall()}
        if "extra" not in cols:
            self._con.execute("ALTER TABLE flows ADD COLUMN extra BLOB")
        if "tunnel_type" not in cols:  # older rows: NULL, their type in `extra` (else VXLAN)
            self._con.execute("ALTER TABLE flows ADD COLUMN tunnel_type VARCHAR")
        marks = {r[0] for r in self._con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = "
            "'ingested_batches'").fetchall()}
        if "correlated" not in marks:  # written before correlation ran behind the raw store
            self._con.execute("ALTER TABLE ingested_batches ADD COLUMN correlated BOOLEAN "
                              "DEFAULT true")
        migrate_derived(self._con, MIGRATE_HORIZON_S)
        if "record" in cols:
            self._con.execute("ALTER TABLE flows ALTER COLUMN record DROP NOT NULL")
            return True
        return False

    def _writer(self) -> duckdb.DuckDBPyConnection:
        if self._closed:
            raise StoreError(f"duckdb {str(self.path)!r} is closed")
        return self._con

    def _raw_writer(self) -> duckdb.DuckDBPyConnection:
        if self._closed:
            raise StoreError(f"duckdb {str(self.path)!r} is closed")
        return self._raw_con

    def _query(self, sql: str, params: list[Any] | None = None) -> list[Any]:
        if self._closed:
            raise StoreError(f"duckdb {str(self.path)!r} is closed")
        try:
            cur = self._con.cursor()
            try:
                return cur.execute(sql, params or []).fetchall()
            finally:
                cur.close()
        except duckdb.Error as exc:
            raise StoreError(f"duckdb {str(self.path)!r}: query failed: {exc}") from exc

    def _scalar(self, sql: str, params: list[Any] | None = None) -> int:
        rows = self._query(sql, params)
        return int(rows[0][0]) if rows else 0

    @staticmethod
    def _rollback(con: duckdb.DuckDBPyConnection) -> None:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # no transaction open: nothing to undo
