"""`eastwest demo` itself (the command behind `make demo` and `make run`), as a newcomer meets it:
started as a user starts it (Kubernetes-style Services by default: ClusterIP calls and the
load generator's NodePort calls), left running for half a minute (a newcomer looks within the
first minute) while the live map's graph is read every couple of seconds, then the dashboard
in a real headless Chromium. The map shows the six services and the load generator, each once,
with one edge per calling pair of the lab's ground truth and nothing else (no `external:` twin
of a service, no link-local chatter of the overlay, and at no moment of the run a NodePort
call's half as a node: `node-h2` dialled, or the masquerade's address, while the middle host's
record has not joined them yet); the API's graph says the same. Ctrl-C stops everything: the
command exits 0 and the lab's namespaces are gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ARTIFACTS, REPO, require_root
from tests.lab.harness import truth_edges
from tests.servers import free_port
from tests.web.conftest import open_dashboard, shot, shown, wait_render

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
NAME = "ewdemot"      # the demo's lab (not the default `ewdemo`: a user's demo may be up)
RUN_S = 30.0          # "within the first minute" (every calling pair has calls by then)


class Demo:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = ARTIFACTS / "demo.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # a process started in the background of a non-interactive shell has SIGINT ignored:
        # give the child the default disposition, or Ctrl-C would test nothing
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eastwest", "demo", "--name", NAME, "--listen",
             f"127.0.0.1:{self.port}", "--data", str(data)], cwd=REPO,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.started = datetime.now(UTC)
        self.token = ""
        self.samples: list[tuple[float, set[str]]] = []  # (s into the run, live graph's nodes)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"eastwest demo exited: {self.log.read_text()[-2000:]}"
            tokens = self.data / "tokens.env"
            if tokens.exists() and "eastwest is running" in self.log.read_text() and self._up():
                self.token = dict(line.split("=", 1) for line in tokens.read_text().split())[
                    "EASTWEST_READ_TOKEN"]
                return
            time.sleep(1)
        pytest.fail(f"eastwest demo not up after {timeout:g} s: {self.log.read_text()[-2000:]}")

    def _up(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=60,
                      headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.text
        return r.json()

    def watch(self, seconds: float, every: float = 2.0) -> None:
        """Let the demo run, reading the live map's graph (the dashboard's default window, the
        last 15 minutes to now) every `every` seconds."""
        t0 = time.monotonic()
        while (t := time.monotonic() - t0) < seconds:
            g = self.get("/api/v1/graph", **{"from": "15m"})
            self.samples.append((round(t, 1), {n["id"] for n in g["nodes"]}))
            time.sleep(max(0.0, every - (time.monotonic() - t0 - t)))

    def flows_of(self, workloads: set[str]) -> list[str]:
        """What a failure names: each connection of `workloads` (start, age now, observers,
        ends), so a half the middle host never reported shows apart from one joined late."""
        now = datetime.now(UTC)
        out = []
        for w in sorted(workloads):
            since = (self.started - timedelta(minutes=1)).isoformat()
            for f in self.get("/api/v1/flows", workload=w, limit=50, since=since)["flows"]:
                age = (now - datetime.fromisoformat(f["start"].replace("Z", "+00:00"))).total_seconds()
                out.append(f"{f['start']} ({age:.1f} s ago) {f['observed_by']} "
                           f"{f['client']['workload']['id']} {f['client']['ip']}:{f['client']['port']} -> "
                           f"{f['server']['workload']['id']} {f['server']['ip']}:{f['server']['port']} "
                           f"service {f['service_ip']}:{f['service_port']}")
        return out

    def lab(self) -> Any:
        from eastwest.lab import Lab

        return Lab.open(NAME)

    def truth(self) -> list[dict[str, Any]]:
        """The truth so far; a Service call's server is the backend that served it (the demo
        dials Services by default: only the server's ledger knows the backend)."""
        lab = self.lab()
        out = []
        for f in sorted((Path(lab.inventory["state_dir"]) / "truth").glob("*.jsonl")):
            out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if lab.inventory.get("cluster_services"):
            lab.resolve_backends(out)
        return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    require_root()
    from eastwest.lab import Lab

    Lab.down_by_name(NAME)
    d = Demo(tmp_path_factory.mktemp("demo") / "data")
    try:
        d.wait_ready()
        d.watch(RUN_S)
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(30)
        Lab.down_by_name(NAME)


