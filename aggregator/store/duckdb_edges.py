"""DuckDB side of the service graph: the edges of a window in ONE aggregation, each edge already
written as its JSON object.

Stage: store (query side). In: a window [since, until), a grouping (workload | namespace | host),
the compiled filter for `connections` and, when the rollups can answer it, for `rollups`.
Out: `edges()`: one list per column of `EDGE_COLUMNS`, one row per edge (client group ->
server group), in no particular order; aggregator/graph.py assembles the graph from them
(docs/api.md for the edge fields).

Why this shape (bench/bench_graph_api.py, docs/benchmarks.md): with 10,000 edges the time went
not into DuckDB's aggregation but into Python: 29 columns x 10,000 rows through `fetchall`, dicts,
a fold of flat rows, networkx, `json.dumps`. Here DuckDB groups straight by edge, with the per-edge
sets kept as plain bit sets and bounds (`observed_by`, one of 7 observer combinations, and the
protocol as bit sets; ports a min/max pair), and writes each edge's JSON itself (one `concat`),
so Python handles one string per edge. Edges the counters cannot describe (several ports or
observer sets, an observer set or protocol outside those sets) are detailed by a second, small
query and rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from aggregator.graph_edges import drops_of
from aggregator.store.query import EdgeQuery, service_group, service_rows
from aggregator.store.sql import (
    CONN_FILTER_COLUMNS,
    ROLLUP_FILTER_COLUMNS,
    DuckParams,
    compile_filter,
)
from eastwest.record import PROTOCOLS

# A window [$1, $2) of one edge's connections: what opened, was active, closed, failed or was
# reset in it, and the RTT sums. One text for the JSON fast path (here) and the detail query
# (duckdb_derived.edge_counts), so both count a window the same way.
WINDOW_COUNTS = """count(*) FILTER (WHERE start_ts >= $1) AS opened,
  count(*) FILTER (WHERE NOT closed OR closed_ts >= $2) AS active,
  count(*) FILTER (WHERE closed AND closed_ts >= $1 AND closed_ts < $2) AS closed,
  count(*) FILTER (WHERE start_ts >= $1 AND outcome IN ('refused', 'timeout', 'dropped')) AS failed,
  count(*) FILTER (WHERE start_ts >= $1 AND outcome = 'reset') AS reset,
  count(*) FILTER (WHERE byte_mismatch) AS byte_mismatches,
  count(*) FILTER (WHERE incomplete) AS incomplete,
  min(rtt_min_us) AS rtt_min, sum(rtt_avg_us) AS rtt_sum, count(rtt_avg_us) AS rtt_n,
  max(rtt_max_us) AS rtt_max"""

# Packets are counted by wire observers only; a connection none of whose observers counted them
# has null packets (aggregator/connection.py). An edge's packets are null when none of its
# connections in the window counted them and its volumes hold none either: `count` is of the
# connections that counted, `conn_packets_*` their sum (null when none did).
PACKET_COUNTS = ("count(packets_c2s) AS packets_n_c2s, count(packets_s2c) AS packets_n_s2c, "
                 "sum(packets_c2s) AS conn_packets_c2s, sum(packets_s2c) AS conn_packets_s2c")

# observed_by as stored: ",client," ... ",client,path,server," (sorted observers, comma-wrapped)
OBSERVER_SETS = ("client", "server", "path", "client,server", "client,path", "path,server",
                 "client,path,server")
PROTOCOL_BITS = tuple(sorted(PROTOCOLS))
_OTHER_PROTOCOL = 1 << len(PROTOCOL_BITS)
_OTHER_OBSERVERS = 1 << len(OBSERVER_SETS)

GROUPS = {
    "workload": ("client_wid", "server_wid"),
    "namespace": ("coalesce(client_namespace, client_wid)", "coalesce(server_namespace, server_wid)"),
    "host": ("coalesce(nullif(client_host, ''), 'unknown')", "coalesce(nullif(server_host, ''), 'unknown')"),
}


def groups(q: EdgeQuery) -> tuple[str, str]:
    """The client and server group expressions of a query (`service`: aggregator/service_view.py,
    reading `_svc_node` of `source(q)`)."""
    if q.group_by == "service":
        mapped = "_svc_node" if q.services else "NULL::VARCHAR"
        return "client_wid", service_group(mapped, "CAST({} AS VARCHAR)")
    return GROUPS[q.group_by]


def source(q: EdgeQuery) -> str:
    """What the edge queries read: `connections`; in the Service view with named addresses,
    joined to them (a hash join on a VALUES list: a CASE of 1,000 Services cost 5x the query)."""
    if q.group_by != "service" or not q.services:
        return "connections"
    values = ", ".join(f"('{ip}', {port}, '{node}')" for ip, port, node in service_rows(q.services))
    return (f"connections LEFT JOIN (VALUES {values}) _svc(_svc_ip, _svc_port, _svc_node) "
            "ON _svc_ip = service_ip AND _svc_port = service_port")


# src/dst node attributes (None for an edge with rollup volumes only), `conns` whether the edge
# has connections in the window, the folding weights (bytes both ways, opened), first/last seen in
# µs since the epoch, and `json`: the edge as GET /api/v1/graph writes it
EDGE_COLUMNS = ("src", "dst", "src_name", "src_namespace", "src_kind", "dst_name",
                "dst_namespace", "dst_kind", "conns", "w_bytes", "w_opened", "first_us",
                "last_us", "json")
VOLUMES = ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "retransmits")
# a group whose deltas sum to nothing is no edge: the volumes of renamed connections left it
# (aggregator/correlate.py, names), its rows hold a delta and the same delta negated
HAVING_VOLUME = ("HAVING NOT (" + " AND ".join(
    f"coalesce(sum({n}), 0) = 0" for n in (*VOLUMES, "resets")) + ")")
_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()


def _counts_sql(group_by: str, where: str, q: EdgeQuery | None = None) -> str:
    """`q`: the query whose groups to use (`service` needs its `services`)."""
    cg, sg = groups(q) if q is not None else GROUPS[group_by]
    table = source(q) if q is not None else "connections"
    # which observer sets the edge's connections have, as bits: one bit (nearly every edge)
    # means all `n` have that set; several, or a set outside OBSERVER_SETS (bit 7), and the
    # detail query counts them. (Seven filtered counts cost ~2x the whole rest of the scan.)
    obs = ("bit_or(CASE observed_by " + " ".join(f"WHEN ',{o},' THEN {1 << i}"
                                                 for i, o in enumerate(OBSERVER_SETS))
           + f" ELSE {_OTHER_OBSERVERS} END) AS obs")
    proto = ("CASE protocol " + " ".join(f"WHEN '{p}' THEN {1 << i}"
                                         for i, p in enumerate(PROTOCOL_BITS))
             + f" ELSE {_OTHER_PROTOCOL} END")
    return f"""
    SELECT {cg} AS src, {sg} AS dst, count(*) AS n,
      {WINDOW_COUNTS}, epoch_us(min(start_ts)) AS first_us,
      epoch_us(max(last_seen)) AS last_us,
      sum(bytes_c2s) AS conn_bytes_c2s, sum(bytes_s2c) AS conn_bytes_s2c,
      sum(retransmits) AS conn_retransmits, {PACKET_COUNTS}, {obs},
      min(server_port) AS port_lo, max(server_port) AS port_hi, bit_or({proto}) AS protos,
      sum(dropped) AS dropped, string_agg(drop_reasons, ',') AS drop_text
    FROM {table}
    WHERE start_ts < $2 AND last_seen >= $1 AND ({where})
    GROUP BY 1, 2"""


def _volumes_sql(group_by: str, where: str) -> str:
    cg, sg = GROUPS[group_by]
    sums = ", ".join(f"sum({n}) AS v_{n}" for n in VOLUMES)
    return (f"SELECT {cg} AS src, {sg} AS dst, {sums} FROM rollups "
            f"WHERE minute >= date_trunc('minute', $1::TIMESTAMPTZ) AND minute < $2 AND ({where}) "
            f"GROUP BY 1, 2 {HAVING_VOLUME}")


def _iso(us: str) -> str:
    """µs since the epoch -> RFC 3339 text exactly as Python's isoformat() + Z writes it."""
    return (f"CASE WHEN {us} IS NULL THEN NULL WHEN {us} % 1000000 = 0 "
            f"THEN strftime(make_timestamp({us}), '%Y-%m-%dT%H:%M:%SZ') "
            f"ELSE strftime(make_timestamp({us}), '%Y-%m-%dT%H:%M:%S.%fZ') END")


