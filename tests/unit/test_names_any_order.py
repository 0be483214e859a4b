"""Each end of a connection is named by the most specific layer that ANY of its observers knows,
whatever order their records arrive in, with no workload map: the client's process names the
client end only once the client's own record is in, the server's process the server end. The
volumes already attributed under a provisional name (`external:<ip>`) move to the final one.
Checked, for every subset of {client, server, path} in every arrival order, in every output:
the connection rows, the rollups (raw and through the graph), the Prometheus series, the live
stream (SSE hub) and the OTLP spans (an in-memory span exporter: no Tempo runs here)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from aggregator.graph import Window, build_graph
from aggregator.identity import IdentityResolver
from aggregator.store.duckdb import DuckDBStore
from aggregator.worker import WorkerSettings
from tests.unit.pipes import Driven, FakeClock, driven
from tests.unit.test_correlate import T0, rec
from tests.unit.test_prom_edges import samples

OBSERVERS = ("client", "server", "path")
SUBSETS = [s for n in (1, 2, 3) for s in itertools.combinations(OBSERVERS, n)]
ORDERS = [order for s in SUBSETS for order in itertools.permutations(s)]
CLIENT_IP, SERVER_IP = "10.244.1.11", "10.244.2.11"


def expected_names(observers: tuple[str, ...]) -> tuple[str, str]:
    """The most specific layer any observer knows: a side's own process, else its address."""
    return ("process:ew-frontend" if "client" in observers else f"external:{CLIENT_IP}",
            "process:ew-api" if "server" in observers else f"external:{SERVER_IP}")


def batches(observers: tuple[str, ...]) -> list[tuple[str, list[Any]]]:
    """Per observer, in arrival order: one batch with an interim record (minute 0) and the final
    one (minute 1), so the first observer's volumes land in two minutes under its names."""
    out = []
    for o in observers:
        coll = {"client": "h1", "server": "h2", "path": "h3"}[o]
        out.append((coll, [rec(o, collector=coll, final=False, dur=20, c2s=400, s2c=100),
                           rec(o, collector=coll, final=True, dur=70, c2s=1000, s2c=5000)]))
    return out


