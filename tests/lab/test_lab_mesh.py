"""The `mesh` lab pattern (issue 20) with Kubernetes-style Services, in the real kernel: every pod
runs the lab's sidecar (`ew-sidecar`, uid 1337) behind Istio's iptables, so each app-to-app TCP
call is four sockets: app -> 127.0.0.1:15001 -> client sidecar -> network -> server pod :15006
-> server sidecar -> from 127.0.0.6 -> app. Proved against the servers' own ledgers and the
sidecars' own hop lines:
- the truth stays the app's: every TCP line's bytes are the server app's, and the server app's
  peer is 127.0.0.6 (its socket really came from its sidecar);
- every meshed call has exactly its two hops (no stray proxied connection: UDP and DNS are never
  redirected, the sidecars never proxy themselves), the hop sockets are where the REDIRECTs put
  them, and the proxy-to-proxy hop carries the app's bytes plus the framing lines each way;
- the truth's `mesh` is the proxy-to-proxy hop as the network has it (the NodePort's masquerade
  included), with those wire bytes;
- a refused port and a server's reset both reach the app as a reset (its connect went to its
  own sidecar, which accepted), while the hops say where it happened.

The lab (module scope, kept up) is meant to be shared by the collector/aggregator test of the
same pattern: `mesh_run` gives the lab, the truth (each TCP line with `mesh`) and the hops."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import eastwest
from eastwest.lab import mesh, sidecar
from eastwest.lab.sidecar import INBOUND_PORT, INBOUND_SOURCE, OK_LINE, OUTBOUND_PORT, PROXY_UID
from tests.conftest import require_root
from tests.lab.harness import (
    Aggregator,
    collectors,
    retransmitted,
    same_or_retransmitted,
    served_edges,
    truth_edges,
    window_of,
)

pytestmark = pytest.mark.lab

NAME = "ewmsh"


class MeshRun(NamedTuple):
    lab: Any  # eastwest.lab.Lab, kept up for the module
    truth: list[dict[str, Any]]  # the run's truth lines, each TCP line with its `mesh`
    hops: list[dict[str, Any]]  # the sidecars' hop lines of the run (two per TCP line)
    ledger: list[dict[str, Any]]  # the servers' ledger lines of the run
    resent: dict[str, int]  # pod name -> TCP segments its namespace retransmitted in the run


@pytest.fixture(scope="module")
def mesh_run(lab_factory, tmp_path_factory) -> MeshRun:
    """One mesh lab with Services and 4 s of traffic (taken right after it: later tests may
    drive the lab again)."""
    lab = lab_factory(name=NAME, hosts=3, pods_per_host=3, services=True, patterns=["mesh"])
    netns = {p["name"]: p["netns"] for p in lab.inventory["pods"]}
    before = {name: retransmitted(ns) for name, ns in netns.items()}
    truth = lab.traffic(4.0, tmp_path_factory.mktemp("mesh") / "truth.jsonl", seed=11)
    resent = {name: retransmitted(ns) - before[name] for name, ns in netns.items()}
    return MeshRun(lab, truth, lab.mesh_hops(), lab.ledger(), resent)


def hop_pairs(hops: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """hop id -> {direction: hop line}; each id once per direction."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for h in hops:
        assert h["id"], h  # every inbound connection came from a sidecar (framed)
        assert h["direction"] not in out.setdefault(h["id"], {}), h
        out[h["id"]][h["direction"]] = h
    return out


