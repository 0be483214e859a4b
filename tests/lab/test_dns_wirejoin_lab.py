"""`eastwest collector` with `--dns` beside its underlay capture (issue 17): a DNS flow the host's
VXLAN carries is captured twice by one collector (in the client's namespace and on the underlay),
and must still be ONE connection at the aggregator.

Lab `ewdnsj` (4 hosts, VXLAN; api and a resolver pod on two of them): the command runs for api's
host (socket probes, the host's underlay, the DNS of the host's namespaces) and sends to a real
aggregator. Every DNS query of the truth made on that host is in exactly one connection: observed
by path and by the client's probe (and by the server's when the resolver is on the same host),
with its dns summary (name, type, rcode, answers); a query to another host's resolver is carried
by the wire's record (the tunnel is on it), a query to the host's own resolver by the DNS
capture's own; and among the raw records, every flow to port 53 has one path stream (one start)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.lab.harness import INGEST, Aggregator, window_of
from tests.servers import free_port

pytestmark = pytest.mark.lab
EW = [sys.executable, "-m", "eastwest"]


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def wait_ready(proc: subprocess.Popen, metrics: str, log: Path, timeout: float = 240.0) -> None:
    """Until the probes drained once (their map gauge is on /metrics): BPF compiled, attached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the collector exited {proc.returncode}: {log.read_text()}")
        try:
            if "eastwest_probe_map_entries" in httpx.get(metrics, timeout=2).text:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the collector did not get ready")


def test_each_dns_query_is_one_connection_with_its_dns_when_one_collector_has_both_captures(
        lab_factory, tmp_path):
    # 4 hosts of 3 pods: api and a resolver on h2 and on h4; each api pod asks both resolvers
    # in turn, its own host's (no overlay) and the other's (across the VXLAN)
    lab = lab_factory(name="ewdnsj", hosts=4, pods_per_host=3)
    inv = lab.inventory
    api = next(p for p in inv["pods"] if p["service"] == "api")
    host = api["host"]
    netns = lab.host_netns(host)
    resolvers = [p for p in inv["pods"] if p["service"] == "resolver"]
    assert {p["host"] for p in resolvers} - {host}, "no resolver on another host"
    assert host in {p["host"] for p in resolvers}, "no resolver on api's host"
    token = tmp_path / "ingest-token"
    token.write_text(INGEST)
    port = free_port()
    with Aggregator(tmp_path / "data", inv["workload_map"]) as agg:
        cmd = [*EW, "collector", "--collector-id", "ewdnsj-col",
               *[a for n in netns for a in ("--netns", n)], "--dns", "scoped",
               "--underlay", f"{netns[0]}/eth0", "--vxlan-port", str(inv["vxlan_port"]),
               "--interval", "1", "--idle-timeout", "2", "--dns-timeout", "2",
               "--aggregator", agg.url, "--ingest-token-file", str(token),
               "--spool-dir", str(tmp_path / "spool"), "--batch-age", "0.2",
               "--metrics-listen", f"127.0.0.1:{port}"]
        log = tmp_path / "collector.err"
        with open(log, "w") as errf:  # a file, not a pipe nobody reads while it runs
            proc = subprocess.Popen(cmd, stderr=errf, text=True)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}/metrics", log)
            # The resolvers' threads sit in recvfrom() since before the probes were attached:
            # the datagram that ends each of those calls names no sender (the probes' known
            # limit, docs/collector.md). A first round moves every thread into a call the
            # probes saw begin (tests/lab/test_socket_probes_udp.py does the same).
            warm = lab.traffic(duration=1.0, truth_path=tmp_path / "warm.jsonl", seed=2)
            time.sleep(3.0)
            truth = lab.traffic(duration=6.0, truth_path=tmp_path / "t.jsonl", seed=17, rate=25)
            time.sleep(1.0)  # the last packets read by both captures
        finally:
            proc.send_signal(signal.SIGTERM)  # every source flushes its finals, the join too
            proc.wait(timeout=180)
        err = log.read_text()
        assert proc.returncode == 0, err
        win = window_of(truth)
        flows = agg.get("/api/v1/flows", since=(ts(win["from"]) - timedelta(minutes=1)).isoformat(),
                        limit="10000", link_local="true")["flows"]
        raw = [r for r in agg.app.state.pipeline.read().records() if r.collector == "ewdnsj-col"]

    pod_host = {p["name"]: p["host"] for p in inv["pods"]}
    queries = [t for t in truth if "dns" in t and pod_host[t["client_pod"]] == host]
    assert len(queries) >= 10, "too few DNS queries on the collector's host to prove anything"
    by_tuple: dict[tuple, list[dict]] = defaultdict(list)
    for f in flows:
        by_tuple[(f["protocol"], f["client"]["ip"], f["client"]["port"], f["server"]["ip"],
                  f["server"]["port"])].append(f)
    kinds = {"other host": 0, "same host": 0}
    for t in queries:
        key = ("udp", t["client_ip"], t["client_port"], t["server_ip"], 53)
        found = by_tuple[key]
        assert len(found) == 1, f"a DNS query in {len(found)} connections: {t}\n{found}"
        f = found[0]
        same = t["server_host"] == host
        want = {"client", "path"} | ({"server"} if same else set())
        assert set(f["observed_by"]) >= want, (t, f["observed_by"])
        d, dq = f["dns"], t["dns"]
        assert d is not None, t
        assert [(n["name"], n["type"], n["count"], n["rcodes"]) for n in d["names"]] == [
            (dq["name"].rstrip("."), dq["type"], 1, {dq["rcode"]: 1})], t
        assert (d["queries"], d["responses"], d["timeouts"], d["rcodes"]) == (
            1, 1, 0, {dq["rcode"]: 1})
        assert sorted((a["type"], a["value"]) for a in d["answers"]) == sorted(
            [(dq["type"], a) for a in dq["answers"]] + [("CNAME", c) for c in dq["cnames"]])
        # across hosts the wire's record carried the DNS (its tunnel); on the host, the DNS
        # capture's own (no overlay between a pod and its own host's resolver)
        assert (f["tunnel"] is not None) == (not same), (t, f["tunnel"])
        kinds["same host" if same else "other host"] += 1
    assert kinds["same host"] and kinds["other host"], kinds

    # the raw records: one path stream (one start, one final with the DNS) per DNS flow of this
    # host's clients (the other api's queries to this host's resolver cross its underlay too:
    # the wire's records of them carry no DNS, this collector does not watch their client)
    starts: dict[tuple, set] = defaultdict(set)
    finals: dict[tuple, list] = defaultdict(list)
    for r in raw:
        if r.observer == "path" and r.server.port == 53:
            starts[r.key].add(r.start)
            if r.final:
                finals[r.key].append(r)
    mine = set()
    for t in queries:
        key = ("udp", t["client_ip"], t["client_port"], t["server_ip"], 53)
        mine.add(key)
        assert len(starts[key]) == 1 and len(finals[key]) == 1, (t, starts[key], finals[key])
        assert finals[key][0].dns is not None and finals[key][0].dns.queries == 1, t
    here = {p["ip"] for p in inv["pods"] if p["host"] == host}
    known = mine | {("udp", t["client_ip"], t["client_port"], t["server_ip"], 53)
                    for t in warm if "dns" in t}
    others = [k for k in finals if k not in known and k[1] in here]
    assert not others, f"DNS flows of this host's clients that the truth does not have: {others}"
    assert "dns/wire_after_dns" not in err and "dns/dns_after_wire" not in err, err
