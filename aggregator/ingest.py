"""Ingest: `POST /api/v1/ingest`, the HTTP door of intake (aggregator/intake.py).

In:  an HTTP body holding one batch, in the binary wire form (`EWB1` + zstd(msgpack), content
type `application/x-eastwest-batch`) or the JSON form for scripts (`application/json`), both
defined in eastwest/codec.py and docs/flow-record.md.
Out: the body handed to `Intake.accept_body` (the rules and drop reasons of every transport),
and a response that lists every rejected record by index and reason.

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

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from aggregator.auth import require_ingest
from aggregator.intake import Intake, Refused, Retry
from aggregator.partitioned import PartitionedCorrelation
from eastwest.codec import CONTENT_TYPE

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
        (409, "this aggregator correlates the partitions of a NATS stream: collectors publish "
              "to NATS (--nats), not here"),
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
    if isinstance(state.pipeline.correlation, PartitionedCorrelation):
        # a batch posted here is not split by partition: its connections' other records are
        # in partitions other replicas correlate (docs/scale-out.md)
        raise HTTPException(409, "this aggregator correlates the partitions of NATS stream "
                            f"{state.settings.nats.stream!r}: point collectors at NATS (--nats "
                            "URL), not at --aggregator")
    body = await _read_body(request, state.settings.max_body_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return await run_in_threadpool(_apply, state.pipeline.intake, body, ctype)


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


def _apply(intake: Intake, body: bytes, ctype: str) -> IngestResponse:
    try:
        out = intake.accept_body(body, ctype)
    except Refused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except Retry as exc:
        raise HTTPException(exc.status, str(exc), headers={"Retry-After": "1"}) from None
    r = out.result
    return IngestResponse(collector=r.collector, batch_seq=r.batch_seq, duplicate=r.duplicate,
                          accepted=out.accepted,
                          rejected=[Rejected(index=x.index, field=x.field, reason=x.reason)
                                    for x in out.rejected])
