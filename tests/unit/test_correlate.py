"""Correlation: the client's, the server's and the wire's records of one connection become ONE
connection, whichever subset of observers reported it and in whatever order; reused ports open
new connections; volumes reach the minute rollups exactly once."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from aggregator.correlate import Correlator, minute_of
from aggregator.identity import IdentityResolver, StaticMap
from eastwest.record import Endpoint, FlowRecord, Process, Tunnel

T0 = datetime(2026, 11, 28, 4, 0, 10, tzinfo=UTC)
MAP = StaticMap([
    {"match": "10.244.1.11/32", "name": "frontend", "namespace": "shop", "host": "h1"},
    {"match": "10.244.2.11/32", "name": "api", "namespace": "shop", "host": "h2"},
    {"match": "10.213.0.1/32", "name": "node-h1", "kind": "Node", "host": "h1"},
    {"match": "10.213.0.2/32", "name": "node-h2", "kind": "Node", "host": "h2"},
])
_seq = itertools.count(1)


def rec(observer: str, *, cport: int = 40000, start: datetime = T0, dur: float = 2.0,
        final: bool = True, c2s: int = 1000, s2c: int = 5000, collector: str | None = None,
        **over) -> FlowRecord:
    coll = collector or {"client": "h1", "server": "h2", "path": "h1"}[observer]
    base = dict(record_id=f"{coll}:{next(_seq)}", collector=coll,
                source="vxlan" if observer == "path" else "socket", start=start,
                end=start + timedelta(seconds=dur), final=final, protocol="tcp", family=4,
                client=Endpoint("10.244.1.11", cport), server=Endpoint("10.244.2.11", 9090),
                observer=observer, bytes_c2s=c2s, bytes_s2c=s2c,
                connect="ok" if observer != "path" else None,
                process=Process(7, "ew-frontend" if observer == "client" else "ew-api")
                if observer != "path" else None,
                tunnel=Tunnel("vxlan", 42, "10.213.0.1", "10.213.0.2", 4789) if observer == "path" else None)
    base.update(over)
    return FlowRecord(**base)


def correlator() -> Correlator:
    return Correlator(IdentityResolver(MAP))


def run(c: Correlator, batches) -> None:
    for batch in batches:
        c.commit(c.plan(batch))


def all_conns(c: Correlator):
    return [x for bucket in c.index.values() for x in bucket]


SUBSETS = [s for n in (1, 2, 3) for s in itertools.combinations(("client", "server", "path"), n)]


@pytest.mark.parametrize("observers", SUBSETS, ids=lambda s: "+".join(s))
def test_any_subset_of_observers_in_any_order_gives_one_connection(observers):
    for order in itertools.permutations(observers):
        c = correlator()
        # each observer's clock is off by up to 1.5 s: still the same connection
        skew = {"client": 0.0, "server": 1.5, "path": -1.0}
        run(c, [[rec(o, start=T0 + timedelta(seconds=skew[o]))] for o in order])
        conns = all_conns(c)
        assert len(conns) == 1, order
        assert conns[0].observed_by == sorted(observers)
        assert conns[0].best()[:2] == (1000, 5000)


def test_merged_connection_keeps_both_processes_tunnel_and_per_side_bytes():
    c = correlator()
    run(c, [[rec("server", c2s=1000, s2c=5000), rec("client", c2s=1000, s2c=5000),
             rec("path", c2s=1000, s2c=5000)]])
    (conn,) = all_conns(c)
    assert conn.client_proc.comm == "ew-frontend" and conn.client_proc.collector == "h1"
    assert conn.server_proc.comm == "ew-api" and conn.server_proc.collector == "h2"
    assert (conn.tunnel.vni, conn.tunnel.vtep_src_host, conn.tunnel.vtep_dst_host) == (42, "h1", "h2")
    assert conn.side_bytes("client") == conn.side_bytes("server") == conn.side_bytes("path") == (1000, 5000)
    assert conn.client.wid == "shop/frontend" and conn.server.wid == "shop/api"
    assert not conn.byte_mismatch


def test_a_reused_port_opens_a_second_connection():
    c = correlator()
    first = [rec("client", start=T0), rec("server", start=T0)]
    # the same 4-tuple again 0.5 s after the first closed: within the slack, yet another connection
    again = T0 + timedelta(seconds=2.5)
    run(c, [first, [rec("server", start=again, c2s=7), rec("client", start=again, c2s=7)]])
    conns = sorted(all_conns(c), key=lambda x: x.start)
    assert len(conns) == 2
    assert [x.observed_by for x in conns] == [["client", "server"]] * 2
    assert [x.best()[0] for x in conns] == [1000, 7]


def test_interim_records_add_only_their_increase_to_the_rollups():
    c = correlator()
    total: dict = {}
    batches = [[rec("client", final=False, dur=5, c2s=100, s2c=10)],
               [rec("server", final=False, dur=5.2, c2s=90, s2c=10)],   # behind the client: adds 0
               [rec("client", final=False, dur=65, c2s=700, s2c=30)],   # next minute
               [rec("client", final=True, dur=66, c2s=1000, s2c=50), rec("server", dur=66, c2s=1000, s2c=50)],
               [rec("client", final=False, dur=30, c2s=500, s2c=20)]]   # late and stale: ignored
    for b in batches:
        plan = c.plan(b)
        for k, v in plan.rollups.items():
            total[k] = [a + x for a, x in zip(total.get(k, [0] * 6), v, strict=True)]
        c.commit(plan)
    assert len(all_conns(c)) == 1
    by_minute = {k[0]: v[:2] for k, v in total.items()}
    assert by_minute == {minute_of(T0): [100, 10], minute_of(T0 + timedelta(seconds=65)): [900, 40]}


def test_loopback_connections_in_different_namespaces_stay_apart():
    c = correlator()
    lo = dict(client=Endpoint("127.0.0.1", 5000), server=Endpoint("127.0.0.1", 80), loopback=True)
    run(c, [[rec("client", netns=111, **lo), rec("client", netns=222, collector="h2", **lo)]])
    assert sorted(x.scope for x in all_conns(c)) == [111, 222]


def test_byte_disagreement_beyond_retransmits_is_flagged():
    c = correlator()
    run(c, [[rec("client", c2s=1000), rec("server", c2s=100)]])
    assert all_conns(c)[0].byte_mismatch
    c = correlator()
    run(c, [[rec("client", c2s=5000, retransmits=2), rec("server", c2s=5000 - 2000)]])
    assert not all_conns(c)[0].byte_mismatch  # 2 retransmits x 1460 explain 2000 bytes


def test_a_failed_store_write_leaves_the_correlator_unchanged():
    c = correlator()
    plan = c.plan([rec("client")])
    assert len(c) == 0  # nothing until commit
    assert len(plan.connections) == 1
    run(c, [[rec("server")]])
    c.commit(c.plan([rec("client")]))
    assert len(c) == 1


def test_prune_forgets_old_closed_connections_by_record_time():
    c = correlator()
    run(c, [[rec("client", start=T0)], [rec("client", cport=40001, start=T0 + timedelta(minutes=10))]])
    assert c.prune() == 1 and len(c) == 1


def test_a_final_record_closes_the_connection_even_when_an_interim_ended_later():
    """A packet source's interim `end` is its tick time; its final's is the last packet's."""
    c = correlator()
    run(c, [[rec("path", final=False, dur=5.0, c2s=50, s2c=60)],
            [rec("path", final=True, dur=3.0, c2s=50, s2c=60)]])
    (conn,) = all_conns(c)
    assert conn.closed and conn.views["path:h1"].final
    assert conn.best()[:2] == (50, 60)


