"""Flow records -> columns, for bulk writes into any columnar backend, and columns -> records.

In:  a list of validated `FlowRecord`s of one batch.  Out: a `pyarrow.Table`, built column by
column, never row by row:
- `to_table`: the flat columns + `record` (the whole record as msgpack): `COLUMNS`, the layout of
  backends that keep the record whole (ClickHouse);
- `flows_table`: the flat columns + `extra`: `DUCKDB_COLUMNS`, the DuckDB layout. `extra` holds
  only what has no column of its own (L3 bytes, cmdline, cgroup, outer port, TCP flags, the
  collector-reported workloads, the `incomplete` reasons, nested tunnels, the `dns` summary, drops, `nat`, `mesh`) as a msgpack array, NULL when all of
  them are empty; `record_of` rebuilds the record exactly from the flat values and `extra`.
  Why: the whole-record blob (~450 bytes, field names included) was most of what DuckDB wrote per
  row, in its WAL at every commit and again at every checkpoint (docs/benchmarks.md).

The flat columns are what queries filter and aggregate on (times, 5-tuple, observer, counters,
process, tunnel); they are read off each record in ONE pass (a tuple per record, transposed by
`zip`): per-column passes over the records cost an attribute walk per value. Integers that do
not fit a signed 64-bit column are refused by ingest before they get here (`storable_problem`).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from eastwest.record import (
    Cgroup,
    DnsSummary,
    Drop,
    Endpoint,
    FlowRecord,
    Mesh,
    Nat,
    Process,
    Rtt,
    Tunnel,
    Workload,
)

INT64_MAX = 2**63 - 1
_TS = pa.timestamp("us", tz="UTC")
_mp = msgspec.msgpack.Encoder()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# name, arrow type, DuckDB type (the DDL of every backend derives from these lists)
CONSTANT_COLUMNS: list[tuple[str, pa.DataType, str]] = [  # the same for a whole batch
    ("collector", pa.string(), "VARCHAR NOT NULL"),
    ("batch_seq", pa.int64(), "BIGINT NOT NULL"),
]
FLAT_COLUMNS: list[tuple[str, pa.DataType, str]] = [  # read off each record (`_flat`)
    ("record_id", pa.string(), "VARCHAR NOT NULL"),
    ("source", pa.string(), "VARCHAR NOT NULL"),
    ("start_ts", _TS, "TIMESTAMPTZ NOT NULL"),
    ("end_ts", _TS, "TIMESTAMPTZ NOT NULL"),
    ("final", pa.bool_(), "BOOLEAN NOT NULL"),
    ("protocol", pa.string(), "VARCHAR NOT NULL"),
    ("family", pa.int8(), "TINYINT NOT NULL"),
    ("client_ip", pa.string(), "VARCHAR NOT NULL"),
    ("client_port", pa.int32(), "INTEGER NOT NULL"),
    ("server_ip", pa.string(), "VARCHAR NOT NULL"),
    ("server_port", pa.int32(), "INTEGER NOT NULL"),
    ("observer", pa.string(), "VARCHAR NOT NULL"),
    ("bytes_c2s", pa.int64(), "BIGINT NOT NULL"),
    ("bytes_s2c", pa.int64(), "BIGINT NOT NULL"),
    ("packets_c2s", pa.int64(), "BIGINT"),
    ("packets_s2c", pa.int64(), "BIGINT"),
    ("connect", pa.string(), "VARCHAR"),
    ("retransmits", pa.int64(), "BIGINT NOT NULL"),
    ("resets", pa.int64(), "BIGINT NOT NULL"),
    ("rtt_min_us", pa.int64(), "BIGINT"),
    ("rtt_avg_us", pa.int64(), "BIGINT"),
    ("rtt_max_us", pa.int64(), "BIGINT"),
    ("pid", pa.int64(), "BIGINT"),
    ("comm", pa.string(), "VARCHAR"),
    ("netns", pa.int64(), "BIGINT"),
    ("container", pa.string(), "VARCHAR"),
    ("vni", pa.int32(), "INTEGER"),
    ("outer_src", pa.string(), "VARCHAR"),
    ("outer_dst", pa.string(), "VARCHAR"),
    ("loopback", pa.bool_(), "BOOLEAN NOT NULL"),
    ("incomplete", pa.bool_(), "BOOLEAN NOT NULL"),
    # the tunnel's type (vxlan | geneve | vxlan-gpe), NULL without a tunnel; appended: rows of
    # files written before it have NULL here and their type in `extra` (else VXLAN)
    ("tunnel_type", pa.string(), "VARCHAR"),
]
INGESTED_AT = ("ingested_at", _TS, "TIMESTAMPTZ NOT NULL")
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    *CONSTANT_COLUMNS, *FLAT_COLUMNS, INGESTED_AT, ("record", pa.binary(), "BLOB NOT NULL")]
COLUMN_NAMES = [c[0] for c in COLUMNS]
SCHEMA = pa.schema([(name, typ) for name, typ, _ in COLUMNS])
DUCKDB_COLUMNS: list[tuple[str, pa.DataType, str]] = [
    *CONSTANT_COLUMNS, *FLAT_COLUMNS, INGESTED_AT, ("extra", pa.binary(), "BLOB")]
DUCKDB_SCHEMA = pa.schema([(name, typ) for name, typ, _ in DUCKDB_COLUMNS])
FLAT_NAMES = [c[0] for c in FLAT_COLUMNS]


class Extra(msgspec.Struct, array_like=True, frozen=True):
    """What a record holds beyond its flat columns (msgpack array; NULL when all are empty)."""

    l3_bytes_c2s: int | None = None
    l3_bytes_s2c: int | None = None
    cmdline: str | None = None
    cgroup_id: int | None = None
    cgroup_path: str | None = None
    outer_dport: int | None = None
    tcp_flags: list[str] | None = None
    client_workload: Workload | None = None
    server_workload: Workload | None = None
    incomplete: list[str] | None = None
    # appended (older blobs end before them): the tunnel's type when not VXLAN (only read now:
    # blobs written before the `tunnel_type` column; new blobs leave it None), nested tunnels
    tunnel_type: str | None = None
    tunnel_outer: list[Tunnel] | None = None
    dns: DnsSummary | None = None  # appended: the DNS a flow to a resolver carried
    drops: list[Drop] | None = None  # appended: drop counts by reason (source `drops`)
    nat: list[Nat] | None = None  # appended: the address translations (conntrack)
    mesh: Mesh | None = None  # appended: a folded service-mesh call (collector/mesh.py)


# `dns`, `drops`, `nat` and `mesh` are appended to a record's extra only when it has them
# (trailing Nones left off: msgspec fills them in): every other blob stays the 12-element array
# the native batch decoder writes byte for byte (aggregator/store/ewwire.c, which hands records
# with `dns`, `drops` or `mesh` to Python, as those with `tunnel_outer`, and writes a record with
# `nat` as the 15-element array, dns and drops nil: Service calls are most client records in a
# cluster). A record with `mesh` has the 16-element array (msgpack array16: 0xdc 0x00 0x10)
_APPENDED = 4
NAT_FIELD = 14  # `nat`'s element of `extra`: a blob of more elements holds one
MESH_FIELD = 15  # `mesh`'s element
_NO_EXTRA = (None,) * (len(Extra.__struct_fields__) - _APPENDED)


def _appended(r: FlowRecord) -> tuple[Any, ...]:
    """The extra's appended fields of `r`, trailing Nones left off."""
    if r.mesh is not None:
        return (r.dns, r.drops, r.nat, r.mesh)
    if r.nat is not None:
        return (r.dns, r.drops, r.nat)
    if r.drops is not None:
        return (r.dns, r.drops)
    return (r.dns,) if r.dns is not None else ()
