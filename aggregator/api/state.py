"""What the read routes share: the pipeline's store (read after write) and the graph's cache.

Stage: API. In: the FastAPI app's state (aggregator/app.py: `pipeline`, `settings`,
`graph_cache`). Out: `reader(request)`, the store's read interface once every batch
acknowledged before the request is applied; graphs built through one function, so every route
applies the same budget and cache: `graph_data_for` (the edges as data, what GET /api/v1/graph
serialises) and `graph_for` (a networkx DiGraph, built only when a route analyses or renders).
The live graph (a window ending now) is cached per (window length, grouping, filter) until the
pipeline's version changes (a batch accepted or written), for at most a second.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import networkx as nx
from fastapi import Request

from aggregator.graph import GraphData, Window, graph_data
from aggregator.store.base import ReadStore
from eastwest.dns_filter import DnsEdgeFilter
from eastwest.filters import Filter

_cache_lock = threading.Lock()


def reader(request: Request) -> ReadStore:
    """The store's read interface, after every batch acknowledged before this request."""
    store: ReadStore = request.app.state.pipeline.read()
    return store


def graph_data_for(request: Request, win: Window, group_by: str, flt: Filter,
                   live: bool, dns: DnsEdgeFilter | None = None,
                   show_proxies: bool = False) -> GraphData:
    st = request.app.state
    budget = st.settings.edge_budget
    hold = timedelta(seconds=st.settings.nodeport_hold_s)
    store = reader(request)
    names = None
    if group_by == "service":
        from aggregator.api.params import service_names

        names = service_names(request)
    def compute() -> GraphData:
        return graph_data(store, win, group_by=group_by, flt=flt, budget=budget, dns=dns,
                          names=names, show_proxies=show_proxies, nodeport_hold=hold,
                          nodeport_ports=st.settings.nodeport_range)

    if not live:
        return compute()
    span = round((win.until - win.since).total_seconds(), 3)
    key: tuple[Any, ...] = (span, group_by, str(flt), dns, show_proxies)
    stamp = st.pipeline.version
    with _cache_lock:
        hit = st.graph_cache.get(key)
        # valid while nothing was ingested, and for at most a second of wall time
        if hit is not None and hit[0] == stamp and (datetime.now(UTC) - hit[1]).total_seconds() < 1:
            cached: GraphData = hit[2]
            return cached
    data = compute()
    with _cache_lock:
        if len(st.graph_cache) > 64:
            st.graph_cache.clear()
        st.graph_cache[key] = (stamp, datetime.now(UTC), data)
    return data


def graph_for(request: Request, win: Window, group_by: str, flt: Filter, live: bool) -> nx.DiGraph:
    return graph_data_for(request, win, group_by, flt, live).graph()
