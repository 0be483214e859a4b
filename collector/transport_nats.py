"""Export over NATS JetStream: spooled batches -> one JetStream subject per partition and collector.

Stage: the sending end of export (collector/export.py batches and spools, collector/retry.py
retries; this replaces only the HTTP POST). In: one encoded batch (eastwest/codec.py wire form,
unchanged). Out: the batch split by partition (eastwest/partition.py: every record of one
connection, whoever observed it, goes to one partition K), each share re-encoded as a batch of
the same collector whose sequence is `batch_seq * 1024 + K`, published to
`eastwest.flows.p<K>.<collector>` with the message id `<collector>:<that sequence>` (JetStream
drops a republished share within its duplicate window), all shares at once; the spool removes
the batch only when every share has its PubAck (a batch partly published is published again
whole: the shares already stored are duplicates, found by their marks).

Shares over max_payload: the server's max_payload (learnt at connecting, less `HEADROOM` bytes
for the headers) bounds every message. A share that encodes larger is cut, deterministically
(`split_records`: a function of its records, in batch order, and of the limit only), into
sub-shares, sub-share j of partition K published with the mark slot `K + P * j` (sequence
`batch_seq * 1024 + K + P * j`, eastwest/partition.py `share_slot`: unique in the batch, and
`slot mod P` is still K, which is how the aggregators route and coalesce it; they never decode
the mark further). The same batch is split the same way at every attempt, so a republished
sub-share has the same message id and mark as before.
- A record that alone encodes over the limit is refused alone: logged with its record id and
  size, counted as `export/nats_max_payload`; the rest of the batch is published. A batch made
  only of such records is `Refused` `nats_max_payload` (counted the same way).
- Partition K has `sub_shares(K, P)` slots (171 with P = 6; 1 with P = 1024): sub-shares past
  them are refused, counted as `export/nats_share_space`, logged.
- max_payload changing between two attempts of one batch: the split of its first attempt is
  kept (`_Pin`, for as long as this process tries the batch), with the message ids that got a
  PubAck. A larger max_payload changes nothing. A smaller one: a sub-share still within it is
  published as before; one over it that the stream already holds (acked) is not published
  again; one over it never acked is split again into fresh slots after the batch's last used
  one (`eastwest_export_nats_resplit_shares_total`): no message id is reused, so nothing is
  lost, and nothing acked is published again. One case can double: a sub-share published
  without a PubAck (a timeout: the stream may hold it) and then split again; its records are
  counted in `eastwest_export_nats_resplit_maybe_doubled_total`. What is not covered: the collector
  restarting between two attempts of a batch that was split and partly acked, AND the server's
  max_payload changing across that restart. The new process splits afresh under the new limit;
  a slot then names other records than the acked message of the same id: JetStream (within
  its duplicate window) or the aggregator's mark drops the new one as a duplicate (those
  records are lost) while records moved to a slot not acked before are stored again (doubled).
  Neither is counted (the new process cannot know); it needs a crash during a split batch's
  send and a server reconfiguration in the same window.
Sub-shares made are counted in `eastwest_export_nats_subshares_total` (collector /metrics).

The `SendResult` (collector/transport.py) of one publish:
- PubAck for every share -> `Accepted` (its answer lists the records refused, `dropped`);
- every record alone over max_payload -> `Refused` `nats_max_payload`; a publish refused by
  the client for its size all the same (a server whose max_payload shrank since the connection
  was made) -> `Retry` `nats_max_payload`, connecting again to learn the new limit;
- no stream answers on the subject -> `Retry` `nats_no_responders`; the stream is full (discard
  new) -> `nats_stream_full`; another JetStream error -> `nats_jetstream_<err_code>`; no PubAck
  in time -> `nats_timeout`; not connected -> `nats_connect_timeout`, `nats_no_servers`,
  `nats_connect_error`, `nats_connection_closed` (after a timeout or a broken connection the
  connection is dropped and made again at the next attempt);
  anything else -> `nats_error`. Retried with jittered backoff inside the deadline; past it the
  batch stays spooled and is sent when NATS is back (this is how collectors ride out a NATS
  restart);
- an authorization failure -> `Retry` `nats_authorization` with `auth`: the batch stays
  spooled, the sender pauses, loudly.
The stream is created or validated at the first connection (`ensure_stream`); a stream that
belongs to someone else is a `ConfigError` at start.
Idempotency is `(collector, partition, batch_seq)` at the aggregators: a share published twice
(a PubAck lost in a restart) is stored once. Splitting costs a decode and P encodes of the
batch's records on the collector (docs/benchmarks.md); a share over max_payload costs about one
more encode of its records per halving of the piece size (only then).
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collector.transport import Accepted, Refused, Retry, SendResult
from eastwest import codec
from eastwest.errors import ConfigError
from eastwest.jetstream import LoopThread, NatsOptions, connect, ensure_stream
from eastwest.partition import (
    MAX_BATCH_SEQ,
    mark_seq,
    record_partition,
    share_slot,
    sub_shares,
)

if TYPE_CHECKING:
    from nats.js.errors import APIError

log = logging.getLogger("eastwest.export.nats")
HEADROOM = 1024  # bytes of max_payload left to a message's headers (Nats-Msg-Id)
MAX_PINS = 16    # batches whose split is remembered between attempts (one is sent at a time)


@dataclass(frozen=True)
class Share:
    """One message: a partition's share of a batch, or sub-share `sub` of it."""
    subject: str
    body: bytes
    msg_id: str
    partition: int
    sub: int
    records: int


