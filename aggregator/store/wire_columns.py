"""A wire batch -> the store's Arrow columns, without a Python object per record.

In:  the body of an ingest POST (`codec.MAGIC` + zstd(msgpack(`codec.Batch`))).  Out: a
`ColumnBatch`: the batch's envelope, its good records as a `pyarrow.Table` in the `flat_table`
layout (`FLAT_NAMES` + `extra`), and `(index, field, reason)` for every bad record.

Two paths give the same result:
- the reference: `codec.decode_batch` (msgspec, one `FlowRecord` per record), then `flat_table`;
- the native decoder (`ewwire.c`, built like the VXLAN helper into the venv, loaded by ctypes,
  run without the GIL): it writes each record's values straight into Arrow column buffers. It is
  conservative: it takes a record only if msgspec and `FlowRecord.__post_init__` would accept it
  and give the same values; anything unusual (a type, range, literal, address form, timestamp or
  key it does not expect) it DEFERS, and Python decodes that one record with msgspec, which gives
  the exact record or error. An envelope it does not expect (keys in another order, an int that
  is not int64, a malformed record it cannot skip, ...) sends the whole batch down the reference
  path. `EASTWEST_WIRE_NATIVE=0` disables it (benchmarks, tests of the fallback),
  `EASTWEST_WIRE_NATIVE=/path/libewwire.so` loads another build; a build from other sources is
  refused. Built by `python -m aggregator.store.wire_columns` (scripts/setup-venv.sh; the shared
  recipe is eastwest/native_build.py). The C call holds no global state: ingest threads run it
  side by side.

A record whose `collector` differs from the batch's is refused here (it was ingest's rule).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from aggregator.store.columns import FLAT_COLUMNS, FLAT_NAMES, flat_table
from eastwest import codec, native_build
from eastwest.errors import CodecError
from eastwest.record import FlowRecord

HERE = Path(__file__).resolve().parent
ENV = "EASTWEST_WIRE_NATIVE"
SPEC = native_build.NativeSpec(
    name="ewwire", here=HERE, sources=("ewwire.c",), env=ENV,
    build_module="aggregator.store.wire_columns",
    cflags=("-O2", "-std=gnu11", "-fPIC", "-shared", "-Wall", "-Wextra", "-fvisibility=default"))

NAMES = [*FLAT_NAMES, "extra"]
TYPES = [*(t for _, t, _ in FLAT_COLUMNS), pa.binary()]
_NULLABLE = [not ddl.endswith("NOT NULL") for _, _, ddl in FLAT_COLUMNS] + [True]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# per column: 's' string/binary, 'b' bool, else the byte width of a fixed-size value
_KIND = ["s" if pa.types.is_string(t) or pa.types.is_binary(t) else "b" if pa.types.is_boolean(t)
         else t.bit_width // 8 for t in TYPES]
# the data capacity of a string column: bytes per record (literals, addresses), else 0: bounded
# by the payload's size (+ 96 bytes a record for `extra`, whose workloads gain keys). A record
# that would not fit is deferred, never cut.
_CAP = [8 if name in ("source", "protocol", "observer", "connect")
        else 39 if name in ("client_ip", "server_ip", "outer_src", "outer_dst")
        else 9 if name == "tunnel_type" else 0
        for name in NAMES]
_EXTRA = NAMES.index("extra")
_ENV_SLOTS = 8


@dataclass(frozen=True)
class ColumnBatch:
    collector: str
    batch_seq: int
    sent_at: datetime
    total: int  # records in the batch, good and bad
    table: pa.Table  # the good records, `flat_table` layout; any row order
    rejected: list[tuple[int, str, str]]  # (index, field, reason), sorted by index
    deferred: int = 0  # records the native decoder left to msgspec (0 on the reference path)
    native: bool = False  # decoded by the native decoder
    _payload: bytes | None = field(default=None, repr=False, compare=False)
    _cache: list[list[FlowRecord]] = field(default_factory=list, repr=False, compare=False)

    def records(self) -> list[FlowRecord]:
        """The good records in batch order, decoded by msgspec on first use (then cached)."""
        if not self._cache:
            self._cache.append(self._decode_records())
        return self._cache[0]

    def _decode_records(self) -> list[FlowRecord]:
        assert self._payload is not None
        return good_records(self._payload, {i for i, _, _ in self.rejected})


def good_records(payload: bytes, rejected: Collection[int]) -> list[FlowRecord]:
    """The records of a batch's msgpack payload in batch order, but those at the `rejected`
    indices (every record msgspec refuses is among them: ingest rejected it)."""
    if not rejected:
        return codec._mp_dec_batch.decode(payload).records
    raws = codec._mp_dec_raw.decode(payload).records
    dec = codec._mp_dec_record.decode
    return [dec(raw) for i, raw in enumerate(raws) if i not in rejected]


def native_available() -> tuple[bool, str]:
    """(the native decoder is loaded, why not)."""
    lib = _lib()
    return lib is not None, str(_state.get("why") or "")


def decode_columns(body: bytes, *, native: bool | None = None) -> ColumnBatch:
    """The batch in `body` as columns; `native=False` forces the reference path, None takes the
    native decoder when it is loaded. Raises what `codec.decode_batch` raises (CodecError)."""
    lib = _lib() if native is not False else None
    if native and lib is None:
        raise RuntimeError(f"native wire decoder not available: {_state.get('why')}")
    if lib is not None:
        try:
            payload: bytes | None = codec.batch_payload(body)
        except CodecError:
            payload = None  # the reference path raises it
        if payload is not None:
            out = _native(lib, payload)
            if out is not None:
                return out
    return _reference(body)


# -- the reference path ---------------------------------------------------------------------------
def _reference(body: bytes) -> ColumnBatch:
    b = codec.decode_batch(body)
    rejected = [(i, e.field, str(e)) for i, e in b.errors]
    good: list[FlowRecord] = []
    if any(r.collector != b.collector for r in b.records):
        bad = {i for i, _ in b.errors}
        k = 0
        for i in range(len(b.records) + len(b.errors)):
            if i in bad:
                continue
            r = b.records[k]
            k += 1
            if r.collector == b.collector:
                good.append(r)
            else:
                rejected.append((i, "collector", other_collector(r.collector, b.collector)))
        rejected.sort()
    else:
        good = b.records
    return ColumnBatch(b.collector, b.batch_seq, b.sent_at, len(good) + len(rejected),
                       _table(good), rejected, _cache=[good])


def _table(records: list[FlowRecord]) -> pa.Table:
    """`flat_table`, also for no records."""
    if not records:
        return pa.Table.from_arrays([pa.array([], t) for t in TYPES], names=NAMES)
    return flat_table(records)


def other_collector(got: str, batch: str) -> str:
    return f"collector={got!r}: differs from the batch's {batch!r}"


# -- the native path ------------------------------------------------------------------------------
_lock = threading.Lock()
_state: dict[str, object] = {}


def _lib() -> ctypes.CDLL | None:
    """The checked library, or None (why in `_state["why"]`). Loaded once per process."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = SPEC.open(_declare)
                if lib is not None and lib.ew_wire_columns().decode() != ",".join(NAMES):
                    path = os.environ.get(ENV) or SPEC.default_path()
                    lib, why = None, f"{path} writes other columns than wire_columns.NAMES"
                _state["why"] = why
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def refused() -> bool:
    """True when a library exists but was refused (stale, foreign): worth a warning."""
    return _lib() is None and SPEC.is_refusal(_state.get("why"))  # type: ignore[arg-type]


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ew_source_digest.restype, lib.ew_source_digest.argtypes = ctypes.c_char_p, []
    lib.ew_wire_columns.restype, lib.ew_wire_columns.argtypes = ctypes.c_char_p, []
    lib.ew_wire_envelope.restype = i64
    lib.ew_wire_envelope.argtypes = [p, i64, p]
    lib.ew_wire_decode.restype = i64
    lib.ew_wire_decode.argtypes = [p, i64, p, p, p, p]


