"""The aggregator end to end on the lab: one collector per lab host (eBPF socket probes scoped
to the host's namespaces, plus VXLAN capture on its underlay), sending batches over HTTP to a
real aggregator; the graph served by GET /api/v1/graph is checked against the lab's ground truth:
exactly the truth's workload edges (none missing, none extra), with connection counts and bytes
equal. Also with one host's collector stopped (edges stay single, observed_by tells which view
is missing). Time travel and diff over two phases of one run (a past window's graph unchanged
after new traffic, the diff showing the newly added dependency) are asserted on the API in
tests/web/test_dashboard_lab.py, whose dashboard tests share that run: one lab run and one
minute's wait fewer for the suite."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from tests.lab.harness import (
    Aggregator,
    collectors,
    served_edges,
    truth_edges,
    truth_edges_by_observers,
    window_of,
)

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewg"


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(name=LAB, hosts=3, pods_per_host=2)


def wait_for_next_minute() -> None:
    """Rollups are per minute: the next phase must start in a minute of its own."""
    now = datetime.now(UTC)
    nxt = now.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1)
    time.sleep((nxt - now).total_seconds())


def new_dependency(lab) -> int:
    """frontend -> db, a dependency the demo application never has: one connection."""
    pods = {p["service"]: p for p in lab.inventory["pods"]}
    code = ("import socket,sys; s=socket.create_connection((sys.argv[1], 5432), timeout=5); "
            "s.sendall(b'x'*321); s.shutdown(socket.SHUT_WR); s.settimeout(2)\n"
            "try:\n  s.recv(65536)\nexcept OSError:\n  pass\ns.close()")
    subprocess.run(["ip", "netns", "exec", pods["frontend"]["netns"], sys.executable, "-c", code,
                    pods["db"]["ip"]], check=True, timeout=30)
    return 1


def test_without_a_workload_map_each_end_is_named_by_what_its_observers_know(lab, tmp_path):
    """No inventory at all: the server's own probe names the server end (its process), the
    client's the client end, whichever collector's batch arrives first; an end no socket probe
    saw keeps its address. One edge per calling pair of the truth, no provisional `external:`
    edge left behind, and no link-local noise (the overlay's neighbour discovery) by default."""
    with Aggregator(tmp_path / "data", None) as agg:
        with collectors(lab, agg.url, tmp_path / "spool", ["h1", "h2", "h3"]) as cs:
            truth = lab.traffic(duration=5.0, seed=13)
            multicast_chatter(lab)
            for c in cs:
                c.stop()
        assert len(truth) > 20
        w = window_of(truth)
        del w["protocol"]  # the default view leaves link-local traffic out by itself
        w["to"] = datetime.now(UTC).isoformat()
        g = agg.get("/api/v1/graph", **w)
        want = truth_edges_by_observers(lab, truth)
        assert served_edges(g) == want
        assert {n["id"] for n in g["nodes"]} == {x for e in want for x in e}
        # the link-local chatter is stored all the same, and shown when asked for
        everything = agg.get("/api/v1/graph", link_local="true", **w)
        noise = {(e["source"], e["target"]) for e in everything["edges"]} - set(want)
        assert noise and all(s.startswith("external:fe80:") and t == "external:ff02::1"
                             or t.startswith("external:ff") for s, t in noise), noise


def multicast_chatter(lab) -> None:
    """A datagram to the all-nodes group from a pod (what mDNS and neighbour discovery look
    like on the wire: link-local source, multicast destination), flooded over the overlay."""
    pod = lab.inventory["pods"][0]
    code = ("import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
            "[s.sendto(b'hello', ('ff02::1%eth0', 5353)) for _ in range(3)]")
    subprocess.run(["ip", "netns", "exec", pod["netns"], sys.executable, "-c", code],
                   check=True, timeout=30)


def test_one_host_collector_stopped_edges_stay_single(lab, tmp_path):
    with Aggregator(tmp_path / "data", lab.inventory["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp_path / "spool", ["h1", "h2"]) as cs:  # h3's is down
            truth = lab.traffic(duration=4.0, seed=12)
            for c in cs:
                c.stop()
        w = window_of(truth)
        g = agg.get("/api/v1/graph", **w)
        assert served_edges(g) == truth_edges(lab, truth)
        h3_servers = {p["ip"] for p in lab.inventory["pods"] if p["host"] == "h3"}
        flows = agg.get("/api/v1/flows", limit="10000", since=w["from"], until=w["to"],
                        protocol=w["protocol"])
        assert flows["count"] == len(truth)
        seen = Counter()
        for f in flows["flows"]:
            if f["server"]["ip"] in h3_servers:
                # the server's view is missing; the client's and the wire's are there
                assert "server" not in f["observed_by"], f
                assert f["observed_by"] == ["client", "path"], f  # h3 servers: across hosts
                seen["h3"] += 1
        assert seen["h3"] == sum(t["server_ip"] in h3_servers for t in truth) > 0
