"""The query API over a real app and DuckDB store: graph (JSON and the text formats), flows with
filters, negation, sorting and cursor pagination, the SSE stream with the same filters (a real
uvicorn on loopback), diff, workloads, and 400s that name the bad parameter."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from eastwest import codec
from eastwest.codec import Batch
from tests.unit.test_correlate import T0, rec

INGEST, READ = "i" * 24, "r" * 24
RH = {"Authorization": f"Bearer {READ}"}
MAP_YAML = """workloads:
- {match: 10.244.1.11/32, name: frontend, namespace: shop, host: h1}
- {match: 10.244.2.11/32, name: api, namespace: shop, host: h2}
- {match: 10.244.3.11/32, name: db, namespace: shop, host: h3}
"""
A = {"from": (T0 - timedelta(minutes=5)).isoformat(), "to": (T0 + timedelta(minutes=5)).isoformat()}


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    return AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST, read_token=READ,
                              workload_map=tmp_path / "map.yaml", retention=None)


def send(c, collector, seq, records):
    r = c.post("/api/v1/ingest", content=codec.encode_batch(Batch(collector, seq, T0, records)),
               headers={"Authorization": f"Bearer {INGEST}", "content-type": codec.CONTENT_TYPE})
    assert r.status_code == 200, r.text


def fill(c):
    """7 frontend->api connections seen by both sides, 2 api->db (one refused, client only)."""
    for i in range(7):
        send(c, "h1", 10 + i, [rec("client", cport=41000 + i, c2s=100 * (i + 1), s2c=10)])
        send(c, "h2", 10 + i, [rec("server", cport=41000 + i, c2s=100 * (i + 1), s2c=10)])
    db = {"client": rec("client").client.__class__("10.244.2.11", 50000),
          "server": rec("client").server.__class__("10.244.3.11", 5432)}
    send(c, "h2", 100, [rec("client", collector="h2", **db, c2s=50, s2c=60),
                        rec("client", collector="h2", client=db["client"].__class__("10.244.2.11", 50001),
                            server=db["server"].__class__("10.244.3.11", 5433), connect="refused",
                            c2s=0, s2c=0)])


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        fill(c)
        yield c


def test_graph_has_one_edge_per_dependency_with_exact_counts(client):
    g = client.get("/api/v1/graph", params=A, headers=RH).json()
    edges = {(e["source"], e["target"]): e for e in g["edges"]}
    assert set(edges) == {("shop/frontend", "shop/api"), ("shop/api", "shop/db")}
    fa = edges[("shop/frontend", "shop/api")]
    assert (fa["connections_opened"], fa["bytes_c2s"], fa["bytes_s2c"]) == (7, 2800, 70)
    assert fa["observed_by"] == {"client,server": 7} and fa["ports"] == [9090]
    ad = edges[("shop/api", "shop/db")]
    assert (ad["connections_opened"], ad["connections_failed"], ad["ports"]) == (2, 1, [5432, 5433])
    ns = client.get("/api/v1/graph", params={**A, "group_by": "host"}, headers=RH).json()
    assert {(e["source"], e["target"]) for e in ns["edges"]} == {("h1", "h2"), ("h2", "h3")}
    only = client.get("/api/v1/graph", params={**A, "workload": "db"}, headers=RH).json()
    assert [(e["source"], e["target"]) for e in only["edges"]] == [("shop/api", "shop/db")]
    assert only["volume_source"] == "rollups"


def test_link_local_chatter_is_stored_but_left_out_unless_asked_for(client):
    """The overlay's neighbour discovery and mDNS (link-local source, multicast destination) are
    stored like any flow; the graph, the flows, the workloads and the diff leave them out unless
    `link_local=true`, and the graph's volumes still come from the rollups."""
    Ep = rec("client").client.__class__
    send(client, "h1", 60, [
        rec("path", collector="h1", protocol="icmpv6", family=6, client=Ep("fe80::a8c1:1", 0),
            server=Ep("ff02::1:ff00:2", 0), tunnel=None, c2s=72, s2c=0),
        rec("path", collector="h1", protocol="udp", client=Ep("10.244.1.11", 5353),
            server=Ep("224.0.0.251", 5353), tunnel=None, c2s=90, s2c=0)])
    noise = {("external:fe80::a8c1:1", "external:ff02::1:ff00:2"),
             ("shop/frontend", "external:224.0.0.251")}
    g = client.get("/api/v1/graph", params=A, headers=RH).json()
    assert {(e["source"], e["target"]) for e in g["edges"]} == {
        ("shop/frontend", "shop/api"), ("shop/api", "shop/db")}
    everything = client.get("/api/v1/graph", params={**A, "link_local": "true"}, headers=RH).json()
    assert {(e["source"], e["target"]) for e in everything["edges"]} - {
        (e["source"], e["target"]) for e in g["edges"]} == noise
    assert everything["volume_source"] == "rollups" and everything["filter"].endswith(
        "[link-local included]")
    flows = client.get("/api/v1/flows", params={"limit": "100"}, headers=RH).json()["flows"]
    all_flows = client.get("/api/v1/flows", params={"limit": "100", "link_local": "1"},
                           headers=RH).json()["flows"]
    assert (len(flows), len(all_flows)) == (9, 11)
    wl = client.get("/api/v1/workloads", params=A, headers=RH).json()["workloads"]
    assert not [w for w in wl if w["id"].startswith("external:")]
    bad = client.get("/api/v1/graph", params={**A, "link_local": "sometimes"}, headers=RH)
    assert bad.status_code == 400 and "link_local" in bad.json()["detail"]


