"""Correlated connections, minute rollups and workloads -> columns, for bulk writes.

Stage: between correlation (a `Plan`, aggregator/correlate.py) and a store backend.
In:  the connections a batch touched, its rollup deltas, the workloads it saw.
Out: `Derived`: three `pyarrow.Table`s that a backend upserts in the transaction of the raw
batch (connections replaced by `conn_id`, rollups ADDED per key, workloads' last_seen raised).

Column lists here are the one source of the tables' DDL for every backend, like columns.py.
IP columns carry `ip_hex` text too, so CIDR filters compile to string ranges (eastwest.filters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import msgspec
import pyarrow as pa

from aggregator.connection import Connection, Identity
from aggregator.correlate import Plan
from eastwest.filters import ip_hex as _ip_hex
from eastwest.filters import outcome_of

ip_hex = lru_cache(maxsize=65536)(_ip_hex)  # addresses repeat across connections

_TS = pa.timestamp("us", tz="UTC")
_enc = msgspec.msgpack.Encoder()
CONN_DECODER = msgspec.msgpack.Decoder(Connection)

S, I32, I64, B, TS, BIN = pa.string(), pa.int32(), pa.int64(), pa.bool_(), _TS, pa.binary()
_DDL = {S: "VARCHAR", I32: "INTEGER", I64: "BIGINT", B: "BOOLEAN", TS: "TIMESTAMPTZ", BIN: "BLOB"}

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
    ("outcome", S, lambda c: outcome_of(c.connect, c.best()[5])),
    ("bytes_c2s", I64, lambda c: c.best()[0]),
    ("bytes_s2c", I64, lambda c: c.best()[1]),
    ("packets_c2s", I64, lambda c: c.best()[2]),
    ("packets_s2c", I64, lambda c: c.best()[3]),
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
    ("state", BIN, lambda c: _enc.encode(c)),
]
CONN_SCHEMA = pa.schema([(n, t) for n, t, _ in CONN_COLUMNS])
CONN_NAMES = [n for n, _, _ in CONN_COLUMNS]

ROLLUP_KEY = ["minute", "client_wid", "server_wid", "client_host", "server_host", "server_port",
              "protocol"]
ROLLUP_ATTRS = ["client_name", "client_namespace", "server_name", "server_namespace"]
ROLLUP_COUNTERS = ["bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "retransmits", "resets"]
ROLLUP_SCHEMA = pa.schema(
    [("minute", TS), ("client_wid", S), ("server_wid", S), ("client_host", S),
     ("server_host", S), ("server_port", I32), ("protocol", S)]
    + [(n, S) for n in ROLLUP_ATTRS] + [(n, I64) for n in ROLLUP_COUNTERS])

WORKLOAD_SCHEMA = pa.schema([("wid", S), ("name", S), ("namespace", S), ("kind", S),
                             ("host", S), ("labels", S), ("source", S), ("first_seen", TS),
                             ("last_seen", TS)])


def ddl(schema: pa.Schema, primary_key: list[str]) -> str:
    cols = ", ".join(f"{f.name} {_DDL[f.type]}" for f in schema)
    return f"({cols}, PRIMARY KEY ({', '.join(primary_key)}))"


@dataclass(frozen=True)
class Derived:
    connections: pa.Table | None
    rollups: pa.Table | None
    workloads: pa.Table | None

    @property
    def empty(self) -> bool:
        return self.connections is None and self.rollups is None


def connections_table(conns: list[Connection]) -> pa.Table:
    best_cache = {id(c): c.best() for c in conns}
    cols = []
    for name, typ, get in CONN_COLUMNS:
        if name in ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "retransmits", "resets"):
            i = ["bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "retransmits",
                 "resets"].index(name)
            values = [best_cache[id(c)][i] for c in conns]
        else:
            values = [get(c) for c in conns]
        cols.append(pa.array(values, type=typ))
    return pa.Table.from_arrays(cols, schema=CONN_SCHEMA)


def derived_of(plan: Plan) -> Derived:
    conns = list(plan.connections.values())
    rollups = None
    if plan.rollups:
        keys = list(plan.rollups)
        ids = [plan.identities[k] for k in keys]
        cols: dict[str, list[Any]] = {n: [k[i] for k in keys] for i, n in enumerate(ROLLUP_KEY)}
        cols["client_name"] = [c.name for c, _ in ids]
        cols["client_namespace"] = [c.namespace for c, _ in ids]
        cols["server_name"] = [s.name for _, s in ids]
        cols["server_namespace"] = [s.namespace for _, s in ids]
        for i, n in enumerate(ROLLUP_COUNTERS):
            cols[n] = [plan.rollups[k][i] for k in keys]
        rollups = pa.Table.from_pydict(cols, schema=ROLLUP_SCHEMA)
    workloads = None
    if conns:
        seen: dict[str, tuple[Identity, datetime, datetime]] = {}
        for c in conns:
            first, last = c.start, c.last_seen
            for ident in (c.client, c.server):
                old = seen.get(ident.wid)
                if old is None:
                    seen[ident.wid] = (ident, first, last)
                else:
                    seen[ident.wid] = (old[0], min(old[1], first), max(old[2], last))
        rows = list(seen.values())
        workloads = pa.Table.from_pydict({
            "wid": [i.wid for i, _, _ in rows], "name": [i.name for i, _, _ in rows],
            "namespace": [i.namespace for i, _, _ in rows], "kind": [i.kind for i, _, _ in rows],
            "host": [i.host for i, _, _ in rows],
            "labels": [msgspec.json.encode(i.labels).decode() for i, _, _ in rows],
            "source": [i.source for i, _, _ in rows], "first_seen": [f for _, f, _ in rows],
            "last_seen": [last for _, _, last in rows]}, schema=WORKLOAD_SCHEMA)
    return Derived(connections_table(conns) if conns else None, rollups, workloads)
