"""The query API of the aggregator: graph, workloads, flows, live stream, diff, policy.

`install(app)` adds the read routes; they read the pipeline's store through `pipeline.read()`
(aggregator/pipeline.py: read-after-write, then the typed read interface). The read path never
builds the write path. A `ConfigError` (a bad parameter, named with its value) becomes a 400.
Response fields: docs/api.md.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from eastwest.errors import ConfigError


def install(app: FastAPI) -> None:

    @app.exception_handler(ConfigError)
    async def _bad_parameter(_req: Request, exc: ConfigError) -> JSONResponse:
        # the filter language names CLI flags (`--not --port`); the API names its parameters
        name = exc.key.replace("--not --", "not_").removeprefix("--").replace("-", "_")
        return JSONResponse({"detail": f"{name}={exc.value!r}: {exc.reason}", "parameter": name},
                            status_code=400)

    from aggregator.api import flows, graph, policy, status, workloads

    app.include_router(graph.router)
    app.include_router(workloads.router)
    app.include_router(flows.router)
    app.include_router(status.router)
    app.include_router(policy.router)
