"""The `ipsec` lab pattern (issue 20): the VXLAN overlay between hosts is encrypted by xfrm
(ESP, transport mode between the hosts' underlay addresses, keys made per lab). Against the
real kernel, with one collector per host (socket probes + `--wire-interface` on the host's
eth0, which sees every packet the host sends and receives there):
- the application's edges come from the sockets alone, exact: the graph of its TCP and UDP
  equals the truth's edges with exact connections, bytes and failures, and no connection has
  a wire (path) observer: the wire could not see inside;
- the wire sees ESP between hosts and nothing in clear: one `esp` connection per pair of hosts
  that carried traffic, between the two nodes of the workload map, observed by the wire alone,
  with more bytes than the payload the truth carried between those hosts (ESP and VXLAN
  overhead on top); no VXLAN-tunnelled and no plain TCP/UDP flow of a pod on any underlay;
- the hosts' security associations carried packets, with the SPIs the inventory names.
A kernel built without IPsec ESP (CONFIG_INET_ESP: the machines this project's CI runs on, see
docs/lab.md) cannot build this lab: there `lab up --pattern ipsec` must refuse, naming the
option, before it builds anything (the first test); the second needs ESP and says so when it
cannot run. The wire's and the aggregator's side of ESP are also tested from a scapy-built
capture, without the kernel (tests/unit/test_esp_wire.py)."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from eastwest.errors import LabError
from eastwest.lab import Lab, ipsec, topology
from eastwest.lab.ipsec import missing_kernel_support
from eastwest.lab.lab import STATE_ROOT
from tests.conftest import require_root
from tests.lab.harness import Aggregator, collectors, served_edges, truth_edges, window_of

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewips"


NO_ESP = missing_kernel_support()


@pytest.fixture(scope="module")
def lab(lab_factory):
    if NO_ESP:
        pytest.skip(f"this kernel is built without {', '.join(NO_ESP)}: no IPsec ESP")
    return lab_factory(name=LAB, hosts=3, pods_per_host=2, patterns=["ipsec"])


def test_lab_up_refuses_a_kernel_without_esp_before_building_anything():
    require_root()
    Lab.down_by_name(LAB)
    if not NO_ESP:  # this kernel can: the check lets it through
        ipsec.check_kernel()
        return
    with pytest.raises(LabError) as err:
        Lab.up(name=LAB, patterns=["ipsec"])
    assert "CONFIG_INET_ESP" in str(err.value) and "--pattern ipsec" in str(err.value)
    assert not topology.lab_netns(LAB) and not (STATE_ROOT / LAB).exists()


def xfrm_states(netns: str) -> list[dict]:
    """`ip xfrm state` of a namespace: src, dst, spi and the bytes each association carried."""
    states: list[dict] = []
    out = subprocess.run(["ip", "-n", netns, "-s", "xfrm", "state"], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f[:1] == ["src"]:
            states.append({"src": f[1], "dst": f[3], "bytes": 0})
        elif f[:1] == ["proto"] and states:
            states[-1]["spi"] = int(f[3], 16)
        elif f and f[0].endswith("(bytes),") and states:
            states[-1]["bytes"] = int(f[0].split("(")[0])
    return states


def test_sockets_give_the_edges_and_the_wire_only_esp_between_hosts(lab, tmp_path):
    inv = lab.inventory
    assert inv["patterns"] == ["ipsec"] and inv["ipsec"]["mode"] == "transport"
    node = {h["underlay_ip"]: f"node-{h['name']}" for h in inv["hosts"]}
    with Aggregator(tmp_path / "data", inv["workload_map"]) as agg:
        t0 = datetime.now(UTC) - timedelta(seconds=1)  # the ESP flows start before the traffic
        with collectors(lab, agg.url, tmp_path / "spool", ["h1", "h2", "h3"], wire=True) as cs:
            truth = lab.traffic(duration=5.0, seed=23)
            for c in cs:
                c.stop()
        assert len(truth) > 20
        cross = [t for t in truth if t["client_host"] != t["server_host"]]
        assert len(cross) > 10
        w = window_of(truth)
        g = agg.get("/api/v1/graph", **w)  # the application's protocols
        assert served_edges(g) == truth_edges(lab, truth)
        for e in g["edges"]:
            assert e["byte_mismatches"] == 0, e
            assert set(e["observed_by"]) <= {"client,server", "client"}, e  # never the wire
            assert "encrypted" not in e, e
        assert not [n["id"] for n in g["nodes"] if n["id"].startswith(("external:", "unknown"))]

        # the wire: ESP between the hosts, one connection per pair that carried traffic
        payload: dict[frozenset, int] = defaultdict(int)
        for t in cross:
            payload[frozenset((t["client_host"], t["server_host"]))] += t["bytes_c2s"] + t["bytes_s2c"]
        esp = agg.get("/api/v1/graph", **{**w, "from": t0.isoformat(), "protocol": ["esp"]})
        pairs: dict[frozenset, dict] = {}
        for e in esp["edges"]:
            assert e["protocols"] == ["esp"] and e["observed_by"] == {"path": e["connections_opened"]}, e
            assert e["source"].startswith("node-") and e["target"].startswith("node-"), e
            assert e["encrypted"] == "esp" and e["wire_sees_inside"] is False, e
            pair = frozenset((e["source"][5:], e["target"][5:]))
            assert pair not in pairs, f"two ESP edges for {sorted(pair)}"
            pairs[pair] = e
        # (a pair without application traffic may still carry the pods' IPv6 housekeeping,
        # flooded over the overlay: encrypted all the same)
        assert set(payload) <= set(pairs), (set(payload), set(pairs))
        for pair, e in pairs.items():
            assert e["connections_opened"] == 1, e
            assert e["bytes_c2s"] + e["bytes_s2c"] > payload.get(pair, 0), (e, payload.get(pair))
        # nothing of the pods in clear on any underlay: the stored flows of the wire are ESP
        flows = agg.get("/api/v1/flows", limit="10000", since=t0.isoformat(), until=w["to"])
        for f in flows["flows"]:
            if "path" in f["observed_by"]:
                assert f["protocol"] == "esp" and f["tunnel"] is None, f
                assert {f["client"]["ip"], f["server"]["ip"]} <= set(node), f
    # the associations the inventory names carried the traffic
    spis = {(a["src_ip"], a["dst_ip"]): int(a["spi"], 16) for a in inv["ipsec"]["associations"]}
    assert len(spis) == 6
    for h in inv["hosts"]:
        states = xfrm_states(h["netns"])
        assert {(s["src"], s["dst"]) for s in states} == {k for k in spis if h["underlay_ip"] in k}
        for s in states:
            assert s["spi"] == spis[(s["src"], s["dst"])], s
            pair = frozenset(node[a][5:] for a in (s["src"], s["dst"]))
            assert s["bytes"] > 0 or pair not in payload, (h["name"], s)
