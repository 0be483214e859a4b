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

The `SendResult` (collector/transport.py) of one publish:
- PubAck -> `Accepted`;
- a batch larger than the server's max_payload can never be published -> `Refused`
  `nats_max_payload` (counted as the drop `export/nats_max_payload`);
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
batch's records on the collector (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from collector.transport import Accepted, Refused, Retry, SendResult
from eastwest import codec
from eastwest.errors import ConfigError
from eastwest.jetstream import LoopThread, NatsOptions, connect, ensure_stream
from eastwest.partition import MAX_BATCH_SEQ, mark_seq, record_partition

if TYPE_CHECKING:
    from nats.js.errors import APIError

log = logging.getLogger("eastwest.export.nats")


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

    async def _publish(self, shares: list[tuple[str, bytes, str]]) -> list[Any]:
        await self._ensure()
        return list(await asyncio.gather(*(
            self.js.publish(subject, body, timeout=self.publish_timeout, stream=self.opts.stream,
                            headers={"Nats-Msg-Id": msg_id})
            for subject, body, msg_id in shares)))

    def shares(self, body: bytes) -> list[tuple[str, bytes, str]]:
        """(subject, encoded share, message id) of each partition the batch has records for
        (a batch without records: one empty share in partition 0)."""
        batch = codec.decode_batch(body)
        if not 0 <= batch.batch_seq <= MAX_BATCH_SEQ:
            raise ValueError(f"batch_seq {batch.batch_seq}: at most {MAX_BATCH_SEQ}")
        p = self.opts.partitions
        groups: dict[int, list[Any]] = {}
        for rec in batch.records:
            groups.setdefault(record_partition(rec, p), []).append(rec)
        if not groups:
            groups[0] = []
        out = []
        for k in sorted(groups):
            seq = mark_seq(batch.batch_seq, k)
            share = codec.encode_batch(codec.Batch(batch.collector, seq, batch.sent_at,
                                                   groups[k]))
            out.append((self.opts.subject_for(self.collector, k), share,
                        f"{batch.collector}:{seq}"))
        return out

    def send(self, body: bytes) -> SendResult:
        from nats import errors as nerr
        from nats.js import errors as jerr

        bound = self.publish_timeout + self.opts.connect_timeout + 5
        try:
            shares = self.shares(body)
        except (codec.CodecError, ValueError) as exc:  # the spool's own bytes: never sendable
            return Refused("nats_bad_batch", f"cannot split the batch by partition: {exc}")
        try:
            acks = self.loop.run(self._publish(shares), bound)
        except nerr.MaxPayloadError as exc:
            return Refused("nats_max_payload", f"NATS: {exc}")
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
        return Accepted({"stream": acks[0].stream, "seqs": [a.seq for a in acks],
                         "partitions": len(acks)})

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


def _jetstream_reason(exc: APIError) -> str:
    """`nats_stream_full` for a stream at its limits (discard new: "maximum bytes exceeded",
    "maximum messages exceeded"), else the JetStream error code."""
    description = exc.description or ""
    if "maximum" in description and "exceeded" in description:
        return "nats_stream_full"
    code = exc.err_code or exc.code
    return f"nats_jetstream_{code}" if code else "nats_jetstream_error"
