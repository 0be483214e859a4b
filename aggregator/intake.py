"""Intake: one `accept` for every batch that reaches the aggregator, by HTTP or by NATS.

Stage: the first of the pipeline (aggregator/pipeline.py); the HTTP route (aggregator/ingest.py)
and the JetStream consumer (aggregator/consume.py) only carry bytes to it. In: a batch's wire
bytes (binary: `EWB1` + zstd(msgpack), decoded straight into columns by aggregator/store/
wire_columns.py; or the JSON form for scripts, eastwest/codec.py). Out: the batch handed to the
correlation stage (aggregator/worker.py) and an `Outcome`: stored or duplicate, and every record
rejected alone with its index, field and reason.

One set of rules, one set of drop reasons (`eastwest_dropped_total{stage="ingest",reason}`):
- `bad_batch`: the body is not a batch (bad magic, broken compression, wrong shape, a string
  that is not UTF-8 in the envelope), counted once (its records cannot be); `bad_envelope`: the collector id is empty or longer than
  253 characters, or `batch_seq` is out of 0..2^63-1; `batch_too_long`: more records than
  `--max-batch-records`. The whole batch is refused (`Refused`: HTTP 400/413/415, NATS `term`).
- `invalid_record`: a record that does not validate, names another collector, or holds an
  integer no store column takes: rejected alone, the others go on.
- `backlogged`, `store_unavailable`: the batch is not taken now (`Retry`: HTTP 429/503 with
  Retry-After, NATS `nak` with a delay); the sender tries again.
A batch seen before (its `(collector, batch_seq)` journaled or stored) is a duplicate: answered
as stored, written nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aggregator.metrics import AggregatorMetrics
from aggregator.store.base import Backlogged, IngestResult, StoreError
from aggregator.store.columns import INT64_MAX, storable_problem
from aggregator.store.wire_columns import ColumnBatch, decode_columns, other_collector
from aggregator.worker import Accepted, Correlation
from eastwest.codec import CONTENT_TYPE, MAGIC, DecodedBatch, decode_json_batch
from eastwest.drops import Drops
from eastwest.errors import CodecError
from eastwest.record import COUNT_MAX, FlowRecord

MAX_COLLECTOR_LEN = 253  # a DNS host name at most
STAGE = "ingest"


@dataclass(frozen=True)
class RejectedRecord:
    index: int
    field: str
    reason: str


@dataclass(frozen=True)
class Outcome:
    result: IngestResult
    accepted: int                      # good records of the batch
    rejected: list[RejectedRecord] = field(default_factory=list)


class Refused(Exception):
    """The whole batch is refused, never to be retried as it is (`status`: the HTTP answer)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