def _native(lib: ctypes.CDLL, payload: bytes) -> ColumnBatch | None:
    """The batch by the native decoder, or None when the reference path must decode it."""
    env = (ctypes.c_int64 * _ENV_SLOTS)()
    n = lib.ew_wire_envelope(payload, len(payload), env)
    if n < 0:
        return None
    c_off, c_len, seq, sec, usec = env[0], env[1], env[2], env[3], env[4]
    collector = payload[c_off:c_off + c_len].decode()
    sent_at = _EPOCH + timedelta(seconds=sec, microseconds=usec)
    ncol = len(NAMES)
    bufs = (ctypes.c_uint64 * (3 * ncol))()
    used = (ctypes.c_int64 * (ncol + 1))()  # in: string data capacities; out: nulls, rows
    # one allocation for every column's buffers, each region 64-byte aligned
    bits = -(-((n + 7) // 8) // 64) * 64
    size = len(payload)
    regions: list[tuple[int, int, int, int]] = []  # per column: valid, offsets, data at; data size
    at = 0
    for c, kind in enumerate(_KIND):
        valid = -1
        if _NULLABLE[c]:
            valid, at = at, at + bits
        offsets = -1
        if kind == "s":
            cap = _CAP[c]
            cap = cap * n if cap else size + 96 * n if c == _EXTRA else size
            offsets, at = at, at + -(-(4 * (n + 1)) // 64) * 64
            used[c] = cap
        else:
            cap = bits if kind == "b" else kind * n  # type: ignore[operator]
        regions.append((valid, offsets, at, cap))
        at += -(-cap // 64) * 64
    block = pa.allocate_buffer(max(at, 64))
    base = block.address
    for c, (valid, offsets, data, _) in enumerate(regions):
        bufs[3 * c] = base + valid if valid >= 0 else 0
        bufs[3 * c + 1] = base + offsets if offsets >= 0 else 0
        bufs[3 * c + 2] = base + data
    deferred = (ctypes.c_int64 * (3 * max(n, 1)))()
    nd = lib.ew_wire_decode(payload, len(payload), env, bufs, used, deferred)
    if nd < 0:
        return None
    rows = used[ncol]
    arrays = []
    piece = block.slice
    for c, typ in enumerate(TYPES):
        valid, offsets, data, cap = regions[c]
        nulls = used[c]
        v = piece(valid, bits) if nulls else None
        if offsets >= 0:
            buffers = [v, piece(offsets, 4 * (rows + 1)), piece(data, cap)]
        else:
            buffers = [v, piece(data, cap)]
        arrays.append(pa.Array.from_buffers(typ, rows, buffers, null_count=nulls))
    table = pa.Table.from_arrays(arrays, names=NAMES)
    rejected: list[tuple[int, str, str]] = []
    if nd:
        idx = [deferred[3 * k] for k in range(nd)]
        raws = [memoryview(payload)[deferred[3 * k + 1]:deferred[3 * k + 1] + deferred[3 * k + 2]]
                for k in range(nd)]
        d = codec._decode_each(collector, seq, sent_at, raws,  # type: ignore[arg-type]
                               codec._mp_dec_record, codec._mp_dec_any)
        rejected = [(idx[k], e.field, str(e)) for k, e in d.errors]
        bad = {k for k, _ in d.errors}
        good: list[FlowRecord] = []
        k_good = 0
        for k in range(nd):
            if k in bad:
                continue
            r = d.records[k_good]
            k_good += 1
            if r.collector == collector:
                good.append(r)
            else:
                rejected.append((idx[k], "collector", other_collector(r.collector, collector)))
        rejected.sort()
        if good:
            table = pa.concat_tables([table, flat_table(good)])
    return ColumnBatch(collector, seq, sent_at, n, table, rejected, deferred=nd, native=True,
                       _payload=payload)


def main(argv: list[str] | None = None) -> int:
    """`python -m aggregator.store.wire_columns [--force] [--output FILE] [--quiet]`: build the
    native decoder into the venv (scripts/setup-venv.sh)."""
    return native_build.main(SPEC, argv, what="wire batch native decoder",
                             fallback="the aggregator decodes batches with msgspec")


if __name__ == "__main__":
    sys.exit(main())
