"""Shared by the lab tests of the IP families (test_lab_ipv6.py, test_lab_dual.py): one lab per
module, one run of the demo application with one collector per lab host (eBPF socket probes
scoped to the host's namespaces + VXLAN capture on its underlay, every record kept) sending to a
real aggregator; then the same exactness checks as the IPv4 lab tests, against the truth:

- the truth against the servers' own ledger, byte for byte (test_lab.py);
- every TCP connection once per side from the socket probes, exact 5-tuple, family, bytes,
  process, netns and outcome (test_socket_probes.py);
- every cross-host connection on both of its hosts' underlays with the VNI, the VTEP pair and
  the bytes (test_vxlan_live.py), the VTEPs IPv6 when the underlay is;
- the aggregator's graph equal to the truth's workload edges, named through the lab's workload
  map (IPv6 pod addresses included), and its flows equal to the truth's 5-tuples
  (test_aggregator_e2e.py)."""

from __future__ import annotations

import ipaddress
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from eastwest.lab.app import address
from tests.lab.harness import (
    Aggregator,
    collectors,
    paired,
    served_edges,
    truth_edges,
    truth_edges_by_observers,
    window_of,
)

HOSTS = ["h1", "h2", "h3"]


@dataclass
class Run:
    lab: Any
    truth: list[dict]
    records: dict[str, list]  # host -> every record its collector emitted
    drops: dict[str, dict]  # host -> its collector's drop counters
    agg: Aggregator


def run_once(lab, tmp, seed: int, duration: float = 4.0):
    """Yield a `Run`: the aggregator stays up until the generator is closed (module teardown)."""
    with Aggregator(tmp / "data", lab.inventory["workload_map"]) as agg:
        with collectors(lab, agg.url, tmp / "spool", HOSTS, keep=True) as cs:
            truth = lab.traffic(duration=duration, seed=seed)
            for c in cs:
                c.stop()
        yield Run(lab, truth, {c.host: c.records for c in cs},
                  {c.host: c.ctx.drops.snapshot() for c in cs}, agg)


def family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def key(t: dict) -> tuple:
    return (t["protocol"], t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])


def check_truth_against_ledger(run: Run) -> None:
    """The application's truth in this family is what its servers counted, and its addresses
    are the pods' addresses of the family the truth names."""
    ledger: dict[tuple, list[dict]] = defaultdict(list)
    for x in sorted(run.lab.ledger(), key=lambda x: x["end"]):
        ledger[key(x)].append(x)
    pods = {p["name"]: p for p in run.lab.inventory["pods"]}
    outcomes = Counter(t["outcome"] for t in run.truth)
    assert outcomes["ok"] > 50 and outcomes["refused"] >= 1, outcomes
    for t in sorted(run.truth, key=lambda t: t["start"]):
        assert family(t["client_ip"]) == family(t["server_ip"]) == t["family"], t
        assert address(pods[t["client_pod"]], t["family"]) == t["client_ip"], t
        assert address(pods[t["server_pod"]], t["family"]) == t["server_ip"], t
        if t["outcome"] == "refused":
            assert key(t) not in ledger and t["bytes_s2c"] == 0, t
            assert t["protocol"] == "udp" or t["bytes_c2s"] == 0, t  # a UDP datagram was sent
            continue
        server = ledger[key(t)].pop(0)
        assert (server["bytes_in"], server["bytes_out"]) == (t["bytes_c2s"], t["bytes_s2c"]), t
        assert server["reset"] == (t["outcome"] == "reset"), t
    assert not any(ledger.values()), "the servers saw exchanges no client recorded"


def check_socket_probes(run: Run) -> None:
    """Every TCP connection of the truth exactly once per side (the server side unless refused),
    exact: 5-tuple, family, bytes, outcome, resets, process and network namespace."""
    tcp = [t for t in run.truth if t["protocol"] == "tcp"]
    assert tcp
    finals = [r for recs in run.records.values() for r in recs
              if r.final and r.source == "socket" and r.protocol == "tcp"]  # UDP: its own test
    for observer in ("client", "server"):
        mine = [r for r in finals if r.observer == observer]
        expected = [t for t in tcp if observer == "client" or t["outcome"] != "refused"]
        assert len(mine) == len(expected), (observer, len(mine), len(expected))
        for t, r in paired(expected, mine, key, lambda r: r.key, lambda r: r.start):
            assert r is not None, f"no {observer} record of {t}"
            assert r.family == t["family"] and r.protocol == "tcp", (observer, t)
            assert r.connect == t["outcome"], (observer, t, r.connect)
            assert (r.bytes_c2s, r.bytes_s2c) == (t["bytes_c2s"], t["bytes_s2c"]), (observer, t)
            assert (r.resets > 0) == (t["outcome"] in ("reset", "refused")), (observer, t)
            comm = t["client_comm"] if observer == "client" else t["server_comm"]
            assert r.process is not None and r.process.comm == comm, (observer, t)
            ns = t["client_netns"] if observer == "client" else t["server_netns"]
            assert r.netns == os.stat(f"/run/netns/{ns}").st_ino, (observer, t)


