"""ClickHouse side of the correlated tables: the queries of the API and of correlation.

Stage: store (reads). In: the API's typed queries (aggregator/store/query.py), their filters
compiled for ClickHouse (aggregator/store/sql.py `ClickParams`); correlation's restart and
refresh reads. Out: rows shaped exactly like the DuckDB store's (aggregator/store/
duckdb_derived.py), so graph, flows, workloads, diff and the stream give the same answers on
both backends.

Every read goes through `FINAL` (the newest version of a connection, each raw record and rollup
delta once: aggregator/store/clickhouse_schema.py). Times are µs integers in the tables and
`datetime`s (UTC) at this interface.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from aggregator.connection import Connection
from aggregator.store.clickhouse_schema import BOOL_COLUMNS, TIME_COLUMNS
from aggregator.store.derived import CONN_DECODER, ROLLUP_COUNTERS
from aggregator.store.duckdb_derived import SHOWN, fold_edges
from aggregator.store.query import ConnectionQuery, EdgeQuery, service_group, service_rows
from aggregator.store.sql import (
    CONN_FILTER_COLUMNS,
    ROLLUP_FILTER_COLUMNS,
    ClickParams,
    compile_filter,
    connection_where,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

GROUPS = {
    "workload": ("client_wid", "server_wid"),
    "namespace": ("ifNull(client_namespace, client_wid)", "ifNull(server_namespace, server_wid)"),
    "host": ("if(ifNull(client_host, '') = '', 'unknown', client_host)",
             "if(ifNull(server_host, '') = '', 'unknown', server_host)"),
}


def groups(q: EdgeQuery) -> tuple[str, str]:
    """The client and server group expressions of a query (`service`: aggregator/service_view.py)."""
    if q.group_by == "service":
        rows = service_rows(q.services)
        # transform(): a lookup of `ip port` in the query's Services, NULL when absent
        keys = ", ".join(f"'{ip} {port}'" for ip, port, _ in rows)
        nodes = ", ".join(f"'{node}'" for _, _, node in rows)
        mapped = (f"nullIf(transform(concat(service_ip, ' ', toString(service_port)), [{keys}], "
                  f"[{nodes}], ''), '')" if rows else "NULL")
        return "client_wid", service_group(mapped, "toString({})")
    return GROUPS[q.group_by]


def micros(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // timedelta(microseconds=1)


def from_micros(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    for k, v in row.items():
        if k in TIME_COLUMNS:
            row[k] = from_micros(v)
        elif k in BOOL_COLUMNS and v is not None:
            row[k] = bool(v)
    return row


class ClickHouseQueries:
    """Mixed into ClickHouseStore: needs `db` and `_exec(sql, params, **kw)`."""

    db: str

    def _exec(self, sql: str, params: Any = None, **kw: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def remember_version(self, conn_id: str, version: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _dicts(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        rows, cols = self._exec(sql, params, with_column_types=True)
        names = [c[0] for c in cols]
        return [dict(zip(names, r, strict=True)) for r in rows]

    # -- correlation state --------------------------------------------------------------------
    def _states(self, where: str, params: dict[str, Any]) -> list[Connection]:
        rows = self._exec(f"SELECT conn_id, version, state FROM {self.db}.connections FINAL "
                          f"WHERE {where}", params, settings={"strings_as_bytes": True})
        out = []
        for cid, version, state in rows:
            self.remember_version(cid.decode(), int(version))
            out.append(CONN_DECODER.decode(state))
        return out

    def recent_connections(self, horizon_s: float) -> list[Connection]:
        newest = self._exec(f"SELECT max(last_seen), count() FROM {self.db}.connections FINAL")
        if not newest or not newest[0][1]:
            return []
        return self._states("last_seen >= %(lo)s", {"lo": int(newest[0][0]) - int(horizon_s * 1e6)})

    def connections_for_keys(self, keys: Iterable[tuple[str, str, int, str, int, int]]
                             ) -> dict[tuple, list[Connection]]:
        """The stored connections (newest versions) of these correlation keys: what another
        aggregator may have written since this one last looked (aggregator/consume.py)."""
        keys = set(keys)
        if not keys:
            return {}
        params = {"sp": tuple(sorted({k[4] for k in keys})),  # a tuple: (..) in SQL, not [..]
                  "si": tuple(sorted({k[3] for k in keys})),
                  "cp": tuple(sorted({k[2] for k in keys}))}
        out: dict[tuple, list[Connection]] = {k: [] for k in keys}
        for c in self._states("server_port IN %(sp)s AND server_ip IN %(si)s AND "
                              "client_port IN %(cp)s", params):
            if c.key in out:
                out[c.key].append(c)
        return out

    def connection_count(self) -> int:
        return int(self._exec(f"SELECT count() FROM {self.db}.connections FINAL")[0][0])

    # -- queries ------------------------------------------------------------------------------
    def connections(self, q: ConnectionQuery) -> list[dict[str, Any]]:
        p = ClickParams()
        where, order = connection_where(q, p)
        cols = ", ".join(q.columns or SHOWN)
        sql = (f"SELECT {cols} FROM {self.db}.connections FINAL WHERE {where} "
               f"ORDER BY {order} LIMIT {int(q.limit)}")
        return [_typed(r) for r in self._dicts(sql, p.named)]

    def edges(self, q: EdgeQuery) -> dict[str, list[Any]]:
        """The window's edges: the connections' counts and the rollups' volumes (when they can
        answer the filter), folded into the columns DuckDB's one query gives."""
        from aggregator.graph_edges import columns_of_rows

        counts = self.edge_counts(q)
        volumes = self.edge_volumes(q) if q.volumes_from_rollups else None
        return columns_of_rows(counts, volumes)

    def edge_counts(self, q: EdgeQuery) -> list[dict[str, Any]]:
        cg, sg = groups(q)
        p = ClickParams()
        cond = compile_filter(q.filter, CONN_FILTER_COLUMNS, p)
        named = dict(p.named, since=micros(q.since), until=micros(q.until))
        closed_ts = "ifNull(closed_ts, 0)"
        sql = f"""
        SELECT {cg} AS src, {sg} AS dst, observed_by, server_port, protocol,
          any(client_name) AS src_name, any(client_namespace) AS src_namespace,
          any(client_kind) AS src_kind, any(server_name) AS dst_name,
          any(server_namespace) AS dst_namespace, any(server_kind) AS dst_kind,
          count() AS n,
          countIf(start_ts >= %(since)s) AS opened,
          countIf(closed = 0 OR {closed_ts} >= %(until)s) AS active,
          countIf(closed = 1 AND {closed_ts} >= %(since)s AND {closed_ts} < %(until)s) AS closed_n,
          countIf(start_ts >= %(since)s AND ifNull(outcome, '') IN ('refused', 'timeout', 'dropped'))
            AS failed,
          countIf(start_ts >= %(since)s AND ifNull(outcome, '') = 'reset') AS reset,
          countIf(byte_mismatch = 1) AS byte_mismatches,
          countIf(incomplete = 1) AS incomplete_n,
          min(rtt_min_us) AS rtt_min, sum(rtt_avg_us) AS rtt_sum, count(rtt_avg_us) AS rtt_n,
          max(rtt_max_us) AS rtt_max, min(start_ts) AS first_us, max(last_seen) AS last_us,
          sum(bytes_c2s) AS conn_bytes_c2s, sum(bytes_s2c) AS conn_bytes_s2c,
          sum(retransmits) AS conn_retransmits, sum(resets) AS conn_resets,
          count(packets_c2s) AS packets_n_c2s, count(packets_s2c) AS packets_n_s2c,
          sum(packets_c2s) AS conn_packets_c2s, sum(packets_s2c) AS conn_packets_s2c,
          sum(dropped) AS dropped,
          arrayStringConcat(groupArray(drop_reasons), ',') AS drop_text
        FROM {self.db}.connections FINAL
        WHERE start_ts < %(until)s AND last_seen >= %(since)s AND ({cond})
        GROUP BY src, dst, observed_by, server_port, protocol"""
        rows = self._dicts(sql, named)
        for r in rows:
            r["closed"], r["incomplete"] = r.pop("closed_n"), r.pop("incomplete_n")
            r["first_seen"], r["last_seen"] = r.pop("first_us"), r.pop("last_us")
            if not r["rtt_n"]:
                r["rtt_sum"] = None  # DuckDB's sum over no values is NULL too
        return fold_edges(rows)

    def service_calls(self, q: EdgeQuery) -> list[dict[str, Any]]:
        """The window's connections that dialled a Service (matching the filter), per client
        group, dialled address and backend: `SERVICE_CALL_COLUMNS` (aggregator/service_view.py);
        the backend named from `workload_rows`, as DuckDB joins its `workloads`."""
        p = ClickParams()
        cond = compile_filter(q.filter, CONN_FILTER_COLUMNS, p)
        named = dict(p.named, since=micros(q.since), until=micros(q.until))
        sql = f"""
        SELECT client_wid AS src, service_ip, service_port, server_wid AS wid, count() AS n,
          countIf(start_ts >= %(since)s) AS opened
        FROM {self.db}.connections FINAL
        WHERE start_ts < %(until)s AND last_seen >= %(since)s AND service_ip IS NOT NULL
          AND ({cond})
        GROUP BY src, service_ip, service_port, wid"""
        rows = self._dicts(sql, named)
        if rows:
            known = {w["wid"]: w for w in self.workload_rows()}
            for r in rows:
                w = known.get(r["wid"], {})
                r.update(name=w.get("name") or r["wid"], namespace=w.get("namespace"),
                         kind=w.get("kind"))
        return rows

    def edge_volumes(self, q: EdgeQuery) -> list[dict[str, Any]]:
        cg, sg = groups(q)
        p = ClickParams()
        cond = compile_filter(q.filter, ROLLUP_FILTER_COLUMNS, p)
        named = dict(p.named, since=micros(q.since.replace(second=0, microsecond=0)),
                     until=micros(q.until))
        sums = ", ".join(f"sum({n}) AS {n}" for n in ROLLUP_COUNTERS)
        sql = (f"SELECT {cg} AS src, {sg} AS dst, {sums} FROM {self.db}.rollups FINAL "
               f"WHERE minute >= %(since)s AND minute < %(until)s AND ({cond}) GROUP BY src, dst "
               "HAVING NOT (" + " AND ".join(f"{n} = 0" for n in ROLLUP_COUNTERS) + ")")
        return self._dicts(sql, named)

    def workload_rows(self) -> list[dict[str, Any]]:
        """One row per workload: the attributes first written, the earliest first_seen and the
        latest last_seen (the DuckDB store's ON CONFLICT rule)."""
        attrs = ("name", "namespace", "kind", "host", "labels", "source")
        picks = ", ".join(f"argMin({a}, version) AS {a}_" for a in attrs)
        rows = self._dicts(
            f"SELECT wid, {picks}, min(first_seen) AS first_us, max(last_seen) AS last_us "
            f"FROM {self.db}.workloads FINAL GROUP BY wid ORDER BY wid", {})
        out = []
        for r in rows:
            row = {"wid": r["wid"], **{a: r[f"{a}_"] for a in attrs}}
            row["first_seen"], row["last_seen"] = from_micros(r["first_us"]), from_micros(r["last_us"])
            out.append(row)
        return out
