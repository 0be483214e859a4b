"""`ColumnPlan`: what one batch changes, as columns: the store's rows, rollups and workloads.

Stage: correlation -> store. In: the C core's output matrices (aggregator/correlate_native_rows.c)
and the registries' Arrow columns, or a reference `Plan` (aggregator/correlate.py) when the C
core is not available. Out: a `ColumnPlan`:
- `rows`: the touched connections in `DUCKDB_CONN_SCHEMA` (aggregator/store/derived.py), in the
  reference's plan order; `conn_ids` (its first column), `created`, `renamed`, `has_delta`
  (the connection is in the reference's `plan.deltas`), `deltas` (n x 6, the increase of its
  best counters), `names_final_in_s` (`naming.until - plan.at`, 0 when its names are final);
- `rollups` (`ROLLUP_SCHEMA`, signed) and `workloads` (`WORKLOAD_SCHEMA`), None when empty;
- `connections`: conn_id -> `Connection`, built from the rows (`connection_of`) only when asked
  (the live stream and the OTLP spans need objects, the store does not).
Every column is built with one Arrow/numpy call, never a Python loop per connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from aggregator.connection import Connection
from aggregator.correlate import Plan
from aggregator.correlate_registry import Addresses, Identities, Strings, take
from aggregator.store.derived import (
    DUCKDB_CONN_SCHEMA,
    ROLLUP_SCHEMA,
    WORKLOAD_SCHEMA,
    Derived,
    connection_of,
    drop_reasons_of_blob,
)

TS = pa.timestamp("us", tz="UTC")
EMPTY_ROWS = DUCKDB_CONN_SCHEMA.empty_table()
_OBSERVED = pa.array([None] + ["," + ",".join(n for b, n in ((1, "client"), (8, "drops"),
                                                             (2, "path"), (4, "server"))
                                               if m & b) + ","
                               for m in range(1, 16)], pa.string())
_CONNECT = pa.array([None, "ok", "refused", "timeout", "reset"], pa.string())
_OUTCOME = pa.array(["ok", "refused", "timeout", "reset", "dropped"], pa.string())
_TUNNEL = pa.array([None, "vxlan", "geneve", "vxlan-gpe"], pa.string())  # EW_TUNNEL_* codes
_LITERALS = pa.concat_arrays([_OBSERVED, _CONNECT, _OUTCOME, _TUNNEL])
IDENTITY_ATTRS = ("wid", "name", "namespace", "kind", "host", "source")
I32, I64, B = pa.int32(), pa.int64(), pa.bool_()
# the rows' columns by where their values come from: (column, OUT_* column, type or base)
_NUMBERS = [
    ("family", "FAMILY", I32), ("client_port", "CPORT", I32), ("server_port", "SPORT", I32),
    ("scope", "SCOPE", I64), ("start_ts", "START", TS), ("last_seen", "LAST", TS),
    ("closed", "CLOSED", B), ("closed_ts", "CLOSED_TS", TS), ("bytes_c2s", "B_C2S", I64),
    ("bytes_s2c", "B_S2C", I64), ("packets_c2s", "P_C2S", I64), ("packets_s2c", "P_S2C", I64),
    ("retransmits", "RETRANS", I64), ("resets", "RESETS", I64), ("rtt_min_us", "RTT_MIN", I64),
    ("rtt_avg_us", "RTT_AVG", I64), ("rtt_max_us", "RTT_MAX", I64),
    ("client_bytes_c2s", "CB_C2S", I64), ("client_bytes_s2c", "CB_S2C", I64),
    ("server_bytes_c2s", "SB_C2S", I64), ("server_bytes_s2c", "SB_S2C", I64),
    ("path_bytes_c2s", "PB_C2S", I64), ("path_bytes_s2c", "PB_S2C", I64),
    ("byte_mismatch", "MISMATCH", B), ("incomplete", "INCOMPLETE", B),
    ("client_pid", "CPID", I64), ("client_netns", "CNETNS", I64),
    ("server_pid", "SPID", I64), ("server_netns", "SNETNS", I64), ("vni", "VNI", I32),
    ("service_port", "SVC_PORT", I32), ("dropped", "DROPPED", I64)]
_STRINGS = [("protocol", "PROTOCOL", 0), ("client_comm", "CCOMM", 0),
            ("client_container", "CCONTAINER", 0), ("client_collector", "CCOLLECTOR", 0),
            ("server_comm", "SCOMM", 0), ("server_container", "SCONTAINER", 0),
            ("server_collector", "SCOLLECTOR", 0), ("vtep_src_host", "VTEP_SRC_HOST", 0),
            ("vtep_dst_host", "VTEP_DST_HOST", 0)]
_ADDRESSES = [("client_ip", "CIP", 0), ("server_ip", "SIP", 0), ("vtep_src", "VTEP_SRC", 0),
              ("vtep_dst", "VTEP_DST", 0), ("service_ip", "SVC_IP", 0)]
_HEX = [("client_ip_hex", "CIP", 0), ("server_ip_hex", "SIP", 0),
        ("service_ip_hex", "SVC_IP", 0)]
_LITERAL_COLUMNS = [("observed_by", "OBSERVED", 0), ("connect", "CONNECT", len(_OBSERVED)),
                    ("outcome", "OUTCOME", len(_OBSERVED) + len(_CONNECT)),
                    ("tunnel_type", "TUNNEL_TYPE", len(_OBSERVED) + len(_CONNECT) + len(_OUTCOME))]


@dataclass
class ColumnPlan:
    at: datetime | None
    rows: pa.Table
    created: np.ndarray
    renamed: np.ndarray
    has_delta: np.ndarray
    deltas: np.ndarray
    names_final_in_s: np.ndarray
    rollups: pa.Table | None
    workloads: pa.Table | None
    token: int = 0  # which pending plan of its correlator this is (0: nothing to undo)
    reference: Plan | None = None  # the reference engine's plan (None on the native one)
    _objects: dict[str, Connection] | None = field(default=None, repr=False)
    # NodePort halves merged into their real connection (aggregator/nodeport.py): conn_id ->
    # key; their rows are deleted, their rollup volumes are taken back in `rollups`
    removed: dict[str, tuple[str, str, int, str, int, int]] = field(default_factory=dict)

    @property
    def conn_ids(self) -> pa.Array:
        return self.rows.column("conn_id").combine_chunks()

    def __len__(self) -> int:
        return self.rows.num_rows

    @cached_property
    def connections(self) -> Mapping[str, Connection]:
        """conn_id -> Connection, in row order (built on first use)."""
        if self._objects is not None:
            return self._objects
        return {row["conn_id"]: connection_of(row) for row in self.rows.to_pylist()}


def _drop_reasons(has: np.ndarray, views: pa.Array) -> pa.Array:
    """The `drop_reasons` column: from the views blobs of the rows with drops (few)."""
    values: list[str | None] = [None] * len(has)
    rows = np.nonzero(has)[0]
    if len(rows):
        for r, blob in zip(rows.tolist(), views.take(pa.array(rows)).to_pylist(), strict=True):
            values[r] = drop_reasons_of_blob(blob)
    return pa.array(values, pa.string())


class Columns:
    """The registries' Arrow columns, to turn the C core's ids back into values."""

    def __init__(self, strings: Strings, addrs: Addresses, idents: Identities) -> None:
        self.strings, self.addrs, self.idents = strings, addrs, idents

    def rows(self, out: np.ndarray, ok: np.ndarray, hex_ids: bytes, blobs: pa.Buffer,
             blob_end: np.ndarray, col: dict[str, int]) -> pa.Table:
        """The `DUCKDB_CONN_SCHEMA` table of `out`/`ok` (OUT_NCOL x n, column-major): numbers
        wrapped as they are (validity bitmaps packed once for the whole matrix), strings by one
        `take` per dictionary for all the columns it feeds."""
        n = out.shape[1]
        bitmaps = np.packbits(ok, axis=1, bitorder="little")
        nulls = n - ok.sum(axis=1, dtype=np.int64)
        step = np.arange(n + 1, dtype=np.int32)
        cols: dict[str, pa.Array] = {
            "conn_id": pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(step * 32),
                                                              pa.py_buffer(hex_ids)]),
            "views": pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(blob_end), blobs])}
        for name, key, typ in _NUMBERS:
            c = col[key]
            if typ == pa.bool_():
                data = np.packbits(out[c] != 0, bitorder="little")
                cols[name] = pa.Array.from_buffers(typ, n, [None, pa.py_buffer(data)])
                continue
            values = out[c] if typ.bit_width == 64 else out[c].astype(np.int32)
            valid = pa.py_buffer(bitmaps[c]) if nulls[c] else None
            cols[name] = pa.Array.from_buffers(typ, n, [valid, pa.py_buffer(values)],
                                               null_count=int(nulls[c]))
        for table, items in ((self.strings.arrow(), _STRINGS),
                             (self.addrs.arrow(), _ADDRESSES), (self.addrs.hex_arrow(), _HEX),
                             (_LITERALS, _LITERAL_COLUMNS)):
            idx = np.concatenate([out[col[key]] + base for _, key, base in items])
            valid = np.concatenate([ok[col[key]] for _, key, _ in items])
            got = take(table, idx, valid)
            for k, (name, _, _) in enumerate(items):
                cols[name] = got.slice(k * n, n)
        cols["drop_reasons"] = _drop_reasons(ok[col["DROPPED"]], cols["views"])
        cols["mesh"] = pa.nulls(n, pa.string())  # the meshed rows' by aggregator/correlate_mesh.py
        who = np.concatenate([out[col["CLIENT"]], out[col["SERVER"]]])
        idents = self.idents.struct().take(pa.array(who, pa.int64()))
        for attr in IDENTITY_ATTRS:
            field = idents.field(attr)
            for k, side in enumerate(("client", "server")):
                cols[f"{side}_{'id_source' if attr == 'source' else attr}"] = field.slice(k * n, n)
        return pa.Table.from_arrays([cols[f.name] for f in DUCKDB_CONN_SCHEMA],
                                    schema=DUCKDB_CONN_SCHEMA)

    def rollups(self, ru: np.ndarray, col: dict[str, int]) -> pa.Table:
        idn = self.idents
        client, server = pa.array(ru[col["CLIENT"]]), pa.array(ru[col["SERVER"]])
        cols: dict[str, Any] = {
            "minute": pa.array(ru[col["MINUTE"]], TS),
            "client_wid": idn.column("wid").take(client), "server_wid": idn.column("wid").take(server),
            "client_host": idn.column("host_or_empty").take(client),
            "server_host": idn.column("host_or_empty").take(server),
            "server_port": pa.array(ru[col["SPORT"]], pa.int32()),
            "protocol": self.strings.arrow().take(pa.array(ru[col["PROTOCOL"]])),
            "link_local": pa.array(ru[col["LINK_LOCAL"]].astype(bool)),
            "client_name": idn.column("name").take(client),
            "client_namespace": idn.column("namespace").take(client),
            "server_name": idn.column("name").take(server),
            "server_namespace": idn.column("namespace").take(server)}
        for k, name in enumerate(("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c",
                                  "retransmits", "resets")):
            cols[name] = pa.array(ru[col[f"C{k}"]], pa.int64())
        return pa.Table.from_arrays([cols[f.name] for f in ROLLUP_SCHEMA], schema=ROLLUP_SCHEMA)

    def workloads(self, wl: np.ndarray, col: dict[str, int]) -> pa.Table:
        idn = self.idents
        who = pa.array(wl[col["IDENT"]])
        cols = {name: idn.column(src).take(who) for name, src in (
            ("wid", "wid"), ("name", "name"), ("namespace", "namespace"), ("kind", "kind"),
            ("host", "host"), ("labels", "labels_json"), ("source", "source"))}
        cols["first_seen"] = pa.array(wl[col["FIRST"]], TS)
        cols["last_seen"] = pa.array(wl[col["LAST"]], TS)
        return pa.Table.from_arrays([cols[f.name] for f in WORKLOAD_SCHEMA],
                                    schema=WORKLOAD_SCHEMA)


def from_reference(plan: Plan) -> ColumnPlan:
    """A reference plan as a `ColumnPlan` (the path without the C core), through `Derived`."""
    d = Derived(plan)
    conns = d.conns
    ids = [c.conn_id for c in conns]
    zero = [0] * 6
    at = plan.at
    rows = d.connection_rows()
    return ColumnPlan(
        at=at, rows=rows if rows is not None else EMPTY_ROWS,
        created=np.array([i in plan.created for i in ids], dtype=bool),
        renamed=np.array([i in plan.renamed for i in ids], dtype=bool),
        has_delta=np.array([i in plan.deltas for i in ids], dtype=bool),
        deltas=np.array([plan.deltas.get(i, zero) for i in ids], dtype=np.int64).reshape(-1, 6),
        names_final_in_s=np.array([(c.naming.until - at).total_seconds()
                                   if c.naming is not None and at is not None else 0.0
                                   for c in conns], dtype=np.float64),
        rollups=d.rollups, workloads=d.workloads, reference=plan,
        _objects=dict(plan.connections), removed=dict(plan.removed))


class ColumnDerived:
    """What the store writes of a `ColumnPlan` besides the raw rows (`DerivedTables`,
    aggregator/store/derived.py): its rows, rollups and workloads as they are; `connections`
    with each connection's `state` (ClickHouse keeps connections whole) built on demand."""

    def __init__(self, plan: ColumnPlan, settled: list[str]) -> None:
        self.plan = plan
        self.settled = settled

    @property
    def replaced(self) -> list[str]:
        ids = self.plan.conn_ids
        return [x for x in ids.filter(pa.array(~self.plan.created)).to_pylist()
                if x is not None] + self.removed

    @property
    def removed(self) -> list[str]:
        return list(self.plan.removed)

    @property
    def removed_keys(self) -> dict[str, tuple[str, str, int, str, int, int]]:
        return dict(self.plan.removed)

    @property
    def empty(self) -> bool:
        return (not len(self.plan) and self.plan.rollups is None and not self.settled
                and not self.plan.removed)

    def connection_rows(self) -> pa.Table | None:
        return self.plan.rows if len(self.plan) else None

    @cached_property
    def connections(self) -> pa.Table | None:
        if not len(self.plan):
            return None
        from aggregator.store.derived import CONN_SCHEMA, _enc

        shown = self.plan.rows.drop_columns(["views"])
        states = pa.array([_enc.encode(c) for c in self.plan.connections.values()], pa.binary())
        return pa.Table.from_arrays(
            [shown.column(f.name) if f.name != "state" else states for f in CONN_SCHEMA],
            schema=CONN_SCHEMA)

    def connection_ids(self) -> list[str]:
        return self.plan.conn_ids.to_pylist() if len(self.plan) else []

    def connections_at(self, rows: list[int]) -> pa.Table | None:
        if not rows or not len(self.plan):
            return None
        if (len(rows) == len(self.plan) or "connections" in self.__dict__
                or self.plan._objects is not None):  # built, or objects at hand: a subset
            t = self.connections
            assert t is not None
            return t if len(rows) == t.num_rows else t.take(pa.array(rows, pa.int64()))
        from aggregator.store.derived import CONN_SCHEMA, _enc

        sub = self.plan.rows.take(pa.array(rows, pa.int64()))
        shown = sub.drop_columns(["views"])
        states = pa.array([_enc.encode(connection_of(r)) for r in sub.to_pylist()], pa.binary())
        return pa.Table.from_arrays(
            [shown.column(f.name) if f.name != "state" else states for f in CONN_SCHEMA],
            schema=CONN_SCHEMA)

    @property
    def rollups(self) -> pa.Table | None:
        return self.plan.rollups

    @property
    def workloads(self) -> pa.Table | None:
        return self.plan.workloads

    def prepare(self) -> None:
        """Built already (the C core writes the rows)."""
