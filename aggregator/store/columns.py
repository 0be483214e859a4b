"""Flow records -> columns, for bulk writes into any columnar backend.

In:  a list of validated `FlowRecord`s of one batch.  Out: a `pyarrow.Table` with one column per
stored field (`COLUMNS`, in table order), built column by column, never row by row.

The flat columns are what queries filter and aggregate on (times, 5-tuple, observer, counters,
process, tunnel). `record` holds the whole record in its msgpack form, so a raw record comes
back exactly as it went in, including fields without a column of their own (workloads, cgroup,
labels, flags). Integers that do not fit a signed 64-bit column are refused by ingest before
they get here (`storable_problem`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec
import pyarrow as pa

from eastwest.record import FlowRecord

INT64_MAX = 2**63 - 1
_TS = pa.timestamp("us", tz="UTC")
_mp = msgspec.msgpack.Encoder()

# name, arrow type, DuckDB type (the DDL of every backend derives from this one list)
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("collector", pa.string(), "VARCHAR NOT NULL"),
    ("batch_seq", pa.int64(), "BIGINT NOT NULL"),
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
    ("ingested_at", _TS, "TIMESTAMPTZ NOT NULL"),
    ("record", pa.binary(), "BLOB NOT NULL"),
]
COLUMN_NAMES = [c[0] for c in COLUMNS]
SCHEMA = pa.schema([(name, typ) for name, typ, _ in COLUMNS])


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
    if r.cgroup is not None and r.cgroup.id >= 2**64:  # travels in `record` only: uint64 is fine
        return "cgroup.id", r.cgroup.id
    return None


def to_table(collector: str, batch_seq: int, records: Sequence[FlowRecord],
             ingested_at: datetime) -> pa.Table:
    n = len(records)
    rtts = [r.rtt_us for r in records]
    procs = [r.process for r in records]
    tuns = [r.tunnel for r in records]
    cols = {
        "collector": [collector] * n,
        "batch_seq": [batch_seq] * n,
        "record_id": [r.record_id for r in records],
        "source": [r.source for r in records],
        "start_ts": [r.start for r in records],
        "end_ts": [r.end for r in records],
        "final": [r.final for r in records],
        "protocol": [r.protocol for r in records],
        "family": [r.family for r in records],
        "client_ip": [r.client.ip for r in records],
        "client_port": [r.client.port for r in records],
        "server_ip": [r.server.ip for r in records],
        "server_port": [r.server.port for r in records],
        "observer": [r.observer for r in records],
        "bytes_c2s": [r.bytes_c2s for r in records],
        "bytes_s2c": [r.bytes_s2c for r in records],
        "packets_c2s": [r.packets_c2s for r in records],
        "packets_s2c": [r.packets_s2c for r in records],
        "connect": [r.connect for r in records],
        "retransmits": [r.retransmits for r in records],
        "resets": [r.resets for r in records],
        "rtt_min_us": [t.min if t else None for t in rtts],
        "rtt_avg_us": [t.avg if t else None for t in rtts],
        "rtt_max_us": [t.max if t else None for t in rtts],
        "pid": [p.pid if p else None for p in procs],
        "comm": [p.comm if p else None for p in procs],
        "netns": [r.netns for r in records],
        "container": [r.container for r in records],
        "vni": [t.vni if t else None for t in tuns],
        "outer_src": [t.outer_src if t else None for t in tuns],
        "outer_dst": [t.outer_dst if t else None for t in tuns],
        "loopback": [r.loopback for r in records],
        "incomplete": [bool(r.incomplete) for r in records],
        "ingested_at": [ingested_at] * n,
        "record": [_mp.encode(r) for r in records],
    }
    return pa.Table.from_arrays([pa.array(cols[name], type=typ) for name, typ, _ in COLUMNS],
                                schema=SCHEMA)
