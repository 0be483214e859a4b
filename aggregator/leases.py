"""Partition leases: which aggregator replica owns which partition, in a JetStream key-value bucket.

Stage: beside the NATS consumer (aggregator/consume.py). In: the stream's partition count P,
this replica's id, the bucket `<stream>_leases` (created by the first replica; its TTL is the
lease time). Out: at each `tick()`, the partitions this replica gained, lost and must release.

Keys of the bucket (https://docs.nats.io/nats-concepts/jetstream/key-value-store):
- `replica.<id>`: this replica is alive (put at every tick);
- `p<K>`: the owner of partition K (its value: the replica id).
The bucket's TTL (`max_age`) is the lease: an entry not written again within it disappears, so
the leases and the liveness of a replica that died (kill -9, a partition of the network) expire
on their own, with no clock of the replicas involved. A replica renews its leases at every tick
(every third of the lease) with a compare-and-set on the revision it wrote (`update(last=)`):
a renewal that fails means the lease expired and may be someone else's: the partition is lost
at once. A free partition is taken with `create` (fails when someone holds it).

The self-balancing rule: the live replicas sorted by id, this one's rank r among N; its share is
P // N, plus one when r < P % N (the shares add up to P). A replica below its share takes free
partitions (starting at its own offset r * P / N, so replicas starting together rarely race for
the same ones); above it, it releases the highest partitions it owns, after their in-flight batch
is done (the caller's `release`), and deletes their leases so another replica takes them at its
next tick, not a lease later. A replica that stops releases everything (a rolling restart moves
partitions within a tick); one that dies leaves them to expire (within the lease).

Ownership and safety: each partition's durable consumer has at most one coalesced group in
flight (`max_ack_pending` = `--nats-coalesce`, the messages a replica fetches at once), and
every batch's mark makes it apply once. A replica writes a group only while it `holds` the
partition (owned, renewed less than a lease ago); a replica taking a partition over waits
until the consumer has nothing pending (the previous owner's group acked, or its ack wait
over) before it reloads the partition and pulls, so two replicas never correlate two groups
of one partition at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("eastwest.leases")
DEFAULT_LEASE_S = 10.0
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_=-]")


def share(partitions: int, replicas: list[str], me: str) -> int:
    """How many partitions replica `me` aims at among the live `replicas` (the rule above)."""
    live = sorted(set(replicas) | {me})
    rank, n = live.index(me), len(live)
    return partitions // n + (1 if rank < partitions % n else 0)


def take_order(partitions: int, replicas: list[str], me: str) -> list[int]:
    """The order this replica tries free partitions in: from its own offset on."""
    live = sorted(set(replicas) | {me})
    start = live.index(me) * partitions // len(live)
    return [(start + i) % partitions for i in range(partitions)]


@dataclass
class Tick:
    gained: list[int] = field(default_factory=list)    # leases taken now: start consuming
    lost: list[int] = field(default_factory=list)      # renewal failed: stop at once
    surplus: list[int] = field(default_factory=list)   # above the share: stop, then release()


class Leases:
    """One replica's leases (the module docstring). Methods are coroutines on the NATS loop."""

    def __init__(self, js: Any, bucket: str, replica: str, partitions: int,
                 lease_s: float = DEFAULT_LEASE_S) -> None:
        self.js, self.bucket, self.partitions = js, bucket, partitions
        self.replica = _KEY_CHARS.sub("_", replica) or "_"
        self.lease_s = lease_s
        self.kv: Any = None
        self.owned: dict[int, int] = {}  # partition -> revision of our lease entry
        self._renewed: dict[int, float] = {}  # partition -> monotonic time of the last renewal
        self._alive_rev: int | None = None

    async def open(self) -> None:
        """The bucket, created with TTL = the lease when it is missing; an existing bucket's
        TTL is the lease every replica uses."""
        from nats.js.api import KeyValueConfig, StorageType
        from nats.js.errors import BucketNotFoundError

        try:
            self.kv = await self.js.key_value(self.bucket)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(KeyValueConfig(
                bucket=self.bucket, history=1, ttl=self.lease_s, storage=StorageType.FILE,
                description="eastwest: which aggregator replica owns which partition"))
        status = await self.kv.status()
        ttl = status.ttl  # the KV stream's max_age, seconds
        if ttl and abs(ttl - self.lease_s) > 0.01:
            log.info("leases: bucket %s has a lease of %.1f s (not %.1f s): using it",
                     self.bucket, ttl, self.lease_s)
            self.lease_s = float(ttl)

    @property
    def tick_s(self) -> float:
        return self.lease_s / 3

    async def snapshot(self) -> tuple[list[str], dict[int, str]]:
        """The live replicas, and partition -> owner of the leases alive now (one watcher
        over the bucket: every key's latest value, deleted and expired ones left out)."""
        watcher = await self.kv.watchall(ignore_deletes=True)
        replicas: list[str] = []
        owners: dict[int, str] = {}

        async def collect() -> None:
            async for e in watcher:
                if e is None:  # the initial values are all delivered
                    return
                if e.key.startswith("replica."):
                    replicas.append(e.key.split(".", 1)[1])
                elif e.key[:1] == "p" and e.key[1:].isdigit():
                    owners[int(e.key[1:])] = (e.value or b"").decode()

        try:
            await asyncio.wait_for(collect(), self.tick_s)
        except TimeoutError:
            # an entry counted when the watcher started but expired before it was delivered
            # never comes (nor the end marker after it): what arrived is the bucket now
            pass
        finally:
            await watcher.stop()
        return sorted(replicas), owners

    async def tick(self) -> Tick:
        """Say this replica is alive, renew its leases, take or give up partitions toward its
        share (the caller stops consuming `lost` and `surplus`, then `release`s `surplus`)."""
        from nats.js.errors import KeyWrongLastSequenceError

        t = Tick()
        await self.kv.put(f"replica.{self.replica}", b"")
        for k, rev in sorted(self.owned.items()):
            try:
                before = time.monotonic()
                self.owned[k] = await self.kv.update(f"p{k}", self.replica.encode(), last=rev)
                self._renewed[k] = before
            except KeyWrongLastSequenceError:  # expired (and maybe taken): not ours any more
                del self.owned[k]
                t.lost.append(k)
                log.warning("leases: partition %d lost (its lease expired)", k)
        live, held = await self.snapshot()
        target = share(self.partitions, live, self.replica)
        if len(self.owned) > target:
            t.surplus = sorted(self.owned)[target:]
            return t
        if len(self.owned) < target:
            for k in take_order(self.partitions, live, self.replica):
                if len(self.owned) >= target:
                    break
                if k in held or k in self.owned:
                    continue
                before = time.monotonic()
                got = await self._create(k)
                if got is not None:
                    self.owned[k] = got
                    self._renewed[k] = before
                    t.gained.append(k)
        return t

    def holds(self, k: int) -> bool:
        """Partition k is this replica's now: owned, and its lease written less than a lease
        ago (a replica paused past its lease may have lost it before its next tick tells).
        Safe to call from any thread."""
        renewed = self._renewed.get(k)
        return k in self.owned and renewed is not None and \
            time.monotonic() - renewed < self.lease_s

    async def _create(self, k: int) -> int | None:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return int(await self.kv.create(f"p{k}", self.replica.encode()))
        except KeyWrongLastSequenceError:  # someone was faster
            return None

    async def release(self, partitions: list[int]) -> None:
        """Give these leases up now (their consumers stopped): another replica takes them at
        its next tick."""
        for k in partitions:
            rev = self.owned.pop(k, None)
            if rev is None:
                continue
            try:
                await self.kv.delete(f"p{k}", last=rev)
            except Exception as exc:  # noqa: BLE001 - taken meanwhile, or NATS gone: it expires
                log.info("leases: partition %d not released (%s): it expires", k, exc)

    async def release_all(self) -> None:
        await self.release(sorted(self.owned))
        try:
            await self.kv.delete(f"replica.{self.replica}")
        except Exception:  # noqa: BLE001 - it expires
            pass
