"""DuckDB side of the correlated tables: connections, minute rollups, workloads.

Stage: store. In: `DerivedTables` (aggregator/store/derived.py) inside the raw batch's transaction;
queries from the API (connections with a compiled `Filter`, workloads). Out: rows as dicts.

Connections live in two tables behind one view, `connections`:
- `connections_live`: the connections the correlator may still change (its index: open ones,
  and closed ones of the last minutes). A batch deletes the rows of the connections it changed
  and inserts their new versions; the table stays small, so the delete's scan stays cheap.
  Each row carries `views` (the correlator's state of it), so a restart reloads exactly this
  table into the correlator.
- `connections_settled`: append-only. A connection moves here, in the transaction of the next
  batch, once the correlator has pruned it (it can never change again).
Why not one table with `INSERT OR REPLACE` on a primary key: DuckDB replaces a conflicting row
3 to 8 times slower than an explicit delete + insert, and a delete by key scans the table; with
every record of a busy edge touching a connection, that was most of the ingest time
(docs/benchmarks.md). Files written before this layout keep their `connections` table as the
settled one; its recent rows move to the live table when the file is opened.

Rollups: `INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x` (deltas add up); workloads
keep their first_seen and raise last_seen. (DuckDB: https://duckdb.org/docs/sql/statements/insert,
"ON CONFLICT clause"; a key may appear once per statement, which correlation guarantees.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa

from aggregator.connection import Connection
from aggregator.store.base import Key
from aggregator.store.derived import (
    CONN_DECODER,
    DDL_TYPES,
    DUCKDB_CONN_NAMES,
    DUCKDB_CONN_SCHEMA,
    ROLLUP_ATTRS,
    ROLLUP_COUNTERS,
    ROLLUP_KEY,
    ROLLUP_SCHEMA,
    WORKLOAD_SCHEMA,
    DerivedTables,
    connection_of,
    ddl,
    derived_of,
)
from aggregator.store.query import ConnectionQuery
from aggregator.store.sql import DuckParams, connection_where

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_COLS = ", ".join(f"{f.name} {DDL_TYPES[f.type]}" for f in DUCKDB_CONN_SCHEMA)
# every column but `views`: what the settled table keeps and the `connections` view shows
SHOWN = [n for n in DUCKDB_CONN_NAMES if n != "views"]
_SHOWN = ", ".join(SHOWN)
DERIVED_DDL = [
    f"CREATE TABLE IF NOT EXISTS connections_live ({_COLS})",
    "CREATE TABLE IF NOT EXISTS rollups " + ddl(ROLLUP_SCHEMA, ROLLUP_KEY),
    "CREATE TABLE IF NOT EXISTS workloads " + ddl(WORKLOAD_SCHEMA, ["wid"]),
]
_SETTLED_DDL = ("CREATE TABLE IF NOT EXISTS connections_settled ("
                + ", ".join(f"{f.name} {DDL_TYPES[f.type]}" for f in DUCKDB_CONN_SCHEMA
                            if f.name != "views") + ")")
_VIEW_DDL = (f"CREATE OR REPLACE VIEW connections AS SELECT {_SHOWN} FROM connections_settled "
             f"UNION ALL SELECT {_SHOWN} FROM connections_live")
_CONN_TABLES = ("connections_settled", "connections_live")



# what `recent_connections` reads to rebuild a connection (`connection_of`)
_STATE_COLUMNS = ["conn_id", "protocol", "family", "client_ip", "client_port", "server_ip",
                  "server_port", "scope", "vni", "vtep_src", "vtep_dst", "vtep_src_host",
                  "vtep_dst_host", "tunnel_type", "views", "service_ip", "service_port", "mesh"] + [
    f"{side}_{a}" for side in ("client", "server")
    for a in ("name", "namespace", "kind", "host", "id_source", "pid", "comm", "netns",
              "container", "collector")]


def migrate_derived(con: duckdb.DuckDBPyConnection, horizon_s: float) -> None:
    """Create the settled table and the view; a file of the one-table layout (a `connections`
    TABLE with a primary key and `state`, the whole connection as msgpack) keeps it as the
    settled table, and its connections of the last `horizon_s` seconds move to the live table
    (their `views` from `state`), where a restart's correlator finds them."""
    kind = con.execute("SELECT table_type FROM information_schema.tables "
                       "WHERE table_name = 'connections'").fetchone()
    if kind is not None and kind[0] == "BASE TABLE":
        con.execute("BEGIN TRANSACTION")
        con.execute("ALTER TABLE connections RENAME TO connections_settled")
        rows = con.execute(
            "SELECT state FROM connections_settled WHERE last_seen >= (SELECT max(last_seen) "
            "FROM connections_settled) - to_microseconds(?::BIGINT)", [int(horizon_s * 1e6)]).fetchall()
        conns = [CONN_DECODER.decode(r[0]) for r in rows]
        if conns:
            from aggregator.correlate import Plan

            live = derived_of(Plan(connections={c.conn_id: c for c in conns})).connection_rows()
            con.register("_live", live)
            con.execute(f"INSERT INTO connections_live ({', '.join(DUCKDB_CONN_NAMES)}) "
                        f"SELECT {', '.join(DUCKDB_CONN_NAMES)} FROM _live")
            con.unregister("_live")
            con.execute("DELETE FROM connections_settled WHERE conn_id IN "
                        "(SELECT conn_id FROM connections_live)")
        con.execute("COMMIT")
    con.execute(_SETTLED_DDL)
    _migrate_tunnel_type(con)
    _migrate_service(con)
    con.execute(_VIEW_DDL)
    _migrate_rollups(con)


