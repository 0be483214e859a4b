"""Dashboard rendering in headless Chromium: layout time and frame times of the service map on
generated graphs of 100, 1,000 and 10,000 edges.

The built dashboard (web/dist) is served from a local static server; its API calls are answered
by Playwright's request routing with a generated graph (GET /api/v1/graph), so the browser's
work is all that is measured. For each size, side by side in the same browser:
- ours: the dashboard as shipped (fcose; past 400 workloads / 2,500 edges it folds workloads
  into their namespaces, so the 10,000-edge graph is drawn as namespaces);
- peer: the same page with cytoscape's built-in CoSE layout (`?layout=cose`), the layout most
  cytoscape dashboards use;
- unfolded: ours with folding off (`?fold=off`), what drawing every workload would cost.
Reported: the layout's own time (ms), page load to first map (ms), and the frame times (p50,
p95, max ms, from requestAnimationFrame) while the map zooms and pans for 2 s. Ratios are
ours / peer. No pass/fail: results go to docs/benchmarks.md by hand.

    python bench/bench_web.py [--sizes 100,1000,10000] [--no-unfolded]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "web" / "dist"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SINCE, UNTIL = "2026-11-28T04:00:00Z", "2026-11-28T04:15:00Z"


def generate(n_edges: int, seed: int = 7) -> dict:
    """A service graph: workloads ~ edges / 10 (at least 20), namespaces ~ workloads / 25,
    edges mostly within a namespace, heavy-tailed volumes, some failing."""
    rnd = random.Random(seed)
    n_wl = max(20, n_edges // 10)
    n_ns = max(3, n_wl // 25)
    wl = [f"ns{i % n_ns}/svc{i}" for i in range(n_wl)]
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < n_edges:
        a = rnd.randrange(n_wl)
        b = (a + rnd.randrange(1, n_ns * 3)) % n_wl if rnd.random() < 0.7 else rnd.randrange(n_wl)
        if a != b:
            pairs.add((wl[a], wl[b]))
    edges = []
    for s, t in sorted(pairs):
        opened = int(rnd.paretovariate(1.2) * 5)
        failed = opened // 10 if rnd.random() < 0.08 else 0
        edges.append({"source": s, "target": t, "connections_opened": opened,
                      "connections_active": 0, "connections_closed": opened,
                      "connections_failed": failed, "resets": 0, "retransmits": 0,
                      "bytes_c2s": opened * 300, "bytes_s2c": opened * 4000, "packets_c2s": 0,
                      "packets_s2c": 0, "byte_mismatches": 0, "rtt_us": None, "ports": [8080],
                      "protocols": ["tcp"], "first_seen": SINCE, "last_seen": UNTIL,
                      "complete": True, "observed_by": {"client,server": opened}, "folded": 1})
    used = sorted({x for p in pairs for x in p})
    nodes = [{"id": w, "name": w.split("/")[1], "namespace": w.split("/")[0], "kind": "Deployment",
              "in_degree": 0, "out_degree": 0} for w in used]
    return {"since": SINCE, "until": UNTIL, "group_by": "workload", "volume_source": "rollups",
            "filter": "", "folded_edges": 0, "nodes": nodes, "edges": edges}


def by_namespace(g: dict) -> dict:
    ns = lambda w: w.split("/")[0]  # noqa: E731
    agg: dict[tuple[str, str], dict] = {}
    for e in g["edges"]:
        k = (ns(e["source"]), ns(e["target"]))
        a = agg.setdefault(k, {**e, "source": k[0], "target": k[1], "connections_opened": 0,
                               "connections_failed": 0, "bytes_c2s": 0, "bytes_s2c": 0})
        for f in ("connections_opened", "connections_failed", "bytes_c2s", "bytes_s2c"):
            a[f] += e[f]
    names = sorted({x for k in agg for x in k})
    return {**g, "group_by": "namespace", "edges": list(agg.values()),
            "nodes": [{"id": n, "name": n, "namespace": n, "kind": "Namespace", "in_degree": 0,
                       "out_degree": 0} for n in names]}


def serve_dist() -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(DIST)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


FRAMES_JS = """async () => {
  const cy = window.eastwest.cy, times = [];
  let last = performance.now(), stop = false;
  const tick = (t) => { times.push(t - last); last = t; if (!stop) requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  const z = cy.zoom(), p = cy.pan();
  await cy.animation({ zoom: z * 2.5, pan: { x: p.x - 300, y: p.y - 200 }, duration: 1000 }).play().promise();
  await cy.animation({ zoom: z, pan: p, duration: 1000 }).play().promise();
  stop = true;
  return times.slice(1);
}"""


def run_one(browser, url: str, graph: dict, query: str) -> dict:
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, bypass_csp=True)
    page = ctx.new_page()
    ns_graph = by_namespace(graph)

    def api(route) -> None:
        u = route.request.url
        body = ns_graph if "group_by=namespace" in u else graph
        if "/readyz" in u:
            body = {"status": "ready", "records": 1}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    page.route("**/api/v1/**", api)
    page.route("**/readyz", api)
    t0 = time.perf_counter()
    page.goto(f"{url}/?from={SINCE}&to={UNTIL}&{query}#token=bench")
    page.wait_for_function("window.eastwest && window.eastwest.seq > 0", timeout=600_000)
    load_ms = (time.perf_counter() - t0) * 1000
    r = page.evaluate("window.eastwest.rendered")
    frames = page.evaluate(FRAMES_JS)
    ctx.close()
    frames.sort()
    return {"layout_ms": r["layoutMs"], "load_ms": load_ms, "nodes": r["nodes"], "edges": r["edges"],
            "frame_p50": statistics.median(frames), "frame_p95": frames[int(len(frames) * 0.95)],
            "frame_max": frames[-1], "frames": len(frames)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000", help="edge counts (default 100,1000,10000)")
    ap.add_argument("--no-unfolded", action="store_true", help="skip the unfolded run (slow at 10,000)")
    args = ap.parse_args()
    if not (DIST / "index.html").is_file():
        raise SystemExit("web/dist is missing: run `make setup` or scripts/setup-web.sh first")
    from playwright.sync_api import sync_playwright

    srv, url = serve_dist()
    print(f"{'edges':>6} {'run':<9} {'drawn n/e':>12} {'layout ms':>10} {'load ms':>9} "
          f"{'frame p50':>9} {'p95':>6} {'max':>6}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for size in [int(s) for s in args.sizes.split(",")]:
            g = generate(size)
            runs = {"ours": "", "peer": "layout=cose"}
            if not args.no_unfolded and len(g["nodes"]) > 400:
                runs["unfolded"] = "fold=off"
            res = {}
            for name, q in runs.items():
                r = res[name] = run_one(browser, url, g, q)
                print(f"{size:>6} {name:<9} {r['nodes']:>5}/{r['edges']:<6} {r['layout_ms']:>10.0f} "
                      f"{r['load_ms']:>9.0f} {r['frame_p50']:>9.1f} {r['frame_p95']:>6.1f} "
                      f"{r['frame_max']:>6.1f}", flush=True)
            o, q = res["ours"], res["peer"]
            print(f"{size:>6} ratio ours/peer: layout {o['layout_ms'] / q['layout_ms']:.2f}x, "
                  f"frame p95 {o['frame_p95'] / q['frame_p95']:.2f}x", flush=True)
        browser.close()
    srv.shutdown()


if __name__ == "__main__":
    main()
