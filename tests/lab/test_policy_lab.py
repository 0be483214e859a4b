"""Policy proved in the lab (issue 21, parts 3 and 4): a policy suggested from a run of the demo
application (collectors -> aggregator -> GET /api/v1/policy/suggest) is enforced with iptables
(`eastwest lab policy apply`), the application runs again without a single connection blocked,
and a call that was never observed (frontend -> db:5432) is dropped: its connect times out after
exactly the SYNs its timeout implies, counted by the DROP rules of the policy chains.
The drop source of the client's host collector (skb:kfree_skb, counted in the kernel) reports
that call as one flow frontend -> db:5432 with reason NETFILTER_DROP and exactly those SYNs,
exported as a collector does (spool, HTTP) to an aggregator, which shows it as ONE connection
shop/frontend -> shop/db:5432 with outcome `dropped` and those packets by reason
(GET /api/v1/flows?outcome=dropped). `eastwest lab policy remove` opens it again."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from eastwest.record import Drop
from tests.lab.harness import INGEST, RH, Aggregator, collectors, truth_edges, window_of

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewxdpol"
CONNECT_TIMEOUT = 2.5


def syns_within(netns: str, timeout: float) -> int:
    """The SYNs Linux sends before a connect times out after `timeout` s: the first at 0, then a
    retransmission after the initial RTO of 1 s (TCP_TIMEOUT_INIT); the first
    `tcp_syn_linear_timeouts` retransmissions wait 1 s each (Linux 6.7+, default 4; without the
    sysctl every wait doubles, RFC 6298 5.5). 2.5 s keeps 0.5 s of margin either way: 3 SYNs
    with linear timeouts, 2 without."""
    path = "/proc/sys/net/ipv4/tcp_syn_linear_timeouts"
    r = subprocess.run(["ip", "netns", "exec", netns, "cat", path], capture_output=True, text=True)
    linear = int(r.stdout) if r.returncode == 0 else 0
    t, wait, n = 0.0, 1.0, 0
    while t < timeout:
        n += 1
        t += wait
        if n > linear:
            wait *= 2
    return n


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(name=LAB, hosts=3, pods_per_host=2)


def eastwest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eastwest", *args], capture_output=True,
                          text=True, timeout=120)


def unobserved_call(lab) -> str:
    """frontend -> db:5432 (the application never makes it): what connect() answered."""
    pods = {p["service"]: p for p in lab.inventory["pods"]}
    code = ("import socket,sys\ns=socket.socket(); s.settimeout(float(sys.argv[2]))\n"
            "try:\n  s.connect((sys.argv[1], 5432)); print('connected')\n"
            "except TimeoutError:\n  print('timeout')\nexcept OSError as e:\n  print(e.strerror)")
    out = subprocess.run(["ip", "netns", "exec", pods["frontend"]["netns"], sys.executable, "-c",
                          code, pods["db"]["ip"], str(CONNECT_TIMEOUT)],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def policy_drops(lab) -> int:
    """Packets counted by the DROP rules that end the lab's policy chains, on every host (the
    suggestion isolates frontend for egress too: the SYN dies on the client's host)."""
    n = 0
    for h in lab.inventory["hosts"]:
        out = subprocess.run(["ip", "netns", "exec", h["netns"], "iptables", "-w", "-L", "-v",
                              "-x", "-n"], capture_output=True, text=True, check=True).stdout
        chain = ""
        for line in out.splitlines():
            if line.startswith("Chain "):
                chain = line.split()[1]
            elif chain.startswith("EW-") and " DROP " in f" {line} ":
                n += int(line.split()[0])
    return n


class DropCollector:
    """The drop source of one lab host's collector (scoped to the host's namespaces), its
    records kept in a list and, given an aggregator's URL, exported to it as a collector does
    (collector/export.py AggregatorSink: batches, spool, HTTP)."""

    def __init__(self, lab, host: str, url: str | None = None, spool=None) -> None:
        from collector.drops.kernel import BccDrops
        from collector.drops.source import DropSource, DropTracker
        from collector.netns import resolve
        from collector.pipeline import CollectorContext
        from eastwest.clock import KernelClock

        netns = tuple(resolve(n) for n in lab.host_netns(host))
        ctx = CollectorContext(collector_id=f"{lab.name}-{host}-drops")
        kclock = KernelClock()
        self.source = DropSource(ctx, lambda: BccDrops(netns=netns),
                                 DropTracker(ctx, kclock.to_utc, idle_timeout=30.0),
                                 lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC), interval=0.5)
        self.records: list = []
        self.sink = None
        if url is not None:
            from collector.export import AggregatorSink, ExportSettings

            self.sink = AggregatorSink(ctx, settings=ExportSettings(
                url=url, token=INGEST, spool_dir=spool, batch_age=0.2))
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.source.run(self._emit, self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)
            self.source.ready.set()

    def _emit(self, records: list) -> None:
        self.records.extend(records)
        if self.sink is not None:
            self.sink.write(records)

    def __enter__(self) -> DropCollector:
        self.thread.start()
        assert self.source.ready.wait(180) and not self.errors, self.errors
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)
        if self.sink is not None:
            self.sink.close()  # everything sent (the final records of the stop included)
        assert not self.errors, self.errors


