"""The graph holds back a NodePort call's halves while the middle host's record may still join
them (aggregator/nodeport_graph.py; docs/aggregator.md, "NodePort calls with masquerade"): in
every order of the three pieces, after every piece, a graph whose window ends now has no node
address as a workload; once the pieces are joined it has the one call. A half that started
`hold` or more before now is shown as what it is (never hidden longer than the hold), an edge
with anything else in the window is shown whole, and a hold of 0 or a past window changes
nothing. Through a real pipeline into every store backend."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from aggregator.graph import Window, graph_data
from aggregator.identity import IdentityResolver, StaticMap
from aggregator.store import open_store
from eastwest.record import Endpoint
from tests.unit.pipes import Driven, driven
from tests.unit.test_correlate_nodeport import NODE, SEEN, T0, piece, pieces
from tests.unit.test_store_connections import data_dir  # noqa: F401 - a fixture

# frontend's client, and h2 by both its underlay address (the NodePort) and its gateway on the
# pod network (the masquerade's source: the lab names it so, docs/lab.md)
MAP = StaticMap([
    {"match": "10.244.1.11/32", "name": "frontend", "namespace": "shop", "host": "h1"},
    {"match": f"{NODE.ip}/32", "name": "node-h2", "kind": "Node", "host": "h2"},
    {"match": f"{SEEN.ip}/32", "name": "node-h2", "kind": "Node", "host": "h2"},
])
HOST = {"client": "h1", "middle": "h2", "server": "h3"}
HOLD = timedelta(seconds=5)
WINDOW = Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5))
JOINED = ("shop/frontend", "process:ew-web")
CLIENT_HALF = ("shop/frontend", "node-h2")
SERVER_HALF = ("node-h2", "process:ew-web")


def opened(backend_dir) -> Driven:
    backend, path = backend_dir
    return driven(open_store(backend, path), IdentityResolver(MAP))


def graph(s: Driven, *, after: float = 1.0, hold: timedelta = HOLD, window: Window = WINDOW,
          group_by: str = "workload") -> tuple[set[str], dict[tuple[str, str], dict]]:
    """Nodes and edges of the graph read `after` seconds after the call started."""
    g = graph_data(s.read(), window, group_by=group_by, nodeport_hold=hold,
                   now=T0 + timedelta(seconds=after)).graph()
    return set(g.nodes), {(u, v): a for u, v, a in g.edges(data=True)}


@pytest.mark.parametrize("order", list(itertools.permutations(("client", "server", "middle"))),
                         ids=">".join)
def test_no_half_is_drawn_while_it_can_be_joined_in_any_order(data_dir, order):  # noqa: F811
    s = opened(data_dir)
    try:
        seq = itertools.count(1)
        for i, which in enumerate(order):
            s.ingest(HOST[which], next(seq), pieces(which))
            for group_by in ("workload", "service", "namespace"):
                nodes, edges = graph(s, group_by=group_by)
                assert "node-h2" not in nodes, (order[:i + 1], group_by, edges)
            _, edges = graph(s)
            seen = order[:i + 1]
            # the call as joined so far (its backend named by the server's process once that came)
            joined = {JOINED if "server" in seen else (JOINED[0], "external:10.244.3.13")}
            if "middle" not in seen:
                joined = set()
            elif seen == ("middle",):  # the middle record alone: the call, as its wire saw it
                joined = {("shop/frontend", "external:10.244.3.13")}
            assert set(edges) == joined, (seen, edges)
            unheld = graph(s, hold=timedelta(0))[1]  # as stored: the halves are edges
            assert set(unheld) == (joined if "middle" in seen else
                                   {e for w, e in (("client", CLIENT_HALF), ("server", SERVER_HALF))
                                    if w in seen})
        _, edges = graph(s)
        assert edges[JOINED]["connections_opened"] == 1
        assert edges[JOINED]["observed_by"] == {"client,path,server": 1}
    finally:
        s.close()


def test_a_half_is_shown_once_it_started_the_hold_ago(data_dir):  # noqa: F811
    """The client's half started at T0, the server's 0.8 s later (`pieces`): at T0 + 5.5 s the
    client's is 5.5 s old (shown, an unjoined call as it is) and the server's 4.7 s (held); at
    T0 + 5.8 s both are shown. A window that ended before now - hold holds nothing back."""
    s = opened(data_dir)
    try:
        s.ingest("h1", 1, pieces("client"))
        s.ingest("h3", 1, pieces("server"))
        assert set(graph(s, after=4.9)[1]) == set()
        nodes, edges = graph(s, after=5.5)
        assert set(edges) == {CLIENT_HALF} and "node-h2" in nodes
        assert set(graph(s, after=5.8)[1]) == {CLIENT_HALF, SERVER_HALF}
        past = Window(T0 - timedelta(minutes=5), T0 - timedelta(seconds=4))  # until <= now - hold
        s.ingest("h1", 2, [piece("client", final=True, client=Endpoint("10.244.1.11", 39000),
                                 start=T0 - timedelta(seconds=60))])
        got = graph(s, after=1.0, window=past)
        assert got == graph(s, after=1.0, window=past, hold=timedelta(0))
        assert got[1][CLIENT_HALF]["connections_opened"] == 1  # the old half, as stored
    finally:
        s.close()


def test_an_edge_with_other_connections_is_shown_whole(data_dir):  # noqa: F811
    """A held half on an edge that also has a call that is no half (an older unjoined half
    here, started before the hold): the edge is drawn with both, the half counted."""
    s = opened(data_dir)
    try:
        s.ingest("h1", 1, pieces("client"))
        s.ingest("h1", 2, [piece("client", final=True, client=Endpoint("10.244.1.11", 39000),
                                 start=T0 - timedelta(seconds=30))])
        _, edges = graph(s)
        assert edges[CLIENT_HALF]["observed_by"] == {"client": 2}
        assert edges[CLIENT_HALF]["connections_opened"] == 2
    finally:
        s.close()


def test_a_half_seen_by_a_wire_only_is_held_too(data_dir):  # noqa: F811
    """The backend's host's wire sees the server's half (node's address -> backend) when its
    socket probe missed the call (started mid-call): no client socket, a client of kind Node.
    Held as the socket halves are, joined by the middle record as they are."""
    s = opened(data_dir)
    try:
        wire = [r.replace(observer="path", source="vxlan", process=None, connect=None)
                for r in pieces("server")]
        s.ingest("h3", 1, wire)
        assert graph(s) == (set(), {})
        assert set(graph(s, hold=timedelta(0))[1]) == {("node-h2", "external:10.244.3.13")}
        s.ingest("h2", 1, pieces("middle"))
        _, edges = graph(s, hold=timedelta(0))
        assert set(edges) == {("shop/frontend", "external:10.244.3.13")}
        assert edges[("shop/frontend", "external:10.244.3.13")]["observed_by"] == {"path": 1}
    finally:
        s.close()


def test_the_client_half_is_held_only_on_a_port_of_the_clusters_nodeport_range(data_dir):  # noqa: F811
    """`--nodeport-range`: a cluster whose kube-apiserver has another
    --service-node-port-range. A call to a node seen by its client only is a half to hold when
    its port is in the range; on a port outside it, it is a call to the node itself, shown."""
    s = opened(data_dir)
    port = NODE.port
    try:
        s.ingest("h1", 1, pieces("client"))

        def edges(ports: tuple[int, int]) -> set[tuple[str, str]]:
            g = graph_data(s.read(), WINDOW, nodeport_hold=HOLD, now=T0 + timedelta(seconds=1),
                           nodeport_ports=ports).graph()
            return set(g.edges)

        assert edges((30000, 32767)) == set()             # the default range holds it
        assert edges((port, port)) == set()
        assert edges((port + 1, port + 100)) == {CLIENT_HALF}  # not a NodePort here: shown
        assert edges((1, port - 1)) == {CLIENT_HALF}
    finally:
        s.close()
