"""Fixtures for the dashboard's browser tests: Debian's Chromium driven headless by Playwright
(from PyPI; no browser download, ever), the built dashboard (web/dist, made by `make setup`),
and helpers that read what the map shows. Screenshots go to test-artifacts/web/ (gitignored).

Without Chromium or a built dashboard these tests FAIL with what to run: CI installs both."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.conftest import ARTIFACTS, REPO
from tests.lab.conftest import lab_factory  # noqa: F401  (the lab tests' fixture, reused)

try:  # the lab tests' shared helpers: aggregator under uvicorn, per-host collectors, truth
    from tests.lab.harness import (  # noqa: F401
        INGEST,
        READ,
        Aggregator,
        collectors,
        served_edges,
        truth_edges,
        window_of,
    )
except ImportError:  # tests/lab/harness.py not landed yet: the same helpers where they began
    from tests.lab.test_aggregator_e2e import (  # noqa: F401
        INGEST,
        READ,
        Aggregator,
        collectors,
        served_edges,
        truth_edges,
        window_of,
    )

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = ARTIFACTS / "web"


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium")
    if not (REPO / "web" / "dist" / "index.html").is_file():
        pytest.fail("the dashboard is not built (web/dist): run `make setup` or scripts/setup-web.sh")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # the page's CSP forbids eval; Playwright's wait_for_function needs it, so tests bypass it
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, bypass_csp=True)
    pg = ctx.new_page()
    pg.errors = []  # uncaught exceptions in the page fail the test
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()
    assert not pg.errors, pg.errors


def shot(page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def seq(page) -> int:
    return page.evaluate("window.eastwest ? window.eastwest.seq : 0")


def wait_render(page, after: int, timeout: float = 30_000) -> int:
    """Wait until the map rendered again after render number `after`; returns the new number."""
    page.wait_for_function(f"window.eastwest && window.eastwest.seq > {after}", timeout=timeout)
    return seq(page)


def open_dashboard(page, url: str, token: str | None, **params: str) -> None:
    frag = f"#token={token}" if token else ""
    page.goto(f"{url}/?{urlencode(params)}{frag}")


def shown(page) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    """What the map draws: workload (or namespace, host) node ids, edges, and each node's box."""
    nodes, edges, parents = page.evaluate("""() => {
        const cy = window.eastwest.cy;
        const leaf = cy.nodes().filter(n => !n.isParent());
        return [leaf.map(n => n.id()), cy.edges().map(e => [e.source().id(), e.target().id()]),
                Object.fromEntries(leaf.map(n => [n.id(), n.parent().nonempty() ? n.parent().id() : '']))];
    }""")
    return sorted(nodes), sorted(tuple(e) for e in edges), parents


def api_view(graph: dict) -> tuple[list[str], list[tuple[str, str]]]:
    return sorted(n["id"] for n in graph["nodes"]), sorted((e["source"], e["target"]) for e in graph["edges"])


def click_edge(page, source: str, target: str) -> None:
    """A real mouse click on the edge as drawn on the canvas, at its middle unless another
    node (or its label) or another edge is drawn there: the layout is random, and a node or an
    edge of the same source lying across the edge's middle took the click (the panel showed
    it). Returns once the open panel shows the edge; fails saying what the click hit otherwise.
    The map is told its size first: an open panel narrows it, which the map learns ~100 ms
    later (cytoscape's debounced ResizeObserver). A click is tried again (at most twice) only
    when the map's viewport moved between the point's reckoning and the panel check (a loaded
    CI run had the click land where the edge had been): a click that misses a map that stayed
    put fails at once."""
    misses: list[str] = []
    for _ in range(3):
        eid, x, y = page.evaluate(_EDGE_POINT, [source, target])
        before = page.evaluate(_VIEWPORT)
        page.mouse.click(x, y)
        try:
            page.wait_for_function("id => { const p = document.getElementById('panel'); "
                                   "return !p.hidden && p.dataset.id === id; }", arg=eid,
                                   timeout=10_000)
            return
        except Exception:  # noqa: BLE001 - playwright's timeout: named below
            after = page.evaluate(_VIEWPORT)
            hit = page.evaluate("([x, y]) => { const el = document.elementFromPoint(x, y); "
                                "return el ? el.id || el.className || el.tagName : null; }", [x, y])
            showing = page.evaluate("(() => { const p = document.getElementById('panel'); "
                                    "return p.hidden ? 'nothing (closed)' : p.dataset.id; })()")
            renders = page.evaluate("[window.eastwest.seq, (window.eastwest.rendered || {}).full]")
            misses.append(f"at ({x:.0f}, {y:.0f}) on {hit!r}, the panel shows {showing!r}, "
                          f"viewport {before} -> {after}, renders (seq, full) {renders}")
            if after == before:  # the map stayed put: a real miss
                break
    shot(page, "click-edge-missed")
    raise AssertionError(f"clicked edge {source} -> {target} {len(misses)} time(s): "
                         + "; then ".join(misses))


