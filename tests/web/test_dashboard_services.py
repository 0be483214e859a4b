"""The dashboard's Service view (issue 16) in a real headless Chromium, against a real aggregator
(uvicorn + DuckDB) fed over its ingest API with Service calls made here (no lab needed): the
map's "Servers" toggle switches between backend workloads and Services → backends, the Service
edge's panel lists the backends that served it with the API's counts and its flows, and the
choice is kept in the address bar. Screenshots: test-artifacts/web/."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from eastwest import codec
from eastwest.codec import Batch
from eastwest.record import Endpoint, Nat
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
- {match: 10.244.2.12/32, name: api, namespace: shop, host: h2}
- {match: 10.244.2.13/32, name: api-canary, namespace: shop, host: h3}
services:
- {match: 10.96.0.11, name: api, namespace: shop}
"""
VIP = Endpoint("10.96.0.11", 80)
_seq = iter(range(1, 10**6))


@pytest.fixture
def agg(tmp_path: Path):
    (tmp_path / "map.yaml").write_text(MAP)
    with Aggregator(tmp_path / "data", str(tmp_path / "map.yaml")) as a:
        yield a


def send(agg, collector: str, records) -> None:
    r = httpx.post(agg.url + "/api/v1/ingest",
                   content=codec.encode_batch(Batch(collector, next(_seq), datetime.now(UTC), records)),
                   headers={"Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE},
                   timeout=30)
    assert r.status_code == 200 and not r.json()["rejected"], r.text


def call(agg, cport: int, backend: str, via_service: bool = True) -> None:
    start = datetime.now(UTC) - timedelta(seconds=30)
    server = Endpoint(backend, 8080)
    over = dict(cport=cport, start=start, server=server)
    nat = [Nat("dnat", VIP, server, 4026531840)] if via_service else None
    send(agg, "h1", [rec("client", collector="h1", nat=nat, **over)])
    send(agg, "h2", [rec("server", collector="h2", **over)])


def test_the_servers_toggle_shows_services_with_their_backends(agg, page):
    for i, backend in enumerate(["10.244.2.11", "10.244.2.12", "10.244.2.11", "10.244.2.13"]):
        call(agg, 41000 + i, backend)
    call(agg, 41010, "10.244.2.11", via_service=False)  # a pod dialled directly
    open_dashboard(page, agg.url, READ, group="workload")
    n = wait_render(page, 0)
    assert shown(page)[1] == [("shop/frontend", "shop/api"), ("shop/frontend", "shop/api-canary")]
    page.select_option("#server-view", "service")
    n = wait_render(page, n)
    nodes, edges, _ = shown(page)
    assert edges == [("shop/frontend", "shop/api"), ("shop/frontend", "svc:shop/api")]
    assert "svc:shop/api" in nodes and "shop/api-canary" not in nodes
    assert page.evaluate("window.eastwest.cy.$id('svc:shop/api').data('kind')") == "Service"
    assert "services=1" in page.url
    graph = httpx.get(agg.url + "/api/v1/graph", params={"group_by": "service"},
                      headers={"Authorization": f"Bearer {READ}"}, timeout=30).json()
    want = next(e for e in graph["edges"] if e["target"] == "svc:shop/api")
    click_edge(page, "shop/frontend", "svc:shop/api")
    page.wait_for_selector("#panel:not([hidden]) #edge-flows table")
    assert page.text_content("#panel-title") == "shop/frontend → svc:shop/api"
    assert panel_numbers(page)["connections_opened"] == "4" == str(want["connections_opened"])
    backends = page.evaluate("""() => [...document.querySelectorAll('#panel tr[data-field=backend]')]
        .map(r => [r.dataset.value, r.querySelector('[data-field=backend_connections]').dataset.value])""")
    assert backends == [["shop/api", "3"], ["shop/api-canary", "1"]]
    assert [[b["id"], str(b["connections_opened"])] for b in want["backends"]] == backends
    assert page.get_attribute("#panel [data-field=service_addresses]", "data-value") == "10.96.0.11:80"
    # its recent flows are the calls through the Service (not the pod dialled directly)
    assert page.locator("#edge-flows tbody tr").count() == 4
    shot(page, "edge-panel-service-backends")
    # back to the backends: the same connections on the workload edges
    page.select_option("#server-view", "workload")
    wait_render(page, n)
    assert shown(page)[1] == [("shop/frontend", "shop/api"), ("shop/frontend", "shop/api-canary")]
    assert "services=1" not in page.url


def test_the_service_view_is_kept_in_the_address_bar(agg, page):
    call(agg, 42000, "10.244.2.11")
    open_dashboard(page, agg.url, READ, group="workload", services="1")
    wait_render(page, 0)
    assert shown(page)[1] == [("shop/frontend", "svc:shop/api")]
    assert page.input_value("#server-view") == "service"