_extra_dec = msgspec.msgpack.Decoder(Extra)
_record_dec = msgspec.msgpack.Decoder(FlowRecord)


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_resume = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is turned into columns and correlated.

    A batch allocates a tuple per record and per connection row, none of them in a reference
    cycle; the collector kept walking them (about 15-25 % of the CPU of an ingest, bench/
    bench_store.py). Reference counting still frees everything; a collection that was due runs
    when the last pause ends. Nested and concurrent pauses (ingest runs in a thread pool) count:
    the collector comes back when the last one ends, and only if it was on before the first."""
    global _gc_depth, _gc_resume
    with _gc_lock:
        if _gc_depth == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_resume:
                gc.enable()


def storable_problem(r: FlowRecord) -> tuple[str, int] | None:
    """The first integer field that does not fit a signed 64-bit column, as (field, value)."""
    for name in ("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c", "l3_bytes_c2s",
                 "l3_bytes_s2c", "retransmits", "resets", "netns"):
        v = getattr(r, name)
        if v is not None and v > INT64_MAX:
            return name, v
    if r.rtt_us is not None and r.rtt_us.max > INT64_MAX:
        return "rtt_us.max", r.rtt_us.max
    if r.process is not None and r.process.pid > INT64_MAX:
        return "process.pid", r.process.pid
    if r.cgroup is not None and r.cgroup.id >= 2**64:  # travels in msgpack only: uint64 is fine
        return "cgroup.id", r.cgroup.id
    return None


def _flat(records: Sequence[FlowRecord]) -> list[tuple[Any, ...]]:
    """One tuple per record: the `FLAT_COLUMNS` values, then the `Extra` values (one pass; a
    missing rtt/process/tunnel/cgroup reads as None through `x and x.field`)."""
    return [(r.record_id, r.source, r.start, r.end, r.final, r.protocol, r.family,
             (c := r.client).ip, c.port, (s := r.server).ip, s.port, r.observer,
             r.bytes_c2s, r.bytes_s2c, r.packets_c2s, r.packets_s2c, r.connect,
             r.retransmits, r.resets, (t := r.rtt_us) and t.min, t and t.avg, t and t.max,
             (p := r.process) and p.pid, p and p.comm, r.netns, r.container,
             (u := r.tunnel) and u.vni, u and u.outer_src, u and u.outer_dst, r.loopback,
             bool(inc := r.incomplete), u and u.type,
             (r.l3_bytes_c2s, r.l3_bytes_s2c, p and p.cmdline, (g := r.cgroup) and g.id,
              g and g.path, u and u.outer_dport, r.tcp_flags, r.client_workload,
              r.server_workload, inc or None, None, r.tunnel_outer) + _appended(r))
            for r in records]


def _flat_arrays(rows: list[tuple[Any, ...]]) -> tuple[list[pa.Array], tuple[Any, ...]]:
    cols = list(zip(*rows, strict=True))
    arrays = [pa.array(cols[i], type=typ) for i, (_, typ, _) in enumerate(FLAT_COLUMNS)]
    return arrays, cols[-1]


def _constants(collector: str, batch_seq: int, ingested_at: datetime, n: int) -> list[pa.Array]:
    return [pa.array([collector] * n, pa.string()), pa.array([batch_seq] * n, pa.int64()),
            pa.array([ingested_at] * n, _TS)]


def extra_lengths(extra: pa.Array) -> np.ndarray:
    """Per row, how many elements its `extra` array has, from its header alone (a msgpack
    fixarray 0x90..0x9f, or array16 0xdc: 16 elements and more); 0 for NULL or empty. A row
    holds `nat` when it has more than `NAT_FIELD`, `mesh` more than `MESH_FIELD`: only those
    blobs need decoding."""
    n = len(extra)
    out = np.zeros(n, dtype=np.int64)
    if extra.type != pa.binary():
        extra = extra.cast(pa.binary())
    _, offsets, data = extra.buffers()
    if data is None or extra.null_count == n:
        return out
    off = np.frombuffer(offsets, dtype=np.int32)[extra.offset:extra.offset + n + 1]
    raw = np.frombuffer(data, dtype=np.uint8)
    has = off[1:] > off[:-1]
    if extra.null_count:
        has &= np.asarray(extra.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    at = off[:-1][has]
    first = raw[at].astype(np.int64)
    count = np.where((first & 0xF0) == 0x90, first & 0x0F, 0)
    a16 = (first == 0xDC) & (off[1:][has] - at >= 3)
    if a16.any():
        count[a16] = (raw[at[a16] + 1].astype(np.int64) << 8) | raw[at[a16] + 2]
    out[has] = count
    return out


def extra_blobs(extras: Sequence[tuple[Any, ...]]) -> pa.Array:
    enc = _mp.encode
    return pa.array([None if e == _NO_EXTRA else enc(e) for e in extras], pa.binary())


def flat_table(records: Sequence[FlowRecord]) -> pa.Table:
    """The DuckDB layout without the batch's constants (collector, batch_seq, ingested_at), which
    the INSERT adds as parameters."""
    arrays, extras = _flat_arrays(_flat(records))
    return pa.Table.from_arrays([*arrays, extra_blobs(extras)], names=[*FLAT_NAMES, "extra"])


def flows_table(collector: str, batch_seq: int, records: Sequence[FlowRecord],
                ingested_at: datetime) -> pa.Table:
    """The rows exactly as the DuckDB store writes them (`DUCKDB_COLUMNS`)."""
    arrays, extras = _flat_arrays(_flat(records))
    c, s, at = _constants(collector, batch_seq, ingested_at, len(records))
    return pa.Table.from_arrays([c, s, *arrays, at, extra_blobs(extras)], schema=DUCKDB_SCHEMA)


def to_table(collector: str, batch_seq: int, records: Sequence[FlowRecord],
             ingested_at: datetime) -> pa.Table:
    """The flat columns + the whole record as msgpack (`COLUMNS`)."""
    arrays, _ = _flat_arrays(_flat(records))
    c, s, at = _constants(collector, batch_seq, ingested_at, len(records))
    blobs = pa.array([_mp.encode(r) for r in records], pa.binary())
    return pa.Table.from_arrays([c, s, *arrays, at, blobs], schema=SCHEMA)


# -- columns -> records ---------------------------------------------------------------------------
# what `record_of` reads, in order: the flat columns with times as µs, then `extra`
READ_COLUMNS = ["collector", *["epoch_us(start_ts)" if n == "start_ts" else
                               "epoch_us(end_ts)" if n == "end_ts" else n for n in FLAT_NAMES],
                "extra"]


def _time(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def record_of(row: Sequence[Any]) -> FlowRecord:
    """One row of `READ_COLUMNS` -> the record that was stored, field for field."""
    (collector, record_id, source, start, end, final, protocol, family, cip, cport, sip, sport,
     observer, b_c2s, b_s2c, p_c2s, p_s2c, connect, retrans, resets, rtt_min, rtt_avg, rtt_max,
     pid, comm, netns, container, vni, outer_src, outer_dst, loopback, _incomplete, tunnel_type,
     blob) = row
    x = _extra_dec.decode(blob) if blob is not None else Extra()
    return FlowRecord(
        record_id=record_id, collector=collector, source=source, start=_time(start),
        end=_time(end), final=final, protocol=protocol, family=family,
        client=Endpoint(cip, cport), server=Endpoint(sip, sport), observer=observer,
        bytes_c2s=b_c2s, bytes_s2c=b_s2c, packets_c2s=p_c2s, packets_s2c=p_s2c,
        l3_bytes_c2s=x.l3_bytes_c2s, l3_bytes_s2c=x.l3_bytes_s2c, connect=connect,
        retransmits=retrans, resets=resets,
        rtt_us=None if rtt_min is None else Rtt(rtt_min, rtt_avg, rtt_max),
        process=None if pid is None else Process(pid, comm, x.cmdline), netns=netns,
        cgroup=None if x.cgroup_id is None else Cgroup(x.cgroup_id, x.cgroup_path),
        container=container,
        tunnel=None if vni is None else Tunnel(  # a tunnel always stored its outer port
            tunnel_type or x.tunnel_type or "vxlan", vni, outer_src, outer_dst,  # type: ignore[arg-type]
            x.outer_dport),  # type: ignore[arg-type]
        tunnel_outer=x.tunnel_outer, dns=x.dns, drops=x.drops, nat=x.nat, mesh=x.mesh,
        client_workload=x.client_workload, server_workload=x.server_workload,
        tcp_flags=x.tcp_flags, loopback=loopback, incomplete=x.incomplete or [])


def record_of_blob(blob: bytes) -> FlowRecord:
    """A record stored whole (`record` column: ClickHouse, DuckDB files written before `extra`)."""
    return _record_dec.decode(blob)