def test_every_pod_runs_its_sidecar_as_the_proxy_uid_behind_istios_rules(mesh_run):
    lab = mesh_run.lab
    inv = lab.inventory
    assert inv["mesh"]["proxy"] == "ew-sidecar" and inv["mesh"]["uid"] == PROXY_UID
    assert sorted(inv["mesh"]["pods"]) == sorted(p["name"] for p in inv["pods"])
    assert all(p["sidecar"] == "ew-sidecar" for p in inv["pods"])
    assert {p["name"]: p["sidecar"] for p in lab.status()["pods"]} == {
        p["name"]: "running" for p in inv["pods"]}
    for p in inv["pods"]:
        pids = subprocess.run(["ip", "netns", "pids", p["netns"]], capture_output=True,
                              text=True, check=True).stdout.split()
        cars = []
        for pid in pids:
            try:
                comm = open(f"/proc/{pid}/comm").read().strip()
                status = open(f"/proc/{pid}/status").read()
            except OSError:
                continue
            if comm == "ew-sidecar":
                uid = next(line.split()[1:] for line in status.splitlines()
                           if line.startswith("Uid:"))
                cgroup = open(f"/proc/{pid}/cgroup").read()
                cars.append((uid, f"0::{p['sidecar_cgroup']}\n" in cgroup))
        assert cars == [([str(PROXY_UID)] * 4, True)], (p["name"], cars)
        # a container of its own in the pod's group, as istio-proxy is
        assert p["sidecar_container_id"] != p["container_id"]
        assert p["sidecar_cgroup"].rsplit("/", 1)[0] == p["cgroup"].rsplit("/", 1)[0]
        nat = subprocess.run(["ip", "netns", "exec", p["netns"], "iptables", "-w", "-t", "nat",
                              "-S"], capture_output=True, text=True, check=True).stdout
        assert f"-A EW_MESH_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN" in nat
        assert f"--to-ports {OUTBOUND_PORT}" in nat and f"--to-ports {INBOUND_PORT}" in nat
        assert "-A PREROUTING -p tcp -j EW_MESH_INBOUND" in nat


def test_the_app_truth_is_the_servers_ledger_byte_for_byte_through_the_sidecars(mesh_run):
    lab, truth, hops, ledger_lines, _ = mesh_run
    pairs = hop_pairs(hops)
    ledger = {(x["pod"], x["client_ip"], x["client_port"]): x for x in ledger_lines
              if x["protocol"] == "tcp"}
    assert all(x["client_ip"] == INBOUND_SOURCE for x in ledger.values())
    tcp = [t for t in truth if t["protocol"] == "tcp"]
    outcomes = Counter((t.get("via"), t["outcome"]) for t in tcp)
    assert outcomes[("service", "ok")] > 150 and outcomes[("pod", "ok")] > 20, outcomes
    assert outcomes[("nodeport", "ok")] >= 3, outcomes
    served = 0
    for t in tcp:
        inb = pairs[t["mesh"]["hop_id"]]["inbound"]
        if t["server_port"] == lab.inventory["dead_port"]:
            continue  # nobody listens: no ledger (below)
        x = ledger[(t["server_pod"], INBOUND_SOURCE, inb["upstream"]["local_port"])]
        assert (x["bytes_in"], x["bytes_out"]) == (t["bytes_c2s"], t["bytes_s2c"]), (t, x)
        assert (x["server_ip"], x["server_port"]) == (t["server_ip"], t["server_port"])
        if "via" in t:  # the PROXY line went through both sidecars untouched
            assert (x["proxy"]["client_ip"], x["proxy"]["client_port"]) == (t["client_ip"],
                                                                            t["client_port"])
        served += 1
    assert served == len(ledger)  # and no server connection that is not a truth line


