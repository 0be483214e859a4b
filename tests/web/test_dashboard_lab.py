"""The dashboard in a real headless Chromium against an aggregator fed by a lab run: one
collector per lab host (eBPF socket probes + VXLAN capture) sends to a real aggregator, which
serves web/dist at /. Phase 1 is the demo application's traffic; phase 2, in a later minute, is
one new dependency (frontend -> db) that the application never has.

Proved: the map draws exactly the API's nodes and edges (and the truth's edges) for every
grouping; a real mouse click on an edge opens its panel with the API's and the truth's numbers,
its observers and its VXLAN tunnel; namespace, workload, port, protocol and failing-only filters,
the group-by switch, time travel (a custom window, ◀) and diff change the map as they should;
the flows table shows exactly the filtered connections, sorted and paged. Screenshots:
test-artifacts/web/."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.lab.test_aggregator_e2e import new_dependency, wait_for_next_minute
from tests.web.conftest import (
    READ,
    Aggregator,
    api_view,
    click_edge,
    collectors,
    open_dashboard,
    panel_numbers,
    seq,
    served_edges,
    shot,
    shown,
    truth_edges,
    wait_render,
    window_of,
)

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "eww"


@pytest.fixture(scope="module")
def fed(lab_factory, tmp_path_factory):
    """A lab run into an aggregator that stays up for the module: (agg, lab, truth, w1, w2)."""
    lab = lab_factory(name=LAB, hosts=3, pods_per_host=2)
    tmp = tmp_path_factory.mktemp("web")
    with Aggregator(tmp / "data", lab.inventory["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp / "spool", ["h1", "h2", "h3"]) as cs:
            truth = lab.traffic(duration=5.0, seed=21)
            for c in cs:
                c.stop()
        assert len(truth) > 20
        w1 = window_of(truth)
        g1 = agg.get("/api/v1/graph", **w1)   # phase 1's graph before phase 2 happened
        wait_for_next_minute()
        with collectors(lab, agg.url, tmp / "spool2", ["h1", "h3"]) as cs:
            p2_start = datetime.now(UTC)
            new_dependency(lab)
            for c in cs:
                c.stop()
        p2_end = datetime.now(UTC)
        g1_window = w1
        w1 = {"from": w1["from"], "to": w1["to"]}
        w2 = {"from": (p2_start - timedelta(seconds=1)).isoformat(),
              "to": (p2_end + timedelta(seconds=1)).isoformat()}
        yield agg, lab, truth, w1, w2, (g1_window, g1)


def graph(agg, w: dict, **params) -> dict:
    return agg.get("/api/v1/graph", **w, **params)


def test_api_graph_equals_truth_then_time_travel_and_diff(fed):
    """The API alone (no browser): phase 1's graph is exactly the truth's workload edges, each
    connection seen by its ends (refused connects by the client only) and cross-host ones by the
    wire too, with no byte mismatch; after phase 2 phase 1's window answers the same graph (time
    travel), and the diff of the two phases adds exactly frontend -> db with its one connection."""
    agg, lab, truth, w1, w2, (g1_window, g1) = fed
    assert served_edges(g1) == truth_edges(lab, truth)
    for e in g1["edges"]:
        assert set(e["observed_by"]) <= {"client,server", "client,path,server", "client",
                                         "client,path"}, e
        assert e["observed_by"].get("client,server", 0) + e["observed_by"].get(
            "client,path,server", 0) >= e["connections_opened"] - e["connections_failed"]
        assert e["byte_mismatches"] == 0, e
    assert agg.get("/api/v1/graph", **g1_window) == g1
    d = agg.get("/api/v1/diff", a_from=w1["from"], a_to=w1["to"], b_from=w2["from"],
                b_to=w2["to"])
    assert [(e["source"], e["target"]) for e in d["added"]] == [("shop/frontend", "shop/db")]
    assert d["added"][0]["connections_opened"] == 1 and d["added"][0]["bytes_c2s"] == 321


def test_map_shows_exactly_the_api_nodes_and_edges_for_every_grouping(fed, page):
    agg, lab, truth, w1, _, _ = fed
    open_dashboard(page, agg.url, READ, **w1)
    n = wait_render(page, 0)
    nodes, edges, boxes = shown(page)
    assert (nodes, edges) == api_view(graph(agg, w1))
    # the application's edges are the truth's (the wire adds the overlay's own ICMPv6 besides)
    tcp_udp = graph(agg, w1, protocol=["tcp", "udp"])
    assert served_edges(tcp_udp) == truth_edges(lab, truth)
    assert set(served_edges(tcp_udp)) <= set(edges)
    assert all(boxes[w] == f"ns:{w.split('/')[0]}" for w in nodes if "/" in w)
    assert all(boxes[w] == "ext:" for w in nodes if w.startswith("external:"))
    assert page.get_attribute("#map", "data-state") == "ready"
    shot(page, "map-workloads-in-namespaces")

    hosts = {p["name"]: p["host"] for p in lab.inventory["pods"]}
    for group, api_group in (("host-box", "workload"), ("workload", "workload"),
                             ("namespace", "namespace"), ("host", "host")):
        page.select_option("#group", group)
        n = wait_render(page, n)
        nodes, edges, boxes = shown(page)
        assert (nodes, edges) == api_view(graph(agg, w1, group_by=api_group)), group
        if group == "host-box":  # each workload boxed in the host its pod runs on
            wl = {w["id"]: w for w in agg.get("/api/v1/workloads", **w1)["workloads"]}
            for w in nodes:
                if wl[w]["host"]:
                    assert boxes[w] == f"host:{wl[w]['host']}", w
            pods = [p for p in lab.inventory["pods"] if p["service"] == "db"]
            assert boxes["shop/db"] == f"host:{hosts[pods[0]['name']]}"
        if group == "host":
            assert {"h1", "h2", "h3"} <= set(nodes)
        shot(page, f"map-group-{group}")


def test_clicking_an_edge_opens_its_panel_with_the_right_numbers(fed, page):
    agg, lab, truth, w1, _, _ = fed
    open_dashboard(page, agg.url, READ, **w1, protocol="tcp", group="workload")
    wait_render(page, 0)
    want = truth_edges(lab, truth)[("shop/api", "shop/db")]
    api = next(e for e in graph(agg, w1, protocol="tcp")["edges"]
               if (e["source"], e["target"]) == ("shop/api", "shop/db"))
    click_edge(page, "shop/api", "shop/db")
    page.wait_for_selector("#panel:not([hidden]) #edge-flows table")
    assert page.text_content("#panel-title") == "shop/api → shop/db"
    got = panel_numbers(page)
    for k in ("connections_opened", "connections_failed", "resets", "bytes_c2s", "bytes_s2c",
              "connections_closed", "packets_c2s", "packets_s2c", "retransmits"):
        assert got[k] == str(api[k]), k
    assert (int(got["connections_opened"]), int(got["bytes_c2s"]), int(got["bytes_s2c"]),
            int(got["connections_failed"])) == (want["connections"], want["bytes_c2s"],
                                                want["bytes_s2c"], want["failed"])
    assert got["ports"] == ", ".join(str(p) for p in api["ports"])
    for observers, count in api["observed_by"].items():
        assert f"{observers}: {count}" in got["observed_by"]
    # db runs on another host than api: the wire saw these flows in VNI 42 between the two
    pods = {p["service"]: p["host"] for p in lab.inventory["pods"]}
    tunnels = page.locator("#panel [data-field=tunnel]").all_text_contents()
    assert any(t.startswith(f"VNI {lab.inventory['vni']}: {pods['api']} → {pods['db']}") for t in tunnels), tunnels
    assert page.locator("#panel svg.chart rect.bar-c").count() == 24
    shot(page, "edge-panel-api-db")

    # a node: its upstream, downstream and impact from the API
    page.keyboard.press("Escape")
    page.locator("#element-list summary").click()
    page.locator("#edge-items li", has_text="node shop/api").first.press("Enter")
    page.wait_for_selector("#node-detail h3")
    detail = agg.get("/api/v1/workloads/shop/api", **w1)
    chips = page.locator("#node-detail .chip").all_text_contents()
    for w in detail["downstream"] + detail["upstream"]:
        assert any(c.startswith(w) for c in chips), (w, chips)
    shot(page, "node-panel-api")


def test_filters_change_what_is_shown(fed, page):
    agg, lab, truth, w1, _, _ = fed
    open_dashboard(page, agg.url, READ, **w1)
    n = wait_render(page, 0)
    cases = [("#f-namespace", "select", "shop", {"namespace": "shop"}),
             ("#f-workload", "fill", "db", {"namespace": "shop", "workload": "db"}),
             ("#f-workload", "fill", "", {"namespace": "shop"}),
             ("#f-port", "fill", "7000", {"namespace": "shop", "port": "7000"}),
             ("#f-port", "fill", "", {"namespace": "shop"}),
             ("#f-namespace", "select", "", {}),
             ("#f-protocol", "select", "udp", {"protocol": "udp"})]
    for sel, how, value, params in cases:
        if how == "select":
            page.select_option(sel, value)
        else:
            page.fill(sel, value)
            page.press(sel, "Enter")
            page.locator(sel).blur()
        n = wait_render(page, n)
        nodes, edges, _ = shown(page)
        assert (nodes, edges) == api_view(graph(agg, w1, **params)), params
        assert edges, params
    # udp: the resolver's DNS, api's exchanges with cache and its datagrams to a dead port
    # (docs/lab.md, "UDP"), as the truth has them
    udp = {s for _, s in truth_edges(lab, [t for t in truth if t["protocol"] == "udp"])}
    assert "platform/resolver" in udp and "shop/cache" in udp
    assert {t for _, t in shown(page)[1]} == udp
    shot(page, "filter-protocol-udp")
    page.select_option("#f-protocol", "")
    n = wait_render(page, n)
    # only failing edges: exactly the truth's edges with a refused or reset connection
    page.check("#f-failing")
    n = wait_render(page, n)
    _, edges, _ = shown(page)
    want = sorted(truth_edges(lab, [t for t in truth if t["outcome"] != "ok"]))
    assert edges == want and ("shop/api", "shop/auth") in edges
    shot(page, "filter-only-failing")


def test_time_travel_and_diff_change_what_is_shown(fed, page):
    agg, lab, truth, w1, w2, _ = fed
    start = datetime.fromisoformat(w1["from"])
    before = {"from": (start - timedelta(hours=2)).isoformat(), "to": (start - timedelta(hours=1)).isoformat()}
    open_dashboard(page, agg.url, READ, **before)
    n = wait_render(page, 0)
    assert shown(page)[1] == [] and page.get_attribute("#map", "data-state") == "empty"
    assert page.get_attribute("#notice", "data-state") == "no-traffic"
    shot(page, "time-travel-empty-window")
    # one window later (▶) is the hour before the traffic: still empty, and the API agrees
    page.click("#fwd")
    n = wait_render(page, n)
    g = page.evaluate("[window.eastwest.graph.since, window.eastwest.graph.until]")
    assert api_view(graph(agg, {"from": g[0], "to": g[1]})) == shown(page)[:2]
    # travel to phase 2 by typing its window: only the new dependency (and its nodes)
    page.fill("#from", w2["from"])
    page.fill("#to", w2["to"])
    page.click("#apply")
    n = wait_render(page, n)
    _, edges, _ = shown(page)
    assert ("shop/frontend", "shop/db") in edges
    assert (shown(page)[:2]) == api_view(graph(agg, w2))
    tcp = [e for e in graph(agg, w2, protocol="tcp")["edges"]]
    assert [(e["source"], e["target"]) for e in tcp] == [("shop/frontend", "shop/db")]
    shot(page, "time-travel-phase-2")
    # diff: A = phase 1, B = phase 2: frontend -> db is added, phase 1's edges are removed
    page.click("#diff-toggle")
    n = wait_render(page, n)
    page.fill("#a-from", w1["from"])
    page.fill("#a-to", w1["to"])
    page.click("#apply")
    n = wait_render(page, n)
    d = agg.get("/api/v1/diff", a_from=w1["from"], a_to=w1["to"], b_from=w2["from"], b_to=w2["to"])
    classes = page.evaluate("""() => Object.fromEntries(window.eastwest.cy.edges().map(e =>
        [e.source().id() + '>' + e.target().id(), ['added', 'removed', 'changed', 'unchanged'].find(c => e.hasClass(c))]))""")
    assert classes["shop/frontend>shop/db"] == "added"
    assert {k for k, v in classes.items() if v == "added"} == {f"{e['source']}>{e['target']}" for e in d["added"]}
    assert {k for k, v in classes.items() if v == "removed"} == {f"{e['source']}>{e['target']}" for e in d["removed"]}
    assert ("shop/api", "shop/db") in {(e["source"], e["target"]) for e in d["removed"]}
    assert page.text_content("#diff-summary").startswith(f"{len(d['added'])} added")
    shot(page, "diff-phase-1-vs-2")


def test_flows_table_shows_the_filtered_connections_sorted_and_paged(fed, page):
    agg, lab, truth, w1, _, _ = fed
    open_dashboard(page, agg.url, READ, **w1, view="flows")
    page.wait_for_selector("#view-flows[data-loaded]")
    db_ip = next(p["ip"] for p in lab.inventory["pods"] if p["service"] == "db")
    want = sum(t["server_ip"] == db_ip for t in truth)
    page.fill("#flow-filter", "--to-workload db")
    page.select_option("#flow-limit", "500")
    page.wait_for_function(f"document.querySelectorAll('#flow-table tbody tr').length === {want}")
    rows = page.locator("#flow-table tbody tr")
    assert rows.count() == want
    assert set(page.locator("#flow-table tbody tr td:nth-child(3)").all_text_contents()) == {"shop/db"}
    shot(page, "flows-to-db")
    # refused ones only, in the other spelling of the filter: the truth's refused connects to db
    page.fill("#flow-filter", "to_workload=db outcome=refused")
    page.click("#flow-run")
    refused = sum(t["server_ip"] == db_ip and t["outcome"] == "refused" for t in truth)
    page.wait_for_function(f"document.querySelectorAll('#flow-table tbody tr.fail').length === {refused}")
    # sort by bytes (descending), page by 50
    page.fill("#flow-filter", "")
    page.select_option("#flow-limit", "50")
    page.click("#flow-table th button[data-sort=bytes]")
    page.wait_for_function("document.querySelector('#flow-table th[aria-sort]')?.textContent.startsWith('Bytes')")
    first = page.locator("#flow-table tbody tr").nth(0).get_attribute("data-id")
    api = agg.get("/api/v1/flows", since=w1["from"], until=w1["to"], sort="-bytes", limit="50")
    assert first == api["flows"][0]["id"]
    page.click("#flow-next")
    page.wait_for_function("document.getElementById('flow-page').textContent.startsWith('page 2')")
    page2 = agg.get("/api/v1/flows", since=w1["from"], until=w1["to"], sort="-bytes", limit="50",
                    cursor=api["next_cursor"])
    assert page.locator("#flow-table tbody tr").nth(0).get_attribute("data-id") == page2["flows"][0]["id"]
    assert seq(page) == 0  # the flows view alone never drew the map
    shot(page, "flows-by-bytes-page-2")
