"""Correlated connections, minute rollups and workloads -> columns, for bulk writes.

Stage: between correlation (a `Plan`, aggregator/correlate.py) and a store backend.
In:  the connections a batch touched, its rollup deltas, the workloads it saw.
Out: `Derived`: three `pyarrow.Table`s that a backend upserts in the transaction of the raw
batch (connections replaced by `conn_id`, rollups ADDED per key, workloads' last_seen raised).

Column lists here are the one source of the tables' DDL for every backend, like columns.py.
IP columns carry `ip_hex` text too, so CIDR filters compile to string ranges (eastwest.filters).

`Derived` is built lazily from the plan: a backend reads only what it writes. `connections` is
the full table (`CONN_COLUMNS`, with `state`: the whole connection as msgpack; ClickHouse);
`connection_rows()` is the DuckDB form (`DUCKDB_CONN_NAMES`: `state` replaced by `views`, the
views and identity labels only, as a msgpack array: everything else of the connection is in its
columns already, and `connection_of` rebuilds it from both). Each connection's derived values
come from one pass over its views (`Connection.summary`) and every row is one tuple,
transposed into columns: the per-column getters of `CONN_COLUMNS` are the reference definition
(tests/unit/test_store_connections.py compares them), not the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any, Protocol

import msgspec
import pyarrow as pa

from aggregator import mesh
from aggregator.connection import Connection, Identity, Naming, ProcInfo, Summary, Tunnel, View
from aggregator.correlate import Plan
from eastwest.filters import dropped_outcome, outcome_of
from eastwest.filters import ip_hex as _ip_hex

ip_hex = lru_cache(maxsize=65536)(_ip_hex)  # addresses repeat across connections

_TS = pa.timestamp("us", tz="UTC")
_enc = msgspec.msgpack.Encoder()
CONN_DECODER = msgspec.msgpack.Decoder(Connection)

S, I32, I64, B, TS, BIN = pa.string(), pa.int32(), pa.int64(), pa.bool_(), _TS, pa.binary()
_DDL = {S: "VARCHAR", I32: "INTEGER", I64: "BIGINT", B: "BOOLEAN", TS: "TIMESTAMPTZ", BIN: "BLOB"}
DDL_TYPES = _DDL

Getter = Callable[[Connection], Any]


def _ident(side: str, attr: str) -> Getter:
    return lambda c: getattr(getattr(c, side), attr) if attr != "wid" else getattr(c, side).wid


def _proc(side: str, attr: str) -> Getter:
    def get(c: Connection) -> Any:
        p = c.client_proc if side == "client" else c.server_proc
        return getattr(p, attr) if p is not None else None
    return get


def _tun(attr: str) -> Getter:
    return lambda c: getattr(c.tunnel, attr) if c.tunnel is not None else None


def _rtt(i: int) -> Getter:
    return lambda c: (c.rtt[i] if c.rtt is not None else None)


def _side_bytes(obs: str, i: int) -> Getter:
    return lambda c: c.side_bytes(obs)[i]


def _dropped(drops: dict[str, int] | None) -> int | None:
    return sum(drops.values()) if drops is not None else None


def drop_reasons_text(drops: dict[str, int] | Sequence[tuple[str, int]] | None) -> str | None:
    """The `drop_reasons` column: "REASON=packets" by reason, comma-separated, sorted."""
    if drops is None:
        return None
    items = sorted(drops.items() if isinstance(drops, dict) else drops)
    return ",".join(f"{r}={n}" for r, n in items)


def parse_drop_reasons(text: str | None) -> dict[str, int]:
    """The inverse of `drop_reasons_text` (empty for NULL)."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        r, _, n = part.partition("=")
        out[r] = int(n)
    return out


