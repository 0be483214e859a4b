"""The `host-network` lab pattern (issue 20): api runs in its host's namespace (as a
hostNetwork pod does), listening on, and calling from, the host's own address on the pod
network (10.244.N.1 on its br0); pods call it and it calls pods. Against the real kernel, with
one collector per host (socket probes scoped to the host's namespaces + VXLAN on its underlay):
- api's process lives in the host's network namespace; the truth says so on both sides;
- the graph equals the truth's edges with exact connections, bytes and failures (api named by
  the workload map: the host's pod-network address is api's alone in this lab), none to
  `external:` or unknown;
- api's sockets are seen by the host's collector (observed_by has its side), and the wire's
  VXLAN flows join them: every cross-host connection is client,path,server."""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import pytest

from tests.lab.harness import Aggregator, collectors, served_edges, truth_edges, window_of
from tests.lab.test_lab_macvlan import expected_observers

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewhn"


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(name=LAB, hosts=3, pods_per_host=2, patterns=["host-network"])


def test_api_runs_in_its_hosts_namespace_and_the_graph_equals_truth(lab, tmp_path):
    inv = lab.inventory
    hosts = {h["name"]: h for h in inv["hosts"]}
    api = next(p for p in inv["pods"] if p["service"] == "api")
    host = hosts[api["host"]]
    assert api["netns"] == host["netns"] and api["attach"] == "host"
    assert api["ip"] == f"10.244.{host['name'][1:]}.1" and api["netns"] not in host["pod_netns"]
    pid = int((lab.state / "ready" / api["name"]).read_text())
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{host['netns']}").st_ino
    with Aggregator(tmp_path / "data", inv["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp_path / "spool", ["h1", "h2", "h3"]) as cs:
            truth = lab.traffic(duration=5.0, seed=22)
            for c in cs:
                c.stop()
        g = agg.get("/api/v1/graph", **window_of(truth))
    to_api = [t for t in truth if t["server_pod"] == api["name"]]
    from_api = [t for t in truth if t["client_pod"] == api["name"]]
    assert len(to_api) > 10 and len(from_api) > 10
    assert {t["server_netns"] for t in to_api} == {t["client_netns"] for t in from_api} == {host["netns"]}
    assert served_edges(g) == truth_edges(lab, truth)
    assert not [n["id"] for n in g["nodes"] if n["id"].startswith(("external:", "unknown"))]
    wid = {p["ip"]: f"{p['namespace']}/{p['service']}" for p in inv["pods"]}
    want: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for t in truth:
        want[(wid[t["client_ip"]], wid[t["server_ip"]])][expected_observers(t, False)] += 1
    for e in g["edges"]:
        assert e["byte_mismatches"] == 0, e
        assert Counter(e["observed_by"]) == want[(e["source"], e["target"])], e
