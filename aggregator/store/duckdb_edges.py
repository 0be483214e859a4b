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

The Service view (`group_by=service`, aggregator/service_view.py) is grouped here too, in the
same one query: the window's connections are grouped by (client, server workload, dialled
address) with the workload view's aggregates (one scan, no join per connection); those few
groups are joined (a hash join) to the query's Service addresses (the Arrow table `_svc`,
registered on the cursor, which brings each Service's `service` object as JSON) and the groups
of one (client, Service node) added up (`_REAGGREGATE`), while the groups of the calls that
dialled no Service already are their edges; the same joined groups, added up per backend, give
each Service edge its `backends`. DuckDB writes both into the edge's JSON
(aggregator/store/service_edges.py has the rules): no Python runs per edge. (Measured slower,
docs/benchmarks.md: the join per connection, 1.3-1.4x this query at 10M stored connections;
the `service` objects aggregated in SQL; an ordered `string_agg` per backend list.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import msgspec
import pyarrow as pa

from aggregator.graph_edges import drops_of
from aggregator.store.query import EdgeQuery
from aggregator.store.service_edges import SERVICE_TABLE, service_arrow
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


# the server end in the Service view: its server workload when the connection dialled no
# Service, else the dialled address's Service node (`_svc_node` of the joined `_svc`), else
# `svc:<ip>:<port>` (an address the query's Services do not list)
SERVICE_DST = ("CASE WHEN service_ip IS NULL THEN server_wid ELSE coalesce(_svc_node, "
               "concat('svc:', service_ip, ':', CAST(coalesce(service_port, 0) AS VARCHAR))) END")
_SVC_JOIN = (f" LEFT JOIN {SERVICE_TABLE} ON _svc_ip = service_ip "
             "AND _svc_port = coalesce(service_port, 0)")


def groups(q: EdgeQuery) -> tuple[str, str]:
    """The client and server group expressions of a query over `source(q)`."""
    if q.group_by == "service":
        return "client_wid", SERVICE_DST
    return GROUPS[q.group_by]


def source(q: EdgeQuery) -> str:
    """What the edge queries read: `connections`; in the Service view joined to the query's
    Service addresses (`_svc`, registered on the cursor)."""
    return "connections" + (_SVC_JOIN if q.group_by == "service" else "")


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
    """`q`: the query whose groups to use (`service`: see `_service_ctes`)."""
    cg, sg = groups(q) if q is not None else GROUPS[group_by]
    return f"""
    SELECT {cg} AS src, {sg} AS dst, {_COUNT_AGGREGATES}
    FROM {source(q) if q is not None else "connections"}
    WHERE start_ts < $2 AND last_seen >= $1 AND ({where})
    GROUP BY 1, 2"""


def _count_aggregates() -> str:
    """The per-edge aggregates of the window's connections, as SQL (`c` of the edge query)."""
    # which observer sets the edge's connections have, as bits: one bit (nearly every edge)
    # means all `n` have that set; several, or a set outside OBSERVER_SETS (bit 7), and the
    # detail query counts them. (Seven filtered counts cost ~2x the whole rest of the scan.)
    obs = ("bit_or(CASE observed_by " + " ".join(f"WHEN ',{o},' THEN {1 << i}"
                                                 for i, o in enumerate(OBSERVER_SETS))
           + f" ELSE {_OTHER_OBSERVERS} END) AS obs")
    proto = ("CASE protocol " + " ".join(f"WHEN '{p}' THEN {1 << i}"
                                         for i, p in enumerate(PROTOCOL_BITS))
             + f" ELSE {_OTHER_PROTOCOL} END")
    return f"""count(*) AS n,
      {WINDOW_COUNTS}, epoch_us(min(start_ts)) AS first_us,
      epoch_us(max(last_seen)) AS last_us,
      sum(bytes_c2s) AS conn_bytes_c2s, sum(bytes_s2c) AS conn_bytes_s2c,
      sum(retransmits) AS conn_retransmits, {PACKET_COUNTS}, {obs},
      min(server_port) AS port_lo, max(server_port) AS port_hi, bit_or({proto}) AS protos,
      sum(dropped) AS dropped, string_agg(drop_reasons, ',') AS drop_text"""


_COUNT_AGGREGATES = _count_aggregates()
# each column of `_COUNT_AGGREGATES` -> how the values of several groups add up to their union's
# (a count or sum: summed; a bound: its min/max; bit sets: or-ed; texts: joined)
_REAGGREGATE = {
    **dict.fromkeys(("n", "opened", "active", "closed", "failed", "reset", "byte_mismatches",
                     "incomplete", "rtt_n", "packets_n_c2s", "packets_n_s2c"),
                    "sum({0})::BIGINT"),
    **dict.fromkeys(("rtt_sum", "conn_bytes_c2s", "conn_bytes_s2c", "conn_retransmits",
                     "conn_packets_c2s", "conn_packets_s2c", "dropped"), "sum({0})"),
    **dict.fromkeys(("rtt_min", "first_us", "port_lo"), "min({0})"),
    **dict.fromkeys(("rtt_max", "last_us", "port_hi"), "max({0})"),
    "obs": "bit_or({0})", "protos": "bit_or({0})", "drop_text": "string_agg({0}, ',')",
}


def _address_text(ip: str, port: str) -> str:
    """`ip:port`, `[ip]:port` for IPv6, as SQL (aggregator/store/service_edges.py address)."""
    return (f"CASE WHEN contains({ip}, ':') THEN concat('[', {ip}, ']:', {port}) "
            f"ELSE concat({ip}, ':', {port}) END")


def _service_ctes(where: str) -> str:
    """The Service view's CTEs (the module docstring): `c` (the edges' counts, as `_counts_sql`'s,
    with `svc`: whether the edge's server end is a Service, its name and its `service` JSON) and
    `bj` (per Service edge its `backends` JSON)."""
    backend = ("concat('{\"id\":', to_json(b.wid), ',\"name\":', to_json(coalesce(w.name, b.wid)), "
               "',\"namespace\":', coalesce(to_json(w.namespace)::VARCHAR, 'null'), "
               "',\"kind\":', coalesce(to_json(w.kind)::VARCHAR, 'null'), "
               "',\"connections\":', b.n, ',\"connections_opened\":', b.opened, '}')")
    # a Service's `service` object comes with its addresses in `_svc`; an address `_svc` lacks
    # (a connection stored since the query listed the window's addresses) is its own node
    unlisted = ("concat('{\"id\":', to_json(dst)::VARCHAR, ',\"name\":null,\"namespace\":null,"
                "\"addresses\":[', to_json(" + _address_text("service_ip",
                                                               "coalesce(service_port, 0)")
                + ")::VARCHAR, ']}')")
    readd = ", ".join(f"{f.format(k)} AS {k}" for k, f in _REAGGREGATE.items())
    return f"""WITH c0 AS (
      SELECT client_wid, server_wid, service_ip, service_port, {_COUNT_AGGREGATES}
      FROM connections
      WHERE start_ts < $2 AND last_seen >= $1 AND ({where})
      GROUP BY 1, 2, 3, 4),
    m AS (
      SELECT c0.*, client_wid AS src, {SERVICE_DST} AS dst, _svc_name AS svc_name,
        _svc_namespace AS svc_namespace,
        coalesce(_svc_json, {unlisted}) AS service
      FROM c0{_SVC_JOIN}
      WHERE service_ip IS NOT NULL),
    c AS (
      SELECT client_wid AS src, server_wid AS dst, c0.* EXCLUDE (client_wid, server_wid, service_ip, service_port),
        false AS svc, NULL::VARCHAR AS svc_name, NULL::VARCHAR AS svc_namespace,
        NULL::VARCHAR AS service
      FROM c0 WHERE service_ip IS NULL
      UNION ALL BY NAME
      SELECT src, dst, {readd}, true AS svc, any_value(svc_name) AS svc_name,
        any_value(svc_namespace) AS svc_namespace, any_value(service) AS service
      FROM m GROUP BY 1, 2),
    b AS (
      SELECT src, dst, server_wid AS wid, sum(n)::BIGINT AS n, sum(opened)::BIGINT AS opened
      FROM m GROUP BY 1, 2, 3),
    bj AS (  -- sorted by id: a list of (id, JSON) sorted, then joined (an ordered string_agg
             -- sorts per group, several times slower)
      SELECT src, dst, concat('[', array_to_string(list_transform(
        list_sort(list({{'k': b.wid, 'j': {backend}}})), lambda x: x.j), ','), ']') AS backends
      FROM b LEFT JOIN workloads w ON w.wid = b.wid GROUP BY 1, 2)"""


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


def _edge_json(from_rollups: bool, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """The edge's JSON object as one `concat` of its pieces (DuckDB builds this several times
    faster than `to_json` of a nested struct, or than chained `||`): the fields and their order
    of docs/api.md; `extra`: (field, SQL of its JSON text) after them (the Service view's)."""
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
        ("observed_by", observed), ("folded", "1"), ("drops", "'null'"), *extra)
    volume_only = concat(
        *((k, "0") for k in ("connections_opened", "connections_active", "connections_closed",
                             "connections_failed", "resets", "byte_mismatches")),
        *volumes, ("rtt_us", "'null'"), ("ports", "'[]'"), ("protocols", "'[]'"),
        ("first_seen", "'null'"), ("last_seen", "'null'"), ("complete", "'true'"),
        ("observed_by", "'{}'"), ("folded", "1"), ("drops", "'null'"), *extra)
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
        args: list[Any] = [q.since, q.until, *pc.values]
        from_rollups = q.volumes_from_rollups
        extra: tuple[tuple[str, str], ...] = ()
        # a workload node's name, namespace and kind: its row in `workloads` (keyed by the same
        # wid), joined to the aggregated edges; aggregating them over every connection of the
        # window was most of the query's time. A namespace or host node is named by its id.
        if q.group_by == "service":  # a Service node: named by the query's Services
            nodes = ("coalesce(ws.name, src) AS src_name, ws.namespace AS src_namespace, "
                     "ws.kind AS src_kind, CASE WHEN svc THEN coalesce(svc_name, substr(dst, 5)) "
                     "ELSE coalesce(wd.name, dst) END AS dst_name, CASE WHEN svc THEN "
                     "svc_namespace ELSE wd.namespace END AS dst_namespace, CASE WHEN svc THEN "
                     "'Service' ELSE wd.kind END AS dst_kind")
            joins = (" LEFT JOIN workloads ws ON ws.wid = src"
                     " LEFT JOIN workloads wd ON wd.wid = dst"
                     " LEFT JOIN bj USING (src, dst)")
            extra = (("service", "CASE WHEN svc THEN service ELSE 'null' END"),
                     ("backends", "CASE WHEN svc THEN bj.backends ELSE '[]' END"))
        elif q.group_by == "workload":
            nodes = ("coalesce(ws.name, src) AS src_name, ws.namespace AS src_namespace, "
                     "ws.kind AS src_kind, coalesce(wd.name, dst) AS dst_name, "
                     "wd.namespace AS dst_namespace, wd.kind AS dst_kind")
            joins = (" LEFT JOIN workloads ws ON ws.wid = src"
                     " LEFT JOIN workloads wd ON wd.wid = dst")
        else:
            nodes = ", ".join(f"NULL::VARCHAR AS {side}_{a}" for side in ("src", "dst")
                              for a in ("name", "namespace", "kind"))
            joins = ""
        counts = _counts_sql(q.group_by, where, q)
        if from_rollups:
            pv = DuckParams(start=3 + len(pc.values))
            vol = _volumes_sql(q.group_by, compile_filter(q.filter, ROLLUP_FILTER_COLUMNS, pv))
            source = "c FULL OUTER JOIN v USING (src, dst)"
            keep = "n IS NOT NULL OR " + " OR ".join(f"v_{k} <> 0" for k in VOLUMES[:4])
            ctes = f"WITH c AS ({counts}), v AS ({vol})"
            args += pv.values
            w_bytes = "coalesce(v_bytes_c2s, 0) + coalesce(v_bytes_s2c, 0)"
        elif q.group_by == "service":
            source, keep, ctes = "c", "true", _service_ctes(where)
            w_bytes = "coalesce(conn_bytes_c2s, 0) + coalesce(conn_bytes_s2c, 0)"
        else:
            source, keep, ctes = "c", "true", f"WITH c AS ({counts})"
            w_bytes = "coalesce(conn_bytes_c2s, 0) + coalesce(conn_bytes_s2c, 0)"
        sql = f"""{ctes}
        SELECT src, dst, {nodes},
          n IS NOT NULL AS conns, ({w_bytes})::BIGINT AS w_bytes, coalesce(opened, 0) AS w_opened,
          first_us, last_us, {_edge_json(from_rollups, extra)} AS json, dropped, drop_text,
          n IS NOT NULL AND (port_lo <> port_hi OR protos >= {_OTHER_PROTOCOL}
            OR bit_count(obs) <> 1 OR obs >= {_OTHER_OBSERVERS}) AS detail
        FROM {source}{joins} WHERE {keep}"""
        table = self._arrow(sql, args, q)
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

    def service_addresses(self, q: EdgeQuery) -> list[tuple[str, int]]:
        """The addresses the window's connections (matching the filter) dialled, (service_ip,
        service_port), sorted: what the Service view names before it groups."""
        pc = DuckParams(start=3)
        where = compile_filter(q.filter, CONN_FILTER_COLUMNS, pc)
        sql = (f"SELECT DISTINCT service_ip, service_port FROM connections WHERE start_ts < $2 "
               f"AND last_seen >= $1 AND service_ip IS NOT NULL AND ({where}) ORDER BY 1, 2")
        table = self._arrow(sql, [q.since, q.until, *pc.values])
        return [(ip, int(port or 0)) for ip, port in zip(
            table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)]

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
            if q.group_by == "service":
                cur.register(SERVICE_TABLE, service_arrow(q.services))
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

    def _arrow(self, sql: str, params: list[Any], q: EdgeQuery | None = None) -> pa.Table:
        """`q`: in the Service view, its Service addresses are registered as `_svc`."""
        cur = self._con.cursor()
        try:
            if q is not None and q.group_by == "service":
                cur.register(SERVICE_TABLE, service_arrow(q.services))
            return cur.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            from aggregator.store.base import StoreError

            raise StoreError(f"duckdb: query failed: {exc}") from exc
        finally:
            cur.close()
