"""A NodePort call with SNAT is ONE connection (issue 16; docs/aggregator.md, "NodePort").

Three pieces on three hosts: the client's socket (`client -> NODE:30080`), the backend's socket
(`NODE':P' -> backend`), and the middle node's wire record folded to `client -> backend` with
`nat = [dnat NODE:30080 -> backend, snat client -> NODE':P']`. Whatever the order of arrival
(the middle record before, between or after the halves, in one batch or many, a restart of
both correlators anywhere), the reference correlator and the column correlator (C core) hold
one connection seen by client, server and path, the backend as server, the NodePort kept as
`service_ip`/`service_port`, and the rollups add up to its counters under its own names only:
the halves' volumes moved, nothing counted twice."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from aggregator.correlate import Correlator
from aggregator.store.derived import Derived, connections_table
from eastwest.record import Endpoint, FlowRecord, Nat, Process, Tunnel
from tests.unit.correlate_workloads import Pair, assert_same_plan, assert_same_state, conns_of

T0 = datetime(2026, 11, 28, 4, 0, 50, tzinfo=UTC)  # the call spans a minute boundary
CLIENT = Endpoint("10.244.1.11", 40000)
NODE = Endpoint("10.213.0.2", 30080)       # what the client dialled
BACKEND = Endpoint("10.244.3.13", 8080)
SEEN = Endpoint("10.244.2.1", 51000)       # the masquerade: what the backend saw
CHAIN = [Nat("dnat", NODE, BACKEND, 4026532001), Nat("snat", CLIENT, SEEN, 4026532001)]
_seq = itertools.count(1)


def piece(which: str, *, final: bool, client: Endpoint = CLIENT, start: datetime = T0,
          skew: float = 0.0) -> FlowRecord:
    """One record of one piece: an interim (4 s) or the final (20 s)."""
    dur = 20.0 if final else 4.0
    c2s, s2c = (1000, 5000) if final else (300, 700)
    coll, obs, cl, sv, nat = {
        "client": ("h1", "client", client, NODE, None),
        "server": ("h3", "server", SEEN, BACKEND, None),
        "middle": ("h2", "path", client, BACKEND, CHAIN),
    }[which]
    s = start + timedelta(seconds=skew)
    return FlowRecord(
        record_id=f"{coll}:{next(_seq)}", collector=coll,
        source="socket" if obs != "path" else "vxlan", start=s, end=s + timedelta(seconds=dur),
        final=final, protocol="tcp", family=4, client=cl, server=sv, observer=obs,  # type: ignore[arg-type]
        bytes_c2s=c2s + (40 if obs == "path" else 0), bytes_s2c=s2c,
        connect="ok" if obs != "path" else None,
        process=Process(7 if obs == "client" else 9, "ew-loadgen" if obs == "client" else "ew-web")
        if obs != "path" else None,
        tunnel=Tunnel("vxlan", 42, "10.213.0.2", "10.213.0.3", 4789) if obs == "path" else None,
        nat=nat)


def pieces(which: str) -> list[FlowRecord]:
    skew = {"client": 0.0, "server": 0.8, "middle": 0.3}[which]
    return [piece(which, final=False, skew=skew), piece(which, final=True, skew=skew)]


class Run:
    """A pair of correlators fed batches, the rollup deltas of every plan summed, the records
    with a NAT chain kept as a store would (a restart learns the aliases again from them)."""

    def __init__(self, resolver: int = 1) -> None:
        self.pair = Pair(resolver, 10.0)
        self.rollups: dict[tuple, list[int]] = defaultdict(lambda: [0] * 6)
        self.stored_nat: list[FlowRecord] = []
        self.rows: dict[str, dict] = {}  # the store's connection rows (replaced, deleted)

    def batch(self, recs: list[FlowRecord]) -> None:
        ref, col = self.pair.ref, self.pair.col
        plan, cp = ref.plan(recs), col.plan_records(recs)
        assert_same_plan(plan, cp)
        assert cp.removed == plan.removed
        ref.commit(plan)
        col.commit(cp)
        assert_same_state(ref, col)
        d = Derived(plan)
        for r in (d.rollups.to_pylist() if d.rollups is not None else ()):
            acc = self.rollups[(r["client_wid"], r["server_wid"], r["server_port"], r["minute"])]
            for i, n in enumerate(("bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c",
                                   "retransmits", "resets")):
                acc[i] += r[n]
        for cid in d.replaced:
            self.rows.pop(cid, None)
        for row in (d.connection_rows().to_pylist() if d.conns else ()):
            self.rows[row["conn_id"]] = row
        self.stored_nat += [r for r in recs if r.nat is not None]

    def restart(self) -> None:
        self.pair.restart()
        for c in (self.pair.ref, self.pair.col):
            c.learn_nat(self.stored_nat)

    def edges(self) -> dict[tuple, list[int]]:
        out: dict[tuple, list[int]] = defaultdict(lambda: [0] * 6)
        for (cw, sw, port, _), v in self.rollups.items():
            for i, x in enumerate(v):
                out[(cw, sw, port)][i] += x
        return {k: v for k, v in out.items() if any(v)}


def check(run: Run, observed: str = ",client,path,server,") -> dict:
    assert_same_state(run.pair.ref, run.pair.col)
    [conn] = conns_of(run.pair.ref)
    row = connections_table([conn]).to_pylist()[0]
    assert (row["client_ip"], row["client_port"]) == (CLIENT.ip, CLIENT.port)
    assert (row["server_ip"], row["server_port"]) == (BACKEND.ip, BACKEND.port)
    assert (row["service_ip"], row["service_port"]) == (NODE.ip, NODE.port)
    assert row["observed_by"] == observed
    # the store holds that one connection, and the rollups are its counters under its names
    assert list(run.rows) == [conn.conn_id]
    best = list(conn.best())
    assert run.edges() == {(conn.client.wid, conn.server.wid, BACKEND.port): best}
    return row


ORDERS = list(itertools.permutations(("client", "server", "middle")))


@pytest.mark.parametrize("restart", [False, True], ids=["", "restart"])
@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_the_three_pieces_are_one_connection_in_every_order(order, restart) -> None:
    """Each piece's interim then final record, one batch each, in this order (a restart after
    each piece when asked)."""
    run = Run()
    with run.pair:
        for which in order:
            for r in pieces(which):
                run.batch([r])
            if restart:
                run.restart()
        row = check(run)
    assert (row["bytes_c2s"], row["bytes_s2c"]) == (1000, 5000)  # the sockets' counts
    assert row["client_comm"] == "ew-loadgen" and row["server_comm"] == "ew-web"
    assert row["client_wid"] == "shop/frontend"


@pytest.mark.parametrize("order", list(itertools.permutations(range(6)))[::37], ids=str)
def test_the_six_records_in_one_batch_or_interleaved(order) -> None:
    """The interims and finals of the three pieces interleaved: all in one batch, one per
    batch, or two batches split in the middle."""
    recs = [*pieces("client"), *pieces("server"), *pieces("middle")]
    batch = [recs[i] for i in order]
    for batches in ([batch], [[r] for r in batch], [batch[:3], batch[3:]]):
        run = Run()
        with run.pair:
            for b in batches:
                run.batch(b)
            check(run)


@pytest.mark.parametrize("resolver", [0, 2])
def test_merged_halves_move_their_volumes_under_other_resolvers(resolver) -> None:
    """Without a static map (names from processes and addresses) and with every layer: the
    halves' names (the node's address as a client) keep no volume."""
    run = Run(resolver)
    with run.pair:
        for which in ("server", "client", "middle"):
            for r in pieces(which):
                run.batch([r])
        check(run)


def test_after_the_naming_window_the_volumes_move_all_the_same() -> None:
    """Halves whose names are final when the middle record arrives (the aggregator's wall
    clock past `settle`): their volumes move at the minute of their last record, and the
    totals still add up to the one connection's counters."""
    run = Run()
    with run.pair:
        for which in ("client", "server"):
            for r in pieces(which):
                run.batch([r])
        run.pair.wall.t += timedelta(seconds=60)
        for r in pieces("middle"):
            run.batch([r])
        [conn] = conns_of(run.pair.ref)
        assert_same_state(run.pair.ref, run.pair.col)
        assert list(run.rows) == [conn.conn_id]
        totals: dict[tuple, list[int]] = defaultdict(lambda: [0] * 6)
        for (cw, sw, _, _), v in run.rollups.items():
            for i, x in enumerate(v):
                totals[(cw, sw)][i] += x
        assert {k: v for k, v in totals.items() if any(v)} == {
            (conn.client.wid, conn.server.wid): list(conn.best())}


