"""The dashboard shows a service-mesh call folded from its sidecars' sockets (issue 20, "Done
means": the edge panel shows a folded mesh edge with its hops), in a real headless Chromium
against a real aggregator (uvicorn + DuckDB) fed over its ingest API with the records two
collectors send for one mesh call (collector/mesh.py folds them): the client's (app -> its
sidecar, sidecar -> the network) and the server's (the network -> sidecar, sidecar -> app), keyed
by the proxy-to-proxy hop, plus the wire's view of that hop with the proxies' framing in its
bytes. A plain call on another edge shows no mesh.

- The edge frontend -> api is ONE edge with the app's bytes (not the wire's), marked as a mesh
  edge: its panel says how many connections went through sidecars, what the wire carried, and
  lists one call's four hops (app -> sidecar, sidecar -> sidecar seen by both sides, sidecar ->
  app) with their sockets and bytes;
- with the "sidecars" switch the map draws the proxies as nodes of their own (kind `proxy`)
  and the app -> app edge becomes the hops' path."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import httpx

from eastwest import codec
from eastwest.codec import Batch
from eastwest.record import Endpoint, Mesh, MeshHop
from tests.unit.test_correlate import rec
from tests.web.conftest import (
    INGEST,
    READ,
    click_edge,
    open_dashboard,
    panel_numbers,
    shot,
    wait_render,
)
from tests.web.test_dashboard_states import agg, conn  # noqa: F401 - the fixture

FRONTEND, FRONTEND_PROXY = Endpoint("10.244.1.11", 41500), Endpoint("10.244.1.11", 52000)
API = Endpoint("10.244.2.11", 9090)
FRAMING_C2S, FRAMING_S2C = 30, 12  # the sidecars' header lines, each way
APP_C2S, APP_S2C = 1000, 5000


_seqs = itertools.count(1)


def send_all(server, records: list) -> None:
    """Each collector's records as its own batch (a batch is one collector's)."""
    for coll in sorted({r.collector for r in records}):
        batch = Batch(coll, next(_seqs), datetime.now(UTC), [r for r in records if r.collector == coll])
        r = httpx.post(server.url + "/api/v1/ingest", content=codec.encode_batch(batch),
                       headers={"Authorization": f"Bearer {INGEST}",
                                "content-type": codec.CONTENT_TYPE}, timeout=30)
        assert r.status_code == 200 and not r.json()["rejected"], r.text


def mesh_call() -> list:
    """One mesh call frontend -> api as its collectors and the wire report it."""
    start = datetime.now(UTC) - timedelta(seconds=30)
    proxy = "ew-sidecar"
    client_mesh = Mesh(proxy, [
        MeshHop("app-proxy", FRONTEND, Endpoint("127.0.0.1", 15001), APP_C2S, APP_S2C, proxy, 501),
        MeshHop("proxy-proxy", FRONTEND_PROXY, API, APP_C2S + FRAMING_C2S, APP_S2C + FRAMING_S2C,
                proxy, 501)])
    server_mesh = Mesh(proxy, [
        MeshHop("proxy-proxy", FRONTEND_PROXY, Endpoint(API.ip, 15006), APP_C2S + FRAMING_C2S,
                APP_S2C + FRAMING_S2C, proxy, 502),
        MeshHop("proxy-app", Endpoint("127.0.0.6", 39000), API, APP_C2S, APP_S2C, proxy, 502)])
    common = dict(start=start, dur=2.0, client=FRONTEND_PROXY, server=API)
    return [
        rec("client", collector="h1", c2s=APP_C2S, s2c=APP_S2C, mesh=client_mesh, **common),
        rec("server", collector="h2", c2s=APP_C2S, s2c=APP_S2C, mesh=server_mesh, **common),
        rec("path", collector="h1", c2s=APP_C2S + FRAMING_C2S, s2c=APP_S2C + FRAMING_S2C,
            **common)]


def test_the_edge_panel_shows_a_folded_mesh_call_and_its_hops(agg, page):  # noqa: F811
    send_all(agg, [*mesh_call(), conn(41000, server="10.244.3.11", port=5432)])
    g = httpx.get(agg.url + "/api/v1/graph", headers={"Authorization": f"Bearer {READ}"},
                  timeout=30).json()
    api = {(e["source"], e["target"]): e for e in g["edges"]}
    meshed, plain = api[("shop/frontend", "shop/api")], api[("shop/frontend", "shop/db")]
    assert (meshed["connections_opened"], meshed["bytes_c2s"], meshed["bytes_s2c"]) == (
        1, APP_C2S, APP_S2C)
    assert meshed["mesh"]["proxy"] == "ew-sidecar" and meshed["mesh"]["connections"] == 1
    assert plain.get("mesh") is None
    assert not [n for n in g["nodes"] if n.get("kind") == "proxy"]

    open_dashboard(page, agg.url, READ)
    wait_render(page, 0)
    classes = page.evaluate("""() => window.eastwest.cy.edges().map(e =>
        [e.data('source'), e.data('target'), e.hasClass('mesh')])""")
    assert ["shop/frontend", "shop/api", True] in classes
    assert ["shop/frontend", "shop/db", False] in classes
    click_edge(page, "shop/frontend", "shop/api")
    page.wait_for_selector("#panel:not([hidden]) #edge-mesh-hops")
    got = panel_numbers(page)
    assert got["mesh"].startswith("via ew-sidecar: 1 of 1"), got
    assert (got["bytes_c2s"], got["bytes_s2c"]) == (str(APP_C2S), str(APP_S2C))
    hops = page.evaluate("""() => [...document.querySelectorAll('#edge-mesh-hops tbody tr')]
        .map(tr => [tr.dataset.hop, tr.dataset.observer, tr.dataset.bytes])""")
    wire = f"{APP_C2S + FRAMING_C2S}/{APP_S2C + FRAMING_S2C}"
    assert hops == [["app-proxy", "client", f"{APP_C2S}/{APP_S2C}"],
                    ["proxy-proxy", "client", wire], ["proxy-proxy", "server", wire],
                    ["proxy-app", "server", f"{APP_C2S}/{APP_S2C}"]]
    shot(page, "edge-panel-mesh")

    page.keyboard.press("Escape")
    click_edge(page, "shop/frontend", "shop/db")
    page.wait_for_selector("#panel:not([hidden]) #edge-flows table")
    assert panel_numbers(page)["mesh"] == "" and page.locator("#edge-mesh-hops").count() == 0


def test_the_sidecars_switch_draws_the_proxies(agg, page):  # noqa: F811 - the fixture
    send_all(agg, mesh_call())
    open_dashboard(page, agg.url, READ)
    wait_render(page, 0)
    page.check("#f-proxies")
    page.wait_for_function("""() => window.eastwest.cy.nodes("[kind = 'proxy']").length === 2""")
    assert "proxies=1" in page.url
    nodes = page.evaluate("""() => window.eastwest.cy.nodes("[kind = 'proxy']").map(n => n.id())""")
    assert sorted(nodes) == ["shop/api~ew-sidecar", "shop/frontend~ew-sidecar"]
    edges = page.evaluate("""() => window.eastwest.cy.edges().map(e =>
        [e.data('source'), e.data('target')])""")
    assert sorted(map(tuple, edges)) == sorted([
        ("shop/frontend", "shop/frontend~ew-sidecar"),
        ("shop/frontend~ew-sidecar", "shop/api~ew-sidecar"),
        ("shop/api~ew-sidecar", "shop/api")])
    shot(page, "map-mesh-sidecars")
