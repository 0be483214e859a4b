"""/docs (Swagger UI) and /redoc load nothing from another origin (an air-gapped network has no
CDN): every URL their pages reference is same-origin, and the aggregator answers each with the
asset itself (aggregator/apidocs.py)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings

INGEST, READ = "i" * 24, "r" * 24
# every URL a page can load: attributes and the Swagger UI config's `url: '...'`
URL_REFS = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']*)["']|\burl:\s*'([^']*)'""")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = AggregatorSettings(data_dir=tmp_path_factory.mktemp("docs") / "data",
                                  ingest_token=INGEST, read_token=READ, retention=None)
    with TestClient(create_app(settings)) as c:
        yield c


def refs(html: str) -> list[str]:
    return [a or b for a, b in URL_REFS.findall(html)]


@pytest.mark.parametrize("page, assets", [
    ("/docs", {"swagger-ui-bundle.js": "SwaggerUIBundle", "swagger-ui.css": ".swagger-ui"}),
    ("/redoc", {"redoc.standalone.js": "Redoc"}),
])
def test_the_docs_pages_load_only_same_origin_assets_that_are_served(client, page, assets):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = refs(r.text)
    assert urls, r.text
    assert not re.search(r"https?://", r.text), "the page names another origin"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
    assert "/openapi.json" in urls
    for name, marker in assets.items():
        url = f"/docs/assets/{name}"
        assert url in urls, (url, urls)
        got = client.get(url)
        assert got.status_code == 200, url
        assert len(got.content) > 10_000 and marker in got.text[:2_000_000], url
    for url in urls:  # the favicon and the spec too
        assert client.get(url).status_code == 200, url


def test_swagger_ui_is_a_version_that_renders_the_openapi_document(client):
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on (4 shows "Unable
    to render this definition"); and no request leaves for the online validator."""
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', bundle)
    assert version is not None and int(version[1]) >= 5, version
    assert '"validatorUrl": null' in client.get("/docs").text
