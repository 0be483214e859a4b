"""The query commands against a running aggregator filled by a lab run, judged by the truth.

A lab (3 hosts x 2 pods, VXLAN) with one collector per host (socket probes scoped to the host's
namespaces, VXLAN capture on its underlay) sending to an aggregator that resolves workloads with
the lab's static map: the stack `eastwest demo` runs (eastwest/cli/demo.py `Stack`). The real
`eastwest` command (a subprocess, server and token from the environment) must print exactly the
truth's connections for each filter, one line per connection; `top` must count the truth's
connections and bytes per edge; `--follow` must receive flows made after it started.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import os
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from eastwest.cli.demo import Stack
from eastwest.client import ApiClient, ClientSettings
from tests.lab.harness import paired
from tests.servers import free_port

Truth = dict[str, Any]
Key = tuple[str, int, str, int]


@dataclass
class Live:
    stack: Stack
    lab: Any
    truth: list[Truth]  # TCP connections of the measured run
    since: str  # RFC 3339, after the warm-up ended and before the measured run began
    env: dict[str, str]
    service: dict[str, str]  # pod ip -> service
    host: dict[str, str]  # pod ip -> host


def key_of(t: Truth) -> Key:
    return (t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])


def flow_key(f: dict[str, Any]) -> Key:
    return (f["client"]["ip"], f["client"]["port"], f["server"]["ip"], f["server"]["port"])


def expected_observers(t: Truth) -> set[str]:
    obs = {"client"} if t["outcome"] == "refused" else {"client", "server"}
    return obs | ({"path"} if t["client_host"] != t["server_host"] else set())


def all_flows(client: ApiClient, since: str) -> list[dict[str, Any]]:
    out, cursor = [], None
    while True:
        doc = client.get_json("/api/v1/flows", [("since", since), ("protocol", "tcp"),
                                                ("limit", 10000)] + ([("cursor", cursor)] if cursor else []))
        out += doc["flows"]
        cursor = doc["next_cursor"]
        if not cursor:
            return out


def paired_flows(truth: list[Truth], flows: list[dict[str, Any]]) -> list[tuple[Truth, dict[str, Any] | None]]:
    return paired(truth, flows, key_of, flow_key, lambda f: f["start"])


def settled(client: ApiClient, since: str, truth: list[Truth]) -> bool:
    """Every truth connection is one closed flow with every observer it can have."""
    return all(f is not None and f["closed"] and set(f["observed_by"]) >= expected_observers(t)
               for t, f in paired_flows(truth, all_flows(client, since)))


def record_count(client: ApiClient) -> int:
    return len(client.get_json("/api/v1/records", [("limit", 100000)])["records"])


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Await a condition the aggregator reaches by itself (each poll is a real query)."""
    ev = threading.Event()
    deadline = datetime.now(UTC).timestamp() + timeout
    while datetime.now(UTC).timestamp() < deadline:
        if cond():
            return
        ev.wait(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def live(lab_factory, tmp_path_factory) -> Iterator[Live]:
    lab = lab_factory(name="ewqa", hosts=3, pods_per_host=2)
    data = tmp_path_factory.mktemp("ewq-aggregator")
    stack = Stack(data, f"127.0.0.1:{free_port()}")
    try:
        stack.aggregator = stack._spawn("aggregator", [
            "aggregator", "--listen", stack.listen, "--data", str(data / "store"),
            "--workload-map", str(lab.inventory["workload_map"])])
        stack.wait_ready()
        cids = []
        for h in lab.inventory["hosts"]:
            cid = f"ewqa-{h['name'].split('-')[-1]}"
            cids.append(cid)
            stack.start_collector(cid, netns=lab.host_netns(h["name"]),
                                  underlay=[f"{h['netns']}/{h['underlay_if']}"])
        settings = ClientSettings(server=stack.url, token=stack.tokens["EASTWEST_READ_TOKEN"])
        with ApiClient(settings) as client:
            def collectors_attached() -> bool:
                lab.traffic(duration=1.0, seed=3)  # warm-up traffic until every source reports
                recs = client.get_json("/api/v1/records", [("limit", 100000)])["records"]
                seen = {(r["collector"], r["source"]) for r in recs}
                return all((c, s) in seen for c in cids for s in ("socket", "vxlan"))

            wait_until(collectors_attached, "every collector's socket and VXLAN sources")
            since = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            truth: list[Truth] = []
            for seed in range(11, 16):  # a loaded machine makes fewer connections per second
                truth += [t for t in lab.traffic(duration=3.0, seed=seed) if t["protocol"] == "tcp"]
                if {"ok", "refused", "reset"} <= {t["outcome"] for t in truth}:
                    break
            (data / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truth))
            assert {"ok", "refused", "reset"} <= {t["outcome"] for t in truth}
            wait_until(lambda: settled(client, since, truth), "the truth's connections")
        pods = lab.inventory["pods"]
        env = {**os.environ, "EASTWEST_SERVER": stack.url,
               "EASTWEST_TOKEN": stack.tokens["EASTWEST_READ_TOKEN"],
               "XDG_CONFIG_HOME": str(data / "no-config")}
        yield Live(stack, lab, truth, since, env, {p["ip"]: p["service"] for p in pods},
                   {p["ip"]: p["host"] for p in pods})
    finally:
        stack.stop()