def _migrate_tunnel_type(con: duckdb.DuckDBPyConnection) -> None:
    """Connection tables written before the tunnel's type was kept get the column; their
    tunnels were all VXLAN (the only type decoded then). Likewise the drop columns (NULL)."""
    for table in _CONN_TABLES:
        cols = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
            [table]).fetchall()}
        if cols and "tunnel_type" not in cols:
            con.execute(f"ALTER TABLE {table} ADD COLUMN tunnel_type VARCHAR")
            con.execute(f"UPDATE {table} SET tunnel_type = 'vxlan' WHERE vni IS NOT NULL")
        for col, typ in (("dropped", "BIGINT"), ("drop_reasons", "VARCHAR")):  # issue 21
            if cols and col not in cols:  # connections stored before drops: none known
                con.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")


def _migrate_service(con: duckdb.DuckDBPyConnection) -> None:
    """Connection tables written before the dialled Service address was kept (issue 16) get
    its columns, NULL in their rows (no record carried `nat` then)."""
    for table in _CONN_TABLES:
        cols = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
            [table]).fetchall()}
        if cols and "service_ip" not in cols:
            con.execute(f"ALTER TABLE {table} ADD COLUMN service_ip VARCHAR")
            con.execute(f"ALTER TABLE {table} ADD COLUMN service_port INTEGER")
        if cols and "service_ip_hex" not in cols:
            con.execute(f"ALTER TABLE {table} ADD COLUMN service_ip_hex VARCHAR")
        if cols and "mesh" not in cols:  # issue 20: no record carried `mesh` before it
            con.execute(f"ALTER TABLE {table} ADD COLUMN mesh VARCHAR")


def _migrate_rollups(con: duckdb.DuckDBPyConnection) -> None:
    """A file written before rollups were keyed by `link_local` gets the column (false: the
    older rows cannot be told apart any more) and the new primary key (a table rebuilt: DuckDB
    cannot change a primary key in place)."""
    cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'rollups'").fetchall()}
    if not cols or "link_local" in cols:
        return
    names = ", ".join(n for n in ROLLUP_KEY + ROLLUP_ATTRS + ROLLUP_COUNTERS if n != "link_local")
    con.execute("BEGIN TRANSACTION")
    con.execute("ALTER TABLE rollups RENAME TO rollups_before_link_local")
    con.execute("CREATE TABLE rollups " + ddl(ROLLUP_SCHEMA, ROLLUP_KEY))
    con.execute(f"INSERT INTO rollups ({names}, link_local) SELECT {names}, false "
                "FROM rollups_before_link_local")
    con.execute("DROP TABLE rollups_before_link_local")
    con.execute("COMMIT")


