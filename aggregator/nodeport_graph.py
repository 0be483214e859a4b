"""NodePort halves on the graph of a window ending now: an edge made only of halves that the
middle host's record may still join is held back.

Stage: query side, between the store's edges (aggregator/graph_edges.py `GraphData`) and the
API (aggregator/graph.py `graph_data`), before the DNS names, the budget and the mesh. In: the
window's `GraphData`, the store, the query, the time now and the hold (`--nodeport-hold`);
the window's connections that look like unjoined NodePort halves and started within the hold
(`ConnectionQuery(halves_since=now - hold)`, aggregator/store/sql.py `nodeport_half`). Out: the
same `GraphData` without the edges ALL of whose connections in the window are such halves, and
without the nodes only those edges had.

Why (docs/aggregator.md, "NodePort calls with masquerade"): a NodePort call with masquerade is
three pieces on three hosts; the correlator joins them into one connection whatever their order
(aggregator/nodeport.py), but a half that arrives before the middle host's record is a
connection of its own until then: `client -> node:30080` (the client's host) and `node's
address -> backend` (the backend's host), drawn as a node that is no workload of the call.
Which half and for how long depends on when each collector's batch arrives, so the rule looks at
what the store holds now, not at arrival order: a half is held while it started less than the
hold ago (the middle host's collector reports the translated leg at its first tick; its batch
arrives a second or two later), and only on an edge that has nothing else in the window. So:

- a real edge is never hidden longer than the hold: once its oldest connection in the window
  started more than the hold ago it is shown (an unjoined half then is what it is: a call the
  middle host's collector did not report, shown as such);
- an edge with any other connection (a joined call, a call that is no half) is shown whole, its
  held halves counted as they are;
- a window that ends the hold or more before now has nothing held (nothing in it started
  within the hold), so past windows are exact as stored.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import msgspec

from aggregator.graph_edges import GraphData, JsonEdge, ends_of
from aggregator.store.base import ReadStore
from aggregator.store.query import NODEPORT_RANGE, ConnectionQuery, EdgeQuery

CONN_LIMIT = 200_000  # held halves read per graph (as aggregator/mesh_graph.py)
COLUMNS = ("conn_id", "client_wid", "server_wid", "client_namespace", "server_namespace",
           "client_host", "server_host", "service_ip")
_dec = msgspec.json.Decoder()


def hold_halves(data: GraphData, store: ReadStore, q: EdgeQuery, now: datetime,
                hold: timedelta, ports: tuple[int, int] = NODEPORT_RANGE) -> int:
    """Drop the edges made only of unjoined NodePort halves younger than `hold` (the module
    docstring; `ports`: the cluster's NodePort range); returns how many edges were held back."""
    if hold <= timedelta(0) or q.until <= now - hold or not data.edges:
        return 0
    rows = store.connections(ConnectionQuery(filter=q.filter, since=q.since, until=q.until,
                                             limit=CONN_LIMIT, columns=COLUMNS,
                                             halves_since=now - hold, halves_ports=ports))
    if not rows:
        return 0
    held = Counter(ends for r in rows if (ends := ends_of(r, data.group_by)) is not None)
    keep: list[JsonEdge] = []
    gone: list[JsonEdge] = []
    for e in data.edges:
        n = held.get((e[0], e[1]), 0)
        # the edge's connections in the window: its observer sets' counts add up to them
        if n and n >= sum(_dec.decode(e[2])["observed_by"].values()):
            gone.append(e)
        else:
            keep.append(e)
    if not gone:
        return 0
    used = {n for e in keep for n in (e[0], e[1])}
    for e in gone:
        for node in (e[0], e[1]):
            if node not in used:
                data.nodes.pop(node, None)
    data.edges = keep
    return len(gone)
