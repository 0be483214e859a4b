"""Serves the dashboard's built assets (web/dist, made by scripts/setup-web.sh) at `/`.

Stage: API boundary. In: GET `/` and `/assets/*`. Out: the page and its hashed assets, or, when
the dashboard was never built, a 503 page that says how to build it (never a 500, never a
silent redirect).

Auth: the page and its assets hold no data, so they are served without a token; every number
on the page comes from the read API, which needs the read token as a bearer header (RFC 6750).
The page asks for it once (login dialog, or a `#token=` fragment, which browsers never send to
a server) and keeps it in the tab's sessionStorage. docs/web.md.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

WEB_DIST_ENV = "EASTWEST_WEB_DIST"
DEFAULT_DIST = Path(__file__).resolve().parent.parent / "web" / "dist"

NOT_BUILT = """<!doctype html><meta charset="utf-8"><title>eastwest: dashboard not built</title>
<body style="font:15px system-ui,sans-serif;max-width:640px;margin:60px auto;line-height:1.5">
<h1>The dashboard is not built</h1>
<p>The aggregator is running, but it found no built dashboard in <code>{dist}</code>.</p>
<p>Build it with <code>make setup</code> (or <code>bash scripts/setup-web.sh</code>; it needs
Node.js 20+ and npm), then reload this page. Point the aggregator elsewhere with
<code>{env}=/path/to/dist</code>.</p>
<p>The API works without it: <a href="/docs">/docs</a>, and the <code>eastwest</code> command.</p>
</body>"""


def dist_dir() -> Path:
    return Path(os.environ.get(WEB_DIST_ENV) or DEFAULT_DIST)


def install(app: FastAPI, dist: Path | None = None) -> None:
    where = dist or dist_dir()
    index = where / "index.html"
    assets = where / "assets"
    if assets.is_dir():
        # hashed file names: cacheable for ever; the page itself is not cached
        app.mount("/assets", StaticFiles(directory=assets), name="web-assets")

    @app.get("/", include_in_schema=False, response_model=None)
    def dashboard() -> Response:
        if not index.is_file():
            return HTMLResponse(NOT_BUILT.format(dist=html.escape(str(where)), env=WEB_DIST_ENV),
                                status_code=503, headers={"Retry-After": "60"})
        return FileResponse(index, media_type="text/html",
                            headers={"Cache-Control": "no-cache",
                                     "Content-Security-Policy": "default-src 'self'; "
                                     "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                     "object-src 'none'; frame-ancestors 'none'"})