def eastwest(live: Live, *argv: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "eastwest", *argv], env=live.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == rc, proc.stderr
    return proc


def query(live: Live, *argv: str) -> list[dict[str, Any]]:
    out = eastwest(live, "flows", "--since", live.since, "--protocol", "tcp", "--limit", "0",
                   *argv, "-o", "jsonl").stdout
    return [json.loads(x) for x in out.splitlines()]


def svc(live: Live, t: Truth, side: str) -> str:
    return live.service[t[f"{side}_ip"]]


def in_net(ip: str, net: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(net)


CASES: list[tuple[list[str], Callable[[Live, Truth], bool]]] = [
    (["--to-workload", "db"], lambda lv, t: svc(lv, t, "server") == "db"),
    (["--to-workload", "db", "--not", "--outcome", "ok"],
     lambda lv, t: svc(lv, t, "server") == "db" and t["outcome"] != "ok"),
    (["--to-workload", "auth", "--outcome", "reset"],
     lambda lv, t: svc(lv, t, "server") == "auth" and t["outcome"] == "reset"),
    (["--from-workload", "api", "--to-port", "6379", "--to-port", "7000"],
     lambda lv, t: svc(lv, t, "client") == "api" and t["server_port"] in (6379, 7000)),
    (["--workload", "frontend"],
     lambda lv, t: "frontend" in (svc(lv, t, "client"), svc(lv, t, "server"))),
    (["--namespace", "load"], lambda lv, t: svc(lv, t, "client") == "loadgen"),
    (["--not", "--outcome", "ok", "--not", "--outcome", "refused"],
     lambda lv, t: t["outcome"] == "reset"),
    (["--observer", "path"], lambda lv, t: t["client_host"] != t["server_host"]),
    (["--vni", "42", "--to-workload", "api"],
     lambda lv, t: t["client_host"] != t["server_host"] and svc(lv, t, "server") == "api"),
    (["--not", "--observer", "path"], lambda lv, t: t["client_host"] == t["server_host"]),
    (["--from-ip", "10.244.2.0/24", "--not", "--to-ip", "10.244.3.0/24"],
     lambda lv, t: in_net(t["client_ip"], "10.244.2.0/24")
     and not in_net(t["server_ip"], "10.244.3.0/24")),
    (["--port", "5432", "--port", "6379"],
     lambda lv, t: t["server_port"] in (5432, 6379) or t["client_port"] in (5432, 6379)),
]


@pytest.mark.parametrize(("argv", "pred"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_stored_flows_are_exactly_the_truths_connections(live, argv, pred):
    flows = query(live, *argv)
    want = Counter(key_of(t) for t in live.truth if pred(live, t))
    got = Counter(flow_key(f) for f in flows)
    assert want, "the case selects nothing in this run: it would prove nothing"
    assert got == want  # each connection once (a 5-tuple reused after a reset: twice)


def test_flows_carry_the_truths_bytes_outcome_and_workloads(live):
    flows = query(live)
    assert Counter(flow_key(f) for f in flows) == Counter(key_of(t) for t in live.truth)
    for t, f in paired_flows(live.truth, flows):
        assert f is not None, t
        assert f["outcome"] == t["outcome"], t
        assert (f["bytes_c2s"], f["bytes_s2c"]) == (t["bytes_c2s"], t["bytes_s2c"]), t
        assert f["client"]["workload"]["name"] == svc(live, t, "client")
        assert f["server"]["workload"]["name"] == svc(live, t, "server")


def test_json_csv_and_table_say_the_same_as_jsonl(live):
    argv = ["flows", "--since", live.since, "--protocol", "tcp", "--to-workload", "db",
            "--limit", "0"]
    jsonl = query(live, "--to-workload", "db")
    doc = json.loads(eastwest(live, *argv, "-o", "json").stdout)
    rows = list(csv.DictReader(io.StringIO(eastwest(live, *argv, "-o", "csv").stdout)))
    table = eastwest(live, *argv, "-o", "table").stdout.splitlines()
    assert [f["id"] for f in doc] == [f["id"] for f in jsonl]
    assert [(r["client_ip"], int(r["client_port"]), int(r["bytes_c2s"]), int(r["bytes_s2c"]),
             r["outcome"], r["server_workload"]) for r in rows] == [
        (f["client"]["ip"], f["client"]["port"], f["bytes_c2s"], f["bytes_s2c"], f["outcome"],
         "db") for f in jsonl]
    assert len(table) == len(jsonl) + 1 and table[0].startswith("START")


def test_who_talks_to_db_how_much_in_one_command(live):
    """`eastwest top --to-workload db`: the truth's callers of db, connections and bytes.
    `--observer client` (every TCP connection has a client side) makes the graph sum the
    connections' own bytes: without a connection-level filter it takes volumes from per-minute
    rollups, which for this sub-minute window also hold the warm-up's bytes (docs/api.md)."""
    out = eastwest(live, "top", "--to-workload", "db", "--protocol", "tcp", "--observer",
                   "client", "--since", live.since, "-n", "0", "-o", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in live.truth:
        if svc(live, t, "server") == "db":
            w = want[f"shop/{svc(live, t, 'client')}"]
            w[0] += 1
            w[1] += t["bytes_c2s"] + t["bytes_s2c"]
            w[2] += t["outcome"] == "refused"
    assert {r["client"]: [int(r["connections"]), int(r["bytes_c2s"]) + int(r["bytes_s2c"]),
                          int(r["failed"])] for r in rows} == dict(want)
    assert {r["server"] for r in rows} == {"shop/db"}


def test_top_by_connections_counts_every_edge_of_the_truth(live):
    out = eastwest(live, "top", "--by", "connections", "--protocol", "tcp", "--since",
                   live.since, "-n", "0", "-o", "json").stdout
    got = {(e["source"], e["target"]): e["connections_opened"] for e in json.loads(out)}
    ns = {p["service"]: p["namespace"] for p in live.lab.inventory["pods"]}
    want = Counter((f"{ns[svc(live, t, 'client')]}/{svc(live, t, 'client')}",
                    f"{ns[svc(live, t, 'server')]}/{svc(live, t, 'server')}") for t in live.truth)
    assert got == dict(want)
    counts = list(got.values())
    assert [e["connections_opened"] for e in json.loads(out)] == sorted(counts, reverse=True)


def test_follow_receives_new_flows_as_they_happen(live):
    """`flows --follow --to-workload db` started, then traffic: its flows arrive, live."""
    n = 3
    # quiet first: no record of the earlier traffic still on its way (a collector's last batch,
    # a wire flow's idle timeout) to update an older connection while --follow listens
    with ApiClient(ClientSettings(server=live.stack.url,
                                  token=live.stack.tokens["EASTWEST_READ_TOKEN"])) as client:
        counts = [record_count(client)]

        def quiet() -> bool:
            counts.append(record_count(client))
            return len(counts) > 6 and counts[-1] == counts[-7]  # unchanged for 3 s

        wait_until(quiet, "the aggregator to receive no more records of earlier traffic")
    proc = subprocess.Popen([sys.executable, "-m", "eastwest", "flows", "--follow",
                             "--to-workload", "db", "--limit", str(n), "-o", "jsonl"],
                            env=live.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            lines.extend(proc.stdout)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started = datetime.now(UTC)
        while reader.is_alive() and proc.poll() is None:
            live.lab.traffic(duration=1.0, seed=5)  # new connections to db, until n arrived
            if (datetime.now(UTC) - started).total_seconds() > 120:
                pytest.fail("--follow received nothing within 120 s of traffic")
        reader.join(10)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    flows = [json.loads(x) for x in lines]
    assert len(flows) == n
    assert {f["server"]["workload"]["name"] for f in flows} == {"db"}
    old = [f for f in flows if f["start"] < started.isoformat().replace("+00:00", "Z")[:19]]
    assert not old, (started, old)


def test_refused_token_and_unreachable_aggregator_are_one_line_exit_1(live):
    env = {**live.env, "EASTWEST_TOKEN": live.stack.tokens["EASTWEST_INGEST_TOKEN"]}
    proc = subprocess.run([sys.executable, "-m", "eastwest", "flows"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "(403: " in proc.stderr
    env["EASTWEST_TOKEN"] = "x" * 32
    proc = subprocess.run([sys.executable, "-m", "eastwest", "graph"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "refused the token from EASTWEST_TOKEN (401" in proc.stderr
    env["EASTWEST_SERVER"] = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "eastwest", "top"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("eastwest top: cannot reach")
    assert Path(live.env["XDG_CONFIG_HOME"]).exists() is False  # no config file was in play


def truth_edges(live: Live) -> set[tuple[str, str]]:
    ns = {p["service"]: p["namespace"] for p in live.lab.inventory["pods"]}
    return {(f"{ns[svc(live, t, 'client')]}/{svc(live, t, 'client')}",
             f"{ns[svc(live, t, 'server')]}/{svc(live, t, 'server')}") for t in live.truth}


def test_graph_formats_are_the_apis_graph(live):
    argv = ["graph", "--since", live.since, "--protocol", "tcp"]
    doc = json.loads(eastwest(live, *argv, "-o", "json").stdout)
    assert {(e["source"], e["target"]) for e in doc["edges"]} == truth_edges(live)
    table = eastwest(live, *argv).stdout.splitlines()
    assert {tuple(ln.split()[:2]) for ln in table[1:]} == truth_edges(live)
    rows = list(csv.DictReader(io.StringIO(eastwest(live, *argv, "-o", "csv").stdout)))
    assert {(r["client"], r["server"]): int(r["connections"]) for r in rows} == {
        (e["source"], e["target"]): e["connections_opened"] for e in doc["edges"]}
    settings = ClientSettings(server=live.stack.url, token=live.env["EASTWEST_TOKEN"])
    with ApiClient(settings) as client:
        for fmt in ("dot", "mermaid"):
            text = client.get_text("/api/v1/graph", [("from", live.since), ("protocol", "tcp"),
                                                     ("format", fmt)])
            assert eastwest(live, *argv, "-o", fmt).stdout == text.rstrip("\n") + "\n"


def test_workloads_list_names_and_detail(live):
    names = eastwest(live, "workloads", "--since", live.since, "-o", "names").stdout.split()
    services = {svc(live, t, s) for t in live.truth for s in ("client", "server")}
    assert services <= set(names)
    out = eastwest(live, "workloads", "db", "--since", live.since).stdout
    callers = {c for c, s in truth_edges(live) if s == "shop/db"}
    assert out.startswith("shop/db  namespace shop")
    assert f"called by ({len(callers)}):" in out and all(c in out for c in callers)


def test_diff_against_an_empty_window_adds_every_edge(live):
    doc = json.loads(eastwest(live, "diff", "--a", "3h..2h", "--b", f"{live.since}..now",
                              "--protocol", "tcp", "-o", "json").stdout)
    assert {(e["source"], e["target"]) for e in doc["added"]} == truth_edges(live)
    assert doc["removed"] == [] and doc["changed"] == []
    table = eastwest(live, "diff", "--a", "3h..2h", "--b", f"{live.since}..now", "--protocol",
                     "tcp").stdout.splitlines()
    assert {ln.split()[0] for ln in table[1:]} == {"+"}
