"""The columnar correlator (aggregator/correlate_columns.py, its C core) against the reference
(aggregator/correlate.py), batch by batch and field by field, on generated workloads
(tests/unit/correlate_workloads.py): the same touched connections (rows; the `views` blob
decoded and byte for byte), flags, deltas, rollup rows, workloads, renames and late names,
`settled` ids after prunes, and the same state after every commit, rollback and restart."""

from __future__ import annotations

import itertools
import os
import random
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from aggregator import correlate_native, service
from aggregator.correlate_columns import ColumnCorrelator
from eastwest import native_build
from eastwest.record import Endpoint, Nat
from tests.unit.correlate_workloads import (
    Pair,
    Wall,
    assert_same_state,
    counter,
    make_workload,
    resolver_of,
)
from tests.unit.test_correlate import T0, rec

# EASTWEST_TEST_NO_SHRINK=1: report the first failing example as found (mutation runs)
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    phases=[Phase.explicit, Phase.generate]
                    if os.environ.get("EASTWEST_TEST_NO_SHRINK") else list(Phase))


@pytest.fixture(scope="module", autouse=True)
def lib():
    """The venv's build. Where a compiler exists it must be built and current."""
    lib, _, why = correlate_native.load()
    if lib is None:
        if native_build.compiler() is None:
            pytest.skip(f"no C compiler here: {why}")
        pytest.fail(f"the native correlator is not usable: {why}")


@SETTINGS
@given(st.randoms(use_true_random=False))
def test_the_column_correlator_plans_what_the_reference_plans(rnd: random.Random) -> None:
    w = make_workload(rnd)
    with Pair(w.resolver, w.settle, **w.kw) as pair:
        assert pair.col.native
        pair.run(w)


OBSERVERS = ("client", "server", "path")
ORDERS = [o for n in (1, 2, 3) for s in itertools.combinations(OBSERVERS, n)
          for o in itertools.permutations(s)]


@pytest.mark.parametrize("resolver", [0, 1, 2])
@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_every_subset_of_observers_in_every_order_plans_the_same(order, resolver) -> None:
    """Each observer sends an interim then a final record, one batch each, in this order; the
    names settle between the second and the third observer (a late name)."""
    with Pair(resolver, 10.0) as pair:
        for k, o in enumerate(order):
            coll = {"client": "h1", "server": "h2", "path": "h3"}[o]
            pair.batch([rec(o, collector=coll, final=False, dur=20, c2s=400, s2c=100),
                        rec(o, collector=coll, dur=70, c2s=1000, s2c=5000)])
            if k == 1:
                pair.wall.t += timedelta(seconds=10)
        assert_same_state(pair.ref, pair.col)


def test_prune_keeps_what_is_exactly_at_its_horizon_and_runs_every_50_commits() -> None:
    """keep_closed 10 s: a closed connection whose last record is exactly 10 s before the high
    water stays, one a microsecond older goes; prune also runs by itself at the 50th commit."""
    kw = {"keep_closed": timedelta(seconds=10), "keep_open": timedelta(seconds=30)}
    with Pair(1, 10.0, **kw) as pair:
        pair.batch([rec("client", cport=1, dur=2.0), rec("client", cport=2, dur=1.999999),
                    rec("server", cport=3, final=False, dur=2.0)])
        pair.batch([rec("client", cport=4, start=T0 + timedelta(seconds=10))])
        pair.prune()
        assert sorted(int(c.client_port) for c in pair.col.connections()) == [1, 3, 4]
        for k in range(60):  # one record a second: the open one (3) goes after 30 s
            pair.batch([rec("path", cport=100 + k, start=T0 + timedelta(seconds=20 + k))])
            assert_same_state(pair.ref, pair.col, deep=k % 10 == 0)
        assert 3 not in {c.client_port for c in pair.col.connections()}
        assert len(pair.col.settled) > 30


@pytest.mark.parametrize("seed", range(12))
def test_without_the_native_core_the_column_plans_are_the_same(seed: int) -> None:
    """The reference engine (no compiler, or EASTWEST_CORRELATE_NATIVE=0) gives the same
    `ColumnPlan`s as the C core, field by field."""
    w = make_workload(random.Random(seed))
    clock = Wall()
    both = [ColumnCorrelator(resolver_of(w.resolver), settle=timedelta(seconds=w.settle),
                             clock=clock, ids=counter(1), native_core=native, **w.kw)
            for native in (True, False)]
    assert [c.native for c in both] == [True, False]
    for step, recs in w.steps:
        if step != "batch":
            continue
        nat, ref = (c.plan_records(recs) for c in both)
        assert nat.rows.to_pylist() == ref.rows.to_pylist()
        for name in ("created", "renamed", "has_delta", "deltas", "names_final_in_s"):
            assert getattr(nat, name).tolist() == getattr(ref, name).tolist(), name
        for name in ("rollups", "workloads"):
            a, b = getattr(nat, name), getattr(ref, name)
            assert (a is None) == (b is None) and (a is None or sorted(
                a.to_pylist(), key=repr) == sorted(b.to_pylist(), key=repr)), name
        assert dict(nat.connections) == dict(ref.connections)
        for c, p in zip(both, (nat, ref), strict=True):
            c.commit(p)
    assert both[0].connections() == both[1].connections()
    assert (both[0].renames, both[0].late_names) == (both[1].renames, both[1].late_names)


