"""A DNS-named edge is counted from its connections by the store's edge-query rules
(aggregator/store/duckdb_edges.py WINDOW_COUNTS): failed is refused, timed out AND dropped, as
the workload edge it was split from counts them; resets apart."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from aggregator.dns_graph import _edge_of_rows
from aggregator.store.query import EdgeQuery

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def row(outcome: str, i: int) -> dict:
    start = T0 + timedelta(seconds=i)
    return {"start_ts": start, "closed": True, "closed_ts": start + timedelta(seconds=1),
            "last_seen": start + timedelta(seconds=1), "outcome": outcome, "byte_mismatch": False,
            "incomplete": False, "bytes_c2s": 10, "bytes_s2c": 20, "retransmits": 0,
            "packets_c2s": None, "packets_s2c": None, "rtt_min_us": None, "rtt_avg_us": None,
            "rtt_max_us": None, "server_port": 443, "protocol": "tcp", "observed_by": "client"}


def test_failed_counts_refused_timed_out_and_dropped_connections():
    outcomes = ["ok", "refused", "timeout", "dropped", "reset", "ok"]
    q = EdgeQuery(since=T0 - timedelta(minutes=1), until=T0 + timedelta(minutes=1))
    edge = _edge_of_rows("shop/frontend", "api.example.com",
                         [(row(o, i), None) for i, o in enumerate(outcomes)], q)
    got = json.loads(edge[2])
    assert (got["connections_opened"], got["connections_failed"], got["resets"]) == (6, 3, 1)
