"""The aggregator serves the dashboard at / (aggregator/webui.py): the built page and its assets
without a token (they hold no data), the API still behind the read token, and a 503 page that
says how to build the dashboard when web/dist is missing (never a 500)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from aggregator.webui import WEB_DIST_ENV

INGEST, READ = "i" * 24, "r" * 24


@pytest.fixture
def settings(tmp_path):
    return AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST, read_token=READ,
                              retention=None)


def test_missing_build_is_a_page_that_says_how_to_build_it(settings, tmp_path, monkeypatch):
    monkeypatch.setenv(WEB_DIST_ENV, str(tmp_path / "no-dist"))
    with TestClient(create_app(settings)) as c:
        r = c.get("/")
    assert r.status_code == 503 and r.headers["content-type"].startswith("text/html")
    assert "make setup" in r.text and "scripts/setup-web.sh" in r.text
    assert str(tmp_path / "no-dist") in r.text


def test_built_page_and_assets_are_served_and_the_api_keeps_its_token(settings, tmp_path, monkeypatch):
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>eastwest</title>"
                                     "<script type=module src=/assets/app-1.js></script>")
    (dist / "assets" / "app-1.js").write_text("console.log('map')")
    monkeypatch.setenv(WEB_DIST_ENV, str(dist))
    with TestClient(create_app(settings)) as c:
        page = c.get("/")
        asset = c.get("/assets/app-1.js")
        api = c.get("/api/v1/graph")
        missing = c.get("/assets/nope.js")
    assert page.status_code == 200 and "<title>eastwest</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert asset.status_code == 200 and asset.text == "console.log('map')"
    assert missing.status_code == 404
    assert api.status_code == 401  # the page is open, the data is not
