"""Per-edge Prometheus series on /metrics: they count what the API's graph counts (bytes each
way, connections, failures by reason, retransmits, RTT), stay within the edge budget (later
edges fold into other -> other, counted), and failures/RTT are told once per connection when it
is complete (closed and settled)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.app import create_app
from aggregator.changes import Changes, changes_of_plan
from aggregator.correlate import Correlator
from aggregator.exporters import Exporters
from aggregator.identity import IdentityResolver
from aggregator.settings import AggregatorSettings
from aggregator.store.derived import derived_of
from eastwest.clock import FakeClock
from eastwest.drops import Drops
from eastwest.record import Rtt
from tests.unit.test_api_query import INGEST, MAP_YAML, READ, RH, A, fill, send
from tests.unit.test_correlate import MAP, rec


def samples(text, name):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def app_for(tmp_path, **over):
    (tmp_path / "map.yaml").write_text(MAP_YAML)
    return create_app(AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST,
                                         read_token=READ, workload_map=tmp_path / "map.yaml",
                                         retention=None, **over))


def edge(client, server, port, **more):
    return tuple(sorted({"client": client, "client_namespace": "shop", "server": server,
                         "server_namespace": "shop", "server_port": str(port), "protocol": "tcp",
                         **more}.items()))


def test_edge_series_equal_the_graph(tmp_path):
    app = app_for(tmp_path)
    c = TestClient(app)
    fill(c)
    app.state.pipeline.exporters.tick(everything_closed=True)
    text = c.get("/metrics").text
    assert samples(text, "eastwest_edge_bytes_total") == {
        edge("frontend", "api", 9090, direction="c2s"): 2800, edge("frontend", "api", 9090, direction="s2c"): 70,
        edge("api", "db", 5432, direction="c2s"): 50, edge("api", "db", 5432, direction="s2c"): 60}
    assert samples(text, "eastwest_edge_connections_total") == {
        edge("frontend", "api", 9090): 7, edge("api", "db", 5432): 1, edge("api", "db", 5433): 1}
    assert samples(text, "eastwest_edge_failures_total") == {edge("api", "db", 5433, reason="refused"): 1}
    assert set(samples(text, "eastwest_edge_retransmits_total").values()) == {0}
    # the same totals as the API's graph
    g = c.get("/api/v1/graph", params=A, headers=RH).json()
    assert sum(e["bytes_c2s"] + e["bytes_s2c"] for e in g["edges"]) == 2980
    assert sum(e["connections_opened"] for e in g["edges"]) == 9
    assert samples(text, "eastwest_export_completed_connections_total") == {(): 9}


def test_rtt_histogram_and_retransmits(tmp_path):
    app = app_for(tmp_path)
    c = TestClient(app)
    send(c, "h1", 1, [rec("client", retransmits=3, rtt_us=Rtt(100, 400, 900))])
    send(c, "h2", 1, [rec("server", retransmits=1)])
    app.state.pipeline.exporters.tick(everything_closed=True)
    text = c.get("/metrics").text
    assert samples(text, "eastwest_edge_retransmits_total") == {edge("frontend", "api", 9090): 4}
    buckets = samples(text, "eastwest_edge_rtt_seconds_bucket")
    assert buckets[edge("frontend", "api", 9090, le="0.00025")] == 0
    assert buckets[edge("frontend", "api", 9090, le="0.0005")] == 1
    assert samples(text, "eastwest_edge_rtt_seconds_sum") == {edge("frontend", "api", 9090): 0.0004}


def test_past_the_budget_new_edges_fold_into_other(tmp_path):
    app = app_for(tmp_path, edge_budget=2)
    c = TestClient(app)
    fill(c)
    text = c.get("/metrics").text
    conns = samples(text, "eastwest_edge_connections_total")
    other = tuple(sorted({"client": "other", "client_namespace": "", "server": "other",
                          "server_namespace": "", "server_port": "", "protocol": ""}.items()))
    assert conns == {edge("frontend", "api", 9090): 7, other: 2}
    assert samples(text, "eastwest_edge_series") == {(): 1}
    assert samples(text, "eastwest_edge_series_folded_total")[()] > 0


_DATA: list[Path] = []


@pytest.fixture(autouse=True)
def _data_dir(tmp_path):
    """Each test's own data folder: the exporters keep what they told in it across a restart
    (exporters-told.json), so a shared one (it was /nonexistent, which root creates) made a
    later test's connections count as told already."""
    _DATA[:] = [tmp_path / "data"]


