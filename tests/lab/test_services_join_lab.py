"""Service calls as ONE connection (issue 16, section 2), in the `--services` lab with a real
aggregator and one collector per host folding NAT from its host's conntrack (collector/natfold.py,
wired as collector/main.py wires it): every ClusterIP call of the truth is one connection,
observed by its client, its server and (across hosts) the wire, with the backend as server and
the dialled ClusterIP and port kept (`service_ip`, `service_port`; the client's records' `nat`).
The NodePort middle host's wire records carry the whole translation (DNAT to the backend,
masquerade), folded to the real client and backend; the aggregator joins the NodePort call's two
other halves (the client's to the node, the server's from the node's address) by it
(aggregator/nodeport.py): every NodePort call is one connection too, observed by client, server
and wire, the NodePort kept as dialled. The graph equals the truth edge for edge: no edge
counted twice, no ClusterIP node, no node address as a workload. Its Service view (group_by=service, the Service names from the lab's workload
map) has one edge per (client workload, Service) the truth called through a ClusterIP or the
NodePort, with exactly the truth's connections and backends, and the pod-direct calls on their
workload -> workload edges; both views add up to the same totals."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from eastwest.record import Endpoint, Nat
from tests.lab.harness import Aggregator, collectors, served_edges, truth_edges, window_of

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
NAME = "ewnat"
HOSTS = ["h1", "h2", "h3"]


def key(x) -> tuple:
    return (x["protocol"], x["client"]["ip"], x["client"]["port"], x["server"]["ip"],
            x["server"]["port"])


def tkey(t: dict) -> tuple:  # the truth's: the client and the backend that really served it
    return (t["protocol"], t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])


def of_call(by_key: dict[tuple, list[dict]], t: dict) -> list[dict]:
    """The connections of a truth call: its 5-tuple, started within half a second of it (a
    call reset or refused frees its port at once: a later call may reuse the 5-tuple, and is
    another connection)."""
    at = datetime.fromisoformat(t["start"])
    return [f for f in by_key.get(tkey(t), [])
            if abs((datetime.fromisoformat(f["start"]) - at).total_seconds()) < 0.5]


def flows_of(agg: Aggregator, truth: list[dict]) -> list[dict]:
    w = window_of(truth)
    out = agg.get("/api/v1/flows", limit="10000", since=w["from"], until=w["to"],
                  protocol=w["protocol"])
    assert out["next_cursor"] is None
    return out["flows"]


# the module's run grouped by Service (group_by=service), filled by `joined` (the other tests
# unpack its tuple as it was)
joined_services: list[dict] = []


@pytest.fixture(scope="module")
def joined(lab_factory, tmp_path_factory):
    lab = lab_factory(name=NAME, pods_per_host=3, services=True)
    tmp = tmp_path_factory.mktemp("nat")
    with Aggregator(tmp / "data", lab.inventory["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp / "spool", HOSTS, keep=True, nat=True) as cs:
            truth = lab.traffic(duration=5.0, seed=23)
            for c in cs:
                c.stop()
        flows = flows_of(agg, truth)
        graph = agg.get("/api/v1/graph", **window_of(truth))
        services = agg.get("/api/v1/graph", group_by="service", **window_of(truth))
        w = window_of(truth)
        via_service = agg.get("/api/v1/flows", limit="10000", since=w["from"], until=w["to"],
                              protocol=w["protocol"], to_service="10.96.0.0/16")["flows"]
    records = {c.host: c.records for c in cs}
    folders = {c.host: c.folder for c in cs}
    joined_services[:] = [services]
    return lab, truth, flows, records, folders, graph, via_service


def test_every_clusterip_call_is_one_connection_to_its_backend(joined):
    lab, truth, flows, _, _, _, _ = joined
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for f in flows:
        by_key[key(f)].append(f)
    calls = [t for t in truth if t.get("via") in ("service", "pod") and t["outcome"] != "refused"]
    seen = Counter()
    for t in calls:
        got = of_call(by_key, t)
        assert len(got) == 1, (t, got)  # one connection: client, server and wire joined
        f = got[0]
        want = {"client", "server"} | ({"path"} if t["client_host"] != t["server_host"] else set())
        assert set(f["observed_by"]) == want, (t, f)
        assert (f["bytes_c2s"], f["bytes_s2c"]) == (t["bytes_c2s"], t["bytes_s2c"]), (t, f)
        if t["via"] == "service":  # the dialled ClusterIP and port stay with the connection
            assert (f["service_ip"], f["service_port"]) == (t["dialled_ip"], t["dialled_port"])
        else:
            assert (f["service_ip"], f["service_port"]) == (None, None), (t, f)
        seen[(t["via"], t["protocol"], t["client_host"] == t["server_host"])] += 1
    assert seen[("service", "tcp", False)] > 100 and seen[("service", "tcp", True)] >= 5, seen
    assert seen[("service", "udp", False)] + seen[("service", "udp", True)] >= 1, seen
    # --to-service 10.96.0.0/16: exactly the calls made through a ClusterIP
    _, _, _, _, _, _, via_service = joined
    assert sorted(key(f) for f in via_service) == sorted(
        tkey(t) for t in calls if t["via"] == "service")
    # no connection names a ClusterIP as its server: every client record was folded
    vips = {s["cluster_ip"] for s in lab.inventory["cluster_services"]}
    assert not [f for f in flows if f["server"]["ip"] in vips]


def test_the_clients_records_keep_the_dialled_clusterip(joined):
    lab, truth, _, records, folders, _, _ = joined
    mine: dict[tuple, list] = defaultdict(list)
    for host, recs in records.items():
        for r in recs:
            if r.observer == "client" and r.source == "socket":
                mine[(host, r.protocol, r.client.ip, r.client.port, r.server.ip,
                      r.server.port)].append(r)
    svcs = {s["name"]: s for s in lab.inventory["cluster_services"]}
    hosts = {h["name"]: h["netns"] for h in lab.inventory["hosts"]}
    import os

    inode = {h: os.stat(f"/run/netns/{ns}").st_ino for h, ns in hosts.items()}
    checked = 0
    for t in truth:
        if t.get("via") != "service" or t["outcome"] == "refused":
            continue
        recs = mine[(t["client_host"], *tkey(t))]
        assert recs, t
        svc = svcs[t["service"]]
        for r in recs:  # every record of the call, interim and final
            assert r.nat == [Nat("dnat", Endpoint(svc["cluster_ip"], svc["port"]),
                                 Endpoint(t["server_ip"], t["server_port"]),
                                 inode[t["client_host"]])], (t, r)
            assert r.incomplete == [], r
        checked += 1
    assert checked > 100
    # pod-direct calls were not translated and say so by having no nat
    for t in truth:
        if t.get("via") == "pod" and t["outcome"] != "refused":
            assert all(r.nat is None for r in mine[(t["client_host"], *tkey(t))]), t
    assert all(not f.unreadable for f in folders.values())


def test_the_nodeport_middle_host_reports_the_whole_translation(joined):
    """h1 dials h2:30080; h2 DNATs to frontend on h3 and masquerades. h2's wire capture sees the
    translated leg (h2 -> backend) and its folder rewrites those records to (the real client,
    the backend) with both translations, in order: what the aggregator needs to join the
    client's and the server's halves."""
    lab, truth, flows, records, _, _, _ = joined
    h2 = defaultdict(list)
    for r in records["h2"]:
        if r.observer == "path":
            h2[(r.protocol, r.client.ip, r.client.port, r.server.ip, r.server.port)].append(r)
    nodeport = [t for t in truth if t.get("via") == "nodeport" and t["outcome"] == "ok"]
    assert len(nodeport) >= 3
    for t in nodeport:
        recs = h2[tkey(t)]
        assert recs, t
        for r in recs:
            assert r.nat == [
                Nat("dnat", Endpoint(t["dialled_ip"], t["dialled_port"]),
                    Endpoint(t["server_ip"], t["server_port"]), r.nat[0].netns),
                Nat("snat", Endpoint(t["client_ip"], t["client_port"]),
                    Endpoint(t["server_saw_ip"], t["server_saw_port"]), r.nat[0].netns)], (t, r)
            assert r.dialled == Endpoint("10.213.0.2", 30080)
    # ... and the connection keeps the NodePort as dialled
    by_key = defaultdict(list)
    for f in flows:
        by_key[key(f)].append(f)
    for t in nodeport:
        [f] = of_call(by_key, t)
        assert (f["service_ip"], f["service_port"]) == ("10.213.0.2", 30080), (t, f)


def test_every_nodeport_call_is_one_connection_observed_by_client_server_and_wire(joined):
    """The client's half (to the node), the server's half (from the node's address) and the
    middle host's record: ONE connection under the real client and the backend, the NodePort
    kept, the sockets' byte counts; no connection left to or from the node's addresses."""
    _, truth, flows, _, _, _, _ = joined
    by_key = defaultdict(list)
    for f in flows:
        by_key[key(f)].append(f)
    nodeport = [t for t in truth if t.get("via") == "nodeport" and t["outcome"] == "ok"]
    assert len(nodeport) >= 3
    for t in nodeport:
        got = of_call(by_key, t)
        assert len(got) == 1 and set(got[0]["observed_by"]) == {"client", "server", "path"}, (
            t, got)
        f = got[0]
        assert (f["service_ip"], f["service_port"]) == (t["dialled_ip"], t["dialled_port"])
        assert (f["bytes_c2s"], f["bytes_s2c"]) == (t["bytes_c2s"], t["bytes_s2c"]), (t, f)
    halves = [f for f in flows if f["server"]["ip"] == "10.213.0.2"
              or f["client"]["ip"] == "10.244.2.1"]
    assert not halves, halves


def test_the_graph_is_the_truth_edge_for_edge(joined):
    """One edge per (client workload, server workload) the truth has, with its connections,
    bytes and failures: a ClusterIP call counted once, under its backend's workload; a NodePort
    call once too, its halves joined (no node address as a client or a server)."""
    lab, truth, _, _, _, graph, _ = joined
    assert served_edges(graph) == truth_edges(lab, truth)
    workload = {p["ip"]: p["service"] for p in lab.inventory["pods"]}
    triples = {(workload[t["client_ip"]], workload[t["server_ip"]], t["server_port"])
               for t in truth}
    ports = defaultdict(set)
    for c, s_, port in triples:
        ports[(c, s_)].add(port)
    assert len(graph["edges"]) == len(ports)


def test_the_service_view_has_one_edge_per_client_and_service_with_its_backends(joined):
    """group_by=service: every call through a ClusterIP (or the NodePort) on ONE edge client
    workload -> svc:<namespace>/<name>, listing the backend workloads that served it with the
    truth's counts; every pod-direct call on its workload -> workload edge; the totals of the
    two views equal (no connection counted twice, none lost)."""
    lab, truth, _, _, _, graph, _ = joined
    doc = joined_services[0]
    wmap = yaml.safe_load(Path(lab.inventory["workload_map"]).read_text())
    wid = {e["match"].split("/")[0]: f"{e['namespace']}/{e['name']}" if e["namespace"]
           else e["name"] for e in wmap["workloads"]}
    svc_of = {}
    for s in lab.inventory["cluster_services"]:
        svc_of[(s["cluster_ip"], s["port"])] = f"svc:{s['namespace']}/{s['name']}"
        if s["node_port"]:
            svc_of[(s["node_port"]["ip"], s["node_port"]["port"])] = (
                f"svc:{s['namespace']}/{s['name']}")
    want: dict[tuple[str, str], dict] = {}
    for t in truth:
        client = wid[t["client_ip"]]
        via = t.get("via") in ("service", "nodeport")
        target = svc_of[(t["dialled_ip"], t["dialled_port"])] if via else wid[t["server_ip"]]
        e = want.setdefault((client, target), {"connections": 0, "bytes_c2s": 0, "bytes_s2c": 0,
                                               "failed": 0, "backends": Counter()})
        e["connections"] += 1
        e["bytes_c2s"] += t["bytes_c2s"]
        e["bytes_s2c"] += t["bytes_s2c"]
        e["failed"] += t["outcome"] in ("refused", "timeout")
        if via:
            e["backends"][wid[t["server_ip"]]] += 1
    got = {(e["source"], e["target"]): {
        "connections": e["connections_opened"], "bytes_c2s": e["bytes_c2s"],
        "bytes_s2c": e["bytes_s2c"], "failed": e["connections_failed"],
        "backends": Counter({b["id"]: b["connections_opened"] for b in e["backends"]})}
        for e in doc["edges"]}
    assert got == want
    assert sum(1 for k in got if k[1].startswith("svc:")) >= 3
    assert not [e for e in doc["edges"] if e["target"].startswith("svc:")
                and not e["service"]["name"]]  # every dialled address named by the lab's map
    for k in ("connections_opened", "bytes_c2s", "bytes_s2c", "connections_failed"):
        assert sum(e[k] for e in doc["edges"]) == sum(e[k] for e in graph["edges"])
