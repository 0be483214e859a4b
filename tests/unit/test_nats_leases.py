"""Partition leases (aggregator/leases.py) against a real nats-server 2.9 (JetStream KV): shares,
take-over after expiry, release on surplus and at stop, a lost renewal.

One server for the module (tests/servers.py: free loopback port, own store directory); each test
uses its own bucket."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from aggregator.leases import Leases, share, take_order
from tests.servers import NatsServer

P = 6


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    s = NatsServer(tmp_path_factory.mktemp("nats-leases")).start()
    yield s.url
    s.stop()


_buckets = itertools.count()


def run(coro):
    return asyncio.run(coro)


async def leases(url: str, bucket: str, names: list[str], lease_s: float = 1.5,
                 partitions: int = P) -> tuple[list, list[Leases]]:
    import nats

    ncs, out = [], []
    for n in names:
        nc = await nats.connect(url)
        ncs.append(nc)
        le = Leases(nc.jetstream(), bucket, n, partitions, lease_s)
        await le.open()
        out.append(le)
    return ncs, out


async def settle(ls: list[Leases], rounds: int = 6) -> None:
    """Tick every replica a few rounds, releasing surplus as the consumer does."""
    for _ in range(rounds):
        for le in ls:
            t = await le.tick()
            if t.surplus:
                await le.release(t.surplus)


def test_shares_add_up_to_p_and_differ_by_at_most_one():
    for p in (1, 2, 5, 6, 7, 64):
        for n in range(1, 9):
            names = [f"r{i}" for i in range(n)]
            got = [share(p, names, me) for me in names]
            assert sum(got) == p and max(got) - min(got) <= 1
            orders = [take_order(p, names, me) for me in names]
            assert all(sorted(o) == list(range(p)) for o in orders)


def test_one_replica_takes_every_partition_and_a_second_gets_its_half(nats_url):
    bucket = f"L{next(_buckets)}"

    async def main():
        ncs, (a, b) = await leases(nats_url, bucket, ["a", "b"])
        t = await a.tick()  # alone: the whole stream
        assert sorted(t.gained) == list(range(P)) and sorted(a.owned) == list(range(P))
        await settle([b, a, b, a])
        assert len(a.owned) == 3 and len(b.owned) == 3
        assert set(a.owned).isdisjoint(b.owned)
        # who owns what, as the bucket says, is what each replica believes
        _, owners = await a.snapshot()
        assert owners == {**{k: "a" for k in a.owned}, **{k: "b" for k in b.owned}}
        # a third replica: 2 each
        ncs3, (c,) = await leases(nats_url, bucket, ["c"])
        await settle([c, a, b, c, a, b])
        assert sorted(len(x.owned) for x in (a, b, c)) == [2, 2, 2]
        assert set().union(a.owned, b.owned, c.owned) == set(range(P))
        # c stops (a rolling restart): it releases, a and b take its two at their next tick
        await c.release_all()
        await settle([a, b])
        assert sorted(len(x.owned) for x in (a, b)) == [3, 3]
        for nc in ncs + ncs3:
            await nc.close()

    run(main())


def test_a_dead_replicas_partitions_are_taken_over_when_its_lease_expires(nats_url):
    bucket = f"L{next(_buckets)}"

    async def main():
        ncs, (a, b) = await leases(nats_url, bucket, ["a", "b"], lease_s=1.5)
        await settle([a, b, a, b])
        dead = set(b.owned)
        assert len(dead) == 3
        # b stops ticking (kill -9): until its lease expires, a cannot take its partitions
        await a.tick()
        assert set(a.owned).isdisjoint(dead)
        t0 = time.monotonic()
        gained: list[int] = []
        while set(gained) != dead:
            assert time.monotonic() - t0 < 10, "not taken over within a few leases"
            gained += (await a.tick()).gained
            await asyncio.sleep(0.25)
        took = time.monotonic() - t0
        assert took >= 1.0  # not before the lease was over (1.5 s since b's last renewal)
        assert sorted(a.owned) == list(range(P))
        # b comes back (a long pause, not a death): its renewals fail, it learns it lost them
        t = await b.tick()
        assert sorted(t.lost) == sorted(dead) and not b.owned
        await settle([b, a, b, a])
        assert len(a.owned) == len(b.owned) == 3
        for nc in ncs:
            await nc.close()

    run(main())


def test_the_bucket_states_the_lease_for_every_replica(nats_url):
    bucket = f"L{next(_buckets)}"

    async def main():
        ncs, (a,) = await leases(nats_url, bucket, ["a"], lease_s=4.0)
        ncs2, (b,) = await leases(nats_url, bucket, ["b"], lease_s=9.0)
        assert (a.lease_s, b.lease_s) == (4.0, 4.0)
        assert b.tick_s == pytest.approx(4.0 / 3)
        for nc in ncs + ncs2:
            await nc.close()

    run(main())


def test_replicas_starting_together_never_own_a_partition_twice(nats_url):
    bucket = f"L{next(_buckets)}"

    async def main():
        ncs, ls = await leases(nats_url, bucket, ["r1", "r2", "r3", "r4"])
        for _ in range(5):  # every replica ticks at once, racing for the same leases
            results = await asyncio.gather(*(le.tick() for le in ls))
            for le, t in zip(ls, results, strict=True):
                if t.surplus:
                    await le.release(t.surplus)
            owned = [k for le in ls for k in le.owned]
            assert len(owned) == len(set(owned))  # never two owners
        assert sorted(len(le.owned) for le in ls) == [1, 1, 2, 2]
        for nc in ncs:
            await nc.close()

    run(main())
