"""The ClickHouse flow store: the `Store` of several aggregators sharing one store.

In:  batches of validated `FlowRecord`s with their `(collector, batch_seq)` and the batch's
     correlated tables (`Derived`, aggregator/store/derived.py).
Out: raw records, connections, edges, rollup volumes and workloads for the API, identical to
     the DuckDB store's answers (the store and API tests run on both).

Native protocol through `clickhouse-driver` (https://clickhouse-driver.readthedocs.io), which
speaks to 18.16 and current servers alike. ClickHouse has no multi-statement transactions, so
the DuckDB store's single transaction becomes an ordered sequence of idempotent inserts, the
batch mark last (docs/scale-out.md, "Exactly once without transactions"):

    flows -> rollups -> workloads -> connections -> ingested_batches

Every table is a ReplacingMergeTree read with FINAL (aggregator/store/clickhouse_schema.py), so a
batch whose writing was interrupted (aggregator killed) and then redone by another aggregator
reads as written once: raw records and rollup deltas carry the (collector, batch_seq) that wrote
them, connections carry a `version` and the highest one wins (a merged NodePort half's
tombstone, `deleted = 1`, outranks every version of it: `_tombstones`). Rollup deltas are
computed before the connections are replaced, so a redo computes the same deltas as the
interrupted try.
Inserts into `Distributed` tables are synchronous (`insert_distributed_sync=1`): `ingest`
returns only when every shard has the rows, which is when the NATS consumer acks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from aggregator.store.base import GroupShare, IngestResult, StoreError, WriteStep
from aggregator.store.clickhouse_derived import LIVE, ClickHouseQueries, micros
from aggregator.store.clickhouse_schema import (
    TABLES,
    TOMBSTONE_VERSION,
    Location,
    Table,
    distributed_ddl,
    local_ddl,
    parse_version,
    replica_of,
    supports_ttl,
)
from aggregator.store.columns import to_table
from aggregator.store.derived import CONN_DECODER, DerivedTables
from aggregator.store.query import EVERY_RECORD, RecordQuery
from eastwest.record import FlowRecord

log = logging.getLogger("eastwest.store.clickhouse")
_dec = msgspec.msgpack.Decoder(FlowRecord)
_EPOCH_DAY = date(1970, 1, 1)
SYNC = {"insert_distributed_sync": 1}
QUORUM_TIMEOUT_MS = 30_000  # a quorum insert not confirmed within it fails (and is retried)
QUORUM_BUSY = 286           # "Quorum for previous write has not been satisfied yet"
QUORUM_RETRIES = 20         # ~8 s of waiting for another writer's quorum insert
MUTATION_WAIT_S = 300.0
KNOWN_VERSIONS = 1_000_000


def day_of(us: int) -> date:
    return _EPOCH_DAY + timedelta(days=us // 86_400_000_000)


def arrow_columns(table: pa.Table) -> dict[str, list[Any]]:
    """Arrow columns -> Python lists the driver inserts (timestamps as µs, booleans as 0/1)."""
    out: dict[str, list[Any]] = {}
    for f, col in zip(table.schema, table.columns, strict=True):
        if pa.types.is_timestamp(f.type):
            out[f.name] = col.cast(pa.int64()).to_pylist()
        elif pa.types.is_boolean(f.type):
            out[f.name] = [None if v is None else int(v) for v in col.to_pylist()]
        else:
            out[f.name] = col.to_pylist()
    return out


def _keyed(rollups: pa.Table, collector: str, batch_seq: int) -> pa.Table:
    """A share's rollup deltas with the share's key in front (the rollups' sorting key)."""
    n = rollups.num_rows
    return pa.Table.from_arrays(
        [pa.array([collector] * n, pa.string()), pa.array([batch_seq] * n, pa.int64()),
         *rollups.columns], names=["collector", "batch_seq", *rollups.column_names])


def last_states(shares: Sequence[GroupShare]) -> pa.Table | None:
    """The group's connection rows: each connection's row from the last share that changed it
    (its plan started from the earlier shares' state), none for a connection a later share
    merged away (`removed`)."""
    keep: list[pa.Table] = []
    seen: set[str] = set()
    for s in reversed(shares):
        ids = s.derived.connection_ids()
        rows = [i for i, cid in enumerate(ids) if cid not in seen]
        seen.update(ids)
        if rows:  # only the kept rows' states are built
            t = s.derived.connections_at(rows)
            if t is not None:
                keep.append(t)
        seen.update(s.derived.removed)
    return pa.concat_tables(keep[::-1]) if keep else None


class ClickHouseStore(ClickHouseQueries):
    """`Store` (aggregator/store/base.py) on a ClickHouse database (or a cluster of shards
    behind Distributed tables). Several aggregators share it: a batch is written before it is
    acknowledged (no local journal) and correlation reloads a batch's keys first."""

    backend = "clickhouse"
    journal_dir: Path | None = None
    shared = True

    def __init__(self, location: str | Location) -> None:
        from clickhouse_driver import Client  # imported here: the DuckDB path never needs it

        self._Client = Client
        self.loc = location if isinstance(location, Location) else Location.parse(location)
        self.db = self.loc.database
        self._local = threading.local()
        self._clients: list[Any] = []  # every thread's connection, closed by close()
        self._lock = threading.Lock()
        self._closed = False
        self.replicated = False  # local tables replicated (a cluster with replicas per shard)
        self._insert_settings: dict[str, int] = dict(SYNC)
        self._versions: OrderedDict[str, int] = OrderedDict()  # conn_id -> last version written
        self._last_version = 0
        try:
            self.server_version = parse_version(str(self._exec("SELECT version()")[0][0]))
            self._create()
        except StoreError:
            raise
        except Exception as exc:  # the driver's network and server errors
            raise StoreError(f"clickhouse {self.loc}: cannot open the store: {exc}") from exc
        if self.loc.ttl_days and not supports_ttl(self.server_version):
            log.info("clickhouse %s: server %s has no table TTL; retention runs in the aggregator "
                     "(day partitions dropped, boundary day deleted by mutation)", self.loc,
                     ".".join(map(str, self.server_version)))

    # -- connections to the server -----------------------------------------------------------
    def _client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._Client(**self.loc.client_kwargs())
            self._local.client = c
            self._clients.append(c)
        return c

    def _exec(self, sql: str, params: Any = None, **kw: Any) -> Any:
        if self._closed:
            raise StoreError(f"clickhouse {self.loc} is closed")
        try:
            return self._client().execute(sql, params, **kw)
        except Exception as exc:  # clickhouse_driver.errors.Error, socket errors, EOFError
            # a broken connection is not reused: the next call reconnects
            self._local.client = None
            detail = " ".join(str(exc).split())[:400]
            raise StoreError(f"clickhouse {self.loc}: {type(exc).__name__}: {detail}") from exc

    def _shards(self) -> list[tuple[str, int, str]]:
        """(host, port, local database) of every shard; one entry without a cluster."""
        if not self.loc.cluster:
            return [(self.loc.host, self.loc.port, self.db)]
        rows = self._exec("SELECT host_name, port, default_database FROM system.clusters "
                          "WHERE cluster = %(c)s AND replica_num = 1 ORDER BY shard_num",
                          {"c": self.loc.cluster})
        if not rows:
            raise StoreError(f"clickhouse {self.loc}: cluster {self.loc.cluster!r} is not in the "
                             "server's remote_servers")
        if not getattr(self, "replicated", False):
            return [(h, int(p), d or "default") for h, p, d in rows]
        # replicated: per shard, the first replica that answers (DDL and mutations replicate)
        out: list[tuple[str, int, str]] = []
        by_shard: dict[int, list[tuple[str, int, str]]] = {}
        for shard, _, host, port, ldb in self._replicas():
            by_shard.setdefault(shard, []).append((host, port, ldb))
        for shard, reps in sorted(by_shard.items()):
            for host, port, ldb in reps:
                try:
                    self._on_shard(host, port, "SELECT 1")
                except StoreError:
                    continue
                out.append((host, port, ldb))
                break
            else:
                raise StoreError(f"clickhouse {self.loc}: no replica of shard {shard} answers")
        return out

    def _on_shard(self, host: str, port: int, sql: str, params: Any = None) -> Any:
        c = self._Client(**self.loc.client_kwargs(host, port))
        try:
            return c.execute(sql, params)
        except Exception as exc:
            raise StoreError(f"clickhouse shard {host}:{port}: {exc}") from exc
        finally:
            c.disconnect()

    def _replicas(self) -> list[tuple[int, int, str, int, str]]:
        """(shard_num, replica_num, host, port, local database) of every replica of the cluster."""
        rows = self._exec("SELECT shard_num, replica_num, host_name, port, default_database FROM "
                          "system.clusters WHERE cluster = %(c)s ORDER BY shard_num, replica_num",
                          {"c": self.loc.cluster})
        return [(int(s), int(r), h, int(p), d or "default") for s, r, h, p, d in rows]

    def local_table(self, name: str) -> str:
        return f"{self.db}_{name}" if self.loc.cluster else name

    def _create(self) -> None:
        """The local tables on every replica of every shard (replicated tables when a shard has
        several replicas: `internal_replication` on the cluster, ZooKeeper on the servers),
        then the Distributed tables over them."""
        self._exec(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        if self.loc.cluster:
            self._shards()  # a cluster the server does not know: a clear error first
            replicas = self._replicas()
            self.replicated = any(r > 1 for _, r, _, _, _ in replicas)
            if self.replicated:
                # an insert is acknowledged once `insert_quorum` replicas of its shard hold it
                # (default 2): a replica lost right after the ack loses nothing acknowledged,
                # and every replica a read may go to has what was acknowledged before
                per_shard = min(sum(1 for s2, _, _, _, _ in replicas if s2 == s)
                                for s, _, _, _, _ in replicas)
                quorum = self.loc.insert_quorum or min(2, per_shard)
                if quorum > per_shard:
                    raise StoreError(f"clickhouse {self.loc}: insert_quorum={quorum} but a "
                                     f"shard has only {per_shard} replicas")
                self._insert_settings = {**SYNC, "insert_quorum": quorum,
                                         "insert_quorum_timeout": QUORUM_TIMEOUT_MS}
        else:
            replicas = [(1, 1, self.loc.host, self.loc.port, self.db)]
        created: set[int] = set()
        for shard, _, host, port, ldb in replicas:
            try:
                if self.loc.cluster:
                    self._on_shard(host, port, f"CREATE DATABASE IF NOT EXISTS {ldb}")
                for t in TABLES:
                    local = self.local_table(t.name)
                    rep = (replica_of(self.loc.cluster or "", local, shard, host, port)
                           if self.replicated else None)
                    self._on_shard(host, port, local_ddl(t, f"{ldb}.{local}",
                                                         self.server_version,
                                                         self.loc.ttl_days, rep))
                created.add(shard)
            except StoreError as exc:
                if not self.replicated:
                    raise
                # a replica that is down: its tables exist from an earlier start (or are made
                # at the next one); the shard's other replicas serve meanwhile
                log.warning("clickhouse %s: replica %s:%d of shard %d not reached (%s)",
                            self.loc, host, port, shard, exc)
        missing = {s for s, _, _, _, _ in replicas} - created
        if missing:
            raise StoreError(f"clickhouse {self.loc}: no replica of shard(s) "
                             f"{sorted(missing)} answers")
        if self.loc.cluster:
            for t in TABLES:
                self._exec(distributed_ddl(t, f"{self.db}.{t.name}", self.loc.cluster,
                                           self.local_table(t.name)))
            if self.replicated:  # every server of the cluster can be the entry (alt_hosts)
                self._distributed_everywhere(replicas)
        self._add_new_columns()

    def _distributed_everywhere(self, replicas: list[tuple[int, int, str, int, str]]) -> None:
        assert self.loc.cluster
        for _, _, host, port, _ in replicas:
            try:
                self._on_shard(host, port, f"CREATE DATABASE IF NOT EXISTS {self.db}")
                for t in TABLES:
                    self._on_shard(host, port, distributed_ddl(
                        t, f"{self.db}.{t.name}", self.loc.cluster, self.local_table(t.name)))
            except StoreError as exc:  # down now: made at a later start
                log.warning("clickhouse %s: no Distributed tables on %s:%d yet (%s)", self.loc,
                            host, port, exc)

    def _add_new_columns(self) -> None:
        """Tables created by an older version get the columns added since (`ALTER TABLE ... ADD
        COLUMN` with the column's DEFAULT: e.g. rollups' `link_local`, false for the older rows;
        connections' `deleted`, 0: no older row is a tombstone). On every shard's local table
        (a replicated one passes the ALTER to its shard's other replicas through ZooKeeper) and
        every Distributed table over them: the entry server's, and with replicas every
        server's (each is an entry, `alt_hosts`; one down now gets it at a later start). A
        column added this way is not in the table's sorting key, which ClickHouse cannot change
        on an existing table; new tables have it there (clickhouse_schema.TABLES)."""
        targets: list[tuple[str | None, int, str, str, Table, bool]] = [
            (host, port, ldb, self.local_table(t.name), t, True)
            for host, port, ldb in self._shards() for t in TABLES]
        if self.loc.cluster:
            targets += [(None, 0, self.db, t.name, t, True) for t in TABLES]
            if self.replicated:
                targets += [(host, port, self.db, t.name, t, False)
                            for _, _, host, port, _ in self._replicas() for t in TABLES]
        for host, port, db, table, t, needed in targets:
            try:
                self._add_columns(host, port, db, table, t)
            except StoreError as exc:
                if needed:
                    raise
                log.warning("clickhouse %s: columns of %s.%s on %s:%d not checked (%s)",
                            self.loc, db, table, host, port, exc)

    def _add_columns(self, host: str | None, port: int, db: str, table: str, t: Table) -> None:
        def run(sql: str, params: Any = None) -> Any:
            return self._exec(sql, params) if host is None else self._on_shard(host, port, sql,
                                                                                params)

        def have() -> set[str]:
            return {r[0] for r in run("SELECT name FROM system.columns WHERE database = %(d)s "
                                      "AND table = %(t)s", {"d": db, "t": table})}

        present = have()
        for col in t.columns:
            name = col.split()[0]
            if name in present:
                continue
            try:
                run(f"ALTER TABLE {db}.{table} ADD COLUMN {col}")
            except StoreError:
                # 18.16 has no ADD COLUMN IF NOT EXISTS: another aggregator opening the store
                # at the same time may have added it first
                present = have()
                if name not in present:
                    raise
                continue
            log.info("clickhouse %s: added column %s to %s.%s", self.loc, col, db, table)

    def _insert(self, table: str, cols: dict[str, list[Any]]) -> None:
        names = ", ".join(cols)
        for attempt in range(QUORUM_RETRIES + 1):
            try:
                self._exec(f"INSERT INTO {self.db}.{table} ({names}) VALUES",
                           list(cols.values()), columnar=True, settings=self._insert_settings)
                return
            except StoreError as exc:
                # ClickHouse before 20.x takes one quorum insert at a time per table: another
                # writer's insert in flight (code 286) is waited for, not a failed batch. The
                # same rows again are harmless (insert_deduplicate, ReplacingMergeTree).
                if getattr(exc.__cause__, "code", None) != QUORUM_BUSY or \
                        attempt == QUORUM_RETRIES:
                    raise
                time.sleep(min(0.02 * 2**attempt, 0.5))

    # -- writes -------------------------------------------------------------------------------
    def ingest(self, collector: str, batch_seq: int, records: Sequence[FlowRecord],
               derived: DerivedTables | None = None) -> IngestResult:
        now = datetime.now(UTC)
        with self._lock:
            if self.batch_applied(collector, batch_seq):
                return IngestResult(collector, batch_seq, 0, True)
            try:
                if records:
                    cols = arrow_columns(to_table(collector, batch_seq, records, now))
                    cols = {"day": [day_of(us) for us in cols["end_ts"]], **cols}
                    self._insert("flows", cols)
                if derived is not None:
                    self._write_derived(collector, batch_seq, derived)
                self._insert("ingested_batches", {
                    "day": [now.date()], "collector": [collector], "batch_seq": [batch_seq],
                    "records": [len(records)], "ingested_at": [micros(now)]})
            except StoreError as exc:
                raise StoreError(f"batch ({collector!r}, {batch_seq}) not stored: {exc}") from exc
            return IngestResult(collector, batch_seq, len(records), False)

    def _next_version(self, conn_id: str) -> int:
        # above anything this store wrote or read for the connection, and above the clock:
        # another aggregator that wrote the connection before (read back by `recent_connections`
        # or `connections_for_keys`) is outranked even when its clock is ahead of ours
        now = time.time_ns() // 1000
        v = max(now, self._last_version + 1, self._versions.get(conn_id, 0) + 1)
        self._last_version = v
        return v

    def remember_version(self, conn_id: str, version: int) -> None:
        self._versions[conn_id] = max(version, self._versions.get(conn_id, 0))
        self._versions.move_to_end(conn_id)
        while len(self._versions) > KNOWN_VERSIONS:
            self._versions.popitem(last=False)

    def _write_derived(self, collector: str, batch_seq: int, d: DerivedTables) -> None:
        if d.rollups is not None and d.rollups.num_rows:
            cols = arrow_columns(d.rollups)
            n = d.rollups.num_rows
            self._insert("rollups", {"day": [day_of(m) for m in cols["minute"]],
                                     "collector": [collector] * n, "batch_seq": [batch_seq] * n,
                                     **cols})
        if d.workloads is not None and d.workloads.num_rows:
            cols = arrow_columns(d.workloads)
            v = self._next_version("")
            self._insert("workloads", {"day": [day_of(t) for t in cols["last_seen"]],
                                       "version": [v] * d.workloads.num_rows, **cols})
        if d.connections is not None and d.connections.num_rows:
            self._insert_connections(d.connections)
        if d.removed:
            self._tombstones(d.removed_keys)

    def _insert_connections(self, table: pa.Table) -> None:
        cols = arrow_columns(table)
        days, versions = [], []
        for cid, state in zip(cols["conn_id"], cols["state"], strict=True):
            conn = CONN_DECODER.decode(state)
            # the creating view's start never changes (views keep their insertion order and
            # one observer reports one start): every version lands in the same partition
            first = next(iter(conn.views.values())).start
            days.append(first.astimezone(UTC).date())
            versions.append(self._next_version(cid))
        self._insert("connections", {"day": days, "version": versions, **cols})
        for cid, v in zip(cols["conn_id"], versions, strict=True):
            self.remember_version(cid, v)

    def _tombstones(self, removed: dict[str, tuple[str, str, int, str, int, int]]) -> None:
        """NodePort halves merged into their real connection (`removed`, conn_id -> key): each
        stored one gets a tombstone, a row of its sort key and day with `deleted = 1` and
        `TOMBSTONE_VERSION`, which FINAL keeps over every other version and every read filters
        out (no mutation: a mutation rewrites whole parts on every shard). Written after the
        connections: a write interrupted in between leaves the half stored beside its real
        connection, and the redo merges it again the same way. A redo writes the identical row.
        A half never stored (created and merged within the step) needs none."""
        keys = list(removed.values())
        if not keys:
            return
        # the halves' stored rows, found through the sort key's prefix: their day (the
        # partition FINAL replaces within), key (its scope too) and newest last_seen
        # (retention's rule)
        rows = self._exec(
            f"SELECT conn_id, any(day), any(protocol), any(client_ip), any(client_port), "
            f"any(server_ip), any(server_port), any(scope), max(last_seen) "
            f"FROM {self.db}.connections "
            "WHERE server_port IN %(sp)s AND server_ip IN %(si)s AND client_port IN %(cp)s "
            "AND conn_id IN %(ids)s GROUP BY conn_id",
            {"sp": tuple(sorted({k[4] for k in keys})), "si": tuple(sorted({k[3] for k in keys})),
             "cp": tuple(sorted({k[2] for k in keys})), "ids": tuple(sorted(removed))})
        if not rows:
            return
        names = ("conn_id", "day", "protocol", "client_ip", "client_port", "server_ip",
                 "server_port", "scope", "last_seen")
        cols: dict[str, list[Any]] = {n: [r[i] for r in rows] for i, n in enumerate(names)}
        n = len(rows)
        self._insert("connections", {**cols, "version": [TOMBSTONE_VERSION] * n,
                                     "deleted": [1] * n})
        for cid in cols["conn_id"]:
            self._versions.pop(cid, None)  # never written again by this store

    def write_group(self, shares: Sequence[GroupShare]) -> None:
        """Coalesced shares of one partition (aggregator/worker.py `accept_group`) in ONE
        insert per table, in the order of `ingest`: flows -> rollups -> workloads -> connections
        -> ingested_batches. Raw rows and rollup deltas carry their own share's
        `(collector, batch_seq)` (each share's deltas come from its own plan), and every
        share's mark is in the last insert: a group interrupted before its marks is redone by
        whoever gets its shares again, grouped any way, and every row it wrote is replaced by
        the same row of the same share (ReplacingMergeTree) or left as the correct one (a share
        whose connections were written plans no delta again). The connections are each
        connection's last state in the group (a later share's plan holds the earlier ones')."""
        if not shares:
            return
        now = datetime.now(UTC)
        with self._lock:
            try:
                flows = [to_table(s.raw.collector, s.raw.batch_seq, recs, now)
                         for s in shares if (recs := s.raw.records())]
                if flows:
                    cols = arrow_columns(pa.concat_tables(flows))
                    self._insert("flows", {"day": [day_of(us) for us in cols["end_ts"]], **cols})
                rollups = [_keyed(s.derived.rollups, s.raw.collector, s.raw.batch_seq)
                           for s in shares
                           if s.derived.rollups is not None and s.derived.rollups.num_rows]
                if rollups:
                    cols = arrow_columns(pa.concat_tables(rollups))
                    self._insert("rollups", {"day": [day_of(m) for m in cols["minute"]], **cols})
                workloads = [s.derived.workloads for s in shares
                             if s.derived.workloads is not None and s.derived.workloads.num_rows]
                if workloads:
                    cols = arrow_columns(pa.concat_tables(workloads))
                    n = len(cols["wid"])
                    self._insert("workloads", {"day": [day_of(t) for t in cols["last_seen"]],
                                               "version": [self._next_version("")] * n, **cols})
                conns = last_states(shares)
                if conns is not None:
                    self._insert_connections(conns)
                removed = {cid: key for s in shares for cid, key in s.derived.removed_keys.items()}
                if removed:
                    self._tombstones(removed)
                self._insert("ingested_batches", {
                    "day": [now.date()] * len(shares),
                    "collector": [s.raw.collector for s in shares],
                    "batch_seq": [s.raw.batch_seq for s in shares],
                    "records": [s.raw.n for s in shares],
                    "ingested_at": [micros(now)] * len(shares)})
            except StoreError as exc:
                first, last = shares[0].raw, shares[-1].raw
                raise StoreError(f"group of {len(shares)} batches ({first.collector!r}, "
                                 f"{first.batch_seq}) .. ({last.collector!r}, {last.batch_seq}) "
                                 f"not stored: {exc}") from exc

    # -- raw reads ----------------------------------------------------------------------------
    def batch_applied(self, collector: str, batch_seq: int) -> bool:
        rows = self._exec(f"SELECT count() FROM {self.db}.ingested_batches WHERE collector = "
                          "%(c)s AND batch_seq = %(s)s", {"c": collector, "s": batch_seq})
        return bool(rows[0][0])

    def records(self, q: RecordQuery = EVERY_RECORD) -> list[FlowRecord]:
        where: list[str] = ["1"]
        params: dict[str, Any] = {}
        if q.since is not None:
            where.append("end_ts >= %(since)s")
            params["since"] = micros(q.since)
        if q.until is not None:
            where.append("end_ts < %(until)s")
            params["until"] = micros(q.until)
        if q.collector is not None:
            where.append("collector = %(collector)s")
            params["collector"] = q.collector
        if q.server_port is not None:
            where.append("server_port = %(server_port)s")
            params["server_port"] = int(q.server_port)
        sql = (f"SELECT record FROM {self.db}.flows FINAL WHERE {' AND '.join(where)} "
               "ORDER BY end_ts, record_id")
        if q.limit is not None:
            sql += f" LIMIT {int(q.limit)}"
        rows = self._exec(sql, params, settings={"strings_as_bytes": True})
        return [_dec.decode(r[0]) for r in rows]

    def nat_records(self, since: datetime) -> list[FlowRecord]:
        """Records with an SNAT in their `nat` (the whole record's msgpack holds the text),
        end at or after `since`."""
        rows = self._exec(f"SELECT record FROM {self.db}.flows FINAL WHERE end_ts >= %(since)s "
                          "AND position(record, 'snat') > 0 ORDER BY end_ts, record_id",
                          {"since": micros(since)}, settings={"strings_as_bytes": True})
        recs = [_dec.decode(r[0]) for r in rows]
        return [r for r in recs if r.nat is not None and any(n.type == "snat" for n in r.nat)]

    def applied_marks(self, keys: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        if not keys:
            return set()
        # 18.16 types a tuple literal's small integers narrower than the column (UInt16 vs
        # Int64) and refuses `(collector, batch_seq) IN`: both columns apart, pairs kept here
        want = {(c, int(s)) for c, s in keys}
        rows = self._exec(f"SELECT collector, batch_seq FROM {self.db}.ingested_batches WHERE "
                          "collector IN %(c)s AND batch_seq IN %(s)s",
                          {"c": tuple(sorted({c for c, _ in want})),
                           "s": tuple(sorted({s for _, s in want}))})
        return {(c, int(s)) for c, s in rows} & want

    def max_batch_seq(self, collector: str) -> int:
        rows = self._exec(f"SELECT count(), max(batch_seq) FROM {self.db}.ingested_batches "
                          "WHERE collector = %(c)s", {"c": collector})
        return -1 if not rows or not rows[0][0] else int(rows[0][1])

    def uncorrelated_batches(self) -> list[tuple[str, int, int]]:
        """Raw and derived rows are written together here: nothing is ever left uncorrelated."""
        return []

    def batch_records(self, collector: str, batch_seq: int) -> list[FlowRecord]:
        rows = self._exec(f"SELECT record FROM {self.db}.flows FINAL WHERE collector = %(c)s "
                          "AND batch_seq = %(s)s ORDER BY end_ts, record_id",
                          {"c": collector, "s": batch_seq}, settings={"strings_as_bytes": True})
        return [_dec.decode(r[0]) for r in rows]

    def write_batches(self, step: WriteStep) -> None:
        """A correlation step of several batches (a store journaled by its aggregator): each
        batch's records and mark, and the derived tables under the step's last batch. Every
        insert is keyed by batch (ReplacingMergeTree): a step written again reads as once."""
        if not step.raw:
            raise StoreError(f"clickhouse {self.loc}: a step without a batch has no key")
        now = datetime.now(UTC)
        with self._lock:
            for b in step.raw:
                recs = b.records()
                if recs:
                    cols = arrow_columns(to_table(b.collector, b.batch_seq, recs, now))
                    self._insert("flows", {"day": [day_of(us) for us in cols["end_ts"]], **cols})
            last = step.raw[-1]
            self._write_derived(last.collector, last.batch_seq, step.derived)
            self._insert("ingested_batches", {
                "day": [now.date()] * len(step.raw),
                "collector": [b.collector for b in step.raw],
                "batch_seq": [b.batch_seq for b in step.raw],
                "records": [b.n for b in step.raw], "ingested_at": [micros(now)] * len(step.raw)})

    def file_bytes(self) -> int:
        return 0  # on the ClickHouse servers, not on this machine

    def count(self) -> int:
        return int(self._exec(f"SELECT count() FROM {self.db}.flows FINAL")[0][0])

    def batches(self) -> int:
        return int(self._exec(f"SELECT count() FROM {self.db}.ingested_batches FINAL")[0][0])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self._clients:
            c.disconnect()
        self._clients.clear()

    # -- retention ----------------------------------------------------------------------------
    def apply_retention(self, cutoff: datetime) -> dict[str, int]:
        """Delete what ended before `cutoff` (the DuckDB store's rule, row for row).

        18.16 has no table TTL, and even with one TTL only acts at merges: whole day partitions
        before the cutoff's day are dropped (cheap), the rest goes by `ALTER TABLE ... DELETE`
        mutations on every shard, awaited until done. A connection is deleted with all its
        versions when its latest `last_seen` is before the cutoff; a workload when its latest
        `last_seen` is, so the survivors keep their `first_seen`."""
        cut = micros(cutoff)
        out: dict[str, int] = {}
        with self._lock:
            out["flows"] = self._scalar(f"SELECT count() FROM {self.db}.flows FINAL "
                                       f"WHERE end_ts < {cut}")
            # tombstones (merged NodePort halves) have the half's day and last_seen: they go
            # by the same rule, but are no connection to count
            live, conns = self._exec(f"SELECT countIf({LIVE}), count() FROM {self.db}.connections "
                                     f"FINAL WHERE last_seen < {cut}")[0]
            out["connections"] = int(live)
            out["rollups"] = self._scalar(f"SELECT count() FROM {self.db}.rollups FINAL "
                                         f"WHERE minute < {cut}")
            old_wids = [r[0] for r in self._exec(
                f"SELECT wid FROM {self.db}.workloads GROUP BY wid HAVING max(last_seen) < {cut}")]
            out["workloads"] = len(old_wids)
            plans: list[tuple[str, str, bool]] = []
            if out["flows"]:
                plans.append(("flows", f"end_ts < {cut}", True))
            if out["rollups"]:
                plans.append(("rollups", f"minute < {cut}", True))
            if conns:
                # every version of a connection whose newest version ended before the cutoff
                # (older versions of live connections have an older last_seen, harmless to drop)
                plans.append(("connections", f"last_seen < {cut}", False))
            if old_wids:
                quoted = ", ".join("'" + w.replace("\\", "\\\\").replace("'", "\\'") + "'"
                                   for w in old_wids)
                plans.append(("workloads", f"wid IN ({quoted})", False))
            for table, cond, by_day in plans:
                self._delete(table, cond, cutoff.astimezone(UTC).date() if by_day else None)
        return out

    def _scalar(self, sql: str) -> int:
        return int(self._exec(sql)[0][0])

    def _delete(self, table: str, cond: str, before_day: date | None) -> None:
        local = self.local_table(table)
        for host, port, ldb in self._shards():
            if before_day is not None:
                parts = self._on_shard(host, port, "SELECT DISTINCT partition FROM system.parts "
                                       "WHERE database = %(d)s AND table = %(t)s AND active",
                                       {"d": ldb, "t": local})
                for (p,) in parts:
                    if p.isdigit() and int(p) < int(before_day.strftime("%Y%m%d")):
                        self._on_shard(host, port, f"ALTER TABLE {ldb}.{local} DROP PARTITION {p}")
            self._on_shard(host, port, f"ALTER TABLE {ldb}.{local} DELETE WHERE {cond}")
            self._await_mutations(host, port, ldb, local)

    def _await_mutations(self, host: str, port: int, ldb: str, local: str) -> None:
        give_up = time.monotonic() + MUTATION_WAIT_S
        delay = 0.01
        while True:
            left = self._on_shard(host, port, "SELECT count() FROM system.mutations WHERE "
                                  "database = %(d)s AND table = %(t)s AND is_done = 0",
                                  {"d": ldb, "t": local})[0][0]
            if not left:
                return
            if time.monotonic() > give_up:
                raise StoreError(f"clickhouse shard {host}:{port}: {left} mutations of "
                                 f"{ldb}.{local} still running after {MUTATION_WAIT_S:.0f} s")
            time.sleep(delay)  # the server offers no wait for mutations before 20.x
            delay = min(delay * 2, 0.5)