def _edge_json(from_rollups: bool) -> str:
    """The edge's JSON object as one `concat` of its pieces (DuckDB builds this several times
    faster than `to_json` of a nested struct, or than chained `||`): the fields and their order
    of docs/api.md."""
    if from_rollups:
        vol = [f"coalesce(v_{n}, 0)" for n in VOLUMES]
        # packets: null when no connection of the window counted them and the minutes hold none
        for i, d in ((2, "c2s"), (3, "s2c")):
            vol[i] = (f"CASE WHEN coalesce(packets_n_{d}, 0) = 0 AND coalesce(v_packets_{d}, 0) = 0 "
                      f"THEN 'null' ELSE {vol[i]}::VARCHAR END")
    else:  # volumes of the matching connections (packets: of those that counted them)
        vol = ["coalesce(conn_bytes_c2s, 0)", "coalesce(conn_bytes_s2c, 0)",
               "coalesce(conn_packets_c2s::VARCHAR, 'null')",
               "coalesce(conn_packets_s2c::VARCHAR, 'null')", "coalesce(conn_retransmits, 0)"]

    def concat(*pairs: tuple[str, str]) -> str:
        parts = ["'{\"source\":'", "to_json(src)::VARCHAR", "',\"target\":'", "to_json(dst)::VARCHAR"]
        for k, v in pairs:
            parts += [f"',\"{k}\":'", v]
        return "concat(" + ", ".join(parts) + ", '}')"

    volumes = (("bytes_c2s", vol[0]), ("bytes_s2c", vol[1]), ("packets_c2s", vol[2]),
               ("packets_s2c", vol[3]), ("retransmits", vol[4]))
    # one observer set (`detail` rewrites the others): all n connections have it
    observed = ("CASE obs " + " ".join(f"WHEN {1 << i} THEN concat('{{\"{o}\":', n, '}}')"
                                       for i, o in enumerate(OBSERVER_SETS)) + " ELSE '{}' END")
    protocols = ("concat('[', concat_ws(',', " + ", ".join(
        f"CASE WHEN protos & {1 << i} <> 0 THEN '\"{p}\"' END"
        for i, p in enumerate(PROTOCOL_BITS)) + "), ']')")
    rtt = ("CASE WHEN rtt_min IS NULL THEN 'null' ELSE concat('{\"min\":', rtt_min, "
           "',\"avg\":', round_even(rtt_sum / rtt_n, 0)::BIGINT, ',\"max\":', rtt_max, '}') END")
    with_conns = concat(
        ("connections_opened", "opened"), ("connections_active", "active"),
        ("connections_closed", "closed"), ("connections_failed", "failed"), ("resets", "reset"),
        ("byte_mismatches", "byte_mismatches"), *volumes, ("rtt_us", rtt),
        ("ports", "concat('[', port_lo, ']')"), ("protocols", protocols),
        ("first_seen", f"concat('\"', {_iso('first_us')}, '\"')"),
        ("last_seen", f"concat('\"', {_iso('last_us')}, '\"')"),
        ("complete", "CASE WHEN incomplete = 0 THEN 'true' ELSE 'false' END"),
        ("observed_by", observed), ("folded", "1"), ("drops", "'null'"))
    volume_only = concat(
        *((k, "0") for k in ("connections_opened", "connections_active", "connections_closed",
                             "connections_failed", "resets", "byte_mismatches")),
        *volumes, ("rtt_us", "'null'"), ("ports", "'[]'"), ("protocols", "'[]'"),
        ("first_seen", "'null'"), ("last_seen", "'null'"), ("complete", "'true'"),
        ("observed_by", "'{}'"), ("folded", "1"), ("drops", "'null'"))
    return f"CASE WHEN n IS NULL THEN {volume_only} ELSE {with_conns} END"


