"""The dashboard's states and live behaviour in a real headless Chromium, against a real
aggregator (uvicorn + DuckDB) fed over its ingest API with records made here (no lab needed):
nothing collected yet, a refused token, the ingest token instead of the read token, the
aggregator going away; live updates that add a workload without moving the ones already drawn;
the flows view's live tail; the dark theme. Screenshots: test-artifacts/web/."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from eastwest import codec
from eastwest.codec import Batch
from eastwest.record import Endpoint
from tests.unit.test_correlate import rec
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

MAP = """workloads:
- {match: 10.244.1.11/32, name: frontend, namespace: shop, host: h1}
- {match: 10.244.2.11/32, name: api, namespace: shop, host: h2}
- {match: 10.244.3.11/32, name: db, namespace: shop, host: h3}
"""
_seq = iter(range(1, 10**6))


@pytest.fixture
def agg(tmp_path: Path):
    (tmp_path / "map.yaml").write_text(MAP)
    with Aggregator(tmp_path / "data", str(tmp_path / "map.yaml")) as a:
        yield a


def send(agg, records) -> None:
    r = httpx.post(agg.url + "/api/v1/ingest",
                   content=codec.encode_batch(Batch("h1", next(_seq), datetime.now(UTC), records)),
                   headers={"Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE},
                   timeout=30)
    assert r.status_code == 200 and not r.json()["rejected"], r.text


def conn(cport: int, server: str = "10.244.2.11", port: int = 9090, **over):
    start = datetime.now(UTC) - timedelta(seconds=30)
    return rec("client", collector="h1", cport=cport, start=start,
               server=Endpoint(server, port), **over)


def test_empty_store_says_no_collector_has_sent_anything(agg, page):
    open_dashboard(page, agg.url, READ)
    wait_render(page, 0)
    assert page.get_attribute("#map", "data-state") == "empty"
    assert page.get_attribute("#notice", "data-state") == "no-data"
    assert "eastwest collector --aggregator" in page.text_content("#notice")
    shot(page, "state-no-collector-yet")


def test_refused_token_asks_again_and_the_read_token_opens_the_map(agg, page):
    send(agg, [conn(41000)])
    open_dashboard(page, agg.url, "not-the-token-0123456789")
    page.wait_for_selector("#login[open]")
    assert "refused this token" in page.text_content("#login-why")
    shot(page, "state-token-refused")
    page.fill("#login-token", READ)
    page.click("#login-submit")
    wait_render(page, 0)
    assert shown(page)[1] == [("shop/frontend", "shop/api")]
    # the token never stays in the address bar
    assert "token" not in page.url


def test_the_ingest_token_is_told_apart_from_the_read_token(agg, page):
    open_dashboard(page, agg.url, INGEST)
    page.wait_for_selector("#login[open]")
    assert "ingest token" in page.text_content("#login-why")


def test_unreachable_aggregator_says_what_to_do(agg, page):
    send(agg, [conn(41000)])
    open_dashboard(page, agg.url, READ)
    wait_render(page, 0)
    agg.__exit__(None, None, None)  # the aggregator goes away; the page polls every 5 s
    page.wait_for_selector("#notice[data-state=unreachable]", timeout=60_000)
    assert "make run" in page.text_content("#notice")
    assert page.get_attribute("#map", "data-state") == "error"
    shot(page, "state-aggregator-unreachable")


def test_live_update_adds_a_workload_without_moving_the_others(agg, page):
    send(agg, [conn(41000), conn(41001)])
    open_dashboard(page, agg.url, READ, group="workload")
    n = wait_render(page, 0)
    before = page.evaluate("Object.fromEntries(window.eastwest.cy.nodes().map(n => [n.id(), n.position()]))")
    assert set(before) == {"shop/frontend", "shop/api"}
    send(agg, [conn(41002, server="10.244.3.11", port=5432)])  # frontend -> db
    while "shop/db" not in shown(page)[0]:
        n = wait_render(page, n, timeout=60_000)  # the next live refresh (every 5 s)
    after = page.evaluate("Object.fromEntries(window.eastwest.cy.nodes().map(n => [n.id(), n.position()]))")
    assert {k: after[k] for k in before} == before
    assert page.evaluate("window.eastwest.rendered.full") is False
    assert shown(page)[1] == [("shop/frontend", "shop/api"), ("shop/frontend", "shop/db")]
    shot(page, "live-update-new-workload")


def test_flows_live_tail_shows_new_connections(agg, page):
    send(agg, [conn(41000)])
    open_dashboard(page, agg.url, READ, view="flows")
    page.wait_for_selector("#view-flows[data-loaded]")
    assert page.locator("#flow-table tbody tr").count() == 1
    page.fill("#flow-filter", "--to-workload db")
    page.click("#flow-tail")
    page.wait_for_selector("#flow-tail[data-connected='1']")
    send(agg, [conn(41005, server="10.244.3.11", port=5432), conn(41006)])  # only one is to db
    page.wait_for_selector("#flow-table tbody tr:has-text('shop/db')")
    assert page.locator("#flow-table tbody tr", has_text="shop/db").count() == 1
    assert page.locator("#flow-table tbody tr", has_text="shop/api").count() == 0
    shot(page, "flows-live-tail")


def test_dark_theme_is_kept_across_reloads(agg, page):
    send(agg, [conn(41000)])
    open_dashboard(page, agg.url, READ)
    wait_render(page, 0)
    before = page.get_attribute("html", "data-theme")
    page.click("#theme")
    after = page.get_attribute("html", "data-theme")
    assert {before, after} == {"light", "dark"}
    page.reload()
    assert page.get_attribute("html", "data-theme") == after
    shot(page, f"theme-{after}")


def test_an_encrypted_edge_is_dotted_labelled_and_its_panel_says_the_wire_saw_nothing_inside(
        agg, page):
    """The wire's record of IPsec ESP between two hosts (docs/vxlan.md "Encrypted traffic"):
    the map draws it dotted with a lock in its label, its panel says ESP and that the wire
    could not see inside; the application's edge beside it is drawn as ever."""
    start = datetime.now(UTC) - timedelta(seconds=30)
    esp = rec("path", collector="h1", source="pcap", start=start, protocol="esp",
              client=Endpoint("10.213.0.1", 0), server=Endpoint("10.213.0.2", 0),
              c2s=4000, s2c=3000, tunnel=None)
    send(agg, [conn(41000), esp])
    g = httpx.get(agg.url + "/api/v1/graph", headers={"Authorization": f"Bearer {READ}"},
                  timeout=30).json()
    api = {(e["source"], e["target"]): e for e in g["edges"]}
    hosts = ("external:10.213.0.1", "external:10.213.0.2")
    assert api[hosts]["encrypted"] == "esp" and "encrypted" not in api[("shop/frontend", "shop/api")]

    open_dashboard(page, agg.url, READ)
    wait_render(page, 0)
    drawn = page.evaluate("""() => Object.fromEntries(window.eastwest.cy.edges().map(e =>
        [e.source().id() + '>' + e.target().id(), [e.hasClass('encrypted'), e.style('line-style'),
         e.data('label')]]))""")
    assert drawn[">".join(hosts)][:2] == [True, "dotted"] and drawn[">".join(hosts)][2].startswith("🔒 ESP")
    assert drawn["shop/frontend>shop/api"][:2] == [False, "solid"]
    click_edge(page, *hosts)
    page.wait_for_selector("#panel:not([hidden]) dd[data-field=encrypted]")
    assert panel_numbers(page)["encrypted"].startswith("ESP: the wire could not see")
    shot(page, "edge-panel-encrypted")
