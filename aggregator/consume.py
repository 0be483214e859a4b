"""NATS JetStream consumer: the aggregator replicas' shared work queue -> intake.

Stage: the NATS door of intake (aggregator/intake.py; POST /api/v1/ingest is the HTTP one). In:
batches that collectors published to the stream (collector/transport_nats.py,
eastwest/jetstream.py), pulled through ONE durable pull consumer that every replica shares.
Out: each batch through `Intake.accept_body` (the same rules and drop reasons as HTTP), acked
once correlation took it: stored in the shared store (ClickHouse, durable on every shard; the
inline correlation reloads the batch's keys from the store first, aggregator/worker.py) or
journaled (a store with a local journal).

Delivery is at least once; `(collector, batch_seq)` makes it exactly once in effect: a batch
redelivered after its aggregator died (ack_wait expired) is found applied and just acked.

Why `max_ack_pending = 1` (one batch in flight across all replicas): correlation joins the
records of one connection that different collectors report (aggregator/correlate.py). If two
replicas correlated two batches at the same time, the client's and the server's records of one
connection could each open a connection. With one batch in flight, replicas take turns, and
before each batch a replica reloads from the store the connections of the batch's keys (what
another replica wrote since, `InlineCorrelation`), so every replica correlates as one
aggregator would. Replicas
give failover and read capacity; the correlate-and-write step is serial (docs/scale-out.md,
"What breaks first", and how to partition it when it is the limit).

Bad batches (not decodable, bad envelope, too long) are terminated (never redelivered) and
counted by intake (`ingest/bad_batch`, `ingest/bad_envelope`, `ingest/batch_too_long`); a store
failure or a full backlog naks the batch with a delay (redelivered, to any replica).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from aggregator.intake import Intake, Refused, Retry
from eastwest.drops import Drops
from eastwest.errors import ConfigError
from eastwest.jetstream import LoopThread, NatsOptions, connect, ensure_stream

log = logging.getLogger("eastwest.consume")
DEFAULT_DURABLE = "eastwest-aggregators"


@dataclass(frozen=True)
class ConsumerSettings:
    nats: NatsOptions
    durable: str = DEFAULT_DURABLE
    ack_wait_s: float = 30.0
    fetch_timeout_s: float = 1.0
    retry_delay_s: float = 1.0


class JetStreamConsumer:
    """Pulls one batch at a time; `start()` runs it in its own thread, `stop()` ends it."""

    def __init__(self, cfg: ConsumerSettings, intake: Intake, drops: Drops) -> None:
        self.cfg, self.intake, self.drops = cfg, intake, drops
        self.loop: LoopThread | None = None
        self._stopping = threading.Event()
        self._task: Any = None
        self.ready = threading.Event()   # subscribed: the consumer exists on the server
        self.applied = 0                 # batches stored by this replica
        self.duplicates = 0
        self.error: Exception | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.loop = LoopThread("nats-consume")
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.loop.loop)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._task is not None:
            try:
                self._task.result(timeout)
            except Exception as exc:  # noqa: BLE001 - reported, shutdown goes on
                log.warning("NATS consumer ended with %s: %s", type(exc).__name__, exc)
        if self.loop is not None:
            self.loop.stop()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            nc = None
            try:
                nc = await connect(self.cfg.nats, "eastwest-aggregator")
                js = nc.jetstream()
                await ensure_stream(js, self.cfg.nats)
                sub = await js.pull_subscribe(self.cfg.nats.subjects, durable=self.cfg.durable,
                                              stream=self.cfg.nats.stream,
                                              config=self._consumer_config())
                self.ready.set()
                await self._pull(sub)
            except ConfigError as exc:  # the stream belongs to someone else: no retry helps
                log.error("NATS consumer stopped: %s", exc)
                self.error = exc
                return
            except Exception as exc:  # noqa: BLE001 - NATS down or restarting: reconnect
                self.drops.count("consume", "nats_unavailable",
                                       detail=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self.cfg.retry_delay_s)
            finally:
                if nc is not None and not nc.is_closed:
                    await nc.close()

    def _consumer_config(self) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        return ConsumerConfig(durable_name=self.cfg.durable, ack_policy=AckPolicy.EXPLICIT,
                              deliver_policy=DeliverPolicy.ALL, ack_wait=self.cfg.ack_wait_s,
                              max_ack_pending=1, max_deliver=-1,
                              filter_subject=self.cfg.nats.subjects,
                              description="eastwest aggregators: one shared work queue")

    async def _pull(self, sub: Any) -> None:
        from nats import errors as nerr

        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                msgs = await sub.fetch(1, timeout=self.cfg.fetch_timeout_s)
            except nerr.TimeoutError:
                continue
            for msg in msgs:
                verdict = await loop.run_in_executor(None, self.apply, msg.data)
                if verdict == "ack":
                    await msg.ack_sync(timeout=10)
                elif verdict == "term":
                    await msg.term()
                else:
                    await msg.nak(delay=self.cfg.retry_delay_s)

    # -- one batch ----------------------------------------------------------------------------
    def apply(self, body: bytes) -> str:
        """One batch through intake (aggregator/intake.py, the rules of every transport):
        'ack' (stored or a duplicate), 'term' (never storable), 'retry'."""
        try:
            out = self.intake.accept_body(body)
        except Refused:
            return "term"
        except Retry:
            return "retry"
        if out.result.duplicate:
            self.duplicates += 1
        else:
            self.applied += 1
        return "ack"
