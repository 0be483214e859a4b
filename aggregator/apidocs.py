"""The interactive API docs, `/docs` (Swagger UI) and `/redoc` (ReDoc), with every asset served
by the aggregator itself.

Stage: API boundary. In: GET `/docs`, `/redoc`, `/docs/assets/*`. Out: the two pages, which load
only same-origin URLs: Swagger UI's bundle and stylesheet, ReDoc's standalone bundle and a
favicon from `/docs/assets/`, and the spec from `/openapi.json`.

Why: FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc's fonts from Google), so
on an air-gapped network, where many clusters are, `/docs` stayed blank. The assets come from
the `fastapi-offline` PyPI package (a dependency in pyproject.toml: Swagger UI 5, which renders
the OpenAPI 3.1 that FastAPI writes, and ReDoc 2), so every install of eastwest has them; the
pages are FastAPI's, pointed at those files. Swagger UI's online validator badge (a request to
validator.swagger.io carrying the spec's URL) is turned off.

Auth: like the dashboard's page, the docs and their assets hold no data and need no token; the
"Try it out" requests carry the bearer token the reader enters (Authorize).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"
ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
SWAGGER_PARAMETERS = {"validatorUrl": None}  # no request to validator.swagger.io


def install(app: FastAPI) -> None:
    """Serve /docs and /redoc from local assets; the app must be built with docs_url=None and
    redoc_url=None (FastAPI's CDN pages)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    spec = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{spec}", title=f"{app.title}: API (Swagger UI)",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png", oauth2_redirect_url=None,
            swagger_ui_parameters=SWAGGER_PARAMETERS)

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{spec}", title=f"{app.title}: API (ReDoc)",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False)
