"""The eBPF socket probes against the real kernel, in namespaces of our own: every connection of
a known workload exactly once per side, with the exact 5-tuple, role, process and payload bytes
the applications wrote; refused connects, resets and retransmits counted; live connections
reported while they live; nothing outside the `--netns` scope."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.lab.test_socket_probes_support import (
    CLIENT_IP,
    CLIENT_NS,
    SCRIPTS,
    SERVER_IP,
    SERVER_NS,
    Collected,
    Server,
    finals_count,
    namespace_pair,
    netns_inode,
    run_client,
    sh,
)

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
N = 23


@pytest.fixture
def pair():
    with namespace_pair() as names:
        yield names


def by_port(records, observer):
    out: dict[int, list] = {}
    for r in records:
        if r.final and r.observer == observer:
            out.setdefault(r.client.port, []).append(r)
    return out


def test_23_connections_give_exactly_23_client_and_23_server_records(pair):
    with Collected([CLIENT_NS, SERVER_NS]) as col, Server():
        truth = run_client("--count", str(N), "--client-ip", CLIENT_IP)
        assert len(truth) == N and all(t["outcome"] == "ok" for t in truth)
        assert col.wait_for(lambda recs: finals_count("client", N)(recs)
                            and finals_count("server", N)(recs), timeout=60)
    clients, servers = by_port(col.records, "client"), by_port(col.records, "server")
    assert len(col.finals("client")) == N and len(col.finals("server")) == N
    assert sorted(clients) == sorted(t["client_port"] for t in truth)
    assert sorted(servers) == sorted(clients)
    c_ns, s_ns = netns_inode(CLIENT_NS), netns_inode(SERVER_NS)
    for t in truth:
        (c,), (s,) = clients[t["client_port"]], servers[t["client_port"]]
        for r, comm, ns in ((c, "ewp-cli", c_ns), (s, "ewp-srv", s_ns)):
            assert r.key == ("tcp", CLIENT_IP, t["client_port"], SERVER_IP, 7777)
            assert (r.bytes_c2s, r.bytes_s2c) == (t["bytes_c2s"], t["bytes_s2c"])
            assert r.process is not None and r.process.comm == comm
            assert "test_socket_probes_workload.py" in (r.process.cmdline or "")
            assert r.netns == ns and r.connect == "ok" and r.resets == 0
            assert r.source == "socket" and r.protocol == "tcp" and r.family == 4
            assert not r.loopback and r.incomplete == []
            # tcp_probe fires only for segments of the established fast path: a short
            # connection may have no RTT sample on one side
            assert r.rtt_us is None or 0 < r.rtt_us.min <= r.rtt_us.max < 1_000_000
            assert r.end >= r.start
    assert col.ctx.drops.snapshot() == {}


def test_refused_connects_are_client_records_with_connect_refused(pair):
    with Collected([CLIENT_NS, SERVER_NS]) as col:
        truth = run_client("--count", "5", "--port", "7779", "--client-ip", CLIENT_IP)
        assert [t["outcome"] for t in truth] == ["refused"] * 5
        assert col.wait_for(finals_count("client", 5), timeout=60)
    finals = col.finals()
    assert sorted(r.client.port for r in finals) == sorted(t["client_port"] for t in truth)
    assert all(r.observer == "client" and r.connect == "refused" and r.resets == 1
               and r.server.port == 7779 and r.bytes_c2s == 0 and r.bytes_s2c == 0
               and r.process is not None and r.process.comm == "ewp-cli" for r in finals)


def test_resets_are_counted_on_both_sides(pair):
    with Collected([CLIENT_NS, SERVER_NS]) as col, Server():
        truth = run_client("--count", "7", "--reset", "1,4,5", "--client-ip", CLIENT_IP)
        assert [t["outcome"] for t in truth] == ["ok", "reset", "ok", "ok", "reset", "reset", "ok"]
        assert col.wait_for(lambda recs: finals_count("client", 7)(recs)
                            and finals_count("server", 7)(recs), timeout=60)
    for observer in ("client", "server"):
        recs = by_port(col.records, observer)
        for t in truth:
            (r,) = recs[t["client_port"]]
            assert r.connect == t["outcome"], (observer, t)
            assert r.resets == (1 if t["outcome"] == "reset" else 0), (observer, t)
            assert (r.bytes_c2s, r.bytes_s2c) == (t["bytes_c2s"], t["bytes_s2c"])


@pytest.mark.parametrize("drop", [False, True], ids=["no-drops", "every-5th-dropped"])
def test_retransmits_are_counted_when_packets_are_dropped(pair, drop):
    if drop:  # a deterministic share (nth mode), lost on the wire: at the receiver's INPUT (a
        # drop in the sender's OUTPUT is a local send error, queued again, not retransmitted)
        sh("ip", "netns", "exec", CLIENT_NS, "iptables", "-A", "INPUT", "-p", "tcp", "--sport",
           "7777", "-m", "statistic", "--mode", "nth", "--every", "5", "--packet", "4", "-j", "DROP")
    with Collected([CLIENT_NS, SERVER_NS]) as col, Server():
        truth = run_client("--count", "3", "--size-base", "100000", "--client-ip", CLIENT_IP)
        assert col.wait_for(lambda recs: finals_count("client", 3)(recs)
                            and finals_count("server", 3)(recs), timeout=120)
    servers = by_port(col.records, "server")
    for t in truth:  # TCP repaired every loss: the bytes stay exact
        (s,) = servers[t["client_port"]]
        assert (s.bytes_c2s, s.bytes_s2c) == (t["bytes_c2s"], t["bytes_s2c"])
    total = sum(r.retransmits for r in col.finals("server"))
    assert (total > 0) if drop else (total == 0)


def test_a_live_connection_has_interim_records_before_its_final(pair):
    with Collected([CLIENT_NS, SERVER_NS], interval=0.5) as col, Server():
        proc = subprocess.Popen(["ip", "netns", "exec", CLIENT_NS, sys.executable, str(SCRIPTS),
                                 "connect", "--ip", SERVER_IP, "--hold", "--client-ip", CLIENT_IP],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            held = json.loads(proc.stdout.readline())
            port = held["client_port"]

            def interim_with_held_bytes(recs):
                return any(not r.final and r.observer == "client" and r.client.port == port
                           and r.bytes_c2s == held["held_bytes_c2s"] for r in recs)

            assert col.wait_for(interim_with_held_bytes, timeout=30)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            truth = json.loads(proc.stdout.readline())
            assert col.wait_for(lambda recs: finals_count("client", 1)(recs)
                                and finals_count("server", 1)(recs), timeout=30)
        finally:
            proc.kill()
            proc.wait()
    for observer in ("client", "server"):
        interim = [r for r in col.records
                   if not r.final and r.client.port == port and r.observer == observer]
        assert interim and all(r.connect == "ok" for r in interim)
        (final,) = [r for r in col.finals(observer) if r.client.port == port]
        assert (final.bytes_c2s, final.bytes_s2c) == (truth["bytes_c2s"], truth["bytes_s2c"])
        assert all(r.start == final.start and r.end <= final.end for r in interim)
        assert all(r.bytes_c2s <= final.bytes_c2s and r.bytes_s2c <= final.bytes_s2c
                   for r in interim)


def test_connections_outside_the_netns_scope_are_not_reported(pair):
    import socket

    with Collected([CLIENT_NS]) as col, Server():
        # in scope: the client side only; out of scope: the server side and this loopback pair
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        c.close(), a.close(), srv.close()
        truth = run_client("--count", "3", "--client-ip", CLIENT_IP)
        assert col.wait_for(finals_count("client", 3), timeout=60)
    assert sorted(r.client.port for r in col.finals()) == sorted(t["client_port"] for t in truth)
    assert {r.observer for r in col.finals()} == {"client"}
    assert {r.netns for r in col.records} == {netns_inode(CLIENT_NS)}


def lab_netns(inventory) -> list[str]:
    names = [inventory["fabric_netns"]]
    for host in inventory["hosts"]:
        names += [host["netns"], *host["pod_netns"]]
    return names


def test_every_tcp_connection_of_the_lab_truth_once_per_side_exact(lab_factory, tmp_path):
    lab = lab_factory(name="ewp", hosts=3, pods_per_host=2)
    with Collected(lab_netns(lab.inventory)) as col:
        truth = [t for t in lab.traffic(duration=3.0, truth_path=tmp_path / "t.jsonl", seed=1)
                 if t["protocol"] == "tcp"]
        assert truth, "the lab made no TCP connections"
        n_client = len(truth)
        n_server = sum(1 for t in truth if t["outcome"] != "refused")
        assert col.wait_for(lambda recs: finals_count("client", n_client)(recs)
                            and finals_count("server", n_server)(recs), timeout=120)
    for observer in ("client", "server"):
        finals = [r for r in col.finals(observer) if r.protocol == "tcp"]  # UDP: its own test
        keys = [r.key for r in finals]
        assert len(keys) == len(set(keys)), f"a {observer} connection reported twice"
        by_key = {r.key: r for r in finals}
        expected = [t for t in truth if observer == "client" or t["outcome"] != "refused"]
        assert len(finals) == len(expected)
        for t in expected:
            key = ("tcp", t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])
            r = by_key[key]
            assert r.connect == t["outcome"], (observer, t)
            assert (r.bytes_c2s, r.bytes_s2c) == (t["bytes_c2s"], t["bytes_s2c"]), (observer, t)
            comm = t["client_comm"] if observer == "client" else t["server_comm"]
            assert r.process is not None and r.process.comm == comm, (observer, t)
            ns = t["client_netns"] if observer == "client" else t["server_netns"]
            assert r.netns == netns_inode(ns)
            # each pod runs in a containerd / CRI-O / Docker style group (eastwest/lab/containers)
            side = "client" if observer == "client" else "server"
            assert t[f"{side}_container"] is not None, "the lab gave its pods no container"
            assert r.container == t[f"{side}_container"], (observer, t)
            assert r.cgroup is not None and r.cgroup.path == t[f"{side}_cgroup"], (observer, t)
            assert (r.resets > 0) == (t["outcome"] in ("reset", "refused"))


@pytest.mark.parametrize("reader", ["mmap", "libbpf"])
def test_closes_beyond_a_full_ring_buffer_are_parked_in_the_kernel_not_lost(pair, reader,
                                                                            monkeypatch):
    """A 4 KiB ring holds 25 close events; 23 connections close 46 sockets while nobody reads:
    21 finals wait in the `overflow` map, and every one arrives, exact, at the next poll; with
    the ring read from its mapping and with libbpf's per-event callbacks (other CPUs)."""
    import time

    from collector.capabilities import probe
    from collector.pipeline import CollectorContext
    from collector.probes import kernel as kernel_mod
    from collector.probes.kernel import BccKernel, ProbeConfig

    if reader == "libbpf":
        monkeypatch.setattr(kernel_mod, "ring_supported", lambda: False)
    from collector.probes.records import RecordBuilder
    from collector.proc import ProcessCache
    from eastwest.clock import KernelClock

    caps = probe()
    scope = (netns_inode(CLIENT_NS), netns_inode(SERVER_NS))
    procs = ProcessCache()
    kernel = BccKernel(caps.offsets, ProbeConfig(ringbuf_pages=1, netns=scope,  # type: ignore[arg-type]
                                                 hooks=caps.features()),
                       on_process=procs.process)
    try:
        with Server():
            truth = run_client("--count", str(N), "--client-ip", CLIENT_IP)
        deadline = time.monotonic() + 30  # the last server sockets close just after the client
        while kernel.stats()["closed"] + kernel.stats()["close_overflowed"] < 2 * N:
            assert time.monotonic() < deadline, kernel.stats()
            time.sleep(0.05)
        stats = kernel.stats()
        states = kernel.poll(0)
        uses_mapping = kernel._reader is not None
    finally:
        kernel.close()
    assert uses_mapping == (reader == "mmap")
    assert (stats["closed"], stats["close_overflowed"]) == (25, 2 * N - 25)
    assert stats["close_deferred"] == stats["deferred_lost"] == stats["conn_map_full"] == 0
    recs = RecordBuilder(CollectorContext(collector_id="t"), KernelClock(), procs).build_many(
        states, final=True, now=KernelClock().to_utc(time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
    for observer in ("client", "server"):
        got = {r.client.port: r for r in recs if r.observer == observer}
        assert len(got) == N == len([r for r in recs if r.observer == observer])
        for t in truth:
            r = got[t["client_port"]]
            assert (r.bytes_c2s, r.bytes_s2c) == (t["bytes_c2s"], t["bytes_s2c"])
            assert r.connect == "ok" and r.process is not None


def test_ctrl_c_during_the_probe_load_is_a_clean_stop() -> None:
    """Ctrl-C at the terminal (SIGINT to the whole foreground process group) while the BPF
    program is being compiled: the collector stops cleanly (exit 0). The compiler runs in a child
    process (collector/bpfload.py) of its own session, so the signal does not kill it half-way
    (it did: `the socket probes did not load: KeyboardInterrupt`, exit 1)."""
    import os
    import signal
    import time

    require_root()
    exe = Path(sys.executable).with_name("eastwest")
    p = subprocess.Popen([str(exe), "collector", "--stdout", "--no-vxlan", "--duration", "30"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    time.sleep(1.0)  # inside the load (the compile takes seconds)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()[-2000:]
