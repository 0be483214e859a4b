"""ClickHouse side of the correlated tables: the queries of the API and of correlation.

Stage: store (reads). In: the API's typed queries (aggregator/store/query.py), their filters
compiled for ClickHouse (aggregator/store/sql.py `ClickParams`); correlation's restart and
refresh reads. Out: rows shaped exactly like the DuckDB store's (aggregator/store/
duckdb_derived.py), so graph, flows, workloads, diff and the stream give the same answers on
both backends.

Every read goes through `FINAL` (the newest version of a connection, each raw record and rollup
delta once: aggregator/store/clickhouse_schema.py), and of connections keeps `deleted = 0`
(`LIVE`: a tombstone is the newest version of a removed connection). Times are µs integers in
the tables and `datetime`s (UTC) at this interface.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from aggregator.connection import Connection
from aggregator.store.clickhouse_schema import BOOL_COLUMNS, TIME_COLUMNS
from aggregator.store.derived import CONN_DECODER, ROLLUP_COUNTERS
from aggregator.store.duckdb_derived import SHOWN, fold_edges
from aggregator.store.query import ConnectionQuery, EdgeQuery
from aggregator.store.service_edges import (
    backend_object,
    node_attrs,
    service_objects,
    unlisted_object,
)
from aggregator.store.sql import (
    CONN_FILTER_COLUMNS,
    ROLLUP_FILTER_COLUMNS,
    ClickParams,
    compile_filter,
    connection_where,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# every read of `connections`: the newest version (FINAL) unless it is a tombstone (a merged
# NodePort half, aggregator/store/clickhouse.py `_tombstones`). WHERE applies after FINAL (a
# PREWHERE would not: 18.16 moves no condition there under FINAL; tests/unit/
# test_store_nodeport.py reads with merges stopped)
LIVE = "deleted = 0"

GROUPS = {
    "workload": ("client_wid", "server_wid"),
    "namespace": ("ifNull(client_namespace, client_wid)", "ifNull(server_namespace, server_wid)"),
    "host": ("if(ifNull(client_host, '') = '', 'unknown', client_host)",
             "if(ifNull(server_host, '') = '', 'unknown', server_host)"),
}


def groups(q: EdgeQuery) -> tuple[str, str]:
    """The client and server group expressions of a query (`service`: aggregator/store/
    service_edges.py; its Services are the parameters `service_params(q)`)."""
    if q.group_by == "service":
        # transform(): a lookup of `ip port` in the query's Services ('' when absent)
        mapped = ("nullIf(transform(concat(service_ip, ' ', toString(ifNull(service_port, 0))), "
                  "%(svc_keys)s, %(svc_nodes)s, ''), '')" if q.services else "NULL")
        return "client_wid", (
            "if(isNull(service_ip), server_wid, ifNull(" + mapped + ", concat('svc:', "
            "assumeNotNull(service_ip), ':', toString(assumeNotNull(service_port)))))")
    return GROUPS[q.group_by]


def service_params(q: EdgeQuery) -> dict[str, Any]:
    """The parameters of `groups(q)` (lists: ClickHouse arrays, quoted by the driver)."""
    if q.group_by != "service" or not q.services:
        return {}
    return {"svc_keys": [f"{a.ip} {a.port}" for a in q.services],
            "svc_nodes": [a.node for a in q.services]}


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
                          f"WHERE {LIVE} AND ({where})", params,
                          settings={"strings_as_bytes": True})
        out = []
        for cid, version, state in rows:
            self.remember_version(cid.decode(), int(version))
            out.append(CONN_DECODER.decode(state))
        return out

    def recent_connections(self, horizon_s: float) -> list[Connection]:
        newest = self._exec(f"SELECT max(last_seen), count() FROM {self.db}.connections FINAL "
                            f"WHERE {LIVE}")
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
        return int(self._exec(f"SELECT count() FROM {self.db}.connections FINAL "
                              f"WHERE {LIVE}")[0][0])

    # -- queries ------------------------------------------------------------------------------
    def connections(self, q: ConnectionQuery) -> list[dict[str, Any]]:
        p = ClickParams()
        where, order = connection_where(q, p)
        cols = ", ".join(q.columns or SHOWN)
        sql = (f"SELECT {cols} FROM {self.db}.connections FINAL WHERE {LIVE} AND ({where}) "
               f"ORDER BY {order} LIMIT {int(q.limit)}")
        return [_typed(r) for r in self._dicts(sql, p.named)]

    def edges(self, q: EdgeQuery) -> dict[str, list[Any]]:
        """The window's edges: the connections' counts and the rollups' volumes (when they can
        answer the filter), folded into the columns DuckDB's one query gives."""
        from aggregator.graph_edges import columns_of_rows

        counts = self.edge_counts(q)
        volumes = self.edge_volumes(q) if q.volumes_from_rollups else None
        if q.group_by != "service":
            return columns_of_rows(counts, volumes)
        return self._service_columns(q, counts)

    def _service_columns(self, q: EdgeQuery, counts: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """The Service view's columns: its Service nodes named, each edge's `service` and
        `backends` (aggregator/store/service_edges.py) from the backends' grouped counts."""
        import msgspec

        from aggregator.graph_edges import columns_of_rows

        named = {a.node: (a.name, a.namespace) for a in q.services}
        objects = service_objects(q.services)
        served = self.service_backends(q)
        svc_edges = {(r["src"], r["dst"]) for r in served}
        for r in counts:
            if (r["src"], r["dst"]) in svc_edges:
                r["dst_name"], r["dst_namespace"], r["dst_kind"] = node_attrs(
                    r["dst"], *named.get(r["dst"], (None, None)))
        cols = columns_of_rows(counts, None)
        known = {w["wid"]: w for w in self.workload_rows()} if served else {}
        backends: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in sorted(served, key=lambda r: r["wid"]):
            backends.setdefault((r["src"], r["dst"]), []).append(
                backend_object(r["wid"], known.get(r["wid"]), r["n"], r["opened"]))
        enc = msgspec.json.Encoder()
        texts = []
        for src, dst, text in zip(cols["src"], cols["dst"], cols["json"], strict=True):
            listed = backends.get((src, dst))
            service = None if listed is None else objects.get(dst) or unlisted_object(dst)
            texts.append(f'{text[:-1]},"service":{enc.encode(service).decode()},'
                         f'"backends":{enc.encode(listed or []).decode()}}}')
        cols["json"] = texts
        return cols

    def service_backends(self, q: EdgeQuery) -> list[dict[str, Any]]:
        """Per Service edge (src, dst: `groups(q)`) and backend workload (`wid`): its
        connections (`n`) and those opened in the window."""
        cg, sg = groups(q)
        p = ClickParams()
        cond = compile_filter(q.filter, CONN_FILTER_COLUMNS, p)
        named = dict(p.named, since=micros(q.since), until=micros(q.until), **service_params(q))
        return self._dicts(f"""
        SELECT {cg} AS src, {sg} AS dst, server_wid AS wid, count() AS n,
          countIf(start_ts >= %(since)s) AS opened
        FROM {self.db}.connections FINAL
        WHERE {LIVE} AND start_ts < %(until)s AND last_seen >= %(since)s AND service_ip IS NOT NULL
          AND ({cond})
        GROUP BY src, dst, wid""", named)

    def service_addresses(self, q: EdgeQuery) -> list[tuple[str, int]]:
        """The distinct addresses the window's connections (matching the filter) dialled."""
        p = ClickParams()
        cond = compile_filter(q.filter, CONN_FILTER_COLUMNS, p)
        named = dict(p.named, since=micros(q.since), until=micros(q.until))
        rows = self._exec(f"""
        SELECT DISTINCT assumeNotNull(service_ip), ifNull(service_port, 0)
        FROM {self.db}.connections FINAL
        WHERE {LIVE} AND start_ts < %(until)s AND last_seen >= %(since)s AND service_ip IS NOT NULL
          AND ({cond})
        ORDER BY 1, 2""", named)
        return [(str(ip), int(port)) for ip, port in rows]

    def edge_counts(self, q: EdgeQuery) -> list[dict[str, Any]]:
        cg, sg = groups(q)
        p = ClickParams()
        cond = compile_filter(q.filter, CONN_FILTER_COLUMNS, p)
        named = dict(p.named, since=micros(q.since), until=micros(q.until), **service_params(q))
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
        WHERE {LIVE} AND start_ts < %(until)s AND last_seen >= %(since)s AND ({cond})
        GROUP BY src, dst, observed_by, server_port, protocol"""
        rows = self._dicts(sql, named)
        for r in rows:
            r["closed"], r["incomplete"] = r.pop("closed_n"), r.pop("incomplete_n")
            r["first_seen"], r["last_seen"] = r.pop("first_us"), r.pop("last_us")
            if not r["rtt_n"]:
                r["rtt_sum"] = None  # DuckDB's sum over no values is NULL too
        return fold_edges(rows)

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
