"""Every API endpoint answers the same on ClickHouse (2 local shards behind Distributed tables)
as on DuckDB: the same batches go into one app per backend, then graph (every group_by, filters,
negation, text formats), flows (filters, every sort, every page of the cursor), workloads, one
workload's impact, diff, raw records and the live stream are compared byte for byte.

Connection ids are uuid4 in production; here both apps draw them from the same counter, so the
ids (and the sort ties they break) are equal too."""

from __future__ import annotations

import itertools
import json
import threading
import time
from datetime import timedelta

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.pipeline import build
from aggregator.settings import AggregatorSettings
from aggregator.store import open_store
from eastwest.record import Drop, Endpoint, Nat, Tunnel
from tests.servers import store_location
from tests.unit.mesh_records import meshed
from tests.unit.test_api_query import INGEST, MAP_YAML, READ, RH, fill, send
from tests.unit.test_correlate import T0, rec

A = {"from": (T0 - timedelta(minutes=5)).isoformat(), "to": (T0 + timedelta(hours=2)).isoformat()}
LATER = T0 + timedelta(hours=1)


@pytest.fixture
def same_ids(monkeypatch):
    """Connection ids and the test records' ids -> counters, restarted for each app (the apps
    then hand out the same connection ids, and get the same record ids). Returns `restart`,
    which gives the id source (n -> 16 * n bytes) to build the next app's correlator with."""
    import tests.unit.test_correlate as tc

    state = {"n": itertools.count(1)}

    def ids(n: int) -> bytes:
        return b"".join(next(state["n"]).to_bytes(16, "big") for _ in range(n))

    def restart():
        state["n"] = itertools.count(1)
        monkeypatch.setattr(tc, "_seq", itertools.count(1))
        return ids

    return restart


def settings_for(tmp_path, name):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    return AggregatorSettings(data_dir=tmp_path / name, ingest_token=INGEST, read_token=READ,
                              workload_map=tmp_path / "map.yaml", retention=None)


def fill_more(c):
    """fill() of test_api_query plus: a wire-only view with a tunnel, interim records over two
    minutes, a reset, UDP, an unknown (external) peer, drops (a blocked call the client saw time
    out, a drops-only flow with two reasons), and an hour later a new dependency."""
    fill(c)
    Ep = Endpoint
    send(c, "h1", 200, [rec("path", cport=42000, c2s=3000, s2c=300,
                            tunnel=Tunnel("vxlan", 42, "10.213.0.1", "10.213.0.2", 4789))])
    send(c, "h1", 201, [rec("client", cport=42001, final=False, c2s=10, s2c=1),
                        rec("client", cport=42002, connect="ok", resets=1, c2s=5, s2c=0)])
    send(c, "h1", 202, [rec("client", cport=42001, start=T0, dur=70.0, c2s=900, s2c=90)])
    send(c, "h2", 203, [rec("server", cport=42001, start=T0, dur=70.0, c2s=900, s2c=90)])
    send(c, "h2", 204, [rec("client", collector="h2", protocol="udp", connect=None,
                            client=Ep("10.244.2.11", 53000), server=Ep("10.96.0.10", 53),
                            c2s=40, s2c=120)])
    db = Ep("10.244.3.11", 5432)
    send(c, "h1", 206, [rec("client", cport=42010, client=Ep("10.244.1.11", 42010), server=db,
                            c2s=0, s2c=0, connect="timeout"),
                        rec("path", cport=42010, client=Ep("10.244.1.11", 42010), server=db,
                            source="drops", c2s=0, s2c=0, tunnel=None,
                            drops=[Drop("NETFILTER_DROP", 3)]),
                        rec("path", cport=42011, client=Ep("10.244.1.11", 42011), server=db,
                            source="drops", c2s=0, s2c=0, tunnel=None,
                            drops=[Drop("NETFILTER_DROP", 2), Drop("NO_SOCKET", 1)])])
    send(c, "h1", 205, [rec("client", start=LATER, server=Ep("10.244.3.11", 5432), c2s=7, s2c=8)])
    # a Service call (its client's record keeps the dialled ClusterIP): the Service view
    dnat = [Nat("dnat", Ep("10.96.0.11", 80), Ep("10.244.2.11", 9090), 4026531840)]
    send(c, "h1", 206, [rec("client", cport=42100, nat=dnat, c2s=11, s2c=22)])
    send(c, "h2", 207, [rec("server", cport=42100, c2s=11, s2c=22)])
    # a folded service-mesh call (issue 20): the client's, the server's (interim, then final)
    # and the wire's records; its `mesh` column and records round-trip on both stores
    send(c, "h1", 208, [meshed("client", 2, cport=42200)])
    send(c, "h2", 208, [meshed("server", 1, final=False, cport=42200)])
    send(c, "h3", 208, [meshed("path", 2, cport=42200, collector="h3")])
    send(c, "h2", 209, [meshed("server", 2, cport=42200)])