def expected(d: Demo) -> tuple[set[str], set[tuple[str, str]]]:
    """The services and calling pairs of the truth so far, named as the lab's map names them."""
    edges = set(truth_edges(d.lab(), d.truth()))
    return {x for e in edges for x in e}, edges


def test_the_demo_graph_is_the_application(demo):
    nodes, edges = expected(demo)
    assert len(nodes) == 7 and len(edges) >= 6, (nodes, edges)  # six services + the loadgen
    g = demo.get("/api/v1/graph", **{"from": (demo.started - timedelta(minutes=1)).isoformat()})
    assert {n["id"] for n in g["nodes"]} == nodes
    assert {(e["source"], e["target"]) for e in g["edges"]} == edges
    assert all(n["kind"] != "External" for n in g["nodes"])


def test_the_live_map_never_shows_a_half_of_a_nodeport_call(demo):
    """Sampled every 2 s through the run: the NodePort calls were made (the truth), and no
    sample had a node that is no workload of the application: a NodePort call's client half
    ends at `node-h2` (the node dialled), its server half starts at the masquerade's address
    (h2's gateway, named `node-h2` too; `external:` if it were unnamed) until the middle host's
    record joins them (docs/aggregator.md, "NodePort calls with masquerade")."""
    assert any(t.get("via") == "nodeport" for t in demo.truth())
    nodes, _ = expected(demo)
    assert len(demo.samples) >= RUN_S / 3, demo.samples
    extra = [(t, sorted(ids - nodes)) for t, ids in demo.samples if ids - nodes]
    assert not extra, extra  # (s into the run, nodes the application does not have)


def test_the_demo_makes_udp_on_both_socket_kinds_and_to_a_dead_port(demo):
    """The demo's own UDP (docs/lab.md, "UDP"): exchanges of several datagrams each way on
    connected and unconnected sockets, and datagrams to a port where nobody listens, refused;
    the graph counts those as failed connections of an edge the application has anyway."""
    g = demo.get("/api/v1/graph", **{"from": (demo.started - timedelta(minutes=1)).isoformat()})
    truth = demo.truth()
    udp = [t for t in truth if t["protocol"] == "udp" and "dns" not in t]
    assert {t["udp_socket"] for t in udp if t["outcome"] == "ok"} == {"connected", "unconnected"}
    assert any(t["dgrams_c2s"] >= 2 and t["dgrams_s2c"] >= 2 for t in udp)
    dead = [t for t in udp if t["outcome"] == "refused"]
    assert dead and all(t["server_comm"] is None and t["dgrams_s2c"] == 0 for t in dead)
    pairs = truth_edges(demo.lab(), dead)
    by_pair = {(e["source"], e["target"]): e for e in g["edges"]}
    for pair in pairs:  # the graph was read first: it may lag the truth, never lead it
        assert by_pair[pair]["connections_failed"] >= 1 and "udp" in by_pair[pair]["protocols"]


def test_the_dashboard_shows_each_service_once_and_one_edge_per_calling_pair(demo, page):
    nodes, edges = expected(demo)
    open_dashboard(page, demo.url, demo.token, group="workload")
    wait_render(page, 0, timeout=60_000)
    drawn_nodes, drawn_edges, _ = shown(page)
    shot(page, "demo-after-a-minute")
    assert set(drawn_nodes) == nodes and len(drawn_nodes) == 7, demo.flows_of(set(drawn_nodes) - nodes)
    assert set(drawn_edges) == edges and len(drawn_edges) == len(edges)


def test_ctrl_c_stops_the_demo_and_takes_the_lab_down(demo):
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(180) == 0, demo.log.read_text()[-2000:]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{NAME}-" not in netns, netns
    assert not os.path.exists(f"/run/netns/{NAME}-h1")