def test_an_edge_with_several_observer_sets_counts_each(client):
    """One edge, connections seen by different observer sets: DuckDB's per-edge bit set sees
    two sets and the detail query counts them (and the ports)."""
    send(client, "h1", 50, [rec("client", cport=42000, c2s=5, s2c=5)])
    send(client, "h1", 51, [rec("client", cport=42001, c2s=5, s2c=5,
                                server=rec("client").server.__class__("10.244.2.11", 9091))])
    g = client.get("/api/v1/graph", params=A, headers=RH).json()
    fa = {(e["source"], e["target"]): e for e in g["edges"]}[("shop/frontend", "shop/api")]
    assert fa["connections_opened"] == 9
    assert fa["observed_by"] == {"client,server": 7, "client": 2}
    assert fa["ports"] == [9090, 9091] and fa["protocols"] == ["tcp"]


def test_packets_nobody_counted_are_null_not_zero(client):
    """Socket probes count no packets (their records carry null): a connection no wire
    observer counted packets of has null packets in its flow and its edge, from the rollups or
    from the connections, and when folded; a wire observer's count shows, and an edge or a
    fold sums the connections that counted (null only when none did)."""
    from datetime import datetime

    from aggregator.graph import Window, fold, graph_data, to_graphml

    Ep = rec("client").client.__class__
    # the wire saw fill()'s api -> db connection (client port 50000) and counted c2s packets only
    send(client, "h3", 300, [rec("path", collector="h3", client=Ep("10.244.2.11", 50000),
                                 server=Ep("10.244.3.11", 5432), c2s=50, s2c=60,
                                 packets_c2s=7, packets_s2c=None)])
    flows = client.get("/api/v1/flows", params={"limit": "100"}, headers=RH).json()["flows"]
    packets = {f["client"]["port"]: (f["packets_c2s"], f["packets_s2c"]) for f in flows}
    assert packets == {**{41000 + i: (None, None) for i in range(7)}, 50000: (7, None),
                       50001: (None, None)}
    raw = client.get("/api/v1/records", headers=RH).json()["records"]
    assert {r["packets_c2s"] for r in raw if r["observer"] != "path"} == {None}
    for params, source in ((A, "rollups"), ({**A, "observer": "client"}, "connections")):
        g = client.get("/api/v1/graph", params=params, headers=RH).json()
        assert g["volume_source"] == source
        edges = {(e["source"], e["target"]): (e["packets_c2s"], e["packets_s2c"])
                 for e in g["edges"]}
        assert edges == {("shop/frontend", "shop/api"): (None, None),
                         ("shop/api", "shop/db"): (7, None)}, (source, edges)
    win = Window(datetime.fromisoformat(A["from"]), datetime.fromisoformat(A["to"]))
    data = graph_data(client.app.state.pipeline.read(), win, budget=1)
    other = json.loads(data.json_bytes())["edges"]
    assert [(e["source"], e["packets_c2s"], e["packets_s2c"]) for e in other] == [("other", 7, None)]
    g = graph_data(client.app.state.pipeline.read(), win).graph()
    g.remove_edge("shop/api", "shop/db")
    g.add_edge("x", "y", **{**g.edges["shop/frontend", "shop/api"], "bytes_c2s": 1})
    assert fold(g, 1) == 2
    assert (g.edges["other", "other"]["packets_c2s"], g.edges["other", "other"]["packets_s2c"]) \
        == (None, None)
    assert "<graphml" in to_graphml(g)


