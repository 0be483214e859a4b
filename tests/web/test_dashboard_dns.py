"""The dashboard shows DNS, in a real headless Chromium against a real aggregator (uvicorn +
DuckDB) fed over its ingest API (no lab): the external server a client resolved is drawn by its
name (api.example.com, not external:203.0.113.7) and its edge panel says how many connections
the answers named within their TTL and after it, with the edge's flows; the edge to the resolver
shows its DNS (queries, NXDOMAIN, SERVFAIL, timeouts, latency, the names asked), every number
equal to the API's. Screenshots: test-artifacts/web/."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from eastwest import codec
from eastwest.codec import Batch
from tests.unit.test_dns_identity import API_A, RESOLVER, batches
from tests.web.conftest import (
    INGEST,
    READ,
    Aggregator,
    click_edge,
    open_dashboard,
    panel_numbers,
    shot,
    shown,
    wait_render,
)

FRONT = "process:ew-frontend"
_seq = itertools.count(1)


@pytest.fixture
def agg(tmp_path: Path):
    with Aggregator(tmp_path / "data", None) as a:
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
        for coll, recs in batches(t0):
            r = httpx.post(a.url + "/api/v1/ingest", content=codec.encode_batch(
                Batch(coll, next(_seq), t0, recs)), headers={
                    "Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE},
                timeout=30)
            assert r.status_code == 200 and not r.json()["rejected"], r.text
        yield a


def api_graph(agg) -> dict:
    r = httpx.get(agg.url + "/api/v1/graph", headers={"Authorization": f"Bearer {READ}"},
                  timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_resolver_edge_panel_shows_its_dns_and_the_resolved_name_is_a_node(agg, page):
    open_dashboard(page, agg.url, READ, group="workload")
    wait_render(page, 0)
    nodes, edges, _ = shown(page)
    assert "api.example.com" in nodes and f"external:{API_A}" in nodes  # the other client's
    assert (FRONT, "api.example.com") in edges
    assert not any(t == f"external:{API_A}" for s, t in edges if s == FRONT)
    want = next(e for e in api_graph(agg)["edges"] if e["target"] == f"external:{RESOLVER}")["dns"]

    click_edge(page, FRONT, f"external:{RESOLVER}")
    page.wait_for_selector("#edge-dns")
    got = panel_numbers(page)
    assert {k: got[f"dns_{k}"] for k in ("queries", "responses", "nxdomain", "servfail",
                                         "timeouts")} == {
        k: str(want[k]) for k in ("queries", "responses", "nxdomain", "servfail", "timeouts")}
    lat = want["latency_us"]
    assert got["dns_latency_us"] == f"{lat['min']} / {lat['avg']} / {lat['max']}"
    rows = page.eval_on_selector_all("#edge-dns-names tbody tr", """rs => rs.map(r =>
        [r.dataset.name, r.className, ...[...r.cells].map(c => c.textContent)])""")
    assert [r[0] for r in rows] == [n["name"] for n in want["names"]]
    fails = {r[0] for r in rows if r[1] == "fail"}
    assert fails == {"flaky.example.com", "gone.example.com"}  # SERVFAIL + timeout, NXDOMAIN
    shot(page, "dns-resolver-edge")

    click_edge(page, FRONT, "api.example.com")
    page.wait_for_selector("#edge-dns-named")
    named = page.eval_on_selector("#edge-dns-named", "p => [p.dataset.ttl, p.dataset.hint]")
    assert named == ["2", "1"]
    assert page.locator("#edge-dns").count() == 0
    # its flows are found although the stored name is the address
    page.wait_for_selector("#edge-flows table")
    assert page.locator("#edge-flows tbody tr").count() == 3
    shot(page, "dns-named-edge")