def test_another_call_from_the_same_port_later_is_another_connection() -> None:
    """The halves' keys are reused (the client's ephemeral port, the masquerade's port) by a
    call a minute later that dialled the node directly, with no middle record: not joined."""
    run = Run()
    later = T0 + timedelta(seconds=90)
    with run.pair:
        for which in ("client", "middle", "server"):
            for r in pieces(which):
                run.batch([r])
        run.batch([piece("client", final=True, start=later)])
        assert_same_state(run.pair.ref, run.pair.col)
        rows = sorted(connections_table(conns_of(run.pair.ref)).to_pylist(),
                      key=lambda r: r["start_ts"])
    assert [(r["server_ip"], r["service_ip"]) for r in rows] == [
        (BACKEND.ip, NODE.ip), (NODE.ip, None)]


def test_a_clusterip_call_is_not_a_nodeport() -> None:
    """A chain without an SNAT (a ClusterIP call, folded by the client's host) learns no alias:
    the batch takes the usual path."""
    c = Correlator(Pair(1, 10.0).ref.resolver)
    r = piece("client", final=True).replace(server=BACKEND, nat=CHAIN[:1])
    c.commit(c.plan([r]))
    assert len(c.nodeport) == 0 and len(c) == 1


def test_aliases_are_forgotten_with_the_connections() -> None:
    c = Correlator(Pair(1, 10.0).ref.resolver)
    c.commit(c.plan(pieces("middle")))
    assert len(c.nodeport) == 2
    c.commit(c.plan([piece("client", final=True, client=Endpoint("10.244.1.12", 1),
                           start=T0 + timedelta(hours=1))]))
    c.prune()
    assert len(c.nodeport) == 0