def test_rollup_volumes_cover_every_minute_the_window_touches(client):
    """The documented resolution rule (docs/api.md, `volume_since`): fill()'s records end at
    04:00:12, so their volumes sit in the rollup minute 04:00. A window starting inside that
    minute (after the connections' last record) still counts the whole minute's bytes, and says
    so; one starting at the next minute does not. Same for a window ending inside the minute."""
    minute = T0.replace(second=0)

    def graph(since, until):
        return client.get("/api/v1/graph", params={"from": since.isoformat(),
                                                   "to": until.isoformat()}, headers=RH).json()

    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    for since, until in ((minute + timedelta(seconds=30), minute + timedelta(minutes=5)),
                         (minute - timedelta(minutes=5), minute + timedelta(seconds=5))):
        g = graph(since, until)
        up = until.replace(second=0) + (timedelta(minutes=1) if until.second else timedelta())
        assert (g["volume_since"], g["volume_until"]) == (iso(since.replace(second=0)), iso(up))
        fa = {(e["source"], e["target"]): e for e in g["edges"]}[("shop/frontend", "shop/api")]
        # no connection of the window, the minute's volumes
        assert (fa["connections_opened"], fa["bytes_c2s"], fa["bytes_s2c"]) == (0, 2800, 70)
    later = graph(minute + timedelta(minutes=1), minute + timedelta(minutes=5))
    assert later["edges"] == [] and later["volume_since"] == iso(minute + timedelta(minutes=1))
    exact = graph(minute - timedelta(minutes=5), minute + timedelta(minutes=5))
    assert (exact["volume_since"], exact["volume_until"]) == (
        iso(minute - timedelta(minutes=5)), iso(minute + timedelta(minutes=5)))
    by_conns = client.get("/api/v1/graph", params={**A, "outcome": "ok"}, headers=RH).json()
    assert by_conns["volume_source"] == "connections"
    assert (by_conns["volume_since"], by_conns["volume_until"]) == (None, None)


def test_budget_fold_of_the_json_edges_equals_the_networkx_fold(client):
    """GraphData.fold (edges as JSON, the API's path) and graph.fold (networkx) give the same
    other -> other edge: sums, ports, protocols, observers, first/last seen, `folded`."""
    from aggregator.graph import Window, build_graph, fold, graph_data, to_json

    store = client.app.state.pipeline.read()
    win = Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5))
    data = graph_data(store, win, budget=1)  # both edges into other -> other
    g = build_graph(store, win)
    assert fold(g, 1) == data.folded_edges == 2
    assert json.loads(data.json_bytes()) == to_json(g)
    other = to_json(g)["edges"][0]
    assert (other["connections_opened"], other["ports"], other["observed_by"]) == (
        9, [5432, 5433, 9090], {"client,server": 7, "client": 2})


def test_graph_text_formats(client):
    dot = client.get("/api/v1/graph", params={**A, "format": "dot"}, headers=RH)
    assert dot.status_code == 200 and '"shop/frontend" -> "shop/api"' in dot.text
    mer = client.get("/api/v1/graph", params={**A, "format": "mermaid"}, headers=RH).text
    assert mer.startswith("graph LR") and "7 conns" in mer
    gml = client.get("/api/v1/graph", params={**A, "format": "graphml"}, headers=RH).text
    assert "<graphml" in gml


@pytest.mark.parametrize("params, name", [
    ({"group_by": "pod"}, "group_by"), ({"format": "png"}, "format"), ({"from": "yesterday"}, "from"),
    ({"port": "99999"}, "port"), ({"not_outcome": "meh"}, "not_outcome"), ({"colour": "red"}, "colour"),
    ({"from": "2026-11-28T05:00:00Z", "to": "2026-11-28T04:00:00Z"}, "from"),
])
def test_a_bad_parameter_is_a_400_naming_it(client, params, name):
    r = client.get("/api/v1/graph", params=params, headers=RH)
    assert r.status_code == 400 and r.json()["parameter"] == name, r.text


def test_every_read_route_refuses_an_unknown_parameter(client):
    """docs/api.md: an unknown parameter is a 400 naming it, so that a typo (`colector=h2`)
    never widens a query. Every GET route under /api/v1 of the OpenAPI document, found there
    (a new route is checked too), is asked with its required parameters and one typo."""
    paths = client.get("/openapi.json").json()["paths"]
    reads = sorted(p for p, ops in paths.items() if p.startswith("/api/v1/") and "get" in ops)
    assert {"/api/v1/records", "/api/v1/graph", "/api/v1/flows", "/api/v1/flows/stream",
            "/api/v1/diff", "/api/v1/workloads", "/api/v1/workloads/{workload}",
            "/api/v1/analysis"} <= set(reads)
    required = {"/api/v1/diff": {"a_from": "2h", "a_to": "1h", "b_from": "1h", "b_to": "now"}}
    for path in reads:
        url = path.replace("{workload}", "shop/api")
        if "from" in {p["name"] for p in paths[path]["get"].get("parameters", ())}:
            required[path] = A  # the window of the data
        if not path.endswith("/stream"):  # (the stream waits for flows: tested below)
            ok = client.get(url, params=required.get(path, {}), headers=RH)
            assert ok.status_code == 200, (path, ok.text)  # the route itself answers
        r = client.get(url, params={**required.get(path, {}), "colector": "h2"}, headers=RH)
        assert r.status_code == 400, (path, r.status_code, r.text[:200])
        assert r.json()["parameter"] == "colector" and "unknown parameter" in r.json()["detail"]


