"""Lab: live `--wire-interface` capture (issue 18) while the demo application runs.

Two interfaces of one lab host at once, as `eastwest collector --wire-interface NS/IF` takes
them: the host-side veth of one pod (plain, untunnelled traffic: what a routed CNI or a MACVLAN
pod puts on the wire) and the host's underlay (VXLAN). Against the lab's truth:
- every TCP and UDP connection of that pod, as client or server, same-host or cross-host, is a
  plain flow (`tunnel` null, source `wire`) with the payload bytes the applications wrote and
  read (more only in a direction whose sender's namespace retransmitted TCP segments in the
  run: the wire carries a segment sent twice twice);
- every cross-host connection of that host is a tunnelled flow on the underlay with the lab's
  VNI and the VTEP pair, with the same bytes;
- nothing is dropped by the kernel; link-local and multicast housekeeping (IPv6 ND) is not
  checked here."""

from __future__ import annotations

import argparse
import collections
import threading

import pytest

from collector.pipeline import CollectorContext
from collector.vxlan import LiveVxlanSource
from tests.lab.harness import retransmitted, same_or_retransmitted


def key(proto: str, cip: str, cport: int, sip: str, sport: int) -> tuple:
    return (proto, cip, cport, sip, sport)


@pytest.mark.lab
def test_wire_interfaces_give_plain_flows_of_a_pod_and_tunnelled_flows_of_its_host(lab_factory,
                                                                                  tmp_path):
    lab = lab_factory(name="eww", hosts=2, pods_per_host=3)
    inv = lab.inventory
    hosts = {h["name"]: h for h in inv["hosts"]}
    host = inv["hosts"][0]
    # frontend on the loadgen's host: called by the loadgen (same host), calls api and resolver
    # on the other host (TCP and UDP across the overlay)
    pod = next(p for p in inv["pods"] if p["host"] == host["name"] and p["service"] == "frontend")
    veth = f"{host['netns']}/{pod['host_if']}"
    underlay = f"{host['netns']}/{host['underlay_if']}"
    args = argparse.Namespace(wire_interface=[veth, underlay], vxlan_port=[inv["vxlan_port"]],
                              geneve_port=None, gpe_port=None, decoder="bulk", interval=5.0,
                              idle_timeout=30.0)
    ctx = CollectorContext(collector_id="wiretest")
    source = LiveVxlanSource(ctx, args, wire=True)  # sockets open (and filter) before traffic
    records: list = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            source.run(records.extend, stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    netns = {p["ip"]: p["netns"] for p in inv["pods"]}
    before = {ns: retransmitted(ns) for ns in netns.values()}
    try:
        truth = lab.traffic(duration=6.0, truth_path=tmp_path / "truth.jsonl", seed=3, rate=30)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    resent = {ip: retransmitted(ns) - before[ns] for ip, ns in netns.items()}

    def senders(k: tuple) -> tuple[int, int]:
        """Segments the client's and the server's namespace retransmitted (TCP only)."""
        return (resent.get(k[1], 0), resent.get(k[3], 0)) if k[0] == "tcp" else (0, 0)

    truth = [t for t in truth if t["protocol"] in ("tcp", "udp")]
    want: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    meta: dict[tuple, dict] = {}
    for t in truth:
        k = key(t["protocol"], t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])
        want[k][0] += t["bytes_c2s"]
        want[k][1] += t["bytes_s2c"]
        meta[k] = t

    plain: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    tunnelled: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    tunnels: dict[tuple, set] = collections.defaultdict(set)
    for r in records:
        assert r.source == "wire" and r.observer == "path"
        if not r.final or r.protocol not in ("tcp", "udp"):
            continue
        k = key(r.protocol, r.client.ip, r.client.port, r.server.ip, r.server.port)
        into = plain if r.tunnel is None else tunnelled
        into[k][0] += r.bytes_c2s
        into[k][1] += r.bytes_s2c
        if r.tunnel is not None:
            tunnels[k].add((r.tunnel.type, r.tunnel.vni, r.tunnel.outer_src, r.tunnel.outer_dst))

    of_pod = [k for k, t in meta.items() if pod["name"] in (t["client_pod"], t["server_pod"])]
    kinds = {(meta[k]["client_host"] == meta[k]["server_host"], meta[k]["protocol"])
             for k in of_pod}
    assert len(of_pod) >= 5 and {(False, "tcp"), (True, "tcp")} <= kinds, kinds
    for k in of_pod:
        assert k in plain, f"{veth}: connection {k} ({meta[k]['outcome']}) not captured"
        assert same_or_retransmitted(plain[k], want[k], senders(k)), (
            f"{veth}: bytes of {k}: {plain[k]} != truth {want[k]} (segments retransmitted in "
            f"the run by the client's and the server's namespace: {senders(k)})")
    assert set(plain) <= set(want), "a plain flow the truth does not have"

    cross = [k for k, t in meta.items() if t["client_host"] != t["server_host"]
             and host["name"] in (t["client_host"], t["server_host"])]
    assert len(cross) >= 5
    for k in cross:
        t = meta[k]
        assert k in tunnelled, f"{underlay}: connection {k} ({t['outcome']}) not captured"
        assert same_or_retransmitted(tunnelled[k], want[k], senders(k)), (
            f"{underlay}: bytes of {k}: {tunnelled[k]} != truth {want[k]} (retransmitted: "
            f"{senders(k)})")
        assert tunnels[k] == {("vxlan", inv["vni"], hosts[t["client_host"]]["underlay_ip"],
                               hosts[t["server_host"]]["underlay_ip"])}
    assert set(tunnelled) <= set(want), "a tunnelled flow the truth does not have"
    assert ctx.drops.snapshot().get(("vxlan", "kernel_drop"), 0) == 0