def test_every_meshed_call_has_its_two_hops_and_the_wire_carries_app_bytes_plus_framing(mesh_run):
    lab, truth, hops, _, _ = mesh_run
    pairs = hop_pairs(hops)
    pods = {p["name"]: p for p in lab.inventory["pods"]}
    tcp = [t for t in truth if t["protocol"] == "tcp"]
    assert all("mesh" not in t for t in truth if t["protocol"] == "udp")
    # exactly two hops per call: nothing else was proxied, nothing proxied twice
    assert len(hops) == 2 * len(tcp) and len(pairs) == len(tcp)
    assert sorted(t["mesh"]["hop_id"] for t in tcp) == sorted(pairs)
    for t in tcp:
        m = t["mesh"]
        out, inb = pairs[m["hop_id"]]["outbound"], pairs[m["hop_id"]]["inbound"]
        assert (out["pod"], inb["pod"]) == (t["client_pod"], t["server_pod"])
        # app -> its sidecar: the REDIRECT put the app's socket on 127.0.0.1:15001
        assert out["downstream"] == {"client_ip": t["client_ip"], "client_port": t["client_port"],
                                     "server_ip": "127.0.0.1", "server_port": OUTBOUND_PORT}
        dialled = ((t["dialled_ip"], t["dialled_port"]) if "via" in t
                   else (t["server_ip"], t["server_port"]))
        assert (out["original_dst"]["ip"], out["original_dst"]["port"]) == dialled
        # sidecar -> sidecar: from the client pod's address to the server pod's :15006
        assert out["upstream"]["local_ip"] == t["client_ip"]
        assert out["upstream"]["local_port"] in sidecar.SIDECAR_PORTS  # never an app's port
        assert (inb["downstream"]["server_ip"], inb["downstream"]["server_port"]) == (
            t["server_ip"], INBOUND_PORT)
        assert (inb["original_dst"]["ip"], inb["original_dst"]["port"]) == (t["server_ip"],
                                                                            t["server_port"])
        assert inb["app_client"] == {"ip": t["client_ip"], "port": t["client_port"]}
        # sidecar -> app: from 127.0.0.6 to the app's own address and port
        if inb["outcome"] != "refused":
            assert inb["upstream"]["local_ip"] == INBOUND_SOURCE
            assert (inb["upstream"]["remote_ip"], inb["upstream"]["remote_port"]) == (
                t["server_ip"], t["server_port"])
        header = sidecar.framing_line(t["client_ip"], t["client_port"], m["hop_id"])
        assert out["framing_c2s"] == inb["framing_c2s"] == len(header)
        # the truth's mesh: the proxy-to-proxy hop as the network has it, and its wire bytes
        assert m["proxy"] == "ew-sidecar"
        assert (m["client_ip"], m["client_port"]) == (out["upstream"]["local_ip"],
                                                      out["upstream"]["local_port"])
        assert (m["server_ip"], m["server_port"]) == (t["server_ip"], t["server_port"])
        assert m["wire_bytes_c2s"] == out["upstream_bytes_out"]
        assert m["wire_bytes_s2c"] == inb["downstream_bytes_out"]
        saw = (inb["downstream"]["client_ip"], inb["downstream"]["client_port"])
        assert (m["server_saw_ip"], m["server_saw_port"]) == saw
        if t.get("via") == "nodeport":  # masqueraded by the NodePort's host
            assert saw[0] != t["client_ip"] and t["snat"] is True
        else:  # no NAT moved the sidecars' hop (the sidecar binds fresh ports)
            assert saw == (m["client_ip"], m["client_port"]) and not t.get("snat")
        if t["outcome"] != "ok":
            continue
        assert out["outcome"] == inb["outcome"] == "ok"
        # each socket's bytes: the app's on the loopback hops, plus the framing on the wire
        assert (out["downstream_bytes_in"], out["downstream_bytes_out"]) == (t["bytes_c2s"],
                                                                             t["bytes_s2c"])
        assert (inb["upstream_bytes_out"], inb["upstream_bytes_in"]) == (t["bytes_c2s"],
                                                                         t["bytes_s2c"])
        assert m["framing_s2c"] == len(OK_LINE)
        assert (m["wire_bytes_c2s"], m["wire_bytes_s2c"]) == (t["bytes_c2s"] + len(header),
                                                              t["bytes_s2c"] + len(OK_LINE))
        assert (out["upstream_bytes_out"], out["upstream_bytes_in"]) == (
            inb["downstream_bytes_in"], inb["downstream_bytes_out"])
    assert Counter(pods[t["client_pod"]]["service"] for t in tcp)["loadgen"] > 50


