"""A NodePort call's three pieces, through a real pipeline into every store backend: ONE stored
connection and one graph edge whatever the order, an aggregator restart between any two pieces
included (the connections reloaded from the store, the NodePort aliases learnt again from its
stored middle records: aggregator/worker.py `relearn_nat`). A merged half's row is deleted and
its rollup volumes move: the graph has no node address as a workload (docs/aggregator.md,
"NodePort")."""

from __future__ import annotations

import itertools

import pytest

from aggregator.store.query import ConnectionQuery
from tests.unit.test_correlate_nodeport import BACKEND, CLIENT, NODE, pieces
from tests.unit.test_store_connections import data_dir, edge, opened  # noqa: F401 - a fixture

ORDERS = list(itertools.permutations(("client", "server", "middle")))
HOST = {"client": "h1", "middle": "h2", "server": "h3"}


@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_one_stored_connection_and_one_edge_across_restarts(data_dir, order):  # noqa: F811
    s = opened(data_dir)
    try:
        for which in order:
            for seq, r in enumerate(pieces(which), start=1):
                s.ingest(HOST[which], seq, [r])
            s.flush()
            s.close()
            s = opened(data_dir)
        assert s.connection_count() == 1
        [row] = s.read().connections(ConnectionQuery(limit=10))
        assert (row["client_ip"], row["server_ip"], row["server_port"]) == (
            CLIENT.ip, BACKEND.ip, BACKEND.port)
        assert (row["service_ip"], row["service_port"]) == (NODE.ip, NODE.port)
        assert row["observed_by"] == ",client,path,server,"
        edges = edge(s)
        assert list(edges) == [("shop/frontend", "process:ew-web")], edges
        e = edges[("shop/frontend", "process:ew-web")]
        assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (1, 1000, 5000)
    finally:
        s.close()
