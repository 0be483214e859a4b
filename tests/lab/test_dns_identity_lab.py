"""DNS through the aggregator against the lab's truth (lab `ewdnsid`, 3 hosts, no workload map):
one collector on api's host (socket probes, its underlay, and the DNS of every pod's namespace)
sends to a real aggregator. Every DNS query of the truth is found through the API (its flow's
`dns`: name, type, rcode, answers and CNAMEs); every connection api made to a server no observer
of this test names (db and cache live on hosts without a collector, and there is no map) is
named by the name api resolved (`db.shop.svc.cluster.local`, not `external:10.244.3.11`), within
the answer's TTL; the server api's own host names (auth, its container) keeps that name; the
graph draws api -> the names, and the resolver edge counts the truth's queries and NXDOMAINs."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest

from eastwest.lab import dns as labdns
from tests.lab.harness import Aggregator, HostCollector, window_of

pytestmark = pytest.mark.lab


class DnsHostCollector(HostCollector):
    """A host's collector that also captures the DNS of the given namespaces (`--dns`)."""

    def __init__(self, lab: Any, host: str, url: str, spool: Any, dns: list[str]) -> None:
        from collector.dns import DnsSource

        super().__init__(lab, host, url, spool)
        self.dns = DnsSource(self.ctx, dns, interval=0.5, idle_timeout=1.0, query_timeout=2.0)

    def _run(self) -> None:
        from collector.dns.wirejoin import joining_sink
        from collector.pipeline import run_pipeline

        sources = [self.socket, self.vxlan, self.dns]
        try:  # as collector/main.py wires it: the DNS onto the underlay's records of a flow
            run_pipeline(sources, joining_sink(self.sink, sources, self.ctx),
                         stop=self.stop_event, handle_signals=False)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)
            self.socket.ready.set()


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_dns_queries_and_names_from_answers_through_the_api(lab_factory, tmp_path):
    lab = lab_factory(name="ewdnsid", hosts=3, pods_per_host=2)
    pods = {p["service"]: p for p in lab.inventory["pods"]}
    api = pods["api"]
    assert {pods[s]["host"] for s in ("db", "cache")} & {api["host"]} == set()
    assert pods["auth"]["host"] == api["host"]  # named by its own host's probe: no DNS name
    with Aggregator(tmp_path / "data", None) as agg:
        col = DnsHostCollector(lab, api["host"], agg.url, tmp_path / "spool",
                               [p["netns"] for p in lab.inventory["pods"]])
        col.start()
        try:
            truth = lab.traffic(duration=5.0, truth_path=tmp_path / "t.jsonl", seed=21, rate=25)
        finally:
            col.stop()  # final records flushed and sent
        win = window_of(truth)
        flows = agg.get("/api/v1/flows", since=(ts(win["from"]) - timedelta(minutes=1)).isoformat(),
                        limit="10000", link_local="true")["flows"]
        graph = agg.get("/api/v1/graph", **{"from": win["from"], "to": win["to"]},
                        protocol=["tcp", "udp"])

    by_tuple = {(f["client"]["ip"], f["client"]["port"], f["server"]["ip"], f["server"]["port"],
                 f["protocol"]): f for f in flows}
    queries = [t for t in truth if "dns" in t]
    assert len(queries) >= 10, "too few DNS queries to prove anything"
    assert {t["dns"]["rcode"] for t in queries} == {"NOERROR", "NXDOMAIN"}
    # every DNS query of the truth, with its name, type, rcode and answers
    for t in queries:
        f = by_tuple[(t["client_ip"], t["client_port"], t["server_ip"], 53, "udp")]
        d, want = f["dns"], t["dns"]
        assert d is not None, t
        assert [(n["name"], n["type"], n["count"], n["rcodes"]) for n in d["names"]] == [
            (want["name"].rstrip("."), want["type"], 1, {want["rcode"]: 1})], t
        assert (d["queries"], d["responses"], d["timeouts"], d["rcodes"]) == (
            1, 1, 0, {want["rcode"]: 1})
        assert sorted((a["type"], a["value"]) for a in d["answers"]) == sorted(
            [(want["type"], a) for a in want["answers"]] + [("CNAME", c) for c in want["cnames"]])
        assert all(a["ttl"] == want["ttl"] for a in d["answers"])

    # api's connections: to db and cache named by the name api resolved, auth by its container
    answers: list[tuple[datetime, str, str]] = sorted(
        (ts(t["end"]), a, t["dns"]["name"].rstrip(".")) for t in queries
        for a in t["dns"]["answers"])
    calls = [t for t in truth if t["client_pod"] == api["name"] and t["protocol"] == "tcp"]
    assert calls
    kinds = Counter()
    for t in calls:
        f = by_tuple[(t["client_ip"], t["client_port"], t["server_ip"], t["server_port"], "tcp")]
        w = f["server"]["workload"]
        accepted = t["outcome"] not in ("refused", "timeout")
        if t["server_ip"] == pods["auth"]["ip"] and accepted:
            assert w["resolved_by"] in ("process", "container") or w["name"].startswith(
                ("container:", "process:")), (t, w)
            kinds["own host"] += 1
            continue
        start = ts(t["start"])
        got = [(at, name) for at, ip, name in answers if ip == t["server_ip"] and at <= start
               + timedelta(seconds=1)]
        assert got, f"api connected to {t['server_ip']} before any answer: {t}"
        at, name = got[-1]
        assert (w["name"], w["kind"]) == (name, "DNS"), (t, w)
        if start <= at + timedelta(seconds=labdns.TTL):
            assert w["resolved_by"] == "dns", (t, w, at)
        kinds[w["resolved_by"]] += 1
    assert kinds["own host"] and kinds["dns"], kinds

    edges = {(e["source"], e["target"]): e for e in graph["edges"]}
    api_wid = next(f["client"]["workload"]["id"] for f in flows
                   if f["client"]["ip"] == api["ip"] and f["client"]["workload"]["id"])
    for svc in ("db", "cache"):
        name = f"{svc}.shop.svc.cluster.local"
        # every connection api made to that address (TCP, and its UDP with cache or to a dead
        # port: docs/lab.md, "UDP"), named by the name it resolved
        want = sum(1 for t in truth if t["client_pod"] == api["name"] and "dns" not in t
                   and t["server_ip"] == pods[svc]["ip"])
        assert edges[(api_wid, name)]["connections_opened"] == want, (name, edges.keys())
    assert not any(dst.startswith("external:") and dst[9:] in (pods["db"]["ip"], pods["cache"]["ip"])
                   for _, dst in edges)
    # the resolver edge(s): every query of the truth counted once. (One collector with both a
    # DNS capture and an underlay capture reports a DNS flow twice as `path` of one collector, and
    # the correlator opens a second, path-only connection for the second report: its client is
    # then named by the address. Each DNS flow's summary still lands on one edge.)
    # the resolver's own address is answered for a name too (the lab's slow name): the DNS flows
    # api sent after that answer are named by it, the others keep the address
    rip = pods["resolver"]["ip"]
    resolver_names = {name for _, ip, name in answers if ip == rip}
    assert resolver_names, "the lab answers a name with the resolver's address"
    resolver = [e for e in edges.values() if e.get("dns")]
    assert {e["target"] for e in resolver} <= {f"external:{rip}", *resolver_names}
    assert api_wid in {e["source"] for e in resolver}
    assert sum(e["dns"]["queries"] for e in resolver) == len(queries)
    assert sum(e["dns"]["timeouts"] for e in resolver) == 0
    assert sum(e["dns"]["nxdomain"] for e in resolver) == sum(
        t["dns"]["rcode"] == "NXDOMAIN" for t in queries)