def test_refused_and_reset_reach_the_app_as_resets_and_the_hops_say_where(mesh_run):
    lab, truth, hops, ledger_lines, _ = mesh_run
    pairs = hop_pairs(hops)
    ledger = {(x["pod"], x["client_port"]): x for x in ledger_lines if x["protocol"] == "tcp"}
    tcp = [t for t in truth if t["protocol"] == "tcp"]
    dead = [t for t in tcp if t["server_port"] == lab.inventory["dead_port"]]
    resets = [t for t in tcp if t["server_port"] != lab.inventory["dead_port"]
              and t["outcome"] != "ok"]
    assert dead and resets, Counter(t["outcome"] for t in tcp)
    for t in dead:  # nobody listens on db's dead port: the server's sidecar was refused
        out, inb = pairs[t["mesh"]["hop_id"]]["outbound"], pairs[t["mesh"]["hop_id"]]["inbound"]
        assert t["outcome"] == "reset" and t["bytes_s2c"] == 0, t
        assert inb["outcome"] == "refused" and "upstream" not in inb
        assert inb["framing_s2c"] == 0 and inb["downstream_bytes_out"] == 0  # no OK line
        assert out["outcome"] == "reset" and t["mesh"]["outcome"] == "refused"
        assert out["downstream_bytes_in"] <= t["bytes_c2s"]
    for t in resets:  # auth's abortive closes (SO_LINGER 0), carried back as resets
        inb = pairs[t["mesh"]["hop_id"]]["inbound"]
        x = ledger[(t["server_pod"], inb["upstream"]["local_port"])]
        assert pods_service(lab, t["server_pod"]) == "auth" and x["reset"], (t, x)
        assert t["outcome"] == "reset" and t["bytes_s2c"] == 0 and x["bytes_out"] == 0
        assert x["bytes_in"] == t["bytes_c2s"]
        assert inb["outcome"] == pairs[t["mesh"]["hop_id"]]["outbound"]["outcome"] == "reset"
        assert t["mesh"]["outcome"] == "reset"
    assert not [t for t in tcp if t["outcome"] in ("refused", "timeout")]


PLAIN_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.99.7.2", 8080)); s.listen(); print("ready", flush=True)
while True:
    c, peer = s.accept(); got = 0
    while (d := c.recv(65536)):
        got += len(d)
    c.sendall(b"r" * 5000); c.close()
    print(peer[0], got, flush=True)
"""
# the error is the errno the connection died of: a reset that lands before the client's
# shutdown(SHUT_WR) fails that call with ENOTCONN, and the socket still holds ECONNRESET
PLAIN_CLIENT = """
import errno, json, socket, sys
c = socket.socket(); c.settimeout(5); c.connect(("10.99.7.2", int(sys.argv[1])))
out = {"sent": 0, "got": 0, "error": None}
try:
    c.sendall(b"p" * 1000); out["sent"] = 1000; c.shutdown(socket.SHUT_WR)
    while (d := c.recv(65536)):
        out["got"] += len(d)
except OSError as exc:
    code = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or exc.errno
    out["error"] = errno.errorcode.get(code, type(exc).__name__)
