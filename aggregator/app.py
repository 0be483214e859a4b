"""The aggregator's HTTP application: a FastAPI factory.

In:  `AggregatorSettings` and (optionally, for tests) a `FlowStore`.  Out: a FastAPI app with
- `POST /api/v1/ingest` (aggregator/ingest.py; ingest token)
- `GET /api/v1/records` raw stored records by time range (read token); the correlated flows,
  graph and query API arrive with the aggregator issue (#6) on this same app and store
- `/healthz`, `/readyz`, `/metrics` (Prometheus text, no token: counts only; self-metrics and
  the per-edge series of aggregator/exporters/prometheus.py), `/openapi.json`,
  `/docs`; the dashboard at `/` (aggregator/webui.py, docs/web.md).

Errors are JSON `{"detail": ...}`. Request validation errors are 400 (not FastAPI's 422) and name
the parameter. Nothing a client sends produces a 500: the store's failures become 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

from aggregator.api import install as install_query_api
from aggregator.auth import Authenticator, require_read
from aggregator.exporters import install as install_exporters
from aggregator.ingest import router as ingest_router
from aggregator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from aggregator.metrics import AggregatorMetrics
from aggregator.settings import AggregatorSettings
from aggregator.store import FlowStore, StoreError, open_store
from aggregator.webui import install as install_web
from eastwest import __version__
from eastwest.codec import Batch
from eastwest.drops import Drops

MAX_RECORDS_PAGE = 100_000
METRICS_FLUSH_S = 5.0  # a scrape waits at most this long for correlation to catch up


def create_app(settings: AggregatorSettings, store: FlowStore | None = None) -> FastAPI:
    owned = store is None
    the_store: FlowStore = store if store is not None else open_store(
        settings.store, getattr(settings, "clickhouse_url", None) or settings.data_dir)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        exporters = getattr(_app.state, "exporters", None)
        if exporters is not None:
            exporters.start()
        consumer = None
        if getattr(settings, "nats", None) is not None:  # NATS JetStream intake (issue #10)
            from aggregator.consume import ConsumerSettings, JetStreamConsumer

            consumer = JetStreamConsumer(ConsumerSettings(
                settings.nats, settings.nats_durable, settings.nats_ack_wait_s), _app.state)
            _app.state.consumer = consumer
            consumer.start()
        yield
        if consumer is not None:
            consumer.stop()
        flush = getattr(_app.state.store, "flush", None)
        if flush is not None:  # correlate what was acknowledged, so exporters are told of it
            await run_in_threadpool(flush, 30.0)
        if exporters is not None:
            exporters.shutdown()  # closed connections told, OTLP queue drained
        if owned:  # the correlating store stops its worker, then closes the store
            _app.state.store.close()

    app = FastAPI(title="eastwest aggregator", version=__version__, lifespan=lifespan,
                  description="Ingest of flow-record batches from eastwest collectors, and the "
                  "read API. Tokens: ingest token for POST /api/v1/ingest, read token for reads "
                  "(Authorization: Bearer TOKEN).")
    drops = Drops()
    metrics = AggregatorMetrics(drops)
    # through app.state.store: the correlating store counts what is journaled, not applied yet
    metrics.watch_store(lambda: app.state.store.count(),
                        getattr(the_store, "file_bytes", lambda: 0))
    app.state.settings = settings
    app.state.store = the_store
    app.state.drops = drops
    app.state.metrics = metrics
    app.state.auth = Authenticator(settings)
    install_query_api(app, settings)  # correlation, graph, flows, stream, diff (issue #6)
    install_exporters(app, settings)  # Prometheus edge series, OTLP (issue #7)
    if hasattr(app.state.store, "lag"):
        metrics.registry.register(_CorrelationLag(app.state.store))
        _tick_after_flush(app)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "bad request"}, status_code=400)

    @app.exception_handler(StoreError)
    async def _store_down(_req: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": f"store unavailable: {exc}"}, status_code=503,
                            headers={"Retry-After": "1"})

    app.include_router(ingest_router)

    @app.get("/api/v1/records", dependencies=[Depends(require_read)],
             summary="Raw stored flow records whose end is in [since, until), oldest first")
    def records(since: datetime | None = None, until: datetime | None = None,
                collector: str | None = Query(None, max_length=253),
                limit: int = Query(1000, ge=1, le=MAX_RECORDS_PAGE)) -> Response:
        for name, value in (("since", since), ("until", until)):
            if value is not None and value.tzinfo is None:
                raise HTTPException(400, f"{name}={value.isoformat()}: give a time zone (e.g. Z)")
        recs = app.state.store.records(since, until, collector=collector, limit=limit)
        return Response(msgspec.json.encode({"records": recs, "count": len(recs)}),
                        media_type="application/json")

    @app.get("/healthz", summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The store is open and answering")
    def readyz() -> dict[str, Any]:
        return {"status": "ready", "records": app.state.store.count()}

    @app.get("/metrics", summary="Prometheus self-metrics", response_class=Response)
    def prometheus() -> Response:
        flush = getattr(app.state.store, "flush", None)
        if flush is not None:  # gauges of correlation include what was acknowledged
            flush(METRICS_FLUSH_S)
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    install_web(app)  # the dashboard (web/dist) at /, or a page saying how to build it

    _add_batch_schema(app)
    return app


def _tick_after_flush(app: FastAPI) -> None:
    """Correlation runs behind the acknowledged store (aggregator/correlating.py): an exporter
    tick (its thread, a test, shutdown) first waits for it, so it tells of every acknowledged
    connection."""
    ex = getattr(app.state, "exporters", None)
    if ex is None:
        return
    tick, flush = ex.tick, app.state.store.flush

    def tick_after_flush(*args: Any, **kwargs: Any) -> Any:
        flush(METRICS_FLUSH_S)
        return tick(*args, **kwargs)

    ex.tick = tick_after_flush


class _CorrelationLag(Collector):
    """How far correlation runs behind the acknowledged raw store (aggregator/correlating.py)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = self.store.lag()
        for key, what in (("batches", "batches"), ("records", "records"),
                          ("seconds", "age in seconds of the oldest")):
            yield GaugeMetricFamily(f"eastwest_correlation_lag_{key}", f"{what} acknowledged "
                                    "(stored durably) and not correlated yet", value=lag[key])
        journal = getattr(self.store, "journal_bytes", None)
        if journal is not None:
            yield GaugeMetricFamily("eastwest_journal_bytes", "bytes of the ingest journal: "
                                    "batches acknowledged and not applied to the store yet",
                                    value=journal())


def _add_batch_schema(app: FastAPI) -> None:
    """Put the JSON batch schema (from the msgspec model, the one source of truth) into the
    OpenAPI components, so clients and schemathesis know the JSON ingest body."""

    class JsonBatch(Batch, frozen=True):
        pass

    (schema,), components = msgspec.json.schema_components(
        [JsonBatch], ref_template="#/components/schemas/{name}")
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = base()
        spec.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
