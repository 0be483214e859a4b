"""Ingest: `POST /api/v1/ingest`, collector batches -> validated records -> the store.

In:  an HTTP body holding one batch, in the binary wire form (`EWB1` + zstd(msgpack), content
type `application/x-eastwest-batch`) or the JSON form for scripts (`application/json`), both
defined in eastwest/codec.py and docs/flow-record.md.
Out: the batch's good records stored durably with its `(collector, batch_seq)` mark, and a
response that lists every rejected record by index and reason.

Rules (docs/api.md):
- Needs the ingest token (aggregator/auth.py).
- A bad record is rejected alone (its index, field and reason in `rejected`); the others are
  stored. A record whose `collector` is not the batch's, or whose integers do not fit the store,
  is a bad record too.
- The binary form goes from its bytes straight into the raw store's columns
  (aggregator/store/wire_columns.py: a native decoder, msgspec for what it defers); records are
  built only behind the ack, by correlation. The JSON form is decoded into records.
- 413 when the body exceeds `max_body_bytes` (checked on Content-Length and while reading) or the
  batch holds more than `max_batch_records` records. 400 when the envelope is not a batch.
  503 (with Retry-After) when the store fails, 429 (with Retry-After) when the aggregator is a
  whole `--correlation-backlog` behind: the collector retries. Never a 500.
- Idempotent: a batch already applied answers 200 with `duplicate: true` and stores nothing.
- Acknowledged (200) only after the store's commit is durable.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from aggregator.auth import require_ingest
from aggregator.store.base import Backlogged, IngestResult, StoreError
from aggregator.store.columns import INT64_MAX, storable_problem
from aggregator.store.wire_columns import ColumnBatch, decode_columns, other_collector
from eastwest.codec import CONTENT_TYPE, MAGIC, DecodedBatch, decode_json_batch
from eastwest.errors import CodecError
from eastwest.record import COUNT_MAX, FlowRecord

MAX_COLLECTOR_LEN = 253  # a DNS host name at most

router = APIRouter()


class Rejected(BaseModel):
    index: int
    field: str
    reason: str


class IngestResponse(BaseModel):
    collector: str
    batch_seq: int
    duplicate: bool
    accepted: int
    rejected: list[Rejected]


class ErrorResponse(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "the body is not a batch (bad magic, broken compression, wrong shape)"),
        (401, "missing or invalid bearer token"), (403, "the read token cannot ingest"),
        (413, "body or batch too large"), (415, "unsupported content type"),
        (429, "the aggregator is a whole backlog behind: retry after Retry-After seconds"),
        (503, "the store is unavailable: retry after Retry-After seconds"))}

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/JsonBatch"}},
        },
    }
}


@router.post("/api/v1/ingest", response_model=IngestResponse, responses=_ERRORS,
             openapi_extra=_BODY_DOC, dependencies=[Depends(require_ingest)],
             summary="Store one batch of flow records (idempotent per collector and batch_seq)")
async def ingest(request: Request) -> IngestResponse:
    state = request.app.state
    limit = state.settings.max_body_bytes
    body = await _read_body(request, limit)
    state.metrics.bytes_in.inc(len(body))
    started = time.perf_counter()
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    response = await run_in_threadpool(_apply, request, body, ctype)
    state.metrics.latency.observe(time.perf_counter() - started)
    return response


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit}")
        except ValueError:
            raise HTTPException(400, f"content-length={declared!r} is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(body: bytes, ctype: str) -> DecodedBatch | ColumnBatch:
    """The JSON form -> records (for scripts); the binary form -> columns, straight from the
    wire bytes (aggregator/store/wire_columns.py): no Python object per record on the way to
    the raw store."""
    try:
        if ctype == "application/json" or (ctype in ("", "application/octet-stream")
                                           and body[:1] == b"{"):
            return decode_json_batch(body)
        if ctype in (CONTENT_TYPE, "application/octet-stream", "") or body[:4] == MAGIC:
            return decode_columns(body)
    except CodecError as exc:
        raise HTTPException(400, str(exc)) from None
    except RecursionError:
        raise HTTPException(400, "batch nests too deeply") from None
    except UnicodeDecodeError as exc:
        # eastwest.codec rejects a record with a non-UTF-8 string alone; this is left for an
        # envelope string (the collector name) that is not UTF-8: the batch is refused, never a 500
        raise HTTPException(400, f"batch holds a string that is not UTF-8 (at byte {exc.start} "
                            "of the string)") from None
    raise HTTPException(415, f"content-type={ctype!r}: send {CONTENT_TYPE} or application/json")


def _apply(request: Request, body: bytes, ctype: str) -> IngestResponse:
    state = request.app.state
    batch = _decode(body, ctype)
    total = batch.total if isinstance(batch, ColumnBatch) else len(batch.records) + len(batch.errors)
    state.metrics.records_in.inc(total)
    if total > state.settings.max_batch_records:
        state.metrics.batches.labels("rejected").inc()
        state.drops.count("ingest", "batch_too_long", total)
        raise HTTPException(413, f"batch of {total} records exceeds the limit of "
                            f"{state.settings.max_batch_records}")
    if not batch.collector or len(batch.collector) > MAX_COLLECTOR_LEN:
        state.metrics.batches.labels("rejected").inc()
        state.drops.count("ingest", "bad_envelope", total)
        raise HTTPException(400, f"collector={batch.collector[:80]!r}: must be 1..{MAX_COLLECTOR_LEN}"
                            " characters")
    if not 0 <= batch.batch_seq <= INT64_MAX:
        state.metrics.batches.labels("rejected").inc()
        state.drops.count("ingest", "bad_envelope", total)
        raise HTTPException(400, f"batch_seq={batch.batch_seq}: must be 0..{INT64_MAX}")

    if isinstance(batch, ColumnBatch):
        rejected = [Rejected(index=i, field=f, reason=r) for i, f, r in batch.rejected]
        accepted = batch.table.num_rows
    else:
        rejected = [Rejected(index=i, field=e.field, reason=str(e)) for i, e in batch.errors]
        good = _keep_good(batch, rejected)
        rejected.sort(key=lambda r: r.index)
        accepted = len(good)
    try:
        result = _store(state.store, batch, body) if isinstance(batch, ColumnBatch) else \
            state.store.ingest(batch.collector, batch.batch_seq, good)
    except Backlogged as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "1"}) from None
    except StoreError as exc:
        state.drops.count("ingest", "store_unavailable", accepted, detail=str(exc))
        raise HTTPException(503, f"store unavailable: {exc}", headers={"Retry-After": "1"}) from None
    if rejected:
        state.drops.count("ingest", "invalid_record", len(rejected))
    state.metrics.batches.labels("duplicate" if result.duplicate else "stored").inc()
    state.metrics.records_out.inc(result.stored)
    return IngestResponse(collector=batch.collector, batch_seq=batch.batch_seq,
                          duplicate=result.duplicate, accepted=accepted, rejected=rejected)


def _store(store: Any, batch: ColumnBatch, body: bytes) -> IngestResult:
    """A batch in columns into whatever store the app has: the correlating store's column path,
    a bare store's table path, else its records."""
    if hasattr(store, "ingest_columns"):
        return store.ingest_columns(batch, body)  # type: ignore[no-any-return]
    if hasattr(store, "ingest_table"):
        return store.ingest_table(  # type: ignore[no-any-return]
            batch.collector, batch.batch_seq, batch.table, batch.table.num_rows)
    return store.ingest(batch.collector, batch.batch_seq, batch.records())  # type: ignore[no-any-return]


