"""NATS JetStream consumer: the aggregator replicas' shared work queue -> the correlating store.

Stage: ingest (the NATS twin of POST /api/v1/ingest, aggregator/ingest.py). In: batches that
collectors published to the stream (collector/transport_nats.py, eastwest/jetstream.py), pulled
through ONE durable pull consumer that every replica shares. Out: each batch stored exactly once
in the shared store (ClickHouse), acked only after the store returned (durable on every shard).

Delivery is at least once; `(collector, batch_seq)` makes it exactly once in effect: a batch
redelivered after its aggregator died (ack_wait expired) is found applied and just acked.

Why `max_ack_pending = 1` (one batch in flight across all replicas): correlation joins the
records of one connection that different collectors report (aggregator/correlate.py). If two
replicas correlated two batches at the same time, the client's and the server's records of one
connection could each open a connection. With one batch in flight, replicas take turns, and
before each batch a replica reloads from the store the connections of the batch's keys (what
another replica wrote since), so every replica correlates as one aggregator would. Replicas
give failover and read capacity; the correlate-and-write step is serial (docs/scale-out.md,
"What breaks first", and how to partition it when it is the limit).

Bad batches (not decodable, bad envelope) are terminated (never redelivered) and counted
(`consume/bad_batch`); a store failure naks the batch with a delay (redelivered, to any replica).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from aggregator.correlate import key_of
from aggregator.ingest import MAX_COLLECTOR_LEN, Rejected, _keep_good
from aggregator.store.base import StoreError
from aggregator.store.columns import INT64_MAX
from eastwest.codec import decode_batch
from eastwest.errors import CodecError, ConfigError
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

    def __init__(self, cfg: ConsumerSettings, state: Any) -> None:
        self.cfg, self.state = cfg, state
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
                self.state.drops.count("consume", "nats_unavailable",
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
        """Store one batch: 'ack' (stored or a duplicate), 'term' (never storable), 'retry'."""
        st = self.state
        started = time.perf_counter()
        st.metrics.bytes_in.inc(len(body))
        try:
            batch = decode_batch(body)
        except (CodecError, UnicodeDecodeError, RecursionError) as exc:
            st.metrics.batches.labels("rejected").inc()
            st.drops.count("consume", "bad_batch", detail=str(exc))
            return "term"
        total = len(batch.records) + len(batch.errors)
        st.metrics.records_in.inc(total)
        if (not batch.collector or len(batch.collector) > MAX_COLLECTOR_LEN
                or not 0 <= batch.batch_seq <= INT64_MAX):
            st.metrics.batches.labels("rejected").inc()
            st.drops.count("consume", "bad_batch", total, detail=f"collector={batch.collector[:80]!r} "
                           f"batch_seq={batch.batch_seq}")
            return "term"
        rejected = [Rejected(index=i, field=e.field, reason=str(e)) for i, e in batch.errors]
        good = _keep_good(batch, rejected)
        store = st.store
        try:
            self.refresh({key_of(r) for r in good})
            result = store.ingest(batch.collector, batch.batch_seq, good)
        except StoreError as exc:
            st.drops.count("consume", "store_unavailable", len(good), detail=str(exc))
            return "retry"
        if rejected:
            st.drops.count("ingest", "invalid_record", len(rejected))
        st.metrics.batches.labels("duplicate" if result.duplicate else "stored").inc()
        st.metrics.records_out.inc(result.stored)
        st.metrics.latency.observe(time.perf_counter() - started)
        if result.duplicate:
            self.duplicates += 1
        else:
            self.applied += 1
        return "ack"

    def refresh(self, keys: set[tuple]) -> None:
        """Replace the correlator's view of these keys with the store's (another replica may
        have written them since). Only stores shared between replicas can answer."""
        store = self.state.store
        fetch = getattr(store.inner, "connections_for_keys", None)
        if fetch is None or not keys:
            return
        fresh = fetch(keys)
        corr = store.correlator
        with corr.lock:
            for key, conns in fresh.items():
                if conns:
                    corr.index[key] = conns
                    for c in conns:
                        corr._raise_high_water(c.last_seen)
                else:
                    corr.index.pop(key, None)
