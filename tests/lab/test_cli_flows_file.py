"""`eastwest flows --input-file` on the records of a real lab run, against its ground truth.

The lab (3 hosts x 2 pods, VXLAN) runs its demo application for a few seconds while the eBPF
socket probes (tests/lab/test_socket_probes_support.py `Collected`) record every connection in
the lab's namespaces; the records go to a JSON-lines file exactly as `eastwest collector --stdout`
writes them. Then the real command (`python -m eastwest flows --input-file ...`, a subprocess)
filters that file, and the connections it prints must be exactly the truth's connections that
the same filter describes: none missing, none extra, per observer (a refused connect has no
server side). Every machine format is parsed back and must say the same.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from eastwest.codec import from_json, write_jsonl
from tests.lab.test_socket_probes_support import Collected, finals_count

Truth = dict[str, Any]
Key = tuple[str, str, int, str, int]  # observer, client ip, client port, server ip, server port


@pytest.fixture(scope="module")
def run(lab_factory, tmp_path_factory):
    """(records file, TCP truth, inventory) of one lab run."""
    lab = lab_factory(name="ewq", hosts=3, pods_per_host=2)
    netns = [lab.inventory["fabric_netns"]]
    for h in lab.inventory["hosts"]:
        netns += lab.host_netns(h["name"])
    tmp = tmp_path_factory.mktemp("cli-file")
    with Collected(netns) as col:
        truth = [t for t in lab.traffic(duration=3.0, truth_path=tmp / "truth.jsonl", seed=7)
                 if t["protocol"] == "tcp"]
        assert truth, "the lab made no TCP connections"
        n_server = sum(1 for t in truth if t["outcome"] != "refused")
        assert col.wait_for(lambda recs: finals_count("client", len(truth))(recs)
                            and finals_count("server", n_server)(recs), timeout=120), \
            "the socket probes did not report every connection of the truth"
        records = [r for r in col.records if r.protocol == "tcp"]  # the TCP truth's records
    path = tmp / "records.jsonl"
    path.write_bytes(write_jsonl(records))
    outcomes = {t["outcome"] for t in truth}
    assert {"ok", "refused", "reset"} <= outcomes, f"the run lacks a failure kind: {outcomes}"
    return path, truth, lab.inventory


def eastwest_flows(path, *argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "eastwest", "flows", "--input-file", str(path),
                           *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def expected_list(truth: list[Truth], pred: Callable[[Truth], bool],
                  observers: tuple[str, ...] = ("client", "server")) -> list[Key]:
    """One key per observer per truth connection: a key repeats when its 4-tuple was used
    twice (a refused connect leaves no TIME_WAIT, so the next one may get the same port)."""
    out = []
    for t in truth:
        if not pred(t):
            continue
        for obs in observers:
            if obs == "server" and t["outcome"] == "refused":
                continue  # never accepted: no server side
            out.append((obs, t["client_ip"], t["client_port"], t["server_ip"], t["server_port"]))
    return out


def expected_keys(truth: list[Truth], pred: Callable[[Truth], bool],
                  observers: tuple[str, ...] = ("client", "server")) -> set[Key]:
    return set(expected_list(truth, pred, observers))


def ip_of(inventory: dict[str, Any], service: str) -> str:
    return next(p["ip"] for p in inventory["pods"] if p["service"] == service)


def in_net(ip: str, net: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(net)


# argv (with {service} placeholders for pod IPs), truth predicate, observers the filter keeps
CASES: list[tuple[list[str], Callable[[Truth, dict[str, str]], bool], tuple[str, ...]]] = [
    (["--to-port", "5432"], lambda t, ip: t["server_port"] == 5432, ("client", "server")),
    (["--outcome", "refused"], lambda t, ip: t["outcome"] == "refused", ("client",)),
    (["--outcome", "reset", "--observer", "client"], lambda t, ip: t["outcome"] == "reset",
     ("client",)),
    (["--to-ip", "{auth}", "--not", "--outcome", "ok"],
     lambda t, ip: t["server_ip"] == ip["auth"] and t["outcome"] != "ok", ("client", "server")),
    (["--from-ip", "{loadgen}"], lambda t, ip: t["client_ip"] == ip["loadgen"],
     ("client", "server")),
    (["--port", "6379", "--port", "7000", "--observer", "server"],
     lambda t, ip: t["server_port"] in (6379, 7000), ("server",)),
    (["--ip", "10.244.3.0/24", "--protocol", "tcp"],
     lambda t, ip: in_net(t["client_ip"], "10.244.3.0/24") or in_net(t["server_ip"], "10.244.3.0/24"),
     ("client", "server")),
    (["--from-ip", "{api}", "--not", "--to-port", "5432", "--not", "--observer", "server"],
     lambda t, ip: t["client_ip"] == ip["api"] and t["server_port"] != 5432, ("client",)),
    (["--not", "--ip", "10.244.0.0/16"], lambda t, ip: False, ()),
]


@pytest.mark.parametrize(("argv", "pred", "observers"), CASES,
                         ids=[" ".join(c[0]) for c in CASES])
def test_file_filters_select_exactly_the_truths_connections(run, argv, pred, observers):
    path, truth, inventory = run
    ips = {p["service"]: p["ip"] for p in inventory["pods"]}
    argv = [a.format(**ips) for a in argv]
    out = eastwest_flows(path, *argv, "-o", "jsonl")
    recs = [from_json(line) for line in out.splitlines()]
    got = {(r.observer, *r.key[1:]) for r in recs}
    want = expected_keys(truth, lambda t: pred(t, ips), observers)
    assert got == want
    finals = [r for r in recs if r.final]
    assert len(finals) == len(expected_list(truth, lambda t: pred(t, ips), observers)), \
        "a connection's final record printed twice or missing"


def test_every_machine_format_says_the_same(run):
    path, truth, inventory = run
    argv = ["--to-ip", ip_of(inventory, "db")]
    want = expected_keys(truth, lambda t: t["server_ip"] == ip_of(inventory, "db"))
    jsonl = [from_json(x) for x in eastwest_flows(path, *argv, "-o", "jsonl").splitlines()]
    doc = json.loads(eastwest_flows(path, *argv, "-o", "json"))
    rows = list(csv.DictReader(io.StringIO(eastwest_flows(path, *argv, "-o", "csv"))))
    assert {(r.observer, *r.key[1:]) for r in jsonl} == want
    assert [from_json(json.dumps(o)) for o in doc] == jsonl
    assert [(row["observed_by"], row["client_ip"], int(row["client_port"]), row["server_ip"],
             int(row["server_port"]), int(row["bytes_c2s"]), int(row["bytes_s2c"]))
            for row in rows] == [(r.observer, *r.key[1:], r.bytes_c2s, r.bytes_s2c) for r in jsonl]
    # exact bytes, as the applications counted them. A client port is reused towards other
    # servers (and after a refusal, towards the same one): key by the whole 4-tuple, and let
    # a repeated 4-tuple's finals match its truths in any order.
    by_key: dict[tuple, list[tuple[int, int]]] = {}
    for t in truth:
        by_key.setdefault((t["client_ip"], t["client_port"], t["server_ip"], t["server_port"]),
                          []).append((t["bytes_c2s"], t["bytes_s2c"]))
    finals: dict[tuple, list[tuple[int, int]]] = {}
    for r in jsonl:
        if r.final:
            finals.setdefault((r.observer, r.client.ip, r.client.port, r.server.ip,
                               r.server.port), []).append((r.bytes_c2s, r.bytes_s2c))
    for (_obs, *four), got in finals.items():
        assert sorted(got) == sorted(by_key[tuple(four)]), (four, got)
    table = eastwest_flows(path, *argv, "-o", "table").splitlines()
    assert table[0].startswith("START") and len(table) == len(jsonl) + 1
