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

One group of batches in flight per partition: correlation joins the records of one connection
that different collectors report, and all of them are in one partition. A partition's worker
fetches the shares waiting (up to `coalesce` messages, `max_ack_pending` of its consumer; after
a first message it waits up to `coalesce_wait_s` for more), and hands them to intake together
(`Intake.accept_group`): runs of at most `coalesce_records` records, each planned share by share
in stream order and written in ONE store write with every share's mark, while this replica
still holds the partition's lease. Each message is acked (or naked, or terminated) only after
its run's write returned; a failed run and every share after it are naked, so no share is
applied before one that came earlier. A replica killed in the middle of a group's write acks
nothing of it: the group is redelivered (after `ack_wait_s`) to the partition's next owner,
which may group it otherwise: the shares whose marks are in the store are duplicates, the others
are planned against what the store holds and rewrite the same rows under the same share keys
(aggregator/store/clickhouse.py `write_group`). `coalesce = 1` is the one-share-at-a-time mode.
Two groups of one partition are never correlated at once, even by two replicas during a
hand-over: the new owner waits until the consumer has nothing pending (the old owner's group
acked, or its ack wait over) before it reloads the partition from the store (before each group
the partition's correlator also reloads the group's keys: what the previous owner wrote), and
the old owner writes only while `Leases.holds` the partition. Partitions are correlated
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
DEFAULT_COALESCE = 32             # shares of a partition written at once (1: one at a time)
DEFAULT_COALESCE_RECORDS = 60_000  # the journaled path's step (aggregator/worker.py COALESCE)
DEFAULT_COALESCE_WAIT_S = 0.05


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
    coalesce: int = DEFAULT_COALESCE                  # messages fetched and written at once
    coalesce_records: int = DEFAULT_COALESCE_RECORDS  # records of one write, at most
    coalesce_wait_s: float = DEFAULT_COALESCE_WAIT_S  # after the first message, for more


class PartitionHooks(Protocol):
    """What the correlation stage does when this replica takes or gives up a partition."""

    def take(self, partition: int) -> None:
        """Before the partition's first batch here: its state reloaded from the store."""

    def drop(self, partition: int) -> None:
        """After its last batch here: its state forgotten."""


class JetStreamConsumer:
    """Leases partitions and pulls each owned one, one group of waiting batches at a time;
    `start()` runs it in its own thread, `stop()` ends it (its leases released, so others take
    over at once)."""

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
                              max_ack_pending=self.cfg.coalesce, max_deliver=-1,
                              filter_subject=self.cfg.nats.partition_subjects(partition),
                              description=f"eastwest aggregators: partition {partition}")

    async def _partition(self, js: Any, k: int, stop: asyncio.Event) -> None:
        """Partition k, owned here: reload its state, then pull its batches until told."""

        loop = asyncio.get_running_loop()
        taken = False
        try:
            cfg = self._consumer_config(k)
            # created, or (made by an older version, another --nats-coalesce) updated in place:
            # max_ack_pending is editable on NATS 2.9
            await js.add_consumer(self.cfg.nats.stream, cfg)
            sub = await js.pull_subscribe(self.cfg.nats.partition_subjects(k),
                                          durable=cfg.durable_name,
                                          stream=self.cfg.nats.stream, config=cfg)
            await self._previous_owner_done(sub, stop)
            if self.hooks is not None:
                await loop.run_in_executor(self._apply, self.hooks.take, k)
            taken = True
            self.taken_over += 1
            self.owned.add(k)
            leases = self.leases

            def still_owned() -> bool:
                return leases is None or leases.holds(k)

            while not (stop.is_set() or self._stopping.is_set()):
                try:
                    msgs = await sub.fetch(self.cfg.coalesce, timeout=self.cfg.fetch_timeout_s)
                except TimeoutError:  # nats' own, or asyncio's (a fetch of several messages)
                    continue
                if len(msgs) < self.cfg.coalesce and self.cfg.coalesce_wait_s > 0:
                    try:  # a moment for the shares published with these
                        msgs += await sub.fetch(self.cfg.coalesce - len(msgs),
                                                timeout=self.cfg.coalesce_wait_s)
                    except TimeoutError:
                        pass
                verdicts = await loop.run_in_executor(
                    self._apply, self.apply_group, [m.data for m in msgs], still_owned)
                for msg, verdict in zip(msgs, verdicts, strict=True):
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
            if self.hooks is not None and taken:
                await loop.run_in_executor(self._apply, self.hooks.drop, k)

    async def _previous_owner_done(self, sub: Any, stop: asyncio.Event) -> None:
        """Before taking a partition: its consumer has nothing pending (the group another
        replica, or this one before a reconnect, had in flight is acked), or the ack wait is
        over (then it is redelivered here)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.cfg.ack_wait_s
        while not (stop.is_set() or self._stopping.is_set()):
            info = await sub.consumer_info()
            if not info.num_ack_pending or loop.time() >= give_up:
                return
            await asyncio.sleep(min(0.1, max(0.0, give_up - loop.time())))

    # -- batches ------------------------------------------------------------------------------
    def apply_group(self, bodies: list[bytes], still_owned: Any = None) -> list[str]:
        """A partition's waiting batches through intake together (`Intake.accept_group`): a
        verdict for each, in order."""
        if self.cfg.coalesce == 1:  # one share at a time, as before coalescing (the peer)
            return [self.apply(b) for b in bodies]
        out: list[str] = []
        for o in self.intake.accept_group(bodies, still_owned, self.cfg.coalesce_records):
            if isinstance(o, Refused):
                out.append("term")
            elif isinstance(o, Retry):
                out.append("retry")
            else:
                if o.result.duplicate:
                    self.duplicates += 1
                else:
                    self.applied += 1
                    self.records += o.result.stored
                out.append("ack")
        return out

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