def random_connection(rnd):
    """A connection with a random subset of views and random counters (for the fast paths)."""
    from aggregator.connection import Connection, Identity, ProcInfo, View
    from aggregator.connection import Tunnel as ConnTunnel

    views = {}
    for slot in rnd.sample(["client", "server", "path:h1", "path:h2"], rnd.randint(1, 4)):
        obs = slot.split(":")[0]
        start = T0 + timedelta(seconds=rnd.uniform(-3, 3))
        views[slot] = View(obs, slot.split(":")[-1] if obs == "path" else "h9", start,
                           start + timedelta(seconds=rnd.uniform(0, 9)), rnd.random() < .7,
                           rnd.choice([0, 1000, 1000 + rnd.randrange(5000)]),
                           rnd.choice([0, 5000, rnd.randrange(9000)]),
                           rnd.choice([None, rnd.randrange(30)]), rnd.choice([None, rnd.randrange(30)]),
                           rnd.randrange(4), rnd.randrange(2),
                           rnd.choice([None, "ok", "refused", "reset"]),
                           rnd.choice([None, (1, 2, 3), (4, 5, 6)]), rnd.random() < .1)
    return Connection(f"{rnd.getrandbits(64):032x}", "tcp", 4, "10.244.1.11", 40000,
                      "10.244.2.11", 9090, 0, Identity("frontend", "shop", host="h1"),
                      Identity("api", "shop", source="static"), views,
                      rnd.choice([None, ProcInfo(1, "a", 2, None, "h1")]), None,
                      rnd.choice([None, ConnTunnel(42, "10.213.0.1", "10.213.0.2", "h1", "h2")]))