def settings_of(**over) -> AggregatorSettings:
    return AggregatorSettings(data_dir=_DATA[0], insecure_open=True, **over)


def exporters(clock, settle=5.0):
    ex = Exporters(settings_of(edge_budget=100, export_settle_s=settle), CollectorRegistry(),
                   Drops(), env={}, clock=clock)
    corr = Correlator(IdentityResolver(MAP))

    def ingest(records):
        ex.on_changes(changes(corr, records))
    return ex, ingest


def changes(corr: Correlator, records) -> Changes:
    """One step of the reference correlator, as the fan-out hands it to the exporters."""
    plan = corr.plan(records)
    corr.commit(plan)
    return changes_of_plan(plan, derived_of(plan).connection_rows())


def observers(done) -> list[str]:
    return [x.strip(",").split(",") for x in done.column("observed_by").to_pylist()]


def test_a_connection_is_told_once_when_closed_and_settled():
    clock = FakeClock()
    ex, ingest = exporters(clock)
    ingest([rec("client", final=False)])
    clock.t += 60
    assert ex.tick().num_rows == 0               # open: never told, however old
    assert ex.completions.pending == 1 and ex.completions.pending_closed() == 0
    ingest([rec("client")])                      # the client closes
    clock.t += 4.9
    assert ex.tick().num_rows == 0               # not settled: the server's view may follow
    assert ex.completions.pending_closed() == 1
    ingest([rec("server")])
    clock.t += 4.9
    assert ex.tick().num_rows == 0
    clock.t += 0.2
    assert observers(ex.tick()) == [["client", "server"]]
    ingest([rec("path")])                        # a late view of a told connection: not told again
    clock.t += 10
    assert ex.tick().num_rows == 0 and ex.completions.pending == 0
    assert ex.completions.pending_closed() == 0


def test_connections_that_never_close_are_given_up_and_counted():
    clock = FakeClock()
    ex, ingest = exporters(clock)
    ingest([rec("client", final=False)])
    clock.t += 1801
    assert ex.tick().num_rows == 0
    assert ex.drops.snapshot() == {("exporters", "never_closed"): 1}


@pytest.mark.parametrize("settle", [0.0, 5.0])
def test_shutdown_tells_every_closed_connection(settle):
    clock = FakeClock()
    ex, ingest = exporters(clock, settle)
    ingest([rec("client"), rec("client", cport=40001, final=False)])
    ex.shutdown()
    assert ex.completions.told == 1 and ex.completions.pending == 1


def test_a_counter_never_goes_down_and_a_decrease_is_paid_by_later_increases():
    """The wire's view first (1,000 bytes), then the client's interim behind it (400): the
    connection's best counters drop by 600. The store's rollups take -600 (docs/aggregator.md);
    the Prometheus counter stays at 1,000 and the client's next 600 bytes pay the debt."""
    registry = CollectorRegistry()
    ex = Exporters(settings_of(edge_budget=100, export_settle_s=5.0), registry, Drops(),
                   env={}, clock=FakeClock())
    corr = Correlator(IdentityResolver(MAP))

    def ingest(records):
        ex.on_changes(changes(corr, records))

    def registry_text():
        return generate_latest(registry).decode()

    ingest([rec("path", final=False, dur=20, c2s=1000, s2c=0)])
    ingest([rec("client", final=False, dur=10, c2s=400, s2c=0)])
    c2s = edge("frontend", "api", 9090, direction="c2s")
    assert samples(registry_text(), "eastwest_edge_bytes_total")[c2s] == 1000
    ingest([rec("client", final=False, dur=30, c2s=1000, s2c=0)])   # paid back: nothing new
    assert samples(registry_text(), "eastwest_edge_bytes_total")[c2s] == 1000
    ingest([rec("client", final=True, dur=40, c2s=1500, s2c=0)])    # 500 beyond
    assert samples(registry_text(), "eastwest_edge_bytes_total")[c2s] == 1500
