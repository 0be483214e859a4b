"""Lab: live VXLAN capture on every lab host's underlay while the demo application runs.

Every cross-host TCP/UDP connection of the truth must appear, on the underlay capture of the
client's host and of the server's host, with the lab's VNI, the VTEP pair (client host ->
server host) and payload bytes equal to what the applications wrote and read."""

from __future__ import annotations

import argparse
import collections
import threading

import pytest

from collector.pipeline import CollectorContext
from collector.vxlan import LiveVxlanSource


def key(proto: str, cip: str, cport: int, sip: str, sport: int) -> tuple:
    return (proto, cip, cport, sip, sport)


@pytest.mark.lab
@pytest.mark.parametrize("port", [4789, 8472])
def test_every_cross_host_connection_with_vni_vteps_and_bytes(lab_factory, port: int, tmp_path):
    lab = lab_factory(name="ewv", hosts=3, pods_per_host=2, vxlan_port=port)
    inv = lab.inventory
    hosts = {h["name"]: h for h in inv["hosts"]}
    ctx = CollectorContext(collector_id="labtest")
    sources, records, threads = {}, {}, []
    stop = threading.Event()
    for name, h in hosts.items():
        args = argparse.Namespace(underlay=[f"{h['netns']}/{h['underlay_if']}"],
                                  vxlan_port=[port], decoder="bulk", interval=5.0,
                                  idle_timeout=30.0)
        sources[name] = LiveVxlanSource(ctx, args)  # sockets open (and filter) before traffic
        records[name] = []
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            sources[name].run(records[name].extend, stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    for name in hosts:
        threads.append(threading.Thread(target=run, args=(name,), daemon=True))
        threads[-1].start()
    try:
        truth = lab.traffic(duration=5.0, truth_path=tmp_path / "truth.jsonl", seed=1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    cross = [t for t in truth if t["client_host"] != t["server_host"]
             and t["protocol"] in ("tcp", "udp")]
    assert len(cross) >= 10, f"the demo made only {len(cross)} cross-host connections"
    outcomes = collections.Counter(t["outcome"] for t in cross)
    assert outcomes["refused"] and outcomes["ok"], outcomes  # resets are checked when present

    want: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
    for t in cross:
        k = key(t["protocol"], t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])
        want[k][0] += t["bytes_c2s"]
        want[k][1] += t["bytes_s2c"]
    meta = {key(t["protocol"], t["client_ip"], t["client_port"], t["server_ip"],
                t["server_port"]): t for t in cross}
    for host in hosts:
        got: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
        tunnels: dict[tuple, set] = collections.defaultdict(set)
        connects: dict[tuple, list] = collections.defaultdict(list)
        for r in records[host]:
            assert r.source == "vxlan" and r.observer == "path"
            if not r.final:
                continue
            k = key(r.protocol, r.client.ip, r.client.port, r.server.ip, r.server.port)
            got[k][0] += r.bytes_c2s
            got[k][1] += r.bytes_s2c
            connects[k].append(r.connect)
            tunnels[k].add((r.tunnel.vni, r.tunnel.outer_src, r.tunnel.outer_dst,
                            r.tunnel.outer_dport))
        seen_here = [k for k, t in meta.items() if host in (t["client_host"], t["server_host"])]
        assert seen_here
        for k in seen_here:
            t = meta[k]
            assert k in got, f"{host}: connection {k} ({t['outcome']}) not captured"
            assert got[k] == want[k], f"{host}: bytes of {k}: {got[k]} != truth {want[k]}"
            expect = (inv["vni"], hosts[t["client_host"]]["underlay_ip"],
                      hosts[t["server_host"]]["underlay_ip"], port)
            assert tunnels[k] == {expect}, f"{host}: tunnel of {k}"
            if t["protocol"] == "tcp" and len(connects[k]) == 1:
                assert connects[k] == [t["outcome"]], f"{host}: outcome of {k}"
    assert ctx.drops.snapshot().get(("vxlan", "kernel_drop"), 0) == 0