# the point to click on an edge (click_edge), with the map fitted around it
_EDGE_POINT = """([s, t]) => {
        const cy = window.eastwest.cy;
        cy.resize();
        const e = cy.edges().filter(e => e.source().id() === s && e.target().id() === t)[0];
        cy.fit(e.union(e.connectedNodes()), 120);
        if (cy.zoom() > 1.3) { cy.zoom(1.3); cy.center(e); }
        const r = document.getElementById('map').getBoundingClientRect();
        const m = e.renderedMidpoint(), a = e.renderedSourceEndpoint(), b = e.renderedTargetEndpoint();
        const at = k => ({x: a.x + (b.x - a.x) * k, y: a.y + (b.y - a.y) * k});
        const straight = Math.hypot(at(0.5).x - m.x, at(0.5).y - m.y) < 2;
        const boxes = cy.nodes().filter(n => !n.isParent()).map(n => n.renderedBoundingBox());
        // every other edge as two segments (source -> middle -> target: a curved one too)
        const segs = cy.edges().filter(o => o.id() !== e.id()).map(o => {
            const om = o.renderedMidpoint();
            return [[o.renderedSourceEndpoint(), om], [om, o.renderedTargetEndpoint()]];
        }).flat();
        const dist = (p, [u, v]) => {
            const dx = v.x - u.x, dy = v.y - u.y, l = dx * dx + dy * dy;
            const k = l ? Math.max(0, Math.min(1, ((p.x - u.x) * dx + (p.y - u.y) * dy) / l)) : 0;
            return Math.hypot(p.x - u.x - k * dx, p.y - u.y - k * dy);
        };
        const inside = p => p.x > 4 && p.y > 4 && p.x < r.width - 4 && p.y < r.height - 4 &&
            !boxes.some(bb => p.x > bb.x1 - 6 && p.x < bb.x2 + 6 && p.y > bb.y1 - 6 && p.y < bb.y2 + 6);
        const room = p => Math.min(Infinity, ...segs.map(sg => dist(p, sg)));
        const tries = [m, ...(straight ? [0.4, 0.6, 0.3, 0.7, 0.2, 0.8, 0.15, 0.85].map(at) : [])]
            .filter(inside);
        // the first point clear of every other edge by 10 px, else the one with the most room
        const p = tries.find(q => room(q) > 10) ||
            tries.reduce((best, q) => room(q) > room(best) ? q : best, tries[0] || m);
        return [e.id(), r.left + p.x, r.top + p.y];
    }"""
# pan, zoom and size of the map, rounded: what moves a point drawn on it
_VIEWPORT = """() => { const cy = window.eastwest.cy, p = cy.pan();
    return [Math.round(p.x), Math.round(p.y), Math.round(cy.zoom() * 1000), cy.width(), cy.height()]; }"""


def panel_numbers(page) -> dict[str, str]:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
        '#panel dd[data-field]')].map(d => [d.dataset.field, d.dataset.value]))""")
