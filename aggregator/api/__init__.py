"""The query API of the aggregator (issue #6): graph, workloads, flows, live stream, diff.

`install(app, settings)` wraps the app's store in the correlating store (aggregator/correlating.py),
builds the identity resolver from the settings, and adds the routes. A `ConfigError` (a bad
parameter, named with its value) becomes a 400. Response fields: docs/api.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aggregator.correlate import Correlator
from aggregator.correlating import MAX_PENDING, CorrelatingStore
from aggregator.identity import IdentityResolver, StaticMap, parse_cidr_groups, system_reverse_dns
from eastwest.errors import ConfigError


def resolver_from(settings: Any) -> IdentityResolver:
    static = StaticMap.load(settings.workload_map) if getattr(settings, "workload_map", None) else None
    sources = []
    if getattr(settings, "k8s_api", None):
        from aggregator.k8s import KubernetesIdentity

        sources.append(KubernetesIdentity.connect(settings.k8s_api,
                                                  token=getattr(settings, "k8s_token", None)))
    return IdentityResolver(static, sources, parse_cidr_groups(getattr(settings, "cidr_groups", ())),
                            system_reverse_dns if getattr(settings, "reverse_dns", False) else None)


def install(app: FastAPI, settings: Any, resolver: IdentityResolver | None = None) -> CorrelatingStore | None:
    st = app.state
    if not hasattr(st.store, "recent_connections"):
        return None  # a raw-only store (a test fake of ingest): no correlation, no query routes
    correlator = Correlator(resolver or resolver_from(settings),
                            slack=timedelta(seconds=getattr(settings, "correlation_slack_s", 5.0)),
                            settle=timedelta(seconds=getattr(settings, "identity_settle_s", 10.0)))
    store = CorrelatingStore(st.store, correlator, st.drops,
                             retention=getattr(settings, "retention", None),
                             max_pending=getattr(settings, "correlation_backlog", MAX_PENDING))
    st.store = store
    st.edge_budget = getattr(settings, "edge_budget", 2000)
    st.graph_cache = {}
    if hasattr(st, "metrics"):
        st.metrics.registry.register(_CorrelationCollector(store))
    _routes(app)
    return store


class _CorrelationCollector(Collector):
    def __init__(self, store: CorrelatingStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("eastwest_correlator_connections", "connections held by the "
                                "correlator's index (open, or closed in the last minutes)",
                                value=len(self.store.correlator))
        yield GaugeMetricFamily("eastwest_stream_subscribers", "live flow stream subscribers",
                                value=self.store.hub.subscribers)
        corr = self.store.correlator
        yield CounterMetricFamily("eastwest_identity_renames", "ends of connections renamed by "
                                  "a later observer that knew them better (the server's own "
                                  "process, say); their volumes moved to the new name",
                                  value=corr.renames)
        yield CounterMetricFamily("eastwest_identity_late_names", "records that knew an end "
                                  "better after its name was final (--identity-settle): the "
                                  "name was kept", value=corr.late_names)


def _routes(app: FastAPI) -> None:

    @app.exception_handler(ConfigError)
    async def _bad_parameter(_req: Request, exc: ConfigError) -> JSONResponse:
        # the filter language names CLI flags (`--not --port`); the API names its parameters
        name = exc.key.replace("--not --", "not_").removeprefix("--").replace("-", "_")
        return JSONResponse({"detail": f"{name}={exc.value!r}: {exc.reason}", "parameter": name},
                            status_code=400)

    from aggregator.api import flows, graph, workloads

    app.include_router(graph.router)
    app.include_router(workloads.router)
    app.include_router(flows.router)