class EdgeQueries:
    """Mixed into DuckDBStore: its connection `_con`."""

    _con: duckdb.DuckDBPyConnection

    def edges(self, q: EdgeQuery) -> dict[str, list[Any]]:
        """Per edge of the window, as columns (`EDGE_COLUMNS`). Counts over the connections that
        overlap the window; volumes from the rollups of the minutes it touches when the rollups
        can answer the filter, else from those connections."""
        pc = DuckParams(start=3)  # $1, $2: the window
        where = compile_filter(q.filter, CONN_FILTER_COLUMNS, pc)
        counts = _counts_sql(q.group_by, where, q)
        args: list[Any] = [q.since, q.until, *pc.values]
        from_rollups = q.volumes_from_rollups
        # a workload node's name, namespace and kind: its row in `workloads` (keyed by the same
        # wid), joined to the aggregated edges; aggregating them over every connection of the
        # window was most of the query's time. A namespace or host node is named by its id.
        if q.group_by in ("workload", "service"):
            nodes = ("coalesce(ws.name, src) AS src_name, ws.namespace AS src_namespace, "
                     "ws.kind AS src_kind, coalesce(wd.name, dst) AS dst_name, "
                     "wd.namespace AS dst_namespace, wd.kind AS dst_kind")
            joins = (" LEFT JOIN workloads ws ON ws.wid = src"
                     " LEFT JOIN workloads wd ON wd.wid = dst")
        else:
            nodes = ", ".join(f"NULL::VARCHAR AS {side}_{a}" for side in ("src", "dst")
                              for a in ("name", "namespace", "kind"))
            joins = ""
        if from_rollups:
            pv = DuckParams(start=3 + len(pc.values))
            vol = _volumes_sql(q.group_by, compile_filter(q.filter, ROLLUP_FILTER_COLUMNS, pv))
            source = "c FULL OUTER JOIN v USING (src, dst)"
            keep = "n IS NOT NULL OR " + " OR ".join(f"v_{k} <> 0" for k in VOLUMES[:4])
            ctes = f"WITH c AS ({counts}), v AS ({vol})"
            args += pv.values
            w_bytes = "coalesce(v_bytes_c2s, 0) + coalesce(v_bytes_s2c, 0)"
        else:
            source, keep, ctes = "c", "true", f"WITH c AS ({counts})"
            w_bytes = "coalesce(conn_bytes_c2s, 0) + coalesce(conn_bytes_s2c, 0)"
        sql = f"""{ctes}
        SELECT src, dst, {nodes},
          n IS NOT NULL AS conns, ({w_bytes})::BIGINT AS w_bytes, coalesce(opened, 0) AS w_opened,
          first_us, last_us, {_edge_json(from_rollups)} AS json, dropped, drop_text,
          n IS NOT NULL AND (port_lo <> port_hi OR protos >= {_OTHER_PROTOCOL}
            OR bit_count(obs) <> 1 OR obs >= {_OTHER_OBSERVERS}) AS detail
        FROM {source}{joins} WHERE {keep}"""
        table = self._arrow(sql, args)
        cols = {n: table.column(n).to_pylist()
                for n in (*EDGE_COLUMNS, "detail", "dropped", "drop_text")}
        dropped, drop_text = cols.pop("dropped"), cols.pop("drop_text")
        for i in [i for i, d in enumerate(dropped) if d is not None]:  # few edges have drops
            edge = _dec.decode(cols["json"][i])
            edge["drops"] = drops_of(dropped[i], drop_text[i])
            cols["json"][i] = _enc.encode(edge).decode()
        detail = [i for i, d in enumerate(cols.pop("detail")) if d]
        if detail:
            self._detail(detail, cols, q, where, pc.values)
        return cols

    def service_calls(self, q: EdgeQuery) -> list[dict[str, Any]]:
        """The window's connections that dialled a Service (matching the filter), per client
        group, dialled address and backend: `SERVICE_CALL_COLUMNS` (aggregator/service_view.py)."""
        pc = DuckParams(start=3)
        where = compile_filter(q.filter, CONN_FILTER_COLUMNS, pc)
        sql = f"""WITH c AS (
          SELECT client_wid AS src, service_ip, service_port, server_wid AS wid, count(*) AS n,
            count(*) FILTER (WHERE start_ts >= $1) AS opened
          FROM connections
          WHERE start_ts < $2 AND last_seen >= $1 AND service_ip IS NOT NULL AND ({where})
          GROUP BY ALL)
        SELECT c.*, coalesce(w.name, c.wid) AS name, w.namespace, w.kind
        FROM c LEFT JOIN workloads w ON w.wid = c.wid"""
        table = self._arrow(sql, [q.since, q.until, *pc.values])
        return table.to_pylist()

    def _detail(self, rows: list[int], cols: dict[str, list[Any]], q: EdgeQuery, where: str,
                params: Sequence[Any]) -> None:
        """Ports, protocols and observed_by of the edges the counters could not describe."""
        cg, sg = groups(q)
        need = pa.table({"src": [cols["src"][i] for i in rows], "dst": [cols["dst"][i] for i in rows]})
        sql = (f"SELECT {cg} AS src, {sg} AS dst, observed_by, server_port, protocol, count(*) AS n "
               f"FROM {source(q)} SEMI JOIN _need ON {cg} = _need.src AND {sg} = _need.dst "
               f"WHERE start_ts < $2 AND last_seen >= $1 AND ({where}) GROUP BY ALL")
        cur = self._con.cursor()
        try:
            cur.register("_need", need)
            found = cur.execute(sql, [q.since, q.until, *params]).fetchall()
        except duckdb.Error as exc:
            from aggregator.store.base import StoreError

            raise StoreError(f"duckdb: query failed: {exc}") from exc
        finally:
            cur.close()
        sets: dict[tuple[str, str], tuple[dict[str, int], set[int], set[str]]] = {}
        for src, dst, obs, port, proto, n in found:
            observed, ports, protocols = sets.setdefault((src, dst), ({}, set(), set()))
            key = obs.strip(",")
            observed[key] = observed.get(key, 0) + n
            ports.add(port)
            protocols.add(proto)
        for i in rows:
            observed, ports, protocols = sets[(cols["src"][i], cols["dst"][i])]
            edge = _dec.decode(cols["json"][i])
            edge.update(ports=sorted(ports), protocols=sorted(protocols), observed_by=observed)
            cols["json"][i] = _enc.encode(edge).decode()

    def _arrow(self, sql: str, params: list[Any]) -> pa.Table:
        cur = self._con.cursor()
        try:
            return cur.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            from aggregator.store.base import StoreError

            raise StoreError(f"duckdb: query failed: {exc}") from exc
        finally:
            cur.close()