def test_suggested_policy_keeps_the_application_and_blocks_an_unobserved_call(lab, tmp_path):
    with Aggregator(tmp_path / "data", lab.inventory["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp_path / "spool", ["h1", "h2", "h3"]) as cs:
            before = lab.traffic(duration=6.0, seed=21)
            for c in cs:
                c.stop()
        r = httpx.get(agg.url + "/api/v1/policy/suggest", headers=RH, timeout=60,
                      params={**window_of(before), "format": "yaml"})
        assert r.status_code == 200, r.text
    policy_file = tmp_path / "suggested.yaml"
    policy_file.write_text(r.text)
    assert "frontend" in r.text and "db" in r.text

    # before: the call is possible (nothing enforces anything)
    assert unobserved_call(lab) == "connected"

    applied = eastwest("lab", "policy", "apply", "--name", LAB, str(policy_file))
    assert applied.returncode == 0, applied.stderr
    try:
        after = lab.traffic(duration=6.0, seed=22)
        # not one legitimate connection blocked: no connect timed out, every outcome is one the
        # first run had too, and every edge of the second run was an edge of the first
        assert Counter(t["outcome"] for t in after)["timeout"] == 0
        assert {t["outcome"] for t in after} <= {t["outcome"] for t in before}
        assert len(after) > 20
        assert set(truth_edges(lab, after)) <= set(truth_edges(lab, before))

        dropped_before = policy_drops(lab)  # the demo's own traffic dropped nothing
        assert dropped_before == 0
        pods = {p["service"]: p for p in lab.inventory["pods"]}
        with Aggregator(tmp_path / "data2", lab.inventory["workload_map"]) as agg2:
            with DropCollector(lab, pods["frontend"]["host"], agg2.url,
                               tmp_path / "spool2") as dc:
                t0 = time.monotonic()
                assert unobserved_call(lab) == "timeout"
                assert time.monotonic() - t0 >= CONNECT_TIMEOUT - 0.5
            shown = dropped_connections(agg2.url)
        syns = syns_within(pods["frontend"]["netns"], CONNECT_TIMEOUT)
        # through the aggregator: one connection frontend -> db:5432, dropped, by reason
        assert [(c["client"]["workload"]["id"], c["server"]["workload"]["id"], c["server"]["port"],
                 c["outcome"], c["drops"], c["observed_by"]) for c in shown] == [
            ("shop/frontend", "shop/db", 5432, "dropped",
             {"packets": syns, "reasons": {"NETFILTER_DROP": syns}}, ["drops"])], shown
        blocked = [r for r in dc.records if r.final and r.server.ip == pods["db"]["ip"]
                   and r.server.port == 5432]
        assert len(blocked) == 1, dc.records
        assert blocked[0].client.ip == pods["frontend"]["ip"] and blocked[0].protocol == "tcp"
        assert blocked[0].drops == [Drop("NETFILTER_DROP", syns)]
        assert blocked[0].source == "drops" and blocked[0].observer == "path"
        assert policy_drops(lab) - dropped_before == syns
    finally:
        removed = eastwest("lab", "policy", "remove", "--name", LAB)
    assert removed.returncode == 0, removed.stderr
    assert unobserved_call(lab) == "connected"


def dropped_connections(url: str, wait: float = 30.0) -> list[dict]:
    """GET /api/v1/flows?outcome=dropped once something is there (the export is asynchronous)."""
    deadline = time.monotonic() + wait
    while True:
        r = httpx.get(url + "/api/v1/flows", headers=RH, timeout=30,
                      params={"outcome": "dropped", "since": "1h"})
        assert r.status_code == 200, r.text
        body = r.json()
        rows = body["flows"] if isinstance(body, dict) else body
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_lab_policy_apply_names_a_bad_file_and_a_missing_lab(lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\n"
                   "spec: {podSelector: {}, ingress: [{ports: [{protocol: ICMP}]}]}\n")
    r = eastwest("lab", "policy", "apply", "--name", LAB, str(bad))
    assert r.returncode == 2, r
    assert "spec.ingress[0].ports[0].protocol" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(bad.read_text().replace("{protocol: ICMP}", "{protocol: UDP}"))
    r = eastwest("lab", "policy", "apply", "--name", "ewxdnone", str(good))
    assert r.returncode == 1 and "no lab named 'ewxdnone' is up" in r.stderr, r


DB_FROM_API = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
"""


def connect(netns: str, ip: str, port: int, timeout: float = 2.0) -> str:
    family = "AF_INET6" if ":" in ip else "AF_INET"
    code = (f"import socket,sys\ns=socket.socket(socket.{family}); s.settimeout({timeout})\n"
            "try:\n  s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
            "except TimeoutError:\n  print('timeout')\nexcept OSError as e:\n  print(e.strerror)")
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, ip, str(port)],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def test_a_dual_stack_lab_enforces_both_families(lab_factory, tmp_path):
    """IPv4 by iptables, IPv6 by ip6tables (neighbour discovery let through): db admits api on
    5432 over both, and frontend over neither."""
    lab6 = lab_factory(name="ewxdpol6", hosts=3, pods_per_host=2, ip_family="dual")
    pods = {p["service"]: p for p in lab6.inventory["pods"]}
    f = tmp_path / "db.yaml"
    f.write_text(DB_FROM_API)
    r = eastwest("lab", "policy", "apply", "--name", "ewxdpol6", str(f))
    assert r.returncode == 0, r.stderr
    assert "api-1          db-1           TCP      5432" in r.stdout
    for ip in (pods["db"]["ip4"], pods["db"]["ip6"]):
        assert connect(pods["api"]["netns"], ip, 5432) == "connected", ip
        assert connect(pods["frontend"]["netns"], ip, 5432) == "timeout", ip
    assert eastwest("lab", "policy", "remove", "--name", "ewxdpol6").returncode == 0
    assert connect(pods["frontend"]["netns"], pods["db"]["ip6"], 5432) == "connected"