print(json.dumps(out))
"""


def test_a_caller_without_a_sidecar_is_relayed_plainly_with_its_half_close(tmp_path):
    """Two namespaces of our own: `b` has the pod rules and a sidecar, `a` neither (a caller
    with no sidecar). The inbound sidecar relays a's unframed connection as it is, a's
    half-close reaches the server (which answers only after its EOF), and a port where nobody
    listens reaches a as a reset."""
    require_root()
    a, b = "ewmshx-a", "ewmshx-b"
    root = str(Path(eastwest.__file__).resolve().parents[1])
    procs: list[subprocess.Popen] = []

    def sh(*args: str, **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, check=True, **kw)

    for ns in (a, b):
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", b)
        for ns, addr in ((a, "10.99.7.1/24"), (b, "10.99.7.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", b, "iptables-restore", "-w", "--noflush", input=mesh.ruleset())
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", b, sys.executable, "-m", "eastwest.lab.sidecar", "--state",
             str(tmp_path), "--pod", "b"], cwd=root, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c",
                                       PLAIN_SERVER], stdout=subprocess.PIPE, text=True))
        assert procs[1].stdout is not None and procs[1].stdout.readline() == "ready\n"
        deadline = time.monotonic() + 10
        while not (tmp_path / "ready" / "b.sidecar").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None
            time.sleep(0.05)
        ok = json.loads(sh("ip", "netns", "exec", a, sys.executable, "-c", PLAIN_CLIENT,
                           "8080").stdout)
        dead = json.loads(sh("ip", "netns", "exec", a, sys.executable, "-c", PLAIN_CLIENT,
                             "8081").stdout)
        assert ok == {"sent": 1000, "got": 5000, "error": None}
        assert procs[1].stdout.readline().split() == [INBOUND_SOURCE, "1000"]
        assert dead["error"] == "ECONNRESET" and dead["got"] == 0, dead
        deadline = time.monotonic() + 5
        while len(hops := mesh.read_hops([tmp_path / "mesh" / "b.jsonl"])) < 2:
            assert time.monotonic() < deadline, hops
            time.sleep(0.05)
        plain, refused = sorted(hops, key=lambda h: h["original_dst"]["port"])
        assert plain["direction"] == "inbound" and plain["id"] is None
        assert plain["app_client"]["ip"] == "10.99.7.1"
        assert (plain["framing_c2s"], plain["framing_s2c"], plain["outcome"]) == (0, 0, "ok")
        assert (plain["downstream_bytes_in"], plain["downstream_bytes_out"],
                plain["upstream_bytes_out"], plain["upstream_bytes_in"]) == (1000, 5000, 1000,
                                                                             5000)
        assert plain["upstream"]["local_ip"] == INBOUND_SOURCE
        assert refused["outcome"] == "refused" and refused["original_dst"]["port"] == 8081
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def pods_service(lab, name: str) -> str:
    return next(p["service"] for p in lab.inventory["pods"] if p["name"] == name)


# -- the collectors and the aggregator on the mesh lab (issue 20, "Done means") -----------------
@pytest.mark.bpf
def test_the_graph_of_a_mesh_run_is_the_apps_truth_each_call_one_folded_connection(mesh_run,
                                                                                   tmp_path):
    """One collector per host (socket probes, VXLAN capture, NAT folding, mesh folding: wired
    as collector/main.py wires them) and a real aggregator, over a second run of the same lab:
    - the graph equals the truth's app-level edges (connections, exact app bytes, failures),
      with no sidecar, `external:` or unknown node, and no byte mismatch (the wire's framing
      is not one) but on the calls whose request reached only the client's sidecar (db's dead
      port: the server pod refused the handoff);
    - every TCP call of the truth is ONE connection keyed by its proxy-to-proxy hop, observed by
      its client and its server (and the wire across hosts), its bytes the app's, its `mesh`
      the four hops (two per side) and the wire's bytes (the app's plus the framing);
    - `show_proxies` draws each meshed workload's sidecar as a node of its own."""
    lab = mesh_run.lab
    hosts = [h["name"] for h in lab.inventory["hosts"]]
    with Aggregator(tmp_path / "data", lab.inventory["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp_path / "spool", hosts, nat=True, mesh=True) as cs:
            truth = lab.traffic(4.0, tmp_path / "truth.jsonl", seed=12)
            for c in cs:
                c.stop()
        w = window_of(truth)
        graph = agg.get("/api/v1/graph", **w)
        proxies = agg.get("/api/v1/graph", show_proxies="true", **w)
        got = agg.get("/api/v1/flows", limit="10000", since=w["from"], until=w["to"],
                      protocol=w["protocol"])
    assert got["next_cursor"] is None
    assert not [n["id"] for n in graph["nodes"]
                if n["id"].startswith(("external:", "unknown")) or n.get("kind") == "proxy"]
    # a byte mismatch only where the server pod refused the sidecar's handoff (db's dead port):
    # the client app's request reached its own sidecar, no server app
    wid = {p["ip"]: f"{p['namespace']}/{p['service']}" for p in lab.inventory["pods"]}
    lost = Counter((wid[t["client_ip"]], wid[t["server_ip"]]) for t in truth
                   if t["server_port"] == lab.inventory["dead_port"] and t["bytes_c2s"])
    assert lost and {(e["source"], e["target"]): e["byte_mismatches"] for e in graph["edges"]
                     if e["byte_mismatches"]} == dict(lost)
    meshed = [e for e in graph["edges"] if e["mesh"]]
    assert meshed and all(e["mesh"]["proxy"] == "ew-sidecar" for e in meshed)

    by_key: dict[tuple, list[dict]] = {}
    for f in got["flows"]:
        by_key.setdefault((f["protocol"], f["client"]["ip"], f["client"]["port"],
                           f["server"]["ip"], f["server"]["port"]), []).append(f)
    pods = {p["name"]: p for p in lab.inventory["pods"]}
    tcp = [t for t in truth if t["protocol"] == "tcp"]
    for t in tcp:
        m = t["mesh"]
        flows = by_key.get(("tcp", m["client_ip"], m["client_port"], m["server_ip"],
                            m["server_port"]), [])
        assert len(flows) == 1, (t, flows)
        f = flows[0]
        assert (f["bytes_c2s"], f["bytes_s2c"]) == (t["bytes_c2s"], t["bytes_s2c"]), (t, f)
        cross = pods[t["client_pod"]]["host"] != pods[t["server_pod"]]["host"]
        want = {"client", "server", "path"} if cross else {"client", "server"}
        assert want <= set(f["observed_by"]), (t, f)
        assert f["mesh"] is not None and f["mesh"]["proxy"] == "ew-sidecar", f
        assert [(h["hop"], h["observer"]) for h in f["mesh"]["hops"]] == [
            ("app-proxy", "client"), ("proxy-proxy", "client"), ("proxy-proxy", "server"),
            ("proxy-app", "server")], f
        app_hop = f["mesh"]["hops"][0]
        assert (app_hop["client"]["ip"], app_hop["client"]["port"]) == (t["client_ip"],
                                                                        t["client_port"])
        if cross and t["outcome"] == "ok":  # more on the wire only where a segment was resent
            senders = (mesh_run.resent[t["client_pod"]], mesh_run.resent[t["server_pod"]])
            assert same_or_retransmitted([f["mesh"]["wire_bytes_c2s"], f["mesh"]["wire_bytes_s2c"]],
                                         [m["wire_bytes_c2s"], m["wire_bytes_s2c"]], senders), (
                t, f, senders)
    udp = [t for t in truth if t["protocol"] == "udp"]
    for t in udp:  # UDP is not meshed: each exchange one plain connection, the app's bytes
        flows = by_key.get(("udp", t["client_ip"], t["client_port"], t["server_ip"],
                            t["server_port"]), [])
        assert [(f["bytes_c2s"], f["bytes_s2c"]) for f in flows] == [
            (t["bytes_c2s"], t["bytes_s2c"])], (t, flows)
    assert served_edges(graph) == truth_edges(lab, truth)
    assert udp and not [f for f in got["flows"] if f["protocol"] == "udp" and f["mesh"]]

    sidecars = {n["id"] for n in proxies["nodes"] if n.get("kind") == "proxy"}
    assert sidecars and all(s.endswith("~ew-sidecar") for s in sidecars)
    assert {e["source"] for e in meshed} <= {s.removesuffix("~ew-sidecar") for s in sidecars}
