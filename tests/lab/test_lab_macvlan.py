"""The `macvlan` lab pattern (issue 20): pods hang off their host's underlay link by MACVLAN in
bridge mode, with addresses on the underlay subnet, and no overlay. Against the real kernel:
- the topology is what docs/lab.md draws (each pod's eth0 a MACVLAN child of its host's eth0,
  no bridge or VXLAN device in any host), pods reach pods and other hosts across the fabric,
  and a pod cannot reach its own host (the documented reason macvlan and host-network do not
  combine);
- the graph of a run, from one collector per host (socket probes + `--wire-interface` on the
  host's eth0, where the pods' packets pass plainly), equals the truth's edges with exact
  connections, bytes and failures; no edge to `external:` or unknown;
- the wire's plain flows join the socket views into one connection: every connection is
  observed by client, path and server (refused ones by client and path), same-host ones too:
  a MACVLAN bridge hands a frame between two pods of one host to the parent link's receive
  path first (drivers/net/macvlan.c: "send to lowerdev first for its network taps"), so the
  capture on the host's eth0 sees it once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from tests.lab.harness import Aggregator, collectors, served_edges, truth_edges, window_of

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewmv"


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(name=LAB, hosts=3, pods_per_host=2, patterns=["macvlan"])


def links(netns: str) -> list[dict]:
    out = subprocess.run(["ip", "-n", netns, "-d", "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def connect(netns: str, ip: str, port: int) -> str:
    """Connect from `netns` to ip:port (nothing listens): `refused` when the peer answered."""
    code = ("import socket,sys\ns=socket.socket(); s.settimeout(1.5)\ntry:\n"
            " s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError as e: print(type(e).__name__)")
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, ip, str(port)],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def test_pods_are_macvlan_children_of_their_hosts_underlay(lab):
    inv = lab.inventory
    assert inv["patterns"] == ["macvlan"]
    hosts = {h["name"]: h for h in inv["hosts"]}
    for h in inv["hosts"]:
        kinds = {x["ifname"]: x.get("linkinfo", {}).get("info_kind") for x in links(h["netns"])}
        assert "br0" not in kinds and "vx0" not in kinds, kinds  # no bridge, no overlay
    for p in inv["pods"]:
        eth0 = next(x for x in links(p["netns"]) if x["ifname"] == "eth0")
        info = eth0["linkinfo"]
        assert info["info_kind"] == "macvlan" and info["info_data"]["mode"] == "bridge", info
        assert eth0["address"] == p["mac"] and eth0["mtu"] == 1500
        assert p["ip"].startswith(f"10.213.{hosts[p['host']]['underlay_ip'].split('.')[-1]}.")
        assert p["host_if"] is None and p["attach"] == "macvlan"
    lg = inv["pods"][0]
    other_host = next(h for h in inv["hosts"] if h["name"] != lg["host"])
    far_pod = next(p for p in inv["pods"] if p["host"] != lg["host"])
    assert connect(lg["netns"], far_pod["ip"], 1) == "refused"  # a pod on another host answers
    assert connect(lg["netns"], other_host["underlay_ip"], 1) == "refused"  # another host too
    # ...but not its own host: MACVLAN bridge mode never hands a child's frames to the parent
    assert connect(lg["netns"], hosts[lg["host"]]["underlay_ip"], 1) != "refused"


def expected_observers(t: dict, same_host_wire: bool) -> str:
    """Who observes truth connection `t`: its client, its server when it accepted, and the wire
    when it crossed hosts or (`same_host_wire`) when the wire sees same-host traffic too."""
    wire = same_host_wire or t["client_host"] != t["server_host"]
    accepted = t["outcome"] not in ("refused", "timeout")
    return ",".join(["client", *(["path"] if wire else []), *(["server"] if accepted else [])])


def test_graph_equals_truth_and_the_wire_joins_the_sockets(lab, tmp_path):
    with Aggregator(tmp_path / "data", lab.inventory["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp_path / "spool", ["h1", "h2", "h3"], wire=True) as cs:
            truth = lab.traffic(duration=5.0, seed=21)
            for c in cs:
                c.stop()
        assert len(truth) > 20
        cross = [t for t in truth if t["client_host"] != t["server_host"]]
        assert len(cross) > 10 and len(cross) < len(truth)  # both kinds
        assert {t["protocol"] for t in cross} == {"tcp", "udp"}
        w = window_of(truth)
        g = agg.get("/api/v1/graph", **w)
        assert served_edges(g) == truth_edges(lab, truth)
        assert not [n["id"] for n in g["nodes"] if n["id"].startswith(("external:", "unknown"))]
        wid = {p["ip"]: f"{p['namespace']}/{p['service']}" for p in lab.inventory["pods"]}
        want: dict[tuple[str, str], Counter] = defaultdict(Counter)
        for t in truth:
            # a MACVLAN bridge hands a frame between two pods of one host to the parent's
            # receive path first ("for its network taps"): the host's wire sees those too
            want[(wid[t["client_ip"]], wid[t["server_ip"]])][expected_observers(t, True)] += 1
        for e in g["edges"]:
            assert e["byte_mismatches"] == 0, e
            assert Counter(e["observed_by"]) == want[(e["source"], e["target"])], e
        # one stored connection per truth connection: the wire's flow is no connection apart
        flows = agg.get("/api/v1/flows", limit="10000", since=w["from"], until=w["to"],
                        protocol=w["protocol"])
        assert flows["count"] == len(truth)