# name, arrow type, getter (computed once per connection: `_best` is cached per row below)
CONN_COLUMNS: list[tuple[str, pa.DataType, Getter]] = [
    ("conn_id", S, lambda c: c.conn_id),
    ("protocol", S, lambda c: c.protocol),
    ("family", I32, lambda c: c.family),
    ("client_ip", S, lambda c: c.client_ip),
    ("client_ip_hex", S, lambda c: ip_hex(c.client_ip)),
    ("client_port", I32, lambda c: c.client_port),
    ("server_ip", S, lambda c: c.server_ip),
    ("server_ip_hex", S, lambda c: ip_hex(c.server_ip)),
    ("server_port", I32, lambda c: c.server_port),
    ("scope", I64, lambda c: c.scope),
    ("start_ts", TS, lambda c: c.start),
    ("last_seen", TS, lambda c: c.last_seen),
    ("closed", B, lambda c: c.closed),
    ("closed_ts", TS, lambda c: c.closed_at),
    ("observed_by", S, lambda c: "," + ",".join(c.observed_by) + ","),
    ("connect", S, lambda c: c.connect),
    ("outcome", S, lambda c: c.outcome()),
    ("bytes_c2s", I64, lambda c: c.best()[0]),
    ("bytes_s2c", I64, lambda c: c.best()[1]),
    ("packets_c2s", I64, lambda c: c.packets()[0]),  # None: no view counted packets
    ("packets_s2c", I64, lambda c: c.packets()[1]),
    ("retransmits", I64, lambda c: c.best()[4]),
    ("resets", I64, lambda c: c.best()[5]),
    ("rtt_min_us", I64, _rtt(0)),
    ("rtt_avg_us", I64, _rtt(1)),
    ("rtt_max_us", I64, _rtt(2)),
    ("client_bytes_c2s", I64, _side_bytes("client", 0)),
    ("client_bytes_s2c", I64, _side_bytes("client", 1)),
    ("server_bytes_c2s", I64, _side_bytes("server", 0)),
    ("server_bytes_s2c", I64, _side_bytes("server", 1)),
    ("path_bytes_c2s", I64, _side_bytes("path", 0)),
    ("path_bytes_s2c", I64, _side_bytes("path", 1)),
    ("byte_mismatch", B, lambda c: c.byte_mismatch),
    ("incomplete", B, lambda c: c.incomplete),
    *[(f"{side}_{attr if attr != 'source' else 'id_source'}", S, _ident(side, attr))
      for side in ("client", "server")
      for attr in ("wid", "name", "namespace", "kind", "host", "source")],
    *[(f"{side}_{attr}", typ, _proc(side, attr)) for side in ("client", "server")
      for attr, typ in (("pid", I64), ("comm", S), ("netns", I64), ("container", S),
                        ("collector", S))],
    ("vni", I32, _tun("vni")),
    ("vtep_src", S, _tun("vtep_src")),
    ("vtep_dst", S, _tun("vtep_dst")),
    ("vtep_src_host", S, _tun("vtep_src_host")),
    ("vtep_dst_host", S, _tun("vtep_dst_host")),
    ("tunnel_type", S, _tun("type")),  # added: rows stored before it have NULL (VXLAN)
    # added: the dialled Service address (records' `nat`); rows stored before them have NULL
    ("service_ip", S, lambda c: c.service_ip),
    ("service_port", I32, lambda c: c.service_port),
    ("service_ip_hex", S, lambda c: ip_hex(c.service_ip) if c.service_ip is not None else None),
    # added: packets the kernel dropped (all reasons) and by reason ("NETFILTER_DROP=3,..."),
    # NULL when no drop source reported the connection
    ("dropped", I64, lambda c: _dropped(c.drops())),
    ("drop_reasons", S, lambda c: drop_reasons_text(c.drops())),
    # added: a folded service-mesh call's sides as JSON (aggregator/mesh.py), NULL when not
    # meshed (and in rows stored before it)
    ("mesh", S, lambda c: mesh.stored(c.mesh)),
    ("state", BIN, lambda c: _enc.encode(c)),
]
CONN_SCHEMA = pa.schema([(n, t) for n, t, _ in CONN_COLUMNS])
CONN_NAMES = [n for n, _, _ in CONN_COLUMNS]

# `link_local`: the edge's connections have a link-local or multicast address (eastwest.filters
# LINK_LOCAL_NETS): the rollups have no addresses, and default views leave those out
ROLLUP_KEY = ["minute", "client_wid", "server_wid", "client_host", "server_host", "server_port",
              "protocol", "link_local"]
