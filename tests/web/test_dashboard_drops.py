"""The dashboard's edge panel shows what the kernel dropped on the edge, by reason (issue 21,
part 4), in a real headless Chromium against a real aggregator (uvicorn + DuckDB) fed over its
ingest API: frontend -> db:5432 blocked twice (the client's connect timed out and a drop source
counted the SYNs it dropped, NETFILTER_DROP; once a NO_SOCKET too), frontend -> api fine. A real
mouse click on the edge opens its panel: the packets dropped, the reasons with their packets, and
the recent flows with their reasons beside the outcome; the clean edge shows none."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from eastwest.record import Drop, Endpoint
from tests.unit.test_correlate import rec
from tests.web.conftest import READ, click_edge, open_dashboard, panel_numbers, shot, wait_render
from tests.web.test_dashboard_states import agg, conn, send  # noqa: F401 - the fixture

DB = Endpoint("10.244.3.11", 5432)


def blocked(cport: int, reasons: list[tuple[str, int]]) -> list:
    start = datetime.now(UTC) - timedelta(seconds=30)
    client = Endpoint("10.244.1.11", cport)
    return [rec("client", collector="h1", cport=cport, start=start, dur=3.0, client=client,
                server=DB, c2s=0, s2c=0, connect="timeout"),
            rec("path", collector="h1", source="drops", start=start, dur=3.0, client=client,
                server=DB, c2s=0, s2c=0, connect=None, tunnel=None,
                drops=[Drop(r, n) for r, n in reasons])]


def test_the_edge_panel_shows_the_drops_by_reason(agg, page):  # noqa: F811 - the fixture
    send(agg, [conn(41000), *blocked(42000, [("NETFILTER_DROP", 3)]),
               *blocked(42001, [("NETFILTER_DROP", 2), ("NO_SOCKET", 1)])])
    g = httpx.get(agg.url + "/api/v1/graph", headers={"Authorization": f"Bearer {READ}"},
                  timeout=30).json()
    api = {(e["source"], e["target"]): e for e in g["edges"]}
    assert api[("shop/frontend", "shop/db")]["drops"] == {
        "packets": 6, "reasons": {"NETFILTER_DROP": 5, "NO_SOCKET": 1}}

    open_dashboard(page, agg.url, READ)
    wait_render(page, 0)
    click_edge(page, "shop/frontend", "shop/db")
    page.wait_for_selector("#panel:not([hidden]) #edge-flows table")
    got = panel_numbers(page)
    assert (got["drops"], got["connections_failed"]) == ("6", "2")
    reasons = page.evaluate("""() => [...document.querySelectorAll('#edge-drops li')]
        .map(li => [li.dataset.reason, li.dataset.packets])""")
    assert reasons == [["NETFILTER_DROP", "5"], ["NO_SOCKET", "1"]]
    outcomes = sorted(page.locator("#edge-flows td.outcome").all_text_contents())
    assert outcomes == ["dropped (NETFILTER_DROP 2, NO_SOCKET 1)", "dropped (NETFILTER_DROP 3)"]
    shot(page, "edge-panel-drops")

    page.keyboard.press("Escape")
    click_edge(page, "shop/frontend", "shop/api")
    page.wait_for_selector("#panel:not([hidden]) #edge-flows table")
    assert panel_numbers(page)["drops"] == "" and page.locator("#edge-drops").count() == 0


def test_the_flows_view_filters_dropped_calls_and_shows_their_reasons(agg, page):  # noqa: F811
    send(agg, [conn(41000), *blocked(42000, [("NETFILTER_DROP", 3)])])
    open_dashboard(page, agg.url, READ, view="flows")
    page.wait_for_selector("#view-flows[data-loaded]")
    assert page.locator("#flow-table tbody tr").count() == 2
    page.fill("#flow-filter", "--outcome dropped")
    page.press("#flow-filter", "Enter")
    page.wait_for_function("document.querySelectorAll('#flow-table tbody tr').length === 1")
    assert page.locator("#flow-table td.outcome").all_text_contents() == [
        "dropped (NETFILTER_DROP 3)"]
    shot(page, "flows-dropped")