class Loop:
    """An asyncio loop in a thread: the live stream's subscribers live on one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def loop():
    lp = Loop()
    yield lp
    lp.close()


def rows(store: Driven) -> list[dict[str, Any]]:
    return store.rows("client_wid", "server_wid", "bytes_c2s", "bytes_s2c")


def run_order(tmp: Path, order: tuple[str, ...], loop: Loop) -> dict[str, Any]:
    """Feed the batches in `order`, one correlation step each, and read every output."""
    clock = FakeClock(datetime.now(UTC))
    spans = InMemorySpanExporter()
    store = driven(DuckDBStore(tmp), IdentityResolver(), clock=clock,
                   worker=WorkerSettings(coalesce=0), edge_budget=100, export_settle_s=5.0,
                   otlp_endpoint="http://127.0.0.1:9", otlp_signals=("traces",), otlp_filter="",
                   exporter_kwargs={"otlp_kwargs": {"span_exporter": spans}})
    ex = store.pipeline.exporters

    async def subscribe() -> Any:
        return store.hub.subscribe()

    async def drain(sub: Any) -> list[Any]:  # on the loop: what it was sent is queued first
        out = []
        while not sub.empty():
            out.append(sub.get_nowait())
        return out

    sub = loop.run(subscribe())
    try:
        for seq, (coll, recs) in enumerate(batches(order), 1):
            store.ingest(coll, seq, recs)
        assert store.flush(30)
        while store.hub.held:  # the stream holds a connection up to a second for its names
            store.hub.release()
            threading.Event().wait(0.05)
        events = loop.run(drain(sub))
        conns = rows(store)
        with store.store._lock:
            rollups = store.store._con.execute(
                "SELECT client_wid, server_wid, sum(bytes_c2s), sum(bytes_s2c) FROM rollups "
                "GROUP BY ALL HAVING sum(bytes_c2s) <> 0 OR sum(bytes_s2c) <> 0 "
                "ORDER BY ALL").fetchall()
        g = build_graph(store.read(), Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
        clock.t += 60  # names final (settle 10 s), every connection quiet for the span pair
        ex.tick()
        assert ex.otlp is not None
        ex.otlp.force_flush()
        text = generate_latest(store.pipeline.metrics.registry).decode()
        return {"conns": conns, "rollups": rollups, "graph": g, "events": events,
                "prom": samples(text, "eastwest_edge_bytes_total"),
                "opened": samples(text, "eastwest_edge_connections_total"),
                "spans": spans.get_finished_spans(), "renames": store.correlator.renames}
    finally:
        store.hub.unsubscribe(sub)
        store.close()


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: ">".join(o))
def test_each_end_is_named_by_what_any_observer_knows_in_every_output(tmp_path, loop, order):
    client, server = expected_names(order)
    out = run_order(tmp_path, order, loop)
    # the connection row
    (conn,) = out["conns"]
    assert (conn["client_wid"], conn["server_wid"]) == (client, server)
    assert (conn["bytes_c2s"], conn["bytes_s2c"]) == (1000, 5000)
    # the rollups: every byte under the final names once, nothing left under a provisional one
    assert out["rollups"] == [(client, server, 1000, 5000)]
    # the graph: one edge
    g = out["graph"]
    assert sorted(g.edges) == [(client, server)]
    e = g.edges[client, server]
    assert (e["connections_opened"], e["bytes_c2s"], e["bytes_s2c"]) == (1, 1000, 5000)
    # Prometheus: the bytes and the opening under the final names only
    labels = dict(client=client, client_namespace="", server=server, server_namespace="",
                  server_port="9090", protocol="tcp")
    assert out["prom"] == {tuple(sorted({**labels, "direction": "c2s"}.items())): 1000.0,
                           tuple(sorted({**labels, "direction": "s2c"}.items())): 5000.0}
    assert out["opened"] == {tuple(sorted(labels.items())): 1.0}
    # the live stream: every event shows the connection under its final names
    assert out["events"], "the stream sent nothing"
    assert {(r["client_wid"], r["server_wid"]) for r in out["events"]} == {(client, server)}
    # OTLP: a CLIENT span, and a SERVER span when the server was seen (its socket, or the wire
    # seeing it answer; none is made up), each resource the final name of its end; the
    # client's peer.service the server's
    names = sorted(s.resource.attributes["service.name"] for s in out["spans"])
    seen = "server" in order or "path" in order
    assert names == sorted([client, server] if seen else [client])
    (cspan,) = [s for s in out["spans"] if s.kind.name == "CLIENT"]
    assert cspan.attributes["peer.service"] == server
    # a provisional name was replaced exactly when a later record knew an end better: each
    # socket observer but the first renames its own end
    assert out["renames"] == sum(1 for side in ("client", "server") if side in order[1:])


def test_a_name_is_final_after_the_settle_time_and_a_later_observer_is_counted(tmp_path):
    """History does not change: the server's record arriving after the settle time leaves the
    server end as it was told, and counts the late name."""
    wall = FakeClock(T0)
    store = driven(DuckDBStore(tmp_path), IdentityResolver(), clock=wall,
                   worker=WorkerSettings(coalesce=0))
    corr = store.correlator
    try:
        store.ingest("h1", 1, [rec("client", collector="h1")])
        assert store.flush(30)
        wall.t += 11
        store.ingest("h2", 1, [rec("server", collector="h2")])
        assert store.flush(30)
        (conn,) = rows(store)
        assert (conn["client_wid"], conn["server_wid"]) == ("process:ew-frontend",
                                                            f"external:{SERVER_IP}")
        assert (corr.renames, corr.late_names) == (0, 1)
    finally:
        store.close()


def test_names_and_the_volumes_to_move_survive_a_restart(tmp_path):
    """A restart between the client's and the server's records: the connection's `naming`
    (its deadline and the volumes attributed so far) comes back from the store, and the
    server's record still renames the server end and moves its volumes."""
    store = driven(DuckDBStore(tmp_path), IdentityResolver(), worker=WorkerSettings(coalesce=0))
    store.ingest("h1", 1, [rec("client", collector="h1")])
    store.close()
    store = driven(DuckDBStore(tmp_path), IdentityResolver(), worker=WorkerSettings(coalesce=0))
    try:
        store.ingest("h2", 1, [rec("server", collector="h2")])
        assert store.flush(30)
        (conn,) = rows(store)
        assert (conn["client_wid"], conn["server_wid"]) == ("process:ew-frontend", "process:ew-api")
        g = build_graph(store.read(), Window(T0 - timedelta(minutes=5), T0 + timedelta(minutes=5)))
        assert sorted(g.edges) == [("process:ew-frontend", "process:ew-api")]
        assert g.edges["process:ew-frontend", "process:ew-api"]["bytes_c2s"] == 1000
    finally:
        store.close()