def _keep_good(batch: DecodedBatch, rejected: list[Rejected], *,
               bounded: bool = COUNT_MAX <= INT64_MAX) -> list[FlowRecord]:
    """The decoded records that may be stored; the others join `rejected` with their index."""
    if not batch.records:
        return []
    if all(rec.collector == batch.collector for rec in batch.records) and bounded \
            and not batch.errors:
        return batch.records  # the common case: nothing to reject
    bad_idx = {i for i, _ in batch.errors}
    good: list[FlowRecord] = []
    idx = 0
    for rec in batch.records:
        while idx in bad_idx:  # records keep their position in the batch
            idx += 1
        # every integer was bounded by the decoder (eastwest/record.py: Count <= COUNT_MAX ==
        # INT64_MAX), so only a record built in Python (tests, the JSON lines reader's callers)
        # can exceed a column: checked here only when `bounded` is False
        problem: tuple[str, str] | None = None
        if rec.collector != batch.collector:
            problem = ("collector", other_collector(rec.collector, batch.collector))
        elif not bounded:
            big = storable_problem(rec)
            if big is not None:
                problem = (big[0], f"{big[0]}={big[1]}: exceeds {INT64_MAX}")
        if problem is None:
            good.append(rec)
        else:
            rejected.append(Rejected(index=idx, field=problem[0], reason=problem[1]))
        idx += 1
    return good