@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_batches_as_tables_join_like_records(order) -> None:
    """The ingest path hands the C core a flat table: a batch with a middle record or a known
    half's record takes the records path (`table_wants`), any other stays on columns; the
    connections are those of the reference correlator."""
    import pyarrow as pa

    from aggregator.nodeport_columns import table_wants
    from aggregator.store.columns import flat_table

    other = piece("client", final=True, client=Endpoint("10.244.1.12", 41000)).replace(
        server=Endpoint("10.244.2.11", 9090))  # an unrelated call in every batch
    with Pair(1, 10.0) as pair:
        for which in order:
            for r in pieces(which):
                batch = [r, other]
                table = flat_table(batch).append_column(
                    "collector", pa.array([x.collector for x in batch], pa.string()))
                wants = table_wants(table, pair.col.nodeport)
                assert wants == (which == "middle" or bool(pair.col.nodeport.aliases))
                p, cp = pair.ref.plan(batch), pair.col.plan(table)
                assert_same_plan(p, cp)
                pair.ref.commit(p)
                pair.col.commit(cp)
                assert_same_state(pair.ref, pair.col)
        assert len(pair.col) == 2
        [conn] = [c for c in pair.col.connections() if c.server_ip == BACKEND.ip]
        assert set(conn.views) == {"client", "server", "path:h2"}
        assert table_wants(flat_table([other]).append_column(
            "collector", pa.array(["h1"], pa.string())), pair.col.nodeport) is False


def test_a_merge_rolled_back_leaves_the_halves_held_as_they_were() -> None:
    """The C core takes a merged half out before it plans (no record of the batch may join
    it); a plan rolled back (a failed store write) puts it back, at its place."""
    with Pair(1, 10.0) as pair:
        for which in ("client", "server"):
            for r in pieces(which):
                pair.batch([r])
        pair.rollback(pieces("middle"))
        assert len(pair.col) == 2
        pair.batch(pieces("middle"))
        [conn] = conns_of(pair.ref)
        assert set(conn.views) == {"client", "server", "path:h2"}


@pytest.mark.parametrize("restart", [False, True], ids=["", "restart"])
@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_meshed_halves_keep_their_mesh_through_the_merge_in_every_order(order, restart) -> None:
    """A NodePort call between two meshed pods (collector/mesh.py folded each side): the
    client's half carries its sidecar hops, the server's half its own; whichever half is
    merged into the real connection brings its side's hops, in both correlators."""
    from eastwest.record import Mesh, MeshHop

    hops = {
        "client": Mesh("ew-sidecar", [
            MeshHop("app-proxy", Endpoint(CLIENT.ip, 45000), Endpoint("127.0.0.1", 15001), 960,
                    5000, "ew-sidecar", 31),
            MeshHop("proxy-proxy", CLIENT, NODE, 1000, 5012, "ew-sidecar", 31)]),
        "server": Mesh("ew-sidecar", [
            MeshHop("proxy-proxy", SEEN, Endpoint(BACKEND.ip, 15006), 1000, 5012, "ew-sidecar", 33),
            MeshHop("proxy-app", Endpoint("127.0.0.6", 20001), BACKEND, 960, 5000, "ew-sidecar",
                    33)]),
    }
    run = Run()
    with run.pair:
        for which in order:
            for r in pieces(which):
                run.batch([r.replace(mesh=hops.get(which))])
            if restart:
                run.restart()
        row = check(run)
        [conn] = conns_of(run.pair.ref)
    assert [(s.observer, [h.hop for h in s.hops]) for s in conn.mesh or ()] == [
        ("client", ["app-proxy", "proxy-proxy"]), ("server", ["proxy-proxy", "proxy-app"])]
    assert row["mesh"] is not None and not row["byte_mismatch"]