def test_flows_filters_negation_and_cursor_pagination(client):
    all_ = client.get("/api/v1/flows", params={"limit": "100"}, headers=RH).json()
    assert all_["count"] == 9
    one = all_["flows"][0]
    assert set(one) >= {"id", "client", "server", "observed_by", "by_observer", "outcome", "tunnel"}
    refused = client.get("/api/v1/flows", params={"outcome": "refused"}, headers=RH).json()
    assert [f["server"]["port"] for f in refused["flows"]] == [5433]
    not_client_only = client.get("/api/v1/flows", params={"observer": "server"}, headers=RH).json()
    assert not_client_only["count"] == 7
    nots = client.get("/api/v1/flows", params={"not_to_workload": "api", "ip": "10.244.3.0/24"},
                      headers=RH).json()
    assert nots["count"] == 2
    seen, cursor = [], None
    while True:
        p = {"sort": "-bytes", "limit": "2", "to_port": "9090"}
        if cursor:
            p["cursor"] = cursor
        page = client.get("/api/v1/flows", params=p, headers=RH).json()
        seen += [f["bytes_c2s"] for f in page["flows"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [700, 600, 500, 400, 300, 200, 100]
    bad = client.get("/api/v1/flows", params={"cursor": "garbage"}, headers=RH)
    assert bad.status_code == 400 and bad.json()["parameter"] == "cursor"


def test_workloads_and_impact(client):
    ws = client.get("/api/v1/workloads", params=A, headers=RH).json()["workloads"]
    assert [w["id"] for w in ws] == ["shop/api", "shop/db", "shop/frontend"]
    db = client.get("/api/v1/workloads/db", params=A, headers=RH).json()
    assert db["impact"] == [{"workload": "shop/api", "distance": 1},
                            {"workload": "shop/frontend", "distance": 2}]
    assert client.get("/api/v1/workloads/shop/api", params=A, headers=RH).json()["downstream"] == ["shop/db"]
    assert client.get("/api/v1/workloads/nobody", params=A, headers=RH).status_code == 404


def test_diff_shows_a_new_dependency(client):
    later = T0 + timedelta(hours=1)
    send(client, "h1", 500, [rec("client", start=later, server=rec("client").server.__class__("10.244.3.11", 5432))])
    d = client.get("/api/v1/diff", headers=RH, params={
        "a_from": A["from"], "a_to": A["to"], "b_from": (later - timedelta(minutes=5)).isoformat(),
        "b_to": (later + timedelta(minutes=5)).isoformat()}).json()
    assert [(e["source"], e["target"]) for e in d["added"]] == [("shop/frontend", "shop/db")]
    assert {(e["source"], e["target"]) for e in d["removed"]} == {("shop/frontend", "shop/api"),
                                                                    ("shop/api", "shop/db")}


def test_read_routes_need_the_read_token_and_are_documented(client):
    assert client.get("/api/v1/graph").status_code == 401
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/graph", "/api/v1/flows", "/api/v1/flows/stream", "/api/v1/diff",
            "/api/v1/workloads", "/api/v1/workloads/{workload}"} <= set(paths)


def test_sse_stream_sends_matching_flows_live(settings):
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    events: list[dict] = []
    subscribed = threading.Event()

    def listen():
        with httpx.stream("GET", f"{base}/api/v1/flows/stream",
                          params={"to_port": "5432", "limit": "2"}, headers=RH, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith(": eastwest"):
                    subscribed.set()
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    lt = threading.Thread(target=listen)
    lt.start()
    assert subscribed.wait(10)
    try:
        with httpx.Client(base_url=base) as c:
            fill(c)  # 9 connections, one of them to port 5432
            # the next batch after the first event: batches correlated in one step (the worker
            # groups waiting batches when behind) give one event for their last state
            deadline = time.monotonic() + 10
            while not events and time.monotonic() < deadline:
                time.sleep(0.01)
            Ep = rec("client").client.__class__
            send(c, "h3", 1, [rec("server", collector="h3", client=Ep("10.244.2.11", 50000),
                                  server=Ep("10.244.3.11", 5432), c2s=50, s2c=60)])
        lt.join(30)
        assert not lt.is_alive()
        # one event per update of a matching connection: api->db opened, then its server view
        assert [(e["server"]["port"], e["observed_by"]) for e in events] == [
            (5432, ["client"]), (5432, ["client", "server"])]
        assert events[0]["id"] == events[1]["id"]
    finally:
        server.should_exit = True
        t.join(10)


def test_metrics_show_the_correlator(client):
    text = client.get("/metrics").text
    assert "eastwest_correlator_connections 9.0" in text
