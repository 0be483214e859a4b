"""What the read routes share: the store, the correlator, the settings, a cache of the live graph.

Stage: API. In: the FastAPI app's state (set up by `aggregator.api.install`). Out: graphs built
through one function, so every route applies the same budget and cache: `graph_data_for` (the
edges as data, what GET /api/v1/graph serialises) and `graph_for` (the same as a networkx
DiGraph, built from it only when a route analyses or renders the graph).
The live graph (a window ending now) is cached per (window length, grouping, filter) until the
next ingest commits: a dashboard polling every second does not rebuild it each time.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import networkx as nx
from fastapi import Request

from aggregator.graph import GraphData, Window, graph_data
from eastwest.filters import Filter

_cache_lock = threading.Lock()


def graph_data_for(request: Request, win: Window, group_by: str, flt: Filter,
                   live: bool) -> GraphData:
    st = request.app.state
    budget = st.edge_budget
    if not live:
        return graph_data(st.store, win, group_by=group_by, flt=flt, budget=budget)
    span = round((win.until - win.since).total_seconds(), 3)
    key: tuple[Any, ...] = (span, group_by, str(flt))
    stamp = st.store.correlator._commits
    with _cache_lock:
        hit = st.graph_cache.get(key)
        # valid while nothing was ingested, and for at most a second of wall time
        if hit is not None and hit[0] == stamp and (datetime.now(UTC) - hit[1]).total_seconds() < 1:
            return hit[2]
    data = graph_data(st.store, win, group_by=group_by, flt=flt, budget=budget)
    with _cache_lock:
        if len(st.graph_cache) > 64:
            st.graph_cache.clear()
        st.graph_cache[key] = (stamp, datetime.now(UTC), data)
    return data


def graph_for(request: Request, win: Window, group_by: str, flt: Filter, live: bool) -> nx.DiGraph:
    return graph_data_for(request, win, group_by, flt, live).graph()