ROLLUP_ATTRS = ["client_name", "client_namespace", "server_name", "server_namespace"]
ROLLUP_COUNTERS = ["bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "retransmits", "resets"]
ROLLUP_SCHEMA = pa.schema(
    [("minute", TS), ("client_wid", S), ("server_wid", S), ("client_host", S),
     ("server_host", S), ("server_port", I32), ("protocol", S), ("link_local", B)]
    + [(n, S) for n in ROLLUP_ATTRS] + [(n, I64) for n in ROLLUP_COUNTERS])

WORKLOAD_SCHEMA = pa.schema([("wid", S), ("name", S), ("namespace", S), ("kind", S),
                             ("host", S), ("labels", S), ("source", S), ("first_seen", TS),
                             ("last_seen", TS)])


def ddl(schema: pa.Schema, primary_key: list[str]) -> str:
    cols = ", ".join(f"{f.name} {_DDL[f.type]}" for f in schema)
    return f"({cols}, PRIMARY KEY ({', '.join(primary_key)}))"


# DuckDB's connections: the columns without `state`, plus `views` (see the module docstring)
DUCKDB_CONN_NAMES = [n for n in CONN_NAMES if n != "state"] + ["views"]
DUCKDB_CONN_SCHEMA = pa.schema([f for f in CONN_SCHEMA if f.name != "state"] + [("views", BIN)])


class _ViewRow(msgspec.Struct, array_like=True):
    """A view in the `views` blob: `View`'s fields as an array; a drops view has a 15th, its
    reason (the other views' arrays end before it, as they always did)."""

    observer: str
    collector: str
    start: datetime
    end: datetime
    final: bool
    bytes_c2s: int
    bytes_s2c: int
    packets_c2s: int | None
    packets_s2c: int | None
    retransmits: int
    resets: int
    connect: str | None
    rtt: tuple[int, int, int] | None
    incomplete: bool
    reason: str | None = None


class _Blob(msgspec.Struct, array_like=True):
    """The `views` column: (views, client labels, server labels[, naming]); files written
    before names could change have no fourth element."""

    views: list[_ViewRow]
    client_labels: dict[str, str] | None
    server_labels: dict[str, str] | None
    naming: Naming | None = None


_views_dec = msgspec.msgpack.Decoder(_Blob)
_astuple = msgspec.structs.astuple


_NONE3 = (None,) * 3
_NONE5 = (None,) * 5
_NONE6 = (None,) * 6


def row_values(c: Connection, s: Summary) -> tuple[Any, ...]:
    """The `CONN_COLUMNS` values of one connection but `state`, in order, from its summary
    (ProcInfo's and Tunnel's fields are in their columns' order)."""
    b, r, ci, si = s.best, s.rtt, c.client, c.server
    cp, sp, t = c.client_proc, c.server_proc, c.tunnel
    return (c.conn_id, c.protocol, c.family, c.client_ip, ip_hex(c.client_ip), c.client_port,
            c.server_ip, ip_hex(c.server_ip), c.server_port, c.scope, s.start, s.last_seen,
            s.closed_at is not None, s.closed_at, s.observed_by, s.connect,
            outcome_of(s.connect, b[5], dropped_outcome(s.connect, s.drops is not None,
                                                        s.observed_by == ",drops,")),
            b[0], b[1], *s.packets, b[4], b[5],
            *(r if r is not None else _NONE3),
            *s.client_bytes, *s.server_bytes, *s.path_bytes, s.byte_mismatch, s.incomplete,
            ci.wid, ci.name, ci.namespace, ci.kind, ci.host, ci.source,
            si.wid, si.name, si.namespace, si.kind, si.host, si.source,
            *(_astuple(cp) if cp is not None else _NONE5),
            *(_astuple(sp) if sp is not None else _NONE5),
            *(_astuple(t) if t is not None else _NONE6), c.service_ip, c.service_port,
            ip_hex(c.service_ip) if c.service_ip is not None else None,
            None if s.drops is None else sum(n for _, n in s.drops), drop_reasons_text(s.drops),
            mesh.stored(c.mesh))


def views_blob(c: Connection) -> bytes:
    """What the columns lack to rebuild the connection: its views (in order), the labels of
    both identities, and while its names may still change, its `naming`."""
    views = [t if (t := _astuple(v))[14] is not None else t[:14] for v in c.views.values()]
    if c.naming is None:
        return _enc.encode((views, c.client.labels or None, c.server.labels or None))
    return _enc.encode((views, c.client.labels or None, c.server.labels or None, c.naming))


class _DropViewRow(msgspec.Struct, array_like=True):
    """What `drop_reasons_of_blob` reads of a view (the rest stays undecoded)."""

    observer: str
    collector: msgspec.Raw
    start: msgspec.Raw
    end: msgspec.Raw
    final: msgspec.Raw
    bytes_c2s: msgspec.Raw
    bytes_s2c: msgspec.Raw
    packets_c2s: int | None
    packets_s2c: msgspec.Raw
    retransmits: msgspec.Raw
    resets: msgspec.Raw
    connect: msgspec.Raw
    rtt: msgspec.Raw
    incomplete: msgspec.Raw
    reason: str | None = None


class _DropBlob(msgspec.Struct, array_like=True):
    views: list[_DropViewRow]


_drop_views_dec = msgspec.msgpack.Decoder(_DropBlob)


def drop_reasons_of_blob(blob: bytes) -> str | None:
    """The `drop_reasons` text of a connection from its `views` blob (the column correlator's
    rows: its C core sums the packets, the reasons are strings)."""
    acc: dict[str, int] = {}
    for v in _drop_views_dec.decode(blob).views:
        if v.observer == "drops":
            r = v.reason or "UNKNOWN"
            acc[r] = acc.get(r, 0) + (v.packets_c2s or 0)
    return drop_reasons_text(acc) if acc else None


def connection_of(row: dict[str, Any]) -> Connection:
    """A connection back from its DuckDB row (`views` and the identity, process and tunnel
    columns); the inverse of `connection_rows`."""
    blob = _views_dec.decode(row["views"])
    views, client_labels, server_labels = blob.views, blob.client_labels, blob.server_labels
    naming = blob.naming
    out = {}
    for v in views:
        view = View(*_astuple(v))
        out[view.slot] = view

    def ident(side: str, labels: dict[str, str] | None) -> Identity:
        return Identity(row[f"{side}_name"], row[f"{side}_namespace"], row[f"{side}_kind"],
                        row[f"{side}_host"], labels or {}, row[f"{side}_id_source"])

    def proc(side: str) -> ProcInfo | None:
        if row[f"{side}_collector"] is None:
            return None
        return ProcInfo(row[f"{side}_pid"], row[f"{side}_comm"], row[f"{side}_netns"],
                        row[f"{side}_container"], row[f"{side}_collector"])

    tunnel = None if row["vni"] is None else Tunnel(
        row["vni"], row["vtep_src"], row["vtep_dst"], row["vtep_src_host"], row["vtep_dst_host"],
        row.get("tunnel_type") or "vxlan")
    return Connection(row["conn_id"], row["protocol"], row["family"], row["client_ip"],
                      row["client_port"], row["server_ip"], row["server_port"], row["scope"],
                      ident("client", client_labels), ident("server", server_labels), out,
                      proc("client"), proc("server"), tunnel, naming,
                      row.get("service_ip"), row.get("service_port"),
                      mesh.sides_of(row.get("mesh")))


def _table(rows: Sequence[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    return pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(cols, schema, strict=True)],
                                schema=schema)


class DerivedTables(Protocol):
    """What a store writes of one correlation step besides its raw rows (the write interface's
    `derived`, aggregator/store/base.py): built by `Derived` from a reference plan, or by
    aggregator/correlate_plan.py `ColumnDerived` from a plan on columns."""

    settled: list[str]

    @property
    def replaced(self) -> list[str]:
        """Connections of this step that were stored before (their rows are replaced), and
        those removed (`removed`: their rows are deleted, none replaces them)."""

    @property
    def removed(self) -> list[str]:
        """Connections this step merged into another (NodePort halves, aggregator/nodeport.py):
        their stored rows are deleted."""

    @property
    def removed_keys(self) -> dict[str, tuple[str, str, int, str, int, int]]:
        """`removed` with each one's correlation key (`Connection.key`): where its stored rows
        are (ClickHouse writes a tombstone of the same sort key)."""

    @property
    def empty(self) -> bool: ...

    @property
    def connections(self) -> pa.Table | None:
        """Every column of `CONN_COLUMNS`, `state` included (ClickHouse)."""

    def connection_rows(self) -> pa.Table | None:
        """The DuckDB form: `DUCKDB_CONN_NAMES`."""

    def connection_ids(self) -> list[str]:
        """The conn_id of each row of `connections`, in order (cheap: no state built)."""

    def connections_at(self, rows: list[int]) -> pa.Table | None:
        """`connections` of these rows only (a coalesced group keeps each connection's last
        row: the others' `state` need not be built)."""

    @property
    def rollups(self) -> pa.Table | None: ...

    @property
    def workloads(self) -> pa.Table | None: ...

    def prepare(self) -> None:
        """Build every table now (the worker's planner does, so its writer only runs SQL)."""


class Derived:
    """The tables of one plan, built on first use; `settled`: connections the correlator has
    forgotten since the last batch (they will never change again: a backend that keeps
    changing connections apart may move them)."""

    def __init__(self, plan: Plan, settled: Sequence[str] = ()) -> None:
        self.plan = plan
        self.conns = list(plan.connections.values())
        self.settled = list(settled)
        self._rows: pa.Table | None = None

    @property
    def replaced(self) -> list[str]:
        """Connections of this plan that were stored before (the others are new)."""
        created = self.plan.created
        return [c.conn_id for c in self.conns if c.conn_id not in created] + self.removed

    @property
    def removed(self) -> list[str]:
        return list(self.plan.removed)

    @property
    def removed_keys(self) -> dict[str, tuple[str, str, int, str, int, int]]:
        return dict(self.plan.removed)

    @cached_property
    def summaries(self) -> list[Summary]:
        return [c.summary() for c in self.conns]

    @property
    def empty(self) -> bool:
        return (not self.conns and not self.plan.rollups and not self.settled
                and not self.plan.removed)

    @cached_property
    def connections(self) -> pa.Table | None:
        """Every column of `CONN_COLUMNS`, `state` included."""
        if not self.conns:
            return None
        return _table([(*row_values(c, s), _enc.encode(c))
                       for c, s in zip(self.conns, self.summaries, strict=True)], CONN_SCHEMA)

    def connection_ids(self) -> list[str]:
        return [c.conn_id for c in self.conns]

    def connections_at(self, rows: list[int]) -> pa.Table | None:
        t = self.connections
        if t is None or not rows:
            return None
        return t if len(rows) == t.num_rows else t.take(pa.array(rows, pa.int64()))

    def prepare(self) -> None:
        """Build the DuckDB tables now (the background worker's planner does, so that its
        writer only runs SQL)."""
        self._rows = self.connection_rows()
        _ = self.rollups, self.workloads

    def connection_rows(self) -> pa.Table | None:
        """The DuckDB form: `DUCKDB_CONN_NAMES`."""
        if self._rows is not None or not self.conns:
            return self._rows
        return _table([(*row_values(c, s), views_blob(c))
                       for c, s in zip(self.conns, self.summaries, strict=True)], DUCKDB_CONN_SCHEMA)

    @cached_property
    def rollups(self) -> pa.Table | None:
        plan = self.plan
        if not plan.rollups:
            return None
        keys = list(plan.rollups)
        ids = [plan.identities[k] for k in keys]
        cols: dict[str, list[Any]] = {n: [k[i] for k in keys] for i, n in enumerate(ROLLUP_KEY)}
        cols["client_name"] = [c.name for c, _ in ids]
        cols["client_namespace"] = [c.namespace for c, _ in ids]
        cols["server_name"] = [s.name for _, s in ids]
        cols["server_namespace"] = [s.namespace for _, s in ids]
        for i, n in enumerate(ROLLUP_COUNTERS):
            cols[n] = [plan.rollups[k][i] for k in keys]
        return pa.Table.from_pydict(cols, schema=ROLLUP_SCHEMA)

    @cached_property
    def workloads(self) -> pa.Table | None:
        if not self.conns:
            return None
        seen: dict[str, list[Any]] = {}  # wid -> [identity, first seen, last seen]
        for c, s in zip(self.conns, self.summaries, strict=True):
            first, last = s.start, s.last_seen
            for ident in (c.client, c.server):
                wid = ident.wid
                old = seen.get(wid)
                if old is None:
                    seen[wid] = [ident, first, last]
                else:
                    if first < old[1]:
                        old[1] = first
                    if last > old[2]:
                        old[2] = last
        rows = list(seen.values())
        return pa.Table.from_pydict({
            "wid": [i.wid for i, _, _ in rows], "name": [i.name for i, _, _ in rows],
            "namespace": [i.namespace for i, _, _ in rows], "kind": [i.kind for i, _, _ in rows],
            "host": [i.host for i, _, _ in rows],
            "labels": [msgspec.json.encode(i.labels).decode() for i, _, _ in rows],
            "source": [i.source for i, _, _ in rows], "first_seen": [f for _, f, _ in rows],
            "last_seen": [last for _, _, last in rows]}, schema=WORKLOAD_SCHEMA)


def connections_table(conns: list[Connection]) -> pa.Table:
    """Every column of `CONN_COLUMNS` for these connections (reference form, by the getters)."""
    return pa.Table.from_arrays([pa.array([get(c) for c in conns], type=typ)
                                 for _, typ, get in CONN_COLUMNS], schema=CONN_SCHEMA)


def derived_of(plan: Plan, settled: Sequence[str] = ()) -> Derived:
    return Derived(plan, settled)