def _ids(con: duckdb.DuckDBPyConnection, name: str, ids: list[str]) -> None:
    con.register(name, pa.table({"conn_id": pa.array(ids, pa.string())}))


def write_derived(con: duckdb.DuckDBPyConnection, derived: DerivedTables) -> None:
    """Called by the store inside the raw batch's open transaction."""
    if derived.settled:  # pruned by the correlator: out of the live table for good
        _ids(con, "_settled", derived.settled)
        try:
            con.execute(f"INSERT INTO connections_settled ({_SHOWN}) SELECT {_SHOWN} FROM "
                        "connections_live WHERE conn_id IN (SELECT conn_id FROM _settled)")
            con.execute("DELETE FROM connections_live WHERE conn_id IN "
                        "(SELECT conn_id FROM _settled)")
        finally:
            con.unregister("_settled")
    replaced = derived.replaced
    if replaced:
        _ids(con, "_replaced", replaced)
        try:
            con.execute("DELETE FROM connections_live WHERE conn_id IN "
                        "(SELECT conn_id FROM _replaced)")
        finally:
            con.unregister("_replaced")
    rows = derived.connection_rows()
    if rows is not None:
        con.register("_conns", rows)
        try:
            cols = ", ".join(DUCKDB_CONN_NAMES)
            con.execute(f"INSERT INTO connections_live ({cols}) SELECT {cols} FROM _conns")
        finally:
            con.unregister("_conns")
    if derived.rollups is not None:
        con.register("_roll", derived.rollups)
        try:
            cols = ", ".join(ROLLUP_KEY + ROLLUP_ATTRS + ROLLUP_COUNTERS)
            sets = ", ".join(f"{n} = rollups.{n} + excluded.{n}" for n in ROLLUP_COUNTERS)
            con.execute(f"INSERT INTO rollups ({cols}) SELECT {cols} FROM _roll "
                        f"ON CONFLICT DO UPDATE SET {sets}")
        finally:
            con.unregister("_roll")
    if derived.workloads is not None:
        con.register("_wl", derived.workloads)
        try:
            cols = ", ".join(f.name for f in WORKLOAD_SCHEMA)
            con.execute(f"INSERT INTO workloads ({cols}) SELECT {cols} FROM _wl ON CONFLICT DO "
                        "UPDATE SET last_seen = greatest(workloads.last_seen, excluded.last_seen),"
                        " first_seen = least(workloads.first_seen, excluded.first_seen)")
        finally:
            con.unregister("_wl")


