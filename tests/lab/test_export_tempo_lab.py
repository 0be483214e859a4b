"""OTLP to Tempo end to end on the lab (issue 22): same-named workloads in two namespaces, UDP
flows, and a restart of the aggregator in the middle of the run.

One lab (3 hosts, the demo application, its UDP resolver), a workload map that names the
frontend pods `staging/api` and the api pods `prod/api` (two workloads called `api`), collectors
that keep running while the aggregator is stopped and started again on the same port and data
folder between two bursts of traffic. The aggregator's spans go to a fake Tempo whose receiver
pushes them, on arrival and on the real clock, through the Tempo double (tests/unit/
tempo_servicegraph.py: the ingestion window, pairing, virtual nodes, the service.namespace
dimension with client_/server_ prefixes). Proved: Tempo's edges equal `GET /api/v1/graph` (and
the truth), `staging/api -> prod/api` is its own series and not a self-loop, UDP flows are
pairs, no span fell outside Tempo's window and none was counted late."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.lab.harness import Aggregator, collectors, served_edges, window_of
from tests.unit.fake_otlp import FakeTempo, tempo_edges
from tests.unit.tempo_servicegraph import REQUEST_TOTAL

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewtempo"
NO_SERVER = ("refused", "timeout")


def renamed_map(src: Path, dst: Path) -> dict[str, str]:
    """The lab's map with frontend -> staging/api and api -> prod/api; pod IP -> workload id."""
    doc = yaml.safe_load(src.read_text())
    for e in doc["workloads"]:
        if e["name"] == "frontend":
            e["name"], e["namespace"] = "api", "staging"
        elif e["name"] == "api":
            e["namespace"] = "prod"
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return {e["match"].split("/")[0]: f"{e['namespace']}/{e['name']}" if e.get("namespace")
            else e["name"] for e in doc["workloads"]}


def wait_for(what, pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def run(lab_factory, tmp_path_factory):
    lab = lab_factory(name=LAB, hosts=3, pods_per_host=2)
    tmp = tmp_path_factory.mktemp("tempo")
    wid = renamed_map(Path(lab.inventory["workload_map"]), tmp / "map.yaml")
    # a generous export timeout: a loaded machine's fake Tempo may answer slowly, and a batch
    # not accepted in time is dropped (counted) by design, which this test must not mistake
    # for a connection told wrongly
    settings = dict(otlp_protocol="grpc", otlp_signals=("traces",), export_settle_s=2.0,
                    otlp_timeout_s=60.0)
    with FakeTempo() as tempo:
        first = Aggregator(tmp / "data", str(tmp / "map.yaml"), otlp_endpoint=tempo.endpoint,
                           **settings)
        first.__enter__()
        port = int(first.url.rsplit(":", 1)[1])
        try:
            with collectors(lab, first.url, tmp / "spool", ["h1", "h2", "h3"]) as cs:
                truth = lab.traffic(duration=3.0, seed=22)
                spans1 = first.app.state.pipeline.exporters.otlp.spans
                first.__exit__(None, None, None)           # graceful: tells and flushes
                first = None
                second = Aggregator(tmp / "data", str(tmp / "map.yaml"),
                                    otlp_endpoint=tempo.endpoint, **settings)
                second.server.config.port = port           # the collectors' URL stays
                with second:
                    truth += lab.traffic(duration=3.0, seed=23)
                    for c in cs:
                        c.stop()  # every record flushed (UDP flows end here) and acknowledged
                    pipeline = second.app.state.pipeline
                    ex = pipeline.exporters
                    # acknowledged is not yet correlated: the last records reach the exporters
                    # when the worker has applied them (a loaded CI run flushed before that)
                    assert pipeline.correlation.applied(60), "the worker did not catch up"
                    wait_for("every closed connection complete",
                             lambda: ex.completions.pending_closed() == 0)
                    ex.force_flush()
                    graph = second.get("/api/v1/graph", **window_of(truth))
                    late = ex.otlp.late_counts()
                    # Tempo's ticker, after `wait`: halves left alone become virtual nodes
                    tempo.got.tempo.expire(time.time() + tempo.got.tempo.config.wait_s + 1)
                    failed = spans1.failed_requests + ex.otlp.spans.failed_requests
                    yield {"truth": truth, "wid": wid, "tempo": tempo, "graph": graph,
                           "late": late, "failed_exports": failed}
        finally:
            if first is not None:
                first.__exit__(None, None, None)


def test_the_run_has_same_named_workloads_in_two_namespaces_and_udp(run):
    edges = {(run["wid"][t["client_ip"]], run["wid"][t["server_ip"]], t["protocol"])
             for t in run["truth"]}
    assert ("staging/api", "prod/api", "tcp") in edges
    assert any(p == "udp" for *_, p in edges)


def test_tempo_edges_equal_the_graph_across_the_restart(run):
    """Tempo's requests and failed requests per edge == the graph's connections, failures and
    resets; connections no server took part in (refused) go to Tempo's virtual node named by
    peer.service, without namespace."""
    sg = run["tempo"].got.tempo
    assert sg.discarded_spans == {} and sg.waiting == 0 and sg.expired_edges == {}
    assert run["late"] == {"ended_before_start": 0, "completed_late": 0, "export_delay": 0}
    assert run["failed_exports"] == 0  # no batch of spans dropped by a failed export
    wid = run["wid"]
    got = tempo_edges(sg)
    back: dict = {}
    for (c, s), e in got.items():
        if "/" not in s:  # a virtual node: the bare name of the server that refused
            (s,) = {w for w in wid.values() if w.rsplit("/", 1)[-1] == s}
        b = back.setdefault((c, s), {"requests": 0, "failed": 0})
        b["requests"] += int(e["requests"])
        b["failed"] += int(e["failed"])
    resets = {(e["source"], e["target"]): e["resets"] for e in run["graph"]["edges"]}
    assert back == {k: {"requests": v["connections"], "failed": v["failed"] + resets[k]}
                    for k, v in served_edges(run["graph"]).items()}
    # and the truth, connection for connection
    want: dict = {}
    for t in run["truth"]:
        server = wid[t["server_ip"]]
        if t["outcome"] in NO_SERVER:
            server = server.rsplit("/", 1)[-1]
        e = want.setdefault((wid[t["client_ip"]], server), {"requests": 0.0, "failed": 0.0})
        e["requests"] += 1
        e["failed"] += t["outcome"] in ("refused", "reset", "timeout")
    assert got == want


def test_the_two_apis_are_two_nodes_not_a_self_loop(run):
    sg = run["tempo"].got.tempo
    n = sum(1 for t in run["truth"] if (run["wid"][t["client_ip"]], run["wid"][t["server_ip"]])
            == ("staging/api", "prod/api"))
    assert n > 0
    assert sg.query(REQUEST_TOTAL, {"client": "api", "server": "api",
                                    "client_service_namespace": "staging",
                                    "server_service_namespace": "prod"}) == n
    assert sg.query(REQUEST_TOTAL, {"client": "api", "server": "api"}) == 0  # no bare self-loop


def test_udp_flows_are_span_pairs(run):
    spans = run["tempo"].got.spans
    udp = {s.trace_id for s in spans if s.attributes["network.transport"] == "udp"}
    n = sum(1 for t in run["truth"] if t["protocol"] == "udp")
    refused = sum(1 for t in run["truth"] if t["protocol"] == "udp" and t["outcome"] == "refused")
    assert n > 0 and len(udp) == n
    assert sum(1 for s in spans if s.trace_id in udp) == 2 * n - refused  # no server took part