GETS = [
    ("/api/v1/graph", {**A}),
    ("/api/v1/graph", {**A, "group_by": "namespace"}),
    ("/api/v1/graph", {**A, "group_by": "host"}),
    ("/api/v1/graph", {**A, "workload": "db"}),
    ("/api/v1/graph", {**A, "not_to_workload": "api", "protocol": "tcp"}),
    ("/api/v1/graph", {**A, "ip": "10.244.3.0/24"}),
    ("/api/v1/graph", {**A, "observer": "path"}),
    ("/api/v1/graph", {**A, "outcome": "refused"}),
    ("/api/v1/graph", {**A, "vni": "42"}),
    ("/api/v1/graph", {"from": (T0 - timedelta(minutes=1)).isoformat(),
                       "to": (T0 + timedelta(seconds=30)).isoformat()}),
    ("/api/v1/graph", {**A, "group_by": "service"}),
    ("/api/v1/graph", {**A, "group_by": "service", "to_service": "10.96.0.0/16"}),
    ("/api/v1/graph", {**A, "format": "dot"}),
    ("/api/v1/graph", {**A, "show_proxies": "true"}),
    ("/api/v1/graph", {**A, "group_by": "host", "show_proxies": "true"}),
    ("/api/v1/graph", {**A, "format": "mermaid"}),
    ("/api/v1/workloads", {**A}),
    ("/api/v1/workloads/db", {**A}),
    ("/api/v1/workloads/shop/api", {**A}),
    ("/api/v1/diff", {"a_from": A["from"], "a_to": (T0 + timedelta(minutes=5)).isoformat(),
                      "b_from": (LATER - timedelta(minutes=5)).isoformat(),
                      "b_to": (LATER + timedelta(minutes=5)).isoformat()}),
    ("/api/v1/records", {"limit": "1000"}),
    ("/api/v1/records", {"collector": "h2", "since": (T0 + timedelta(seconds=1)).isoformat()}),
    *[("/api/v1/flows", {"sort": s, "limit": "1000"})
      for s in ("start", "-start", "last_seen", "-last_seen", "bytes", "-bytes",
                "client_workload", "-server_workload")],
    ("/api/v1/flows", {"outcome": "refused"}),
    ("/api/v1/flows", {"observer": "server", "not_port": "9090"}),
    ("/api/v1/flows", {"not_observer": "client"}),
    ("/api/v1/flows", {"from_ip": "10.244.1.0/24", "to_port": "9090", "sort": "bytes"}),
    ("/api/v1/flows", {"since": (T0 + timedelta(seconds=30)).isoformat()}),
    ("/api/v1/flows", {"until": T0.isoformat()}),
    ("/api/v1/flows", {"protocol": "udp"}),
    ("/api/v1/flows", {"namespace": "shop", "not_outcome": "ok"}),
    ("/api/v1/flows", {"outcome": "dropped"}),
    ("/api/v1/graph", {**A, "outcome": "dropped"}),
]


def _body(r) -> object:
    """JSON compared as values (key order is the serializer's business), text as text."""
    return r.json() if r.headers["content-type"].startswith("application/json") else r.text


def answers(c) -> list[tuple[str, dict, int, object]]:
    out = []
    for path, params in GETS:
        r = c.get(path, params=params, headers=RH)
        out.append((path, params, r.status_code, _body(r)))
    # every page of every sort, following next_cursor
    for sort in ("start", "-bytes", "last_seen"):
        params = {"sort": sort, "limit": "2"}
        while True:
            r = c.get("/api/v1/flows", params=params, headers=RH)
            out.append(("/api/v1/flows", dict(params), r.status_code, _body(r)))
            nxt = r.json()["next_cursor"]
            if not nxt:
                break
            params["cursor"] = nxt
    return out


