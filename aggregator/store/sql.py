"""The filter language (eastwest/filters.py) compiled to SQL, once per dialect.

Stage: store (read path). In: a `Filter`, a mapping of the filter's view keys to a table's
column expressions, and a `Params` that owns the dialect's placeholders. Out: a WHERE fragment
(without WHERE) whose values went into `Params`; the same predicate `Filter.matches` applies in
memory (tests/unit/test_filters.py checks both agree on every case, in DuckDB and ClickHouse).

Dialects differ in placeholders (DuckDB `$n`, ClickHouse `%(pN)s`), in booleans (ClickHouse
18.16 has no `true`: 1/0) and in `position` (`position(x IN col)` vs `position(col, x)`).
Values are always parameters, never spliced.

Column mapping: IP keys map to columns holding `ip_hex` text (CIDRs become string ranges);
`observers` to a comma-wrapped list (",client,path,"); `link_local` to a boolean column where a
table has no addresses (rollups); else hidden link-local flows are told by their addresses.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from aggregator.store.query import NODEPORT_RANGE, ConnectionQuery
from eastwest.filters import DIMENSIONS, LINK_LOCAL_NETS, Filter, net_range

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Params:
    """Collects query parameters; `add(v)` returns the placeholder that stands for `v`."""

    def __init__(self, start: int = 1) -> None:
        self.values: list[Any] = []
        self.start = start

    def add(self, value: Any) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    true, false = "true", "false"

    def position(self, needle: str, column: str) -> str:
        return f"position({needle} IN {column}) > 0"


class DuckParams(Params):
    """DuckDB: numbered `$n` placeholders (so a query may also number its own first ones)."""

    def add(self, value: Any) -> str:
        self.values.append(value)
        return f"${self.start + len(self.values) - 1}"


class ClickParams(Params):
    """ClickHouse (clickhouse-driver): named `%(pN)s` placeholders, 1/0 booleans."""

    true, false = "1", "0"

    def __init__(self, start: int = 0) -> None:
        super().__init__(start)
        self.named: dict[str, Any] = {}

    def add(self, value: Any) -> str:
        """Times are µs since the epoch in ClickHouse's tables, booleans 1/0."""
        if isinstance(value, datetime):
            value = (value - _EPOCH) // timedelta(microseconds=1)
        elif isinstance(value, bool):
            value = int(value)
        name = f"p{self.start + len(self.named)}"
        self.named[name] = value
        self.values.append(value)
        return f"%({name})s"

    def position(self, needle: str, column: str) -> str:
        return f"position({column}, {needle}) > 0"


def compile_filter(flt: Filter, columns: Mapping[str, str], p: Params) -> str:
    """`flt` as a WHERE fragment over `columns`; its values go to `p`."""
    parts: list[str] = []
    if not flt.link_local:
        if "link_local" in columns:
            parts.append(f"NOT coalesce({columns['link_local']}, {p.false})")
        elif "client_ip" in columns and "server_ip" in columns:
            ors = [_in_range(columns[key], net, p) for key in ("client_ip", "server_ip")
                   for net in LINK_LOCAL_NETS]
            parts.append(f"NOT coalesce(({' OR '.join(ors)}), {p.false})")
    for c in flt.clauses:
        d = DIMENSIONS[c.dim]
        ors = []
        for f in d.fields:
            col = columns[f]
            for v in c.values:
                if d.kind == "net":
                    ors.append(_in_range(col, v, p))
                elif d.kind == "member":
                    ors.append(p.position(p.add(f",{v},"), col))
                else:
                    ors.append(f"{col} = {p.add(v)}")
        expr = "(" + " OR ".join(ors) + ")"
        if c.negate:  # NULL-safe: a flow without the field does not match the positive clause
            expr = f"NOT coalesce({expr}, {p.false})"
        parts.append(expr)
    return " AND ".join(parts) if parts else p.true


def _in_range(col: str, net: Any, p: Params) -> str:
    if not hasattr(net, "network_address"):  # a Service name the caller did not resolve
        raise ValueError(f"filter value {net!r} must be resolved to addresses first")
    lo, hi = net_range(net)
    return f"({col} >= {p.add(lo)} AND {col} <= {p.add(hi)})"


# -- connections ------------------------------------------------------------------------------
# the filter's view keys -> columns of `connections` (the same names in every backend)
CONN_FILTER_COLUMNS = {
    "client_ip": "client_ip_hex", "server_ip": "server_ip_hex", "client_port": "client_port",
    "server_port": "server_port", "protocol": "protocol", "outcome": "outcome",
    "observers": "observed_by", "vni": "vni", "client_workload": "client_name",
    "server_workload": "server_name", "client_namespace": "client_namespace",
    "server_namespace": "server_namespace", "service_ip": "service_ip_hex",
}
# the view keys the rollups can answer (aggregator/store/query.py ROLLUP_KEYS) -> their columns
ROLLUP_FILTER_COLUMNS = {
    "link_local": "link_local",
    "client_workload": "client_name", "server_workload": "server_name",
    "client_namespace": "client_namespace", "server_namespace": "server_namespace",
    "server_port": "server_port", "protocol": "protocol",
}
SORT_EXPR = {"start": "start_ts", "last_seen": "last_seen", "bytes": "(bytes_c2s + bytes_s2c)",
             "client_workload": "client_wid", "server_workload": "server_wid"}


# A connection that looks like one half of a NodePort call with masquerade that its middle
# host's record has not joined yet (aggregator/nodeport.py; docs/aggregator.md, "NodePort calls
# with masquerade"): no dialled address (neither end's host saw a translation), and either no
# server socket and a server named as a node on a port of the NodePort range (the client's
# half: its socket, its host's wire, or both), or no client socket and a client named as a node
# (the server's half, from the masquerade's address: its socket, its host's wire, or both).
def nodeport_half(p: Params, ports: tuple[int, int] = NODEPORT_RANGE) -> str:
    """The WHERE fragment of a connection that looks like an unjoined NodePort half (above);
    `ports`: the cluster's NodePort range (the aggregator's `--nodeport-range`)."""
    client, server = p.position("',client,'", "observed_by"), p.position("',server,'", "observed_by")
    lo, hi = int(ports[0]), int(ports[1])
    return (f"service_ip IS NULL AND ((NOT {server} AND server_kind = 'Node' "
            f"AND server_port >= {lo} AND server_port <= {hi}) "
            f"OR (NOT {client} AND client_kind = 'Node'))")


def connection_where(q: ConnectionQuery, p: Params) -> tuple[str, str]:
    """The WHERE fragment and the ORDER BY of a `ConnectionQuery` (keyset paging: the rows
    after the cursor's (sort value, conn_id) in the query's order)."""
    where = [compile_filter(q.filter, CONN_FILTER_COLUMNS, p)]
    if q.since is not None:
        where.append(f"last_seen >= {p.add(q.since)}")
    if q.until is not None:
        where.append(f"start_ts < {p.add(q.until)}")
    if q.meshed:
        where.append("mesh IS NOT NULL")
    if q.halves_since is not None:
        where.append(f"start_ts > {p.add(q.halves_since)} AND {nodeport_half(p, q.halves_ports)}")
    expr = SORT_EXPR[q.sort.key]
    op, direction = ("<", "DESC") if q.sort.descending else (">", "ASC")
    if q.cursor is not None:
        v1, v2, cid = p.add(q.cursor.value), p.add(q.cursor.value), p.add(q.cursor.conn_id)
        where.append(f"({expr} {op} {v1} OR ({expr} = {v2} AND conn_id {op} {cid}))")
    return " AND ".join(where), f"{expr} {direction}, conn_id {direction}"
