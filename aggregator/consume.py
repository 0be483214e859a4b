"""NATS JetStream consumer: the partitions this replica owns -> intake.

Stage: the NATS door of intake (aggregator/intake.py; POST /api/v1/ingest is the HTTP one). In:
batches that collectors published to the stream, one subject per partition
(collector/transport_nats.py, eastwest/jetstream.py, eastwest/partition.py). Each partition K has
its own durable pull consumer (`<durable>-p<K>`, filter `eastwest.flows.p<K>.>`); the replicas
share the partitions through leases (aggregator/leases.py): a replica pulls only the partitions
it owns, and a partition it takes over first has its correlation state reloaded from the store
(`PartitionHooks.take`, aggregator/partitioned.py) before its first batch.
Out: each batch through `Intake.accept_body` (the same rules and drop reasons as HTTP), acked
once correlation took it: stored in the shared store (ClickHouse, durable on every shard) or
journaled (a store with a local journal).

Delivery is at least once; `(collector, partition, batch_seq)` makes it exactly once in effect:
a batch redelivered after its aggregator died (ack_wait expired) is found applied and just acked.

One batch in flight per partition (`max_ack_pending = 1` on each partition's consumer):
correlation joins the records of one connection that different collectors report, and all of
them are in one partition; two batches of one partition are never correlated at once, even by
two replicas during a hand-over (before each batch the partition's correlator reloads the
batch's keys from the store: what the previous owner wrote). Partitions are correlated
independently: P partitions, P batches in flight across the replicas. Within one replica the
batches of its partitions are applied by one thread (the identity resolver is shared; the
replica's CPU is one interpreter's anyway): replicas add throughput, a replica's partitions
share its CPU.

Bad batches (not decodable, bad envelope, too long) are terminated (never redelivered) and
counted by intake (`ingest/bad_batch`, `ingest/bad_envelope`, `ingest/batch_too_long`); a store
failure or a full backlog naks the batch with a delay (redelivered, to the partition's owner).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from aggregator.intake import Intake, Refused, Retry
from aggregator.leases import DEFAULT_LEASE_S, Leases
from eastwest.drops import Drops
from eastwest.errors import ConfigError
from eastwest.jetstream import LoopThread, NatsOptions, connect, ensure_stream

log = logging.getLogger("eastwest.consume")
DEFAULT_DURABLE = "eastwest-aggregators"


def default_replica_id() -> str:
    """This replica's name in the leases: host and process (unique while it runs)."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ConsumerSettings:
    nats: NatsOptions
    durable: str = DEFAULT_DURABLE
    ack_wait_s: float = 30.0
    fetch_timeout_s: float = 1.0
    retry_delay_s: float = 1.0
    lease_s: float = DEFAULT_LEASE_S
    replica: str = field(default_factory=default_replica_id)


class PartitionHooks(Protocol):
    """What the correlation stage does when this replica takes or gives up a partition."""

    def take(self, partition: int) -> None:
        """Before the partition's first batch here: its state reloaded from the store."""

    def drop(self, partition: int) -> None:
        """After its last batch here: its state forgotten."""