def app_for(tmp_path, backend, store, ids):
    settings = settings_for(tmp_path, backend)
    return create_app(settings, pipeline=build(settings, store=store, ids=ids))


def per_batch(app):
    """DuckDB's correlation worker groups waiting batches into one step when it is behind (the
    connections come out the same; ids drawn in another order, a rollup delta in another minute,
    one stream event for several updates); ClickHouse correlates each batch as it comes. The
    comparison pins DuckDB to one batch per step."""
    from aggregator.worker import JournaledCorrelation, WorkerSettings

    worker = app.state.pipeline.correlation
    if isinstance(worker, JournaledCorrelation):
        worker.settings = WorkerSettings(coalesce=0)
    return app


def test_every_endpoint_answers_the_same_on_clickhouse_as_on_duckdb(tmp_path, same_ids):
    results = {}
    for backend in ("duckdb", "clickhouse"):
        ids = same_ids()
        store = open_store(backend, store_location(backend, tmp_path / backend))
        with TestClient(per_batch(app_for(tmp_path, backend, store, ids))) as c:
            fill_more(c)
            results[backend] = answers(c)
        store.close()
    duck, click = results["duckdb"], results["clickhouse"]
    assert len(duck) == len(click) > len(GETS)
    for d, k in zip(duck, click, strict=True):
        assert d[2] == 200, d
        assert d == k, f"{d[0]} {d[1]}"
    # and the data is what the test meant to put there (a comparison of two empties proves nothing)
    graph = duck[0][3]
    assert {(e["source"], e["target"]) for e in graph["edges"]} >= {
        ("shop/frontend", "shop/api"), ("shop/api", "shop/db"), ("shop/frontend", "shop/db")}
    drops = {(e["source"], e["target"]): e["drops"] for e in graph["edges"]}
    assert drops[("shop/frontend", "shop/db")] == {
        "packets": 6, "reasons": {"NETFILTER_DROP": 5, "NO_SOCKET": 1}}
    assert drops[("shop/frontend", "shop/api")] is None
    meshes = {(e["source"], e["target"]): e["mesh"] for e in graph["edges"]}
    assert meshes[("shop/frontend", "shop/api")]["connections"] == 1
    assert meshes[("shop/api", "shop/db")] is None
    flows = [f for a in duck if a[0] == "/api/v1/flows" for f in a[3]["flows"]]
    [call] = {f["client"]["port"]: f["mesh"] for f in flows if f["mesh"]}.values()
    assert [h["observer"] for h in call["hops"]] == ["client", "client", "server", "server"]
    assert call["hops"][-1]["bytes_c2s"] == 2000  # the server's final record's hops
    split = next(a[3] for a in duck if a[1].get("show_proxies") and "group_by" not in a[1])
    assert {n["id"] for n in split["nodes"] if n["kind"] == "proxy"} == {
        "shop/frontend~ew-sidecar", "shop/api~ew-sidecar"}
    records = next(a[3] for a in duck if a[0] == "/api/v1/records")["records"]
    assert sum(1 for r in records if r["mesh"] is not None) == 3


def _stream_events(app, feed) -> list[dict]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    events: list[dict] = []
    subscribed = threading.Event()

    def listen():
        with httpx.stream("GET", f"{base}/api/v1/flows/stream",
                          params={"to_workload": "api", "limit": "9"}, headers=RH, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith(": eastwest"):
                    subscribed.set()
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    lt = threading.Thread(target=listen)
    lt.start()
    try:
        assert subscribed.wait(10)
        with httpx.Client(base_url=base) as c:
            feed(c)
        lt.join(30)
        assert not lt.is_alive()
    finally:
        server.should_exit = True
        t.join(10)
    return events


def test_the_live_stream_is_the_same_on_clickhouse_as_on_duckdb(tmp_path, same_ids):
    got = {}
    for backend in ("duckdb", "clickhouse"):
        ids = same_ids()
        store = open_store(backend, store_location(backend, tmp_path / backend))
        try:
            app = per_batch(app_for(tmp_path, backend, store, ids))
            got[backend] = _stream_events(app, fill_more)
        finally:
            store.close()
    assert len(got["duckdb"]) == 9
    assert got["duckdb"] == got["clickhouse"]
