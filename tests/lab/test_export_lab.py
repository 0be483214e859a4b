"""Exporters end to end on the lab: one lab run (3 hosts, socket probes + VXLAN per host, a real
aggregator), watched at once by
- a real Prometheus (Debian's package, started here on a free loopback port with its own config
  and data dir) scraping the aggregator and the three collectors every second, and
- a fake Tempo: an OTLP gRPC receiver built from opentelemetry-proto's service definitions
  (tests/unit/fake_otlp.py), receiving the aggregator's OTLP traces and metrics.

Proved: Prometheus's per-edge series equal the truth (connections, bytes each way, refused and
reset failures) per workload edge; EVERY PromQL expression of EVERY dashboard (variables resolved
through Prometheus the way Grafana does) returns data for the run; every truth connection arrives
as one well-formed CLIENT/SERVER span pair (a CLIENT span alone when no server took part:
refused, timed out); Tempo's pairing of the received spans equals the aggregator's graph; the
OTLP metrics carry the truth's totals."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.lab.harness import (
    INGEST,
    Aggregator,
    collectors,
    paired,
    served_edges,
    truth_edges,
    window_of,
)
from tests.servers import free_port
from tests.unit.fake_otlp import KIND_CLIENT, KIND_SERVER, FakeTempo, service_graph, workload

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewo"
SCRAPE_S = 1
AGG_JOB, COL_JOB = "eastwest-aggregator", "eastwest-collector"


def wait_for(what: str, pred, timeout: float = 120.0, every: float = 0.2):
    """Poll `pred` until it returns something truthy (an awaited condition, with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


class Prometheus:
    """Debian's prometheus on 127.0.0.1:<free port>, its own config and TSDB under `root`."""

    def __init__(self, root: Path, targets: dict[str, list[str]]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed (scripts/setup-system.sh installs it)")
        root.mkdir(parents=True, exist_ok=True)
        cfg = {"global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
               "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]}
                                  for job, t in targets.items()]}
        (root / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is YAML
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"))

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, n_targets: int) -> None:
        wait_for("prometheus to be ready", self._ready, 60)

        def all_up():
            active = self.api("/api/v1/targets")["activeTargets"]
            return len(active) == n_targets and all(t["health"] == "up" for t in active)
        wait_for("every scrape target up", all_up, 60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def api(self, path: str, **params) -> dict:
        r = httpx.get(self.url + path, params=params, timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def instant(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("/api/v1/query", **params)["result"]

    def value(self, expr: str) -> float:
        res = self.instant(expr)
        return float(res[0]["value"][1]) if res else math.nan


@pytest.fixture(scope="module")
def run(lab_factory, tmp_path_factory):
    """The one lab run every test here reads."""
    lab = lab_factory(name=LAB, hosts=3, pods_per_host=2)
    tmp = tmp_path_factory.mktemp("export")
    prom = None
    with FakeTempo() as tempo, \
            Aggregator(tmp / "data", lab.inventory["workload_map"], otlp_endpoint=tempo.endpoint,
                       otlp_protocol="grpc", otlp_metrics_interval_s=1.0, export_settle_s=3.0) as agg:
        try:
            t0 = time.time()
            with collectors(lab, agg.url, tmp / "spool", ["h1", "h2", "h3"], metrics=True) as cs:
                prom = Prometheus(tmp / "prometheus", {
                    AGG_JOB: [agg.url.removeprefix("http://")],
                    COL_JOB: [c.metrics_target for c in cs]})
                prom.start(n_targets=4)
                truth = lab.traffic(duration=6.0, seed=17)
                # one refused batch, so the drops panels have something to show (a real drop:
                # an envelope without a collector name)
                r = httpx.post(agg.url + "/api/v1/ingest", headers={
                    "Authorization": f"Bearer {INGEST}", "content-type": "application/json"},
                    content=json.dumps({"collector": "", "batch_seq": 1,
                                        "sent_at": datetime.now(UTC).isoformat(), "records": [{}]}))
                assert r.status_code == 400, r.text
                for c in cs:
                    c.stop()  # every record flushed and acknowledged
            ex = agg.app.state.pipeline.exporters
            # acknowledged is not yet correlated: the last records reach the exporters when the
            # worker has applied them
            assert agg.app.state.pipeline.correlation.applied(60), "the worker did not catch up"
            # every closed connection is complete after the settle time (connections still open
            # when the collectors stopped stay pending, as they should)
            wait_for("every closed connection complete",
                     lambda: ex.completions.pending_closed() == 0, 120)
            ex.force_flush()
            done = time.time()
            # Prometheus has scraped the aggregator after the last completion
            wait_for("a scrape after the last completion", lambda: prom.instant(
                f'timestamp(eastwest_store_records{{job="{AGG_JOB}"}})')[0]["value"][1] and float(
                prom.instant(f'timestamp(eastwest_store_records{{job="{AGG_JOB}"}})')[0]["value"][1]) > done + SCRAPE_S)
            t1 = time.time()
            graph = agg.get("/api/v1/graph", **window_of(truth))
            yield {"lab": lab, "truth": truth, "prom": prom, "tempo": tempo, "agg": agg,
                   "graph": graph, "t0": t0, "t1": t1}
        finally:
            if prom is not None:
                prom.stop()


def wid_of_ip(lab) -> dict[str, str]:
    """Pod IP -> workload id (namespace/name), from the lab's static workload map."""
    import yaml

    wl = yaml.safe_load(Path(lab.inventory["workload_map"]).read_text())["workloads"]
    return {e["match"].split("/")[0]: (f"{e['namespace']}/{e['name']}" if e.get("namespace") else e["name"])
            for e in wl}


# -- Prometheus ----------------------------------------------------------------------------------
def by_edge(results, value=float):
    out = {}
    for r in results:
        m = r["metric"]
        key = (f"{m['client_namespace']}/{m['client']}" if m.get("client_namespace") else m["client"],
               f"{m['server_namespace']}/{m['server']}" if m.get("server_namespace") else m["server"])
        out[key] = value(r["value"][1])
    return out


def test_prometheus_edge_series_equal_the_truth(run):
    prom, lab, truth = run["prom"], run["lab"], run["truth"]
    want = truth_edges(lab, truth)
    app = '{job="%s", protocol=~"tcp|udp"%s}'
    keys = "client, client_namespace, server, server_namespace"

    def q(metric, extra=""):
        return by_edge(prom.instant(f"sum by ({keys}) ({metric}{app % (AGG_JOB, extra)})"), int)

    conns = q("eastwest_edge_connections_total")
    assert conns == {k: v["connections"] for k, v in want.items()}
    assert q("eastwest_edge_bytes_total", ', direction="c2s"') == {k: v["bytes_c2s"] for k, v in want.items()}
    assert q("eastwest_edge_bytes_total", ', direction="s2c"') == {k: v["bytes_s2c"] for k, v in want.items()}
    wid = wid_of_ip(lab)
    refused: Counter = Counter()
    reset: Counter = Counter()
    for t in truth:
        edge = (wid[t["client_ip"]], wid[t["server_ip"]])
        refused[edge] += t["outcome"] == "refused"
        reset[edge] += t["outcome"] == "reset"
    assert sum(refused.values()) > 0 and sum(reset.values()) > 0, "the lab provokes both"
    assert q("eastwest_edge_failures_total", ', reason="refused"') == {k: n for k, n in refused.items() if n}
    assert q("eastwest_edge_failures_total", ', reason="reset"') == {k: n for k, n in reset.items() if n}
    # RTT: one observation per completed TCP connection that had an RTT sample
    assert prom.value(f'sum(eastwest_edge_rtt_seconds_count{{job="{AGG_JOB}"}})') > 0


# -- every dashboard query -----------------------------------------------------------------------
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))


def resolve_variables(prom, dash, t0, t1) -> dict[str, str]:
    """Query variables the way Grafana resolves them: label_values(metric, label) through the
    series API; 'All' becomes the alternation of every value (what Grafana sends without an
    allValue; ours use .*, which this makes stricter)."""
    values = {}
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", v["definition"])
        assert m, v["definition"]
        got = prom.api(f"/api/v1/label/{m.group(2)}/values", **{"match[]": m.group(1),
                                                                 "start": t0, "end": t1})
        assert got, f"{dash['uid']}: variable {v['name']} has no values"
        # regex-escaped, then escaped again for the PromQL string literal (as Grafana does)
        values[v["name"]] = "(" + "|".join(re.escape(x).replace("\\", "\\\\") for x in got) + ")"
    return values


def substitute(expr: str, values: dict[str, str], range_s: int) -> str:
    builtins = {"__range": f"{range_s}s", "__rate_interval": f"{4 * SCRAPE_S + 1}s",
                "__interval": f"{SCRAPE_S}s"}
    allv = {**builtins, **values}

    def one(m):
        name = m.group(1) or m.group(2)
        return allv[name] if name in allv else m.group(0)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def finite(result) -> bool:
    for r in result:
        vals = r.get("values") or [r["value"]]
        if any(math.isfinite(float(v[1])) for v in vals):
            return True
    return False


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_promql_query_of_the_dashboard_returns_data(run, path):
    prom, t0, t1 = run["prom"], run["t0"], run["t1"]
    dash = json.loads(path.read_text())
    values = resolve_variables(prom, dash, t0, t1)
    range_s = int(t1 - t0) + 2
    ran = 0
    for p in dash["panels"]:
        for t in p.get("targets", []):
            if t["datasource"]["type"] != "prometheus":
                continue
            expr = substitute(t["expr"], values, range_s)
            assert "$" not in expr.replace("$1", ""), expr
            if t.get("instant"):
                res = prom.api("/api/v1/query", query=expr, time=f"{t1:.3f}")["result"]
            else:
                res = prom.api("/api/v1/query_range", query=expr, start=f"{t0:.3f}",
                               end=f"{t1:.3f}", step=f"{SCRAPE_S}s")["result"]
            assert finite(res), f"{path.name} / {p['title']} / {t['refId']}: no data for {expr}"
            ran += 1
    if path.name == "eastwest-tempo.json":
        assert ran == 0  # Tempo queries only: checked structurally (tests/unit/test_dashboards.py)
    else:
        assert ran >= 5


def test_the_node_graph_frames_name_every_truth_edge(run):
    """The service map's nodes/edges queries, as Grafana sends them, give the truth's workloads
    and edges (the ICMPv6 of the overlay adds its own nodes, filtered here by the truth)."""
    prom, t0, t1 = run["prom"], run["t0"], run["t1"]
    dash = json.loads((REPO / "dashboards" / "eastwest-service-map.json").read_text())
    values = resolve_variables(prom, dash, t0, t1)
    ng = next(p for p in dash["panels"] if p["type"] == "nodegraph")
    t = {x["refId"]: substitute(x["expr"], values, int(t1 - t0) + 2) for x in ng["targets"]}
    edges = {(r["metric"]["source"], r["metric"]["target"]): r["metric"]["id"]
             for r in prom.instant(t["edges"], t1)}
    nodes = {r["metric"]["id"]: r["metric"]["title"] for r in prom.instant(t["nodes"], t1)}
    want = truth_edges(run["lab"], run["truth"])
    assert set(want) <= set(edges)
    assert all(edges[k] == f"{k[0]} -> {k[1]}" for k in want)
    assert {w for k in want for w in k} <= set(nodes)
    assert all(nodes[w] == w.rsplit("/", 1)[-1] for k in want for w in k)


# -- OTLP to the fake Tempo ----------------------------------------------------------------------
NO_SERVER = ("refused", "timeout")  # no server took part: a CLIENT span alone, none made up


def test_every_truth_connection_is_one_client_server_span_pair(run):
    tempo, truth = run["tempo"], run["truth"]
    spans = tempo.got.spans
    by_trace: dict[bytes, list] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    assert all(len(v) in (1, 2) for v in by_trace.values())
    pairs = []
    for v in by_trace.values():
        (c,) = [s for s in v if s.kind == KIND_CLIENT]
        server = [s for s in v if s.kind == KIND_SERVER]
        if server:
            assert server[0].parent_span_id == c.span_id
        assert c.parent_span_id == b""
        pairs.append((c, server[0] if server else None))

    def span_key(p: tuple) -> tuple:
        a = p[0].attributes
        return (a["network.transport"], a["client.address"], a["client.port"], a["server.address"],
                a["server.port"])

    def truth_key(t: dict) -> tuple:
        return (t["protocol"], t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])

    # one span pair per truth connection (a 5-tuple reused after a reset: two)
    assert Counter(map(span_key, pairs)) == Counter(map(truth_key, truth))
    want = paired(truth, pairs, truth_key, span_key, lambda p: p[0].start_ns)
    wid = wid_of_ip(run["lab"])
    error = 2  # STATUS_CODE_ERROR
    for t, (c, s) in want:
        assert c.attributes["eastwest.bytes.client_to_server"] == t["bytes_c2s"], t
        assert c.attributes["eastwest.bytes.server_to_client"] == t["bytes_s2c"], t
        assert (c.status == error) == (t["outcome"] in ("refused", "reset", "timeout")), t
        assert c.attributes["eastwest.connection.outcome"] == t["outcome"], t
        assert workload(c.resource) == wid[t["client_ip"]]
        assert c.attributes["peer.service"] == wid[t["server_ip"]].rsplit("/", 1)[-1]
        assert c.attributes["network.peer.address"] == t["server_ip"]
        assert (s is None) == (t["outcome"] in NO_SERVER), t
        if s is not None:
            assert s.status == c.status
            assert workload(s.resource) == wid[t["server_ip"]]
            assert s.attributes["network.peer.address"] == t["client_ip"]
        if t["client_host"] != t["server_host"] and t["outcome"] != "refused":
            assert c.attributes.get("eastwest.vni") == 42, t


def test_tempo_pairing_of_the_received_spans_equals_the_aggregator_graph(run):
    """What Tempo (service.namespace as a prefixed dimension, tests/unit/fake_otlp.RECOMMENDED)
    draws from the spans, once `wait` has passed: the aggregator's graph, but for connections
    no server took part in (refused, timed out), which go to Tempo's virtual node named by
    peer.service (a virtual node carries no namespace)."""
    sg = service_graph(run["tempo"].got.spans)
    assert (sg.unpaired_client, sg.unpaired_server) == (0, 0)
    wid = wid_of_ip(run["lab"])
    want: dict = {}
    for t in run["truth"]:
        server = wid[t["server_ip"]]
        key = (wid[t["client_ip"]], server.rsplit("/", 1)[-1] if t["outcome"] in NO_SERVER
               else server)
        e = want.setdefault(key, {"requests": 0, "failed": 0})
        e["requests"] += 1
        e["failed"] += t["outcome"] in ("refused", "reset", "timeout")
    assert sg.edges == want
    # the aggregator's graph: the same connections, under the server's namespaced name
    served = served_edges(run["graph"])
    resets = {(e["source"], e["target"]): e["resets"] for e in run["graph"]["edges"]}
    back: dict = {}
    for (c, s), e in sg.edges.items():
        k = (c, next(w for w in wid.values() if w.rsplit("/", 1)[-1] == s) if "/" not in s else s)
        b = back.setdefault(k, {"requests": 0, "failed": 0})
        b["requests"] += e["requests"]
        b["failed"] += e["failed"]
    assert back == {k: {"requests": v["connections"], "failed": v["failed"] + resets[k]}
                    for k, v in served.items()}
    assert all(workload(s.resource) for s in run["tempo"].got.spans)


def test_otlp_metrics_carry_the_truth_totals(run):
    tempo, lab, truth = run["tempo"], run["lab"], run["truth"]
    want = truth_edges(lab, truth)

    def sums(name, **match):
        out: Counter = Counter()
        for key, p in tempo.got.latest_points(name).items():
            a = dict(key)
            if a.get("network.transport") not in ("tcp", "udp"):
                continue
            if any(a.get(k) != v for k, v in match.items()):
                continue
            c = f"{a['client.namespace']}/{a['client']}" if a.get("client.namespace") else a["client"]
            s = f"{a['server.namespace']}/{a['server']}" if a.get("server.namespace") else a["server"]
            out[(c, s)] += p.as_int
        return dict(out)

    assert sums("eastwest.edge.connections") == {k: v["connections"] for k, v in want.items()}
    assert sums("eastwest.edge.bytes", direction="c2s") == {k: v["bytes_c2s"] for k, v in want.items()}
    assert sums("eastwest.edge.bytes", direction="s2c") == {k: v["bytes_s2c"] for k, v in want.items()}
    assert run["agg"].app.state.drops.snapshot().get(("otlp", "export_failed"), 0) == 0