class JetStreamConsumer:
    """Leases partitions and pulls each owned one, one batch at a time; `start()` runs it in its
    own thread, `stop()` ends it (its leases released, so others take over at once)."""

    def __init__(self, cfg: ConsumerSettings, intake: Intake, drops: Drops,
                 hooks: PartitionHooks | None = None) -> None:
        self.cfg, self.intake, self.drops, self.hooks = cfg, intake, drops, hooks
        self.loop: LoopThread | None = None
        self._stopping = threading.Event()
        self._task: Any = None
        self.ready = threading.Event()   # connected, leases opened: batches may flow
        self.applied = 0                 # batches stored by this replica
        self.records = 0                 # records they held
        self.duplicates = 0
        self.error: Exception | None = None
        self.owned: set[int] = set()     # partitions being consumed here now
        self.taken_over = 0              # partitions taken (each reloaded from the store)
        self.leases: Leases | None = None
        # one thread applies batches and reloads partitions: correlation is serial per replica
        self._apply = ThreadPoolExecutor(1, thread_name_prefix="eastwest-apply")

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.loop = LoopThread("nats-consume")
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.loop.loop)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._task is not None:
            try:
                self._task.result(timeout + self.cfg.fetch_timeout_s)
            except Exception as exc:  # noqa: BLE001 - reported, shutdown goes on
                log.warning("NATS consumer ended with %s: %s", type(exc).__name__, exc)
        if self.loop is not None:
            self.loop.stop()
        self._apply.shutdown(wait=True)

    async def _run(self) -> None:
        workers: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
        while not self._stopping.is_set():
            nc = None
            try:
                nc = await connect(self.cfg.nats, f"eastwest-aggregator:{self.cfg.replica}")
                js = nc.jetstream()
                await ensure_stream(js, self.cfg.nats)
                if self.leases is None:
                    self.leases = Leases(js, self.cfg.nats.lease_bucket, self.cfg.replica,
                                         self.cfg.nats.partitions, self.cfg.lease_s)
                self.leases.js = js  # after a reconnect: the same leases, renewed if alive
                await self.leases.open()
                self.ready.set()
                await self._own(js, self.leases, workers)
            except ConfigError as exc:  # the stream belongs to someone else: no retry helps
                log.error("NATS consumer stopped: %s", exc)
                self.error = exc
                return
            except Exception as exc:  # noqa: BLE001 - NATS down or restarting: reconnect
                self.drops.count("consume", "nats_unavailable",
                                 detail=f"{type(exc).__name__}: {exc}")
                await self._stop_workers(workers, list(workers))
                await asyncio.sleep(self.cfg.retry_delay_s)
            finally:
                if nc is not None and not nc.is_closed:
                    await nc.close()

    async def _own(self, js: Any, leases: Leases,
                   workers: dict[int, tuple[asyncio.Task[None], asyncio.Event]]) -> None:
        """Every tick: renew, balance, start and stop the partitions' workers. The tick never
        waits for a worker (a reload or a batch may take longer than a lease): a partition
        given up is released by its own task once its worker has finished, and renewed
        until then."""
        retiring: dict[int, asyncio.Task[None]] = {}
        while not self._stopping.is_set():
            # a tick that hangs (a connection half broken by a NATS restart) must not freeze the
            # leases: past a lease it raises, and the consumer connects again
            t = await asyncio.wait_for(leases.tick(), leases.lease_s)
            for k in t.lost:
                if k in workers:
                    workers.pop(k)[1].set()  # its batch in flight may finish; then it stops
            for k in t.surplus:
                if k not in retiring:
                    retiring[k] = asyncio.create_task(self._retire(leases, k, workers))
            for k, task in list(retiring.items()):
                if task.done():
                    del retiring[k]
            for k in sorted(leases.owned):  # gained now, or a worker ended (reconnect, error)
                if k not in retiring and (k not in workers or workers[k][0].done()):
                    stop = asyncio.Event()
                    workers[k] = (asyncio.create_task(self._partition(js, k, stop)), stop)
            await self._sleep(leases.tick_s)
        await asyncio.gather(*retiring.values(), return_exceptions=True)
        await self._stop_workers(workers, list(workers))
        await leases.release_all()

    async def _retire(self, leases: Leases, k: int,
                      workers: dict[int, tuple[asyncio.Task[None], asyncio.Event]]) -> None:
        await self._stop_workers(workers, [k])
        await leases.release([k])

    async def _sleep(self, seconds: float) -> None:
        end = asyncio.get_running_loop().time() + seconds
        while not self._stopping.is_set():
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.2))

    async def _stop_workers(self, workers: dict[int, tuple[asyncio.Task[None], asyncio.Event]],
                            which: list[int]) -> None:
        for k in which:
            if k in workers:
                task, stop = workers.pop(k)
                stop.set()
                await asyncio.gather(task, return_exceptions=True)

    def _consumer_config(self, partition: int) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        return ConsumerConfig(durable_name=f"{self.cfg.durable}-p{partition}",
                              ack_policy=AckPolicy.EXPLICIT,
                              deliver_policy=DeliverPolicy.ALL, ack_wait=self.cfg.ack_wait_s,
                              max_ack_pending=1, max_deliver=-1,
                              filter_subject=self.cfg.nats.partition_subjects(partition),
                              description=f"eastwest aggregators: partition {partition}")

    async def _partition(self, js: Any, k: int, stop: asyncio.Event) -> None:
        """Partition k, owned here: reload its state, then pull its batches until told."""
        from nats import errors as nerr

        loop = asyncio.get_running_loop()
        if self.hooks is not None:
            await loop.run_in_executor(self._apply, self.hooks.take, k)
        self.taken_over += 1
        self.owned.add(k)
        try:
            sub = await js.pull_subscribe(self.cfg.nats.partition_subjects(k),
                                          durable=f"{self.cfg.durable}-p{k}",
                                          stream=self.cfg.nats.stream,
                                          config=self._consumer_config(k))
            while not (stop.is_set() or self._stopping.is_set()):
                try:
                    msgs = await sub.fetch(1, timeout=self.cfg.fetch_timeout_s)
                except nerr.TimeoutError:
                    continue
                for msg in msgs:
                    verdict = await loop.run_in_executor(self._apply, self.apply, msg.data)
                    if verdict == "ack":
                        await msg.ack_sync(timeout=10)
                    elif verdict == "term":
                        await msg.term()
                    else:
                        await msg.nak(delay=self.cfg.retry_delay_s)
            await sub.unsubscribe()
        except Exception as exc:  # noqa: BLE001 - NATS trouble: the next tick starts it again
            self.drops.count("consume", "nats_unavailable",
                             detail=f"partition {k}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(self.cfg.retry_delay_s)
        finally:
            self.owned.discard(k)
            if self.hooks is not None:
                await loop.run_in_executor(self._apply, self.hooks.drop, k)

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
            self.records += out.result.stored
        return "ack"
