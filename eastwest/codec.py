"""Wire and file codecs for flow records.

In:  `FlowRecord`s (or bytes from the network / a file).  Out: bytes (or records plus per-record
errors). Two forms:

- JSON lines: one record per line, the public JSON contract (docs/flow-record.md).
- Batch wire form: `MAGIC` + zstd(msgpack(Batch)). A batch carries `(collector, batch_seq)`, the
  idempotency key of ingest: a retried batch is applied once.

Decoding never lets one bad record spoil its batch: `decode_batch` returns the good records and
a `(index, RecordError)` per bad one. Only an envelope that is not a batch at all (bad magic,
broken compression, wrong shape) raises `CodecError`, naming what and where.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec
import zstandard

from eastwest.errors import CodecError, RecordError
from eastwest.record import FlowRecord, record_error_from

MAGIC = b"EWB1"
CONTENT_TYPE = "application/x-eastwest-batch"
MAX_DECOMPRESSED = 256 * 1024 * 1024  # a zip-bomb bound for one batch

_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder(FlowRecord)
_mp_enc = msgspec.msgpack.Encoder()


class Batch(msgspec.Struct, frozen=True):
    collector: str
    batch_seq: int
    sent_at: datetime
    records: list[FlowRecord]


class _RawBatch(msgspec.Struct, frozen=True):
    collector: str
    batch_seq: int
    sent_at: datetime
    records: list[msgspec.Raw]


_mp_dec_batch = msgspec.msgpack.Decoder(Batch)
_mp_dec_raw = msgspec.msgpack.Decoder(_RawBatch)
_mp_dec_record = msgspec.msgpack.Decoder(FlowRecord)
_mp_dec_any = msgspec.msgpack.Decoder()


class DecodedBatch(msgspec.Struct, frozen=True):
    collector: str
    batch_seq: int
    sent_at: datetime
    records: list[FlowRecord]
    errors: list[tuple[int, RecordError]]


# -- JSON -------------------------------------------------------------------------------------
def to_json(record: FlowRecord) -> bytes:
    return _json_enc.encode(record)


def from_json(data: bytes | str) -> FlowRecord:
    try:
        return _json_dec.decode(data)
    except msgspec.ValidationError as exc:
        raw = _safe(lambda: msgspec.json.decode(data))
        raise record_error_from(exc, raw) from None
    except msgspec.DecodeError as exc:
        raise RecordError("record", _preview(data), f"not valid JSON: {exc}") from None


def write_jsonl(records: Iterable[FlowRecord]) -> bytes:
    return b"".join(_json_enc.encode(r) + b"\n" for r in records)


# -- binary batches ---------------------------------------------------------------------------
def encode_batch(batch: Batch, level: int = 3) -> bytes:
    return MAGIC + zstandard.ZstdCompressor(level=level).compress(_mp_enc.encode(batch))


def batch_payload(data: bytes) -> bytes:
    """The msgpack payload of a binary batch (magic checked, zstd undone within the bound)."""
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise CodecError(f"not an eastwest batch: expected magic {MAGIC!r}, got {data[:4]!r}", 0)
    try:
        return zstandard.ZstdDecompressor().decompress(
            data[len(MAGIC) :], max_output_size=MAX_DECOMPRESSED
        )
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload is corrupt: {exc}", len(MAGIC)) from None


def decode_batch(data: bytes) -> DecodedBatch:
    payload = batch_payload(data)
    try:  # fast path: the whole batch is valid
        b = _mp_dec_batch.decode(payload)
        return DecodedBatch(b.collector, b.batch_seq, b.sent_at, b.records, [])
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        pass
    try:
        raw = _mp_dec_raw.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CodecError(f"batch envelope is malformed: {exc}") from None
    return _decode_each(raw.collector, raw.batch_seq, raw.sent_at, raw.records, _mp_dec_record,
                        _mp_dec_any)


def decode_json_batch(data: bytes) -> DecodedBatch:
    """The JSON form of a batch, for scripts: {"collector","batch_seq","sent_at","records":[...]}."""

    class _RawJson(msgspec.Struct):
        collector: str
        batch_seq: int
        sent_at: datetime
        records: list[msgspec.Raw]

    try:
        raw = msgspec.json.decode(data, type=_RawJson)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise CodecError(f"JSON batch is malformed: {exc}") from None
    return _decode_each(raw.collector, raw.batch_seq, raw.sent_at, raw.records, _json_dec,
                        msgspec.json.Decoder())


def _decode_each(collector: str, seq: int, sent_at: datetime, raws: list[msgspec.Raw],
                 typed: Any, untyped: Any) -> DecodedBatch:
    good: list[FlowRecord] = []
    bad: list[tuple[int, RecordError]] = []
    for i, raw in enumerate(raws):
        try:
            good.append(typed.decode(raw))
        except msgspec.ValidationError as exc:
            bad.append((i, record_error_from(exc, _safe(lambda r=raw: untyped.decode(r)))))
        except msgspec.DecodeError as exc:
            bad.append((i, RecordError("record", None, f"undecodable: {exc}")))
        except UnicodeDecodeError as exc:  # msgpack str that is not UTF-8
            bad.append((i, RecordError("record", None, f"a string is not valid UTF-8: {exc.reason} "
                                                       f"at byte {exc.start} of it")))
    return DecodedBatch(collector, seq, sent_at, good, bad)


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # only used to fetch a value for an error message
        return None


def _preview(data: bytes | str, n: int = 60) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text[:n] + ("..." if len(text) > n else "")