def test_summary_is_the_properties_in_one_pass():
    import random

    rnd = random.Random(5)
    for _ in range(3000):
        c = random_connection(rnd)
        s = c.summary()
        assert (s.start, s.last_seen, s.closed_at, s.connect, s.best, s.rtt, s.incomplete) == (
            c.start, c.last_seen, c.closed_at, c.connect, c.best(), c.rtt, c.incomplete)
        assert (s.closed_at is not None) == c.closed
        assert s.observed_by == "," + ",".join(c.observed_by) + ","
        assert (s.client_bytes, s.server_bytes, s.path_bytes) == (
            c.side_bytes("client"), c.side_bytes("server"), c.side_bytes("path"))
        assert s.byte_mismatch == c.byte_mismatch
        assert s.packets == c.packets() == tuple(
            b if any(getattr(v, f) is not None for v in c.views.values())  # null: nobody counted
            else None for b, f in zip(c.best()[2:4], ("packets_c2s", "packets_s2c"), strict=True))


def udp(observer: str, **over) -> FlowRecord:
    """A DNS-like UDP exchange as each observer reports it: the socket probes (client, server:
    datagrams and payload bytes, no `connect`) and the wire (a plain UDP flow, packets)."""
    base = dict(protocol="udp", server=Endpoint("10.244.2.11", 53), connect=None, c2s=120,
                s2c=480, packets_c2s=3, packets_s2c=2, cport=40001)
    base.update(over)
    return rec(observer, **base)


@pytest.mark.parametrize("observers", SUBSETS, ids=lambda s: "+".join(s))
def test_udp_socket_records_of_both_ends_and_the_wire_join_as_one_connection_in_any_order(
        observers):
    for order in itertools.permutations(observers):
        c = correlator()
        skew = {"client": 0.0, "server": 1.5, "path": -1.0}
        run(c, [[udp(o, final=False, start=T0 + timedelta(seconds=skew[o]), c2s=40, s2c=160,
                     packets_c2s=1, packets_s2c=1)] for o in order]
            + [[udp(o, start=T0 + timedelta(seconds=skew[o]))] for o in reversed(order)])
        (conn,) = all_conns(c)
        assert conn.observed_by == sorted(observers), order
        assert conn.best()[:4] == (120, 480, 3, 2), order
        if "client" in observers:
            assert conn.client_proc.comm == "ew-frontend"
        if "server" in observers:
            assert conn.server_proc.comm == "ew-api"


def test_a_udp_flow_one_observer_idled_out_twice_is_two_connections_the_wire_joins_the_first():
    # the client's probes ended the flow after the idle timeout and saw it again later (a new
    # flow, a new start); the wire (a longer idle timeout) reported one flow from the first start
    c = correlator()
    later = T0 + timedelta(seconds=45)
    run(c, [[udp("path", dur=50, c2s=240, s2c=960, packets_c2s=6, packets_s2c=4)],
            [udp("client", dur=2)], [udp("server", dur=2, start=T0 + timedelta(seconds=0.5))],
            [udp("client", start=later, dur=5)], [udp("server", start=later, dur=5)]])
    conns = sorted(all_conns(c), key=lambda x: x.start)
    assert [x.observed_by for x in conns] == [["client", "path", "server"], ["client", "server"]]