def test_names_become_static_after_a_restart_with_a_workload_map() -> None:
    """Created without a map (external names), then the aggregator restarts with one: the
    client's and then the server's own records rename their ends to static names, and once
    both are static the names are final (no `naming` left)."""
    with Pair(0, 10.0) as pair:
        pair.batch([rec("path", collector="h3", final=False)])
        pair.restart(1)
        pair.batch([rec("client")])
        (conn,) = pair.col.connections()
        assert conn.client.source == "static" and conn.naming is not None
        pair.batch([rec("server")])
        (conn,) = pair.col.connections()
        assert (conn.client.wid, conn.server.wid) == ("shop/frontend", "shop/api")
        assert conn.naming is None and pair.col.renames == 2


def test_a_rollup_row_adding_up_to_zero_is_no_row() -> None:
    """The wire's 100 bytes, then the client's interim with none (static names: no rename):
    the deltas cancel, and neither engine writes the all-zero row."""
    with Pair(1, 10.0) as pair:
        recs = [rec("path", final=False, dur=1, c2s=100, s2c=0),
                rec("client", final=False, dur=2, c2s=0, s2c=0)]
        cp = pair.col.plan_records(recs)
        rp = pair.ref.plan(recs)
        assert cp.rollups is None or cp.rollups.num_rows == 0
        assert not rp.rollups
        pair.col.rollback(cp)
        pair.batch(recs)


def test_a_reused_address_is_named_for_each_connections_start_in_both_correlators() -> None:
    """A time-aware source (Kubernetes: pod IPs are reused) is asked for each connection's
    start by both correlators, also when connections of both owners are in ONE batch (the
    column correlator resolves once per distinct facts AND start)."""
    from eastwest.record import Endpoint

    with Pair(2, 10.0) as pair:
        recs = [rec("path", collector="h3", cport=40000 + i, start=T0 + timedelta(seconds=i),
                    server=Endpoint("192.168.9.9", 9090)) for i in range(4)]
        pair.batch(recs)
        assert_same_state(pair.ref, pair.col)
        names = sorted((c.client_port, c.server.name) for c in pair.col.connections())
        # T0 is at second 10: even seconds are pod-9's, odd ones pod-9b's (the test source)
        assert names == [(40000, "pod-9"), (40001, "pod-9b"), (40002, "pod-9"), (40003, "pod-9b")]


@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_udp_socket_views_counting_datagrams_plan_the_same_in_every_order(order) -> None:
    """UDP socket records count datagrams (packets from a socket view, unlike TCP's): the C core
    takes them as the reference does, whoever reports first."""
    from tests.unit.test_correlate import udp

    with Pair(0, 10.0) as pair:
        for o in order:
            coll = {"client": "h1", "server": "h2", "path": "h3"}[o]
            pair.batch([udp(o, collector=coll, final=False, dur=20, c2s=40, s2c=160,
                            packets_c2s=1, packets_s2c=1),
                        udp(o, collector=coll, dur=70, packets_c2s=3 + (o == "path"))])
        assert_same_state(pair.ref, pair.col)


VIP_A, VIP_B = Endpoint("10.96.0.10", 80), Endpoint("10.96.0.11", 9090)
BACKEND = Endpoint("10.244.2.11", 9090)


@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_a_service_call_keeps_its_dialled_address_in_every_order(order) -> None:
    """Issue 16: the client knows the ClusterIP it dialled (its host's DNAT), the server knows
    nothing of it, the wire (a NodePort's middle host) knows another; whatever the order, both
    correlators keep the same one (aggregator/service.py: the lowest rank), once per connection,
    and a restart keeps it."""
    nat = {"client": [Nat("dnat", VIP_A, BACKEND, 4026531840)], "server": None,
           "path": [Nat("dnat", VIP_B, BACKEND, None)]}
    with Pair(1, 10.0) as pair:
        for o in order:
            coll = {"client": "h1", "server": "h2", "path": "h3"}[o]
            pair.batch([rec(o, collector=coll, final=False, dur=20, nat=nat[o]),
                        rec(o, collector=coll, dur=70, nat=nat[o])])
        assert_same_state(pair.ref, pair.col)
        [conn] = pair.col.connections()
        known = [nat[o][0].original for o in order if nat[o]]
        want = min(known, key=lambda e: service.rank(e.ip, e.port)) if known else None
        assert ((conn.service_ip, conn.service_port) == (want.ip, want.port) if want
                else conn.service_ip is None and conn.service_port is None)
        pair.restart()
        assert_same_state(pair.ref, pair.col)
        [again] = pair.col.connections()
        assert (again.service_ip, again.service_port) == (conn.service_ip, conn.service_port)