@dataclass(frozen=True)
class Left:
    """Records of a batch that cannot be published: counted as the drop `export/<reason>`."""
    reason: str
    records: int
    detail: str


@dataclass
class Plan:
    shares: list[Share]
    left: list[Left]
    used: dict[int, int]  # per partition: sub-share slots used (the next one free)


@dataclass
class _Pin:
    """A batch's split, kept from its first attempt to its last in this process."""
    plan: Plan
    acked: set[str]  # message ids the stream holds (PubAck received)
    sent: set[str] = field(default_factory=set)  # published, no PubAck: maybe in the stream


class NatsSender:
    """Publishes one encoded batch, split by partition, and waits for every share's PubAck."""

    def __init__(self, opts: NatsOptions, collector: str, *, publish_timeout: float = 5.0) -> None:
        self.opts = opts
        self.subject = opts.subject_for(collector, 0)  # partition 0's (named in errors)
        self.collector = collector
        self.publish_timeout = publish_timeout
        self.loop = LoopThread("export-nats")
        self.nc: Any = None
        self.js: Any = None
        self._pins: dict[tuple[int, int, int], _Pin] = {}  # batches being tried: their split
        self.split_shares = 0    # sub-shares beyond the first made for shares over max_payload
        self.resplit_shares = 0  # shares split again: max_payload shrank between two attempts
        self.maybe_doubled = 0   # records of those published before without a PubAck
        self._connect_at_start()

    def _connect_at_start(self) -> None:
        """Create or validate the stream now: a stream that is not ours stops the collector
        here (ConfigError); NATS being down does not (batches spool until it answers)."""
        try:
            self.loop.run(self._ensure(), self.opts.connect_timeout + 10)
        except ConfigError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable now: the sender keeps trying
            self._reset()
            log.warning("NATS %s not reachable at start (%s: %s): batches wait in the spool",
                        self.opts.url, type(exc).__name__, exc)

    async def _ensure(self) -> None:
        if self.nc is None or self.nc.is_closed:
            self.nc = await connect(self.opts, f"eastwest-collector:{self.collector}")
            self.js = self.nc.jetstream()
            await ensure_stream(self.js, self.opts)

    async def _publish(self, shares: list[Share], pin: _Pin) -> list[Any]:
        """Every share at once; each PubAck is noted in the pin before the first error (if any)
        is raised, so a later attempt knows which shares the stream holds."""
        results = await asyncio.gather(*(
            self.js.publish(s.subject, s.body, timeout=self.publish_timeout,
                            stream=self.opts.stream, headers={"Nats-Msg-Id": s.msg_id})
            for s in shares), return_exceptions=True)
        from nats import errors as nerr

        for share, r in zip(shares, results, strict=True):
            if not isinstance(r, BaseException):
                pin.acked.add(share.msg_id)
            elif not isinstance(r, nerr.MaxPayloadError):  # left the client: maybe stored
                pin.sent.add(share.msg_id)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)

    def plan(self, body: bytes, limit: int | None = None) -> Plan:
        """The shares of one encoded batch, each at most `limit` bytes (None: unsplit)."""
        return self.plan_batch(_decoded(body), limit)

    def plan_batch(self, batch: codec.DecodedBatch, limit: int | None,
                   used: dict[int, int] | None = None) -> Plan:
        """(subject, encoded share, message id) of each partition the batch has records for
        (a batch without records: one empty share in partition 0), in partition order; a
        share over `limit` bytes split into sub-shares (`split_records`), sub-share j of
        partition K marked with the slot K + P * (used[K] + j) (eastwest/partition.py
        `share_slot`). What cannot be published is in `Plan.left`."""
        p = self.opts.partitions
        groups: dict[int, list[Any]] = {}
        for rec in batch.records:
            groups.setdefault(record_partition(rec, p), []).append(rec)
        if not groups:
            groups[0] = []
        out = Plan([], [], {})
        for k in sorted(groups):
            first = (used or {}).get(k, 0)
            self._plan_partition(batch, k, groups[k], limit, first, out)
        return out

    def _plan_partition(self, batch: codec.DecodedBatch, k: int, records: list[Any],
                        limit: int | None, first: int, out: Plan) -> None:
        p = self.opts.partitions

        def encode(recs: list[Any], slot: int = k) -> bytes:
            return codec.encode_batch(codec.Batch(batch.collector,
                                                  mark_seq(batch.batch_seq, slot),
                                                  batch.sent_at, recs))

        pieces, giants = split_records(records, encode, limit)
        for rec, size in giants:
            out.left.append(Left("nats_max_payload", 1, f"record {rec.record_id} of batch "
                                 f"{batch.batch_seq} (partition {k}) is {size} bytes encoded "
                                 f"alone, over NATS' max_payload less headers ({limit} bytes)"))
        room = sub_shares(k, p) - first
        for j, (recs, data) in enumerate(pieces):
            if j >= room:
                n = sum(len(r) for r, _ in pieces[j:])
                out.left.append(Left("nats_share_space", n, f"{n} records of batch "
                                     f"{batch.batch_seq} (partition {k}) need more than the "
                                     f"{sub_shares(k, p)} sub-shares a mark can name with "
                                     f"{p} partitions"))
                break
            slot = share_slot(k, first + j, p)
            if slot != k:  # the piece was encoded with sub-share 0's sequence
                data = encode(recs, slot)
            seq = mark_seq(batch.batch_seq, slot)
            out.shares.append(Share(self.opts.subject_for(self.collector, k), data,
                                    f"{batch.collector}:{seq}", k, first + j, len(recs)))
        out.used[k] = first + min(len(pieces), room)

    def _attempt_plan(self, batch: codec.DecodedBatch, body: bytes) -> tuple[_Pin, list[Share]]:
        """The pin of this batch (made at its first attempt here) and the shares to publish now
        under the connection's max_payload (see the module docstring: a shrunk max_payload)."""
        limit = max(1, int(self.nc.max_payload) - HEADROOM)
        key = (batch.batch_seq, len(body), zlib.crc32(body))
        pin = self._pins.get(key)
        if pin is None:
            pin = _Pin(self.plan_batch(batch, limit), set())
            self.split_shares += sum(1 for s in pin.plan.shares if s.sub > 0)
            while len(self._pins) >= MAX_PINS:
                self._pins.pop(next(iter(self._pins)))
            self._pins[key] = pin
            return pin, list(pin.plan.shares)
        todo: list[Share] = []
        plan = pin.plan
        for share in list(plan.shares):
            if len(share.body) <= limit:
                todo.append(share)  # the same bytes, the same message id: JetStream dedups
            elif share.msg_id in pin.acked:
                continue  # in the stream already: never published again
            else:  # max_payload shrank below this share: its records go to fresh sub-shares
                plan.shares.remove(share)
                piece = codec.DecodedBatch(batch.collector, batch.batch_seq, batch.sent_at,
                                           _records_of(share), [])
                again = Plan([], [], {})
                self._plan_partition(piece, share.partition, piece.records, limit,
                                     plan.used[share.partition], again)
                plan.used[share.partition] = again.used[share.partition]
                plan.shares += again.shares
                plan.left += again.left
                todo += again.shares
                self.resplit_shares += 1
                if share.msg_id in pin.sent:  # its PubAck lost, not its message, maybe
                    self.maybe_doubled += share.records
                log.warning("NATS max_payload is now %d bytes: share %s (%d records, %d bytes) "
                            "of batch %d split again into %d sub-shares", self.nc.max_payload,
                            share.msg_id, share.records, len(share.body), batch.batch_seq,
                            len(again.shares))
        return pin, todo

    def send(self, body: bytes) -> SendResult:
        from nats import errors as nerr
        from nats.js import errors as jerr

        bound = self.publish_timeout + self.opts.connect_timeout + 5
        try:
            batch = _decoded(body)
        except (codec.CodecError, ValueError) as exc:  # the spool's own bytes: never sendable
            return Refused("nats_bad_batch", f"cannot split the batch by partition: {exc}")
        try:
            self.loop.run(self._ensure(), bound)
            pin, todo = self._attempt_plan(batch, body)
            left = pin.plan.left
            if not pin.plan.shares:  # every record alone over max_payload: nothing to publish
                self._forget(pin)
                for lost in left:
                    log.error("NATS: %s: refused", lost.detail)
                more = f"; ... ({len(left)} records in all)" if len(left) > 3 else ""
                return Refused(left[0].reason,
                               "; ".join(lost.detail for lost in left[:3]) + more)
            acks = self.loop.run(self._publish(todo, pin), bound)
        except nerr.MaxPayloadError as exc:  # a server whose max_payload shrank since connecting
            self._reset()
            return Retry("nats_max_payload", f"NATS: {exc} (connecting again to learn the "
                         "server's max_payload)")
        except nerr.AuthorizationError as exc:
            return Retry("nats_authorization", f"NATS: {exc}", auth=True)
        except (nerr.NoRespondersError, jerr.NoStreamResponseError) as exc:
            return Retry("nats_no_responders",
                         f"{type(exc).__name__}: no stream answers on {self.subject}")
        except jerr.APIError as exc:  # stream full (discard new), leader election, ...
            return Retry(_jetstream_reason(exc), f"JetStream: {exc}")
        except nerr.TimeoutError:
            self._reset()
            return Retry("nats_timeout", f"no PubAck within {self.publish_timeout:g} s")
        except TimeoutError:  # the bound of the whole attempt (an OSError: caught before those)
            self._reset()
            return Retry("nats_connect_timeout", f"not connected to {self.opts.url} within "
                         f"{bound:g} s")
        except (nerr.NoServersError, nerr.ConnectionClosedError, OSError) as exc:
            self._reset()
            reason = ("nats_no_servers" if isinstance(exc, nerr.NoServersError) else
                      "nats_connection_closed" if isinstance(exc, nerr.ConnectionClosedError)
                      else "nats_connect_error")
            return Retry(reason, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever else the client raises: try again
            return Retry("nats_error", f"{type(exc).__name__}: {exc}")
        self._forget(pin)
        for lost in left:
            log.error("NATS: %s: refused, the rest of the batch is published", lost.detail)
        answer: dict[str, Any] = {"stream": acks[0].stream if acks else self.opts.stream,
                                  "seqs": [a.seq for a in acks],
                                  "partitions": len({s.partition for s in pin.plan.shares}),
                                  "shares": len(pin.plan.shares)}
        if left:
            answer["dropped"] = [(lost.reason, lost.records, lost.detail) for lost in left]
        return Accepted(answer)

    def _forget(self, pin: _Pin) -> None:
        for key, p in list(self._pins.items()):
            if p is pin:
                del self._pins[key]

    def gauges(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Counters for the collector's /metrics (collector/metrics.py `watch_source`)."""
        return {("eastwest_export_nats_subshares_total", ()): self.split_shares,
                ("eastwest_export_nats_resplit_shares_total", ()): self.resplit_shares,
                ("eastwest_export_nats_resplit_maybe_doubled_total", ()): self.maybe_doubled}

    def _reset(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None:
            try:
                self.loop.run(nc.close(), 5)
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        self._reset()
        self.loop.stop()


def split_records(records: list[Any], encode: Callable[[list[Any]], bytes], limit: int | None
                  ) -> tuple[list[tuple[list[Any], bytes]], list[tuple[Any, int]]]:
    """Records (in batch order) -> contiguous pieces, each encoded within `limit` bytes, in
    order, and the records that alone encode over it (with their size). A function of the
    records and the limit only: the same pieces at every attempt with the same limit.
    A piece over the limit is cut into `ceil(1.25 * size / limit)` runs of (nearly) equal record
    counts (at least 2), each split again until it fits."""
    data = encode(records)
    if limit is None or len(data) <= limit:
        return [(records, data)], []
    if len(records) == 1:
        return [], [(records[0], len(data))]
    n = min(len(records), max(2, math.ceil(1.25 * len(data) / limit)))
    pieces: list[tuple[list[Any], bytes]] = []
    giants: list[tuple[Any, int]] = []
    for i in range(n):
        run = records[i * len(records) // n:(i + 1) * len(records) // n]
        more, big = split_records(run, encode, limit)
        pieces += more
        giants += big
    return pieces, giants


def _decoded(body: bytes) -> codec.DecodedBatch:
    batch = codec.decode_batch(body)
    if not 0 <= batch.batch_seq <= MAX_BATCH_SEQ:
        raise ValueError(f"batch_seq {batch.batch_seq}: at most {MAX_BATCH_SEQ}")
    return batch


def _records_of(share: Share) -> list[Any]:
    return list(codec.decode_batch(share.body).records)


def _jetstream_reason(exc: APIError) -> str:
    """`nats_stream_full` for a stream at its limits (discard new: "maximum bytes exceeded",
    "maximum messages exceeded"), else the JetStream error code."""
    description = exc.description or ""
    if "maximum" in description and "exceeded" in description:
        return "nats_stream_full"
    code = exc.err_code or exc.code
    return f"nats_jetstream_{code}" if code else "nats_jetstream_error"
