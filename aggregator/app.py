"""The aggregator's HTTP application: a FastAPI factory.

In:  `AggregatorSettings` (the pipeline, aggregator/pipeline.py, is built from them; tests may
hand a store or a whole pipeline).  Out: a FastAPI app with
- `POST /api/v1/ingest` (aggregator/ingest.py; ingest token)
- `GET /api/v1/records` raw stored records by time range (read token); the correlated flows,
  graph and query API arrive with the aggregator issue (#6) on this same app and store
- `/healthz`, `/readyz`, `/metrics` (Prometheus text, no token: counts only; self-metrics and
  the per-edge series of aggregator/exporters/prometheus.py), `/openapi.json`,
  `/docs` and `/redoc` (aggregator/apidocs.py: their assets served here, no CDN); the
  dashboard at `/` (aggregator/webui.py, docs/web.md).

Errors are JSON `{"detail": ...}`. Request validation errors are 400 (not FastAPI's 422) and name
the parameter. Nothing a client sends produces a 500: the store's failures become 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from aggregator.api import install as install_query_api
from aggregator.api.graph import TIME_HELP
from aggregator.api.params import check_names, positive_int
from aggregator.apidocs import install as install_api_docs
from aggregator.auth import Authenticator, require_read
from aggregator.ingest import router as ingest_router
from aggregator.intake import MAX_COLLECTOR_LEN
from aggregator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from aggregator.pipeline import METRICS_WAIT_S, Pipeline
from aggregator.pipeline import build as build_pipeline
from aggregator.settings import AggregatorSettings
from aggregator.store import Store, StoreError
from aggregator.store.query import RecordQuery
from aggregator.webui import install as install_web
from eastwest import __version__
from eastwest.codec import Batch
from eastwest.errors import ConfigError
from eastwest.filters import parse_time

MAX_RECORDS_PAGE = 100_000


def create_app(settings: AggregatorSettings, store: Store | None = None, *,
               pipeline: Pipeline | None = None) -> FastAPI:
    """The app over the pipeline (aggregator/pipeline.py) built from `settings` (or the one
    given, tests); `store`: a store opened by the caller (closed by the caller too)."""
    pipe = pipeline or build_pipeline(settings, store=store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pipe.start()  # the exporters' ticker, the NATS consumer
        yield
        await run_in_threadpool(pipe.stop)  # correlate what was acknowledged, tell, close

    app = FastAPI(title="eastwest aggregator", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # served from local assets: install_api_docs
                  description="Ingest of flow-record batches from eastwest collectors, and the "
                  "read API. Tokens: ingest token for POST /api/v1/ingest, read token for reads "
                  "(Authorization: Bearer TOKEN).")
    metrics = pipe.metrics
    app.state.settings = settings
    app.state.pipeline = pipe
    app.state.drops = pipe.drops
    app.state.metrics = metrics
    app.state.auth = Authenticator(settings)
    app.state.graph_cache = {}
    install_query_api(app)  # graph, flows, stream, diff, workloads: reads only

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts, names = [], []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            where = ".".join(str(x) for x in loc if x not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
            if len(loc) == 2 and loc[0] in ("query", "path"):
                names.append(str(loc[1]))
        body: dict[str, Any] = {"detail": "; ".join(parts) or "bad request"}
        if names:  # like every other 400 of a parameter: which one (the first)
            body["parameter"] = names[0]
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StoreError)
    async def _store_down(_req: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": f"store unavailable: {exc}"}, status_code=503,
                            headers={"Retry-After": "1"})

    app.include_router(ingest_router)

    @app.get("/api/v1/records", dependencies=[Depends(require_read)],
             summary="Raw stored flow records whose end is in [since, until), oldest first")
    def records(request: Request,
                since: str | None = Query(None, description=f"end at or after: {TIME_HELP}"),
                until: str | None = Query(None, description=f"end before: {TIME_HELP}"),
                collector: str | None = Query(None, description="only this collector's records"),
                limit: str | None = Query(None, description=f"at most this many, "
                                          f"1..{MAX_RECORDS_PAGE} (default 1000)")) -> Response:
        check_names(request, {"since", "until", "collector", "limit"}, filters=False)
        now = datetime.now(UTC)
        t0 = parse_time("since", since, now) if since is not None else None
        t1 = parse_time("until", until, now) if until is not None else None
        if t0 is not None and t1 is not None and t0 >= t1:
            raise ConfigError("since", since, f"must be before until ({t1.isoformat()})")
        if collector is not None and not 1 <= len(collector) <= MAX_COLLECTOR_LEN:
            raise ConfigError("collector", collector,
                              f"a collector name has 1..{MAX_COLLECTOR_LEN} characters")
        size = positive_int("limit", limit, 1000, MAX_RECORDS_PAGE)
        recs = pipe.read().records(RecordQuery(t0, t1, collector, size))
        return Response(msgspec.json.encode({"records": recs, "count": len(recs)}),
                        media_type="application/json")

    @app.get("/healthz", summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The store is open and answering")
    def readyz() -> dict[str, Any]:
        return {"status": "ready", "records": pipe.correlation.count()}

    @app.get("/metrics", summary="Prometheus self-metrics", response_class=Response)
    def prometheus() -> Response:
        pipe.correlation.applied(METRICS_WAIT_S)  # gauges include what was acknowledged
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    install_api_docs(app)  # /docs and /redoc, their assets served here (no CDN)
    install_web(app)  # the dashboard (web/dist) at /, or a page saying how to build it

    _add_batch_schema(app)
    return app


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