def check_wire(run: Run) -> None:
    """Every cross-host connection of the truth on the underlay of both its hosts, with the
    lab's VNI, the VTEPs (client host -> server host, of the underlay's family), the port and the
    bytes the applications wrote and read."""
    inv = run.lab.inventory
    hosts = {h["name"]: h for h in inv["hosts"]}
    cross = [t for t in run.truth if t["client_host"] != t["server_host"]]
    assert len(cross) >= 10, f"only {len(cross)} cross-host connections"
    want: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for t in cross:
        want[key(t)][0] += t["bytes_c2s"]
        want[key(t)][1] += t["bytes_s2c"]
    meta = {key(t): t for t in cross}
    for host in HOSTS:
        got: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
        tunnels: dict[tuple, set] = defaultdict(set)
        connects: dict[tuple, list] = defaultdict(list)
        for r in run.records[host]:
            if r.observer != "path" or not r.final or r.protocol not in ("tcp", "udp"):
                continue
            assert r.tunnel is not None, r
            k = (r.protocol, r.client.ip, r.client.port, r.server.ip, r.server.port)
            got[k][0] += r.bytes_c2s
            got[k][1] += r.bytes_s2c
            connects[k].append(r.connect)
            tunnels[k].add((r.family, r.tunnel.vni, r.tunnel.outer_src, r.tunnel.outer_dst,
                            r.tunnel.outer_dport))
        here = [k for k, t in meta.items() if host in (t["client_host"], t["server_host"])]
        assert here
        for k in here:
            t = meta[k]
            assert k in got, f"{host}: connection {k} ({t['outcome']}) not captured"
            assert got[k] == want[k], f"{host}: bytes of {k}: {got[k]} != truth {want[k]}"
            src, dst = hosts[t["client_host"]]["underlay_ip"], hosts[t["server_host"]]["underlay_ip"]
            assert family(src) == inv["underlay_family"]
            assert tunnels[k] == {(t["family"], inv["vni"], src, dst, inv["vxlan_port"])}, (host, k)
            if t["protocol"] == "tcp" and len(connects[k]) == 1:
                assert connects[k] == [t["outcome"]], f"{host}: outcome of {k}"
        assert run.drops[host].get(("vxlan", "kernel_drop"), 0) == 0


def check_aggregator(run: Run) -> None:
    """The graph is the truth's workload edges (both families of a pod are one workload), every
    edge seen by whom it should be, with no byte mismatch; the flows are the truth's 5-tuples."""
    w = window_of(run.truth)
    g = run.agg.get("/api/v1/graph", **w)
    assert served_edges(g) == truth_edges(run.lab, run.truth)
    for e in g["edges"]:  # TCP and UDP alike: their ends, the wire across hosts
        assert set(e["observed_by"]) <= {"client,server", "client,path,server", "client",
                                         "client,path"}, e
        assert e["byte_mismatches"] == 0, e
    flows = run.agg.get("/api/v1/flows", limit="10000", since=w["from"], until=w["to"],
                        protocol=w["protocol"])
    assert flows["count"] == len(run.truth)
    got = Counter((f["protocol"], f["client"]["ip"], f["client"]["port"], f["server"]["ip"],
                   f["server"]["port"]) for f in flows["flows"])
    assert got == Counter(key(t) for t in run.truth)


def replay(run: Run, url: str, spool) -> None:
    """Send every kept record again, as each host's collector sent it, to another aggregator."""
    from collector.export import AggregatorSink, ExportSettings
    from collector.pipeline import CollectorContext
    from tests.lab.harness import INGEST

    for host, records in run.records.items():
        sink = AggregatorSink(CollectorContext(collector_id=f"{run.lab.name}-{host}"),
                              settings=ExportSettings(url=url, token=INGEST, spool_dir=spool / host,
                                                      batch_age=0.2))
        sink.write(records)
        sink.close()


def check_names_without_a_map(run: Run, tmp) -> None:
    """No workload map (the same records, replayed to a second aggregator): each end named by
    what its observers know (its process from its own socket probe, else its address, IPv6
    ones included); one edge per calling pair of the truth, none left `external:` beside it.

    The default view, every protocol (as the IPv4 test): IPv6 neighbour discovery answers a
    multicast solicitation with a unicast advertisement between the two pods' own (unique
    local) addresses; the wire decoders count ND and MLD as `link_control` instead of making
    an icmpv6 flow of them, so no edge server -> client appears beside the truth's."""
    with Aggregator(tmp / "data-nomap", None) as agg:
        replay(run, agg.url, tmp / "spool-nomap")
        w = window_of(run.truth)
        del w["protocol"]
        g = agg.get("/api/v1/graph", **w)
    assert served_edges(g) == truth_edges_by_observers(run.lab, run.truth)
