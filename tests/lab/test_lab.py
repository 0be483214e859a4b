"""The lab itself: it builds, its overlay carries each packet between exactly the right hosts,
its truth is exact (the servers' own counts agree byte for byte), and it leaves nothing behind,
also when interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from eastwest.cgroups import cgroup2_mount, container_id
from eastwest.lab import Lab
from eastwest.lab.topology import existing_netns
from tests.conftest import require_root

pytestmark = pytest.mark.lab

EW = [sys.executable, "-m", "eastwest"]
TRUTH_FIELDS = {"client_pod", "client_ip", "client_port", "server_pod", "server_ip", "server_port",
                "protocol", "bytes_c2s", "bytes_s2c", "start", "end", "outcome"}


def lab_processes(name: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "eastwest.lab.app" in line and f"/lab/{name}" in line]


def test_cli_up_traffic_down_leaves_nothing_behind(tmp_path):
    require_root()
    name = "ewcli"
    subprocess.run([*EW, "lab", "down", "--name", name, "-q"], check=False)
    truth = tmp_path / "t.jsonl"
    try:
        up = subprocess.run([*EW, "lab", "up", "--name", name, "-q"], capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        assert len([n for n in existing_netns() if n.startswith(f"{name}-")]) == 1 + 3 + 7
        groups = cgroup2_mount() / f"eastwest-lab-{name}"  # the pods' container groups
        assert len([d for d in groups.rglob("*") if d.is_dir()
                    and container_id(str(d.relative_to(groups)))]) == 7
        st = subprocess.run([*EW, "lab", "status", "--name", name, "--json"], capture_output=True,
                            text=True, check=True)
        status = json.loads(st.stdout)
        assert all(p["process"] == "running" for p in status["pods"] if p["service"] != "loadgen")
        tr = subprocess.run([*EW, "lab", "traffic", "--name", name, "--duration", "3", "--truth",
                             str(truth), "--seed", "7", "-q"], capture_output=True, text=True)
        assert tr.returncode == 0, tr.stderr
        lines = [json.loads(x) for x in truth.read_text().splitlines()]
        assert lines and all(TRUTH_FIELDS <= set(t) for t in lines)
    finally:
        down = subprocess.run([*EW, "lab", "down", "--name", name, "-q"], capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert [n for n in existing_netns() if n.startswith(f"{name}-")] == []
    assert lab_processes(name) == []
    assert not Path(f"/run/eastwest/lab/{name}").exists()
    assert not groups.exists()


def test_truth_equals_what_the_servers_counted(lab_factory, tmp_path):
    lab = lab_factory(name="ewtruth")
    truth = lab.traffic(4.0, tmp_path / "t.jsonl", seed=3)
    # A 5-tuple can recur: UDP clients bind a fresh ephemeral port per call and the kernel may
    # hand out one just freed. Calls on one 5-tuple are sequential, so the n-th call the client
    # recorded (by start) is the n-th exchange the server recorded (by end).
    ledger: dict[tuple, list[dict]] = {}
    for x in sorted(lab.ledger(), key=lambda x: x["end"]):
        key = (x["protocol"], x["client_ip"], x["client_port"], x["server_ip"], x["server_port"])
        ledger.setdefault(key, []).append(x)
    outcomes = Counter(t["outcome"] for t in truth)
    assert outcomes["ok"] > 100 and outcomes["refused"] >= 1 and outcomes["reset"] >= 1, outcomes
    checked = 0
    for t in sorted(truth, key=lambda t: t["start"]):
        key = (t["protocol"], t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])
        if t["outcome"] == "refused":
            assert key not in ledger, t  # nobody accepted it
            # a refused UDP exchange's datagram was sent (its payload counted), never answered
            assert t["bytes_s2c"] == 0 and (t["protocol"] == "udp" or t["bytes_c2s"] == 0), t
            continue
        server = ledger[key].pop(0)
        assert (server["bytes_in"], server["bytes_out"]) == (t["bytes_c2s"], t["bytes_s2c"]), t
        assert server["reset"] == (t["outcome"] == "reset"), t
        checked += 1
    assert checked == len(truth) - outcomes["refused"]
    # the demo's own UDP (docs/lab.md, "UDP"): both socket kinds, several datagrams each way, and
    # a datagram to a dead port, refused (sent: its bytes count; never answered)
    udp = [t for t in truth if t["protocol"] == "udp" and "dns" not in t]
    assert {t["udp_socket"] for t in udp if t["outcome"] == "ok"} == {"connected", "unconnected"}
    assert any(t["dgrams_c2s"] >= 2 and t["dgrams_s2c"] >= 2 for t in udp)
    dead = [t for t in udp if t["outcome"] == "refused"]
    assert dead and all((t["dgrams_c2s"], t["dgrams_s2c"], t["bytes_s2c"]) == (1, 0, 0)
                        and t["bytes_c2s"] > 0 for t in dead)
    assert not any(ledger.values()), "the servers saw exchanges no client recorded"
    # the application's own ports are what the truth says, and pods are who the inventory says
    pods = {p["name"]: p for p in lab.inventory["pods"]}
    for t in truth:
        assert pods[t["client_pod"]]["ip"] == t["client_ip"]
        assert pods[t["server_pod"]]["ip"] == t["server_ip"]
    # the call graph has the edges the docs promise, and most calls cross hosts
    edges = {(t["client_pod"].rsplit("-", 1)[0], t["server_pod"].rsplit("-", 1)[0]) for t in truth}
    assert edges == {("loadgen", "frontend"), ("frontend", "api"), ("api", "db"), ("api", "cache"),
                     ("api", "auth"), ("api", "resolver")}
    assert sum(t["client_host"] != t["server_host"] for t in truth) > len(truth) / 2


def test_overlay_carries_each_packet_between_exactly_its_two_hosts(lab_factory, tmp_path):
    """Static forwarding entries: a VXLAN packet seen on a host's underlay always has that host
    as one VTEP and the host of the other pod as the other, so VTEP ground truth is exact."""
    from scapy.all import IP, UDP, VXLAN, rdpcap

    lab = lab_factory(name="ewovl", vxlan_port=8472)
    host_of_ip = {p["ip"]: p["host"] for p in lab.inventory["pods"]}
    underlay = {h["underlay_ip"]: h["name"] for h in lab.inventory["hosts"]}
    caps = {}
    procs = []
    for h in lab.inventory["hosts"]:
        caps[h["name"]] = tmp_path / f"{h['name']}.pcap"
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", h["netns"], "tcpdump", "-i", "eth0", "-U", "-w",
             str(caps[h["name"]]), "udp", "port", "8472"], stderr=subprocess.PIPE))
    for p in procs:  # tcpdump says "listening on" once its capture is open
        assert b"listening on" in p.stderr.readline()
    truth = lab.traffic(2.0, seed=5)
    for p in procs:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=10)
    cross = [t for t in truth if t["client_host"] != t["server_host"]]
    assert cross
    seen_pairs: Counter[tuple[str, str]] = Counter()
    for host, path in caps.items():
        for pkt in rdpcap(str(path)):
            if not pkt.haslayer(VXLAN) or IP not in pkt[VXLAN]:
                continue
            if pkt[VXLAN][IP].dst not in host_of_ip:
                continue  # multicast/broadcast (IGMP from the bridges) is flooded to every host
            outer, inner = pkt[IP], pkt[VXLAN][IP]
            assert pkt[UDP].dport == 8472 and pkt[VXLAN].vni == lab.inventory["vni"]
            a, b = underlay[outer.src], underlay[outer.dst]
            assert host in (a, b)
            assert (host_of_ip[inner.src], host_of_ip[inner.dst]) == (a, b), pkt.summary()
            seen_pairs[(a, b)] += 1
    expected = {(t["client_host"], t["server_host"]) for t in cross}
    assert expected <= set(seen_pairs)


def test_interrupted_up_tears_down_what_it_built():
    require_root()
    name = "ewint"
    Lab.down_by_name(name)
    # SIGINT as a terminal sends it: a suite started in the background of a non-interactive
    # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([*EW, "lab", "up", "--name", name], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    for line in proc.stderr:  # interrupt in the middle: after the first pod exists
        if "pod " in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, rest
    assert "tearing down" in rest
    assert [n for n in existing_netns() if n.startswith(f"{name}-")] == []
    assert not Path(f"/run/eastwest/lab/{name}").exists()


def test_a_namespace_made_while_tearing_down_is_removed_too(monkeypatch):
    """An interrupted `lab up` leaves its last `ip netns add` killed but not waited for (Python's
    subprocess on Ctrl-C), so a pod's namespace may appear after teardown listed them (a loaded
    run left `ewint-h1-p0` and exited 1): the next pass removes it."""
    require_root()
    from eastwest.lab import topology

    name = "ewlate"
    topology.remove(name)
    subprocess.run(["ip", "netns", "add", f"{name}-h1"], check=True)
    real = topology.kill_netns_processes
    made: list[str] = []

    def late_pod(netns: str) -> list[int]:
        if not made:  # the straggler finishes while the first pass runs
            made.append(f"{name}-h1-p0")
            subprocess.run(["ip", "netns", "add", made[0]], check=True)
        return real(netns)

    monkeypatch.setattr(topology, "kill_netns_processes", late_pod)
    said: list[str] = []
    try:
        gone = topology.remove(name, said.append)
    finally:
        monkeypatch.undo()
        topology.remove(name)
    assert sorted(gone) == [f"{name}-h1", f"{name}-h1-p0"], said
    assert [n for n in existing_netns() if n.startswith(f"{name}-")] == []
    assert f"again: {name}-h1-p0" in said


def test_up_twice_is_refused_and_down_is_idempotent(lab_factory):
    lab = lab_factory(name="ewtwice", hosts=2, pods_per_host=3)
    from eastwest.errors import LabError

    with pytest.raises(LabError, match="already up"):
        Lab.up(name="ewtwice", hosts=2, pods_per_host=3)
    assert lab.status()["pods"][1]["process"] == "running"
    lab.down()
    assert lab.down() == []  # nothing left: a second down is a no-op


def test_non_root_is_told_clearly():
    require_root()
    r = subprocess.run([*EW, "lab", "status", "--name", "nosuch"], capture_output=True, text=True)
    assert r.returncode == 1 and "no lab named 'nosuch'" in r.stdout
    code = ("import os\nos.geteuid = lambda: 1000\nfrom eastwest.cli import main\n"
            "raise SystemExit(main(['lab', 'up', '--name', 'ewnr']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ})
    assert r.returncode == 1 and "needs root" in r.stderr
    time.sleep(0)  # nothing was built
    assert [n for n in existing_netns() if n.startswith("ewnr-")] == []