class Retry(Exception):
    """The batch is not taken now; the sender retries it (HTTP 429 or 503, NATS nak)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode(body: bytes, ctype: str = CONTENT_TYPE) -> ColumnBatch | DecodedBatch:
    """The JSON form -> records (for scripts); the binary form -> columns, straight from the
    wire bytes: no Python object per record on the way to the journal. `Refused` otherwise."""
    try:
        if ctype == "application/json" or (ctype in ("", "application/octet-stream")
                                           and body[:1] == b"{"):
            return decode_json_batch(body)
        if ctype in (CONTENT_TYPE, "application/octet-stream", "") or body[:4] == MAGIC:
            return decode_columns(body)
    except CodecError as exc:
        raise Refused(400, "bad_batch", str(exc)) from None
    except RecursionError:
        raise Refused(400, "bad_batch", "batch nests too deeply") from None
    except UnicodeDecodeError as exc:
        # eastwest.codec rejects a record with a non-UTF-8 string alone; this is left for an
        # envelope string (the collector name) that is not UTF-8: the batch is refused
        raise Refused(400, "bad_batch", f"batch holds a string that is not UTF-8 (at byte "
                      f"{exc.start} of the string)") from None
    raise Refused(415, "bad_batch", f"content-type={ctype!r}: send {CONTENT_TYPE} or "
                  "application/json")


class Intake:
    def __init__(self, correlation: Correlation, drops: Drops, metrics: AggregatorMetrics, *,
                 max_batch_records: int) -> None:
        self.correlation, self.drops, self.metrics = correlation, drops, metrics
        self.max_batch_records = max_batch_records

    def accept_body(self, body: bytes, ctype: str = CONTENT_TYPE) -> Outcome:
        """Decode, validate and hand over one batch's bytes (what both transports carry)."""
        started = time.perf_counter()
        self.metrics.bytes_in.inc(len(body))
        try:
            batch = decode(body, ctype)
        except Refused as exc:
            self._refused(exc.reason, 1)  # a batch that cannot be read: its records uncounted
            raise
        out = self.accept(batch, body if isinstance(batch, ColumnBatch) else None)
        self.metrics.latency.observe(time.perf_counter() - started)
        return out

    def accept(self, batch: ColumnBatch | DecodedBatch, body: bytes | None = None) -> Outcome:
        """Validate a decoded batch and hand it to correlation (`body`: its wire bytes, which
        the journal keeps, when it came in the binary form)."""
        accepted, rejected = self._validated(batch, body)
        try:
            result = self.correlation.accept(accepted)
        except (Backlogged, StoreError) as exc:
            raise self._retry(exc, accepted.n) from None
        return self._outcome(result, accepted, rejected)

    def accept_group(self, bodies: Sequence[bytes], still_owned: Callable[[], bool] | None = None,
                     max_records: int | None = None) -> list[Outcome | Refused | Retry]:
        """Several batches' bytes in their order (the JetStream consumer's waiting shares of
        one partition): each decoded and validated alone (a bad one is `Refused` alone), the
        good ones handed to correlation together (`Correlation.accept_group`: one step, one
        write; runs of at most `max_records` good records, a batch larger than that alone)
        while `still_owned()`. A failed run is a `Retry` for each of its batches and for every
        batch after it (none is applied before one that came earlier)."""
        out: list[Outcome | Refused | Retry] = []
        good: list[tuple[int, Accepted, list[RejectedRecord]]] = []
        for body in bodies:
            started = time.perf_counter()
            self.metrics.bytes_in.inc(len(body))
            try:
                try:
                    batch = decode(body)
                except Refused as exc:
                    self._refused(exc.reason, 1)
                    raise
                acc, rej = self._validated(batch, body if isinstance(batch, ColumnBatch) else None)
            except Refused as exc:
                out.append(exc)
                continue
            good.append((len(out), acc, rej))
            out.append(Retry(503, "not handed over"))  # replaced below
            self.metrics.latency.observe(time.perf_counter() - started)
        if not good:
            return out
        runs: list[list[tuple[int, Accepted, list[RejectedRecord]]]] = [[]]
        n = 0
        for g in good:
            if runs[-1] and max_records is not None and n + g[1].n > max_records:
                runs.append([])
                n = 0
            runs[-1].append(g)
            n += g[1].n
        for r, run in enumerate(runs):
            started = time.perf_counter()
            try:
                results = self.correlation.accept_group([a for _, a, _ in run], still_owned)
            except (Backlogged, StoreError) as exc:
                left = [g for later in runs[r:] for g in later]
                retry = self._retry(exc, sum(a.n for _, a, _ in left))
                for i, _, _ in left:
                    out[i] = retry
                return out
            for (i, acc, rej), result in zip(run, results, strict=True):
                out[i] = self._outcome(result, acc, rej)
            self.metrics.latency.observe(time.perf_counter() - started)
        return out

    def _retry(self, exc: Exception, records: int) -> Retry:
        if isinstance(exc, Backlogged):  # counted by the correlation stage, which knows how far
            return Retry(429, str(exc))
        self.drops.count(STAGE, "store_unavailable", records, detail=str(exc))
        return Retry(503, f"store unavailable: {exc}")

    def _outcome(self, result: IngestResult, accepted: Accepted,
                 rejected: list[RejectedRecord]) -> Outcome:
        if rejected:
            self.drops.count(STAGE, "invalid_record", len(rejected))
        self.metrics.batches.labels("duplicate" if result.duplicate else "stored").inc()
        self.metrics.records_out.inc(result.stored)
        return Outcome(result, accepted.n, rejected)

    def _validated(self, batch: ColumnBatch | DecodedBatch,
                   body: bytes | None) -> tuple[Accepted, list[RejectedRecord]]:
        """The batch's envelope checked (`Refused`), its good records as `Accepted`."""
        total = batch.total if isinstance(batch, ColumnBatch) else len(batch.records) + len(batch.errors)
        self.metrics.records_in.inc(total)
        if total > self.max_batch_records:
            self._refused("batch_too_long", total)
            raise Refused(413, "batch_too_long", f"batch of {total} records exceeds the limit "
                          f"of {self.max_batch_records}")
        if not batch.collector or len(batch.collector) > MAX_COLLECTOR_LEN:
            self._refused("bad_envelope", total)
            raise Refused(400, "bad_envelope", f"collector={batch.collector[:80]!r}: must be "
                          f"1..{MAX_COLLECTOR_LEN} characters")
        if not 0 <= batch.batch_seq <= INT64_MAX:
            self._refused("bad_envelope", total)
            raise Refused(400, "bad_envelope", f"batch_seq={batch.batch_seq}: must be "
                          f"0..{INT64_MAX}")
        if isinstance(batch, ColumnBatch):
            rejected = [RejectedRecord(i, f, r) for i, f, r in batch.rejected]
            accepted = Accepted(batch.collector, batch.batch_seq, batch.table.num_rows,
                                [i for i, _, _ in batch.rejected], body=body, table=batch.table,
                                decode=batch.records)
        else:
            rejected = [RejectedRecord(i, e.field, str(e)) for i, e in batch.errors]
            good = keep_good(batch, rejected)
            rejected.sort(key=lambda r: r.index)
            accepted = Accepted(batch.collector, batch.batch_seq, len(good),
                                [r.index for r in rejected], records=good)
        return accepted, rejected

    def _refused(self, reason: str, records: int) -> None:
        self.metrics.batches.labels("rejected").inc()
        self.drops.count(STAGE, reason, records)


def keep_good(batch: DecodedBatch, rejected: list[RejectedRecord], *,
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
            rejected.append(RejectedRecord(idx, problem[0], problem[1]))
        idx += 1
    return good