class DerivedQueries:
    """Mixed into DuckDBStore: its connection, locks, writer and raw record count."""

    _con: duckdb.DuckDBPyConnection
    _lock: threading.Lock
    _raw_lock: threading.Lock
    _count: int

    def _writer(self) -> duckdb.DuckDBPyConnection:  # pragma: no cover - DuckDBStore's
        raise NotImplementedError

    def _query(self, sql: str, params: list[Any] | None = None) -> list[Any]:  # pragma: no cover
        raise NotImplementedError

    def _rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        cur = self._con.cursor()
        try:
            res = cur.execute(sql, params)
            names = [d[0] for d in res.description]
            return [dict(zip(names, row, strict=True)) for row in res.fetchall()]
        except duckdb.Error as exc:
            from aggregator.store.base import StoreError

            raise StoreError(f"duckdb: query failed: {exc}") from exc
        finally:
            cur.close()

    # -- correlation state --------------------------------------------------------------------
    def recent_connections(self, horizon_s: float) -> list[Connection]:
        """The connections the correlator may still change: the live table (restart)."""
        rows = self._rows(f"SELECT {', '.join(_STATE_COLUMNS)} FROM connections_live", [])
        return [connection_of(r) for r in rows]

    def connection_count(self) -> int:
        return int(self._query("SELECT count(*) FROM connections")[0][0])

    # -- queries ------------------------------------------------------------------------------
    def connections(self, q: ConnectionQuery) -> list[dict[str, Any]]:
        p = DuckParams()
        where, order = connection_where(q, p)
        cols = ", ".join(q.columns or SHOWN)
        return self._rows(f"SELECT {cols} FROM connections WHERE {where} ORDER BY {order} "
                          f"LIMIT {int(q.limit)}", p.values)

    def connections_for_keys(self, keys: Iterable[Key]) -> dict[Key, list[Connection]]:
        """One aggregator writes this file: its correlator holds what there is to know."""
        return {}

    def workload_rows(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM workloads ORDER BY wid", [])

    def apply_retention(self, cutoff: datetime) -> dict[str, int]:
        """Delete what ended before `cutoff` from every table; returns rows deleted per table."""
        out: dict[str, int] = {}
        with self._raw_lock, self._lock:
            con = self._writer()
            for table, col in (("flows", "end_ts"), *((t, "last_seen") for t in _CONN_TABLES),
                               ("rollups", "minute"), ("workloads", "last_seen")):
                try:
                    n = con.execute(f"DELETE FROM {table} WHERE {col} < ?", [cutoff]).fetchone()
                except duckdb.Error as exc:
                    from aggregator.store.base import StoreError

                    raise StoreError(f"duckdb: retention on {table} failed: {exc}") from exc
                name = "connections" if table in _CONN_TABLES else table
                out[name] = out.get(name, 0) + (int(n[0]) if n else 0)
            if out.get("flows"):
                self._count = max(0, self._count - out["flows"])
        return out


def fold_edges(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold the flat (edge x observers x port x protocol) rows of `edge_counts` into one row
    per edge; `first_seen`/`last_seen` come in as epoch µs. Shared by every backend."""
    edges: dict[tuple[str, str], dict[str, Any]] = {}
    summed = ("opened", "active", "closed", "failed", "reset", "byte_mismatches", "incomplete",
              "rtt_sum", "rtt_n", "conn_bytes_c2s", "conn_bytes_s2c", "conn_retransmits",
              "conn_resets", "packets_n_c2s", "packets_n_s2c", "conn_packets_c2s",
              "conn_packets_s2c")
    # drops: a sum that stays null while no row had any, and the reason texts joined
    for r in rows:
        e = edges.get((r["src"], r["dst"]))
        obs = r.pop("observed_by")
        port, proto = r.pop("server_port"), r.pop("protocol")
        if e is None:
            r["observed_by"] = {obs: r["n"]}
            r["ports"], r["protocols"] = {port}, {proto}
            edges[(r["src"], r["dst"])] = r
            continue
        for k in summed:
            e[k] = (e[k] or 0) + (r[k] or 0)
        if r.get("dropped") is not None:
            e["dropped"] = (e.get("dropped") or 0) + r["dropped"]
            e["drop_text"] = ",".join(t for t in (e.get("drop_text"), r.get("drop_text")) if t)
        e["observed_by"][obs] = e["observed_by"].get(obs, 0) + r["n"]
        e["ports"].add(port)
        e["protocols"].add(proto)
        e["first_seen"] = min(e["first_seen"], r["first_seen"])
        e["last_seen"] = max(e["last_seen"], r["last_seen"])
        for k, pick in (("rtt_min", min), ("rtt_max", max)):
            if r[k] is not None:
                e[k] = r[k] if e[k] is None else pick(e[k], r[k])
    for e in edges.values():
        e["ports"], e["protocols"] = sorted(e["ports"]), sorted(e["protocols"])
        e["rtt_avg"] = e["rtt_sum"] / e["rtt_n"] if e["rtt_n"] else None
        e["incomplete"] = bool(e["incomplete"])
        # timestamps travel as µs: DuckDB's per-value TIMESTAMPTZ -> datetime is slow
        e["first_seen"] = _EPOCH + timedelta(microseconds=e["first_seen"])
        e["last_seen"] = _EPOCH + timedelta(microseconds=e["last_seen"])
    return list(edges.values())


