"""UDP flows from the eBPF socket probes against the real kernel, in namespaces of our own
(`ewu-c`, `ewu-s`, 10.78.0.0/24 and fd78::/64): every exchange of a known workload
(tests/lab/udp_workload.py) found from both ends, for each of sendto/recvfrom, sendmsg/recvmsg
and sendmmsg/recvmmsg, connected and unconnected sockets, IPv4 and IPv6, with the exact
datagrams and payload bytes per direction the applications sent and received, the process, the
namespace; `refused` for a dead port, from a connected socket (ECONNREFUSED) and from an
unconnected one (the drop source's `NO_SOCKET` on the server's side, joined by the correlators);
the client told by the first datagram.

One collector (socket probes and drop source), one pair of namespaces and one workload run
serve the whole module."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.lab.test_socket_probes_support import Collected, netns_inode, sh

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
CLIENT_NS, SERVER_NS = "ewu-c", "ewu-s"
C4, S4, C6, S6 = "10.78.0.1", "10.78.0.2", "fd78::1", "fd78::2"
WORKLOAD = Path(__file__).with_name("udp_workload.py")
IDLE = 2.0
MODES = ("sendto", "sendmsg", "sendmmsg")
DEAD = ("dead", "dead-unconnected")  # to port 9109, where nobody listens


def build_namespaces() -> None:
    for ns in (CLIENT_NS, SERVER_NS):
        sh("ip", "netns", "del", ns, check=False)
    steps = [("ip", "netns", "add", CLIENT_NS), ("ip", "netns", "add", SERVER_NS),
             ("ip", "link", "add", "ewu-c0", "netns", CLIENT_NS, "type", "veth", "peer", "name",
              "ewu-s0", "netns", SERVER_NS)]
    for ns, dev, a4, a6 in ((CLIENT_NS, "ewu-c0", C4, C6), (SERVER_NS, "ewu-s0", S4, S6)):
        steps += [("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev),
                  ("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad"),
                  ("ip", "-n", ns, "link", "set", "lo", "up"),
                  ("ip", "-n", ns, "link", "set", dev, "up")]
    for step in steps:
        r = sh(*step, check=False)
        if r.returncode != 0:
            pytest.fail(f"cannot build the test namespaces: {' '.join(step)}: {r.stderr}")


@pytest.fixture(scope="module")
def run():
    """The collector (idle timeout 2 s), the workload's truth, and every record collected."""
    require_root()
    build_namespaces()
    server = None
    try:
        with Collected([CLIENT_NS, SERVER_NS], interval=1.0, idle_timeout=IDLE,
                       drops=True) as col:
            # from one idle timeout after attaching, the probes see every flow's first datagram
            time.sleep(IDLE + 0.5)
            server = subprocess.Popen(
                ["ip", "netns", "exec", SERVER_NS, sys.executable, str(WORKLOAD), "serve",
                 "--ip4", S4, "--ip6", S6], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            line = server.stdout.readline() if server.stdout else ""
            if line.strip() != "ready":
                pytest.fail(f"the UDP server did not start: {line!r} {server.stderr.read()}")
            r = subprocess.run(["ip", "netns", "exec", CLIENT_NS, sys.executable, str(WORKLOAD),
                                "client", "--ip4", S4, "--ip6", S6],
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                pytest.fail(f"the UDP client failed: {r.stderr}")
            truth = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
            ports = {t["client_port"] for t in truth}
            dead = [t for t in truth if t["mode"] in DEAD]
            want = 2 * (len(truth) - len(dead)) + len(dead)  # the dead ports: their clients only

            def done(recs):
                socks = sum(1 for x in recs if x.final and x.protocol == "udp"
                            and x.source == "socket" and x.client.port in ports)
                dropped = {x.client.port for x in recs if x.final and x.source == "drops"}
                return socks >= want and all(t["client_port"] in dropped for t in dead)

            # client sockets closed: final within an interval; the server's: the idle timeout
            col.wait_for(done, timeout=30)
            time.sleep(1.5)  # anything more (duplicates) would arrive within an interval
        yield col, truth
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (CLIENT_NS, SERVER_NS):
            sh("ip", "netns", "del", ns, check=False)


def finals(col, observer, port):
    return [r for r in col.records if r.final and r.protocol == "udp" and r.observer == observer
            and r.client.port == port and r.source == "socket"]


def test_the_workload_did_what_the_assertions_rely_on(run):
    _, truth = run
    exchanges = [t for t in truth if t["mode"] in MODES]
    assert len(exchanges) == 2 * 3 * 2  # families x call pairs x connected or not
    assert {(t["family"], t["mode"], t["connected"]) for t in exchanges} == {
        (f, m, c) for f in (4, 6) for m in MODES for c in (False, True)}
    assert all(t["dgrams_sent"] == t["dgrams_recv"] == 5 and t["bytes_sent"] == 1970
               and t["bytes_recv"] == 1970 + 35 for t in exchanges)
    assert [t["outcome"] for t in truth if t["mode"] == "dead"] == ["refused", "refused"]
    assert [(t["family"], t["outcome"]) for t in truth if t["mode"] == "dead-unconnected"] == [
        (4, "refused"), (6, "refused")]  # no answer, and no error either: nothing to see


@pytest.mark.parametrize("mode", MODES, ids=["sendto+recvfrom", "sendmsg+recvmsg",
                                             "sendmmsg+recvmmsg"])
def test_every_exchange_is_one_client_and_one_server_record_with_exact_counts(run, mode):
    col, truth = run
    c_ns, s_ns = netns_inode(CLIENT_NS), netns_inode(SERVER_NS)
    cases = [t for t in truth if t["mode"] == mode]
    assert len(cases) == 4
    for t in cases:
        cip, sip = (C4, S4) if t["family"] == 4 else (C6, S6)
        for observer, comm, ns in (("client", "ewu-cli", c_ns), ("server", "ewu-srv", s_ns)):
            recs = finals(col, observer, t["client_port"])
            assert len(recs) == 1, (observer, t, recs)
            (r,) = recs
            assert r.key == ("udp", cip, t["client_port"], sip, t["server_port"]), (observer, t)
            assert r.family == t["family"] and r.source == "socket"
            assert (r.packets_c2s, r.bytes_c2s) == (t["dgrams_sent"], t["bytes_sent"]), (observer, t)
            assert (r.packets_s2c, r.bytes_s2c) == (t["dgrams_recv"], t["bytes_recv"]), (observer, t)
            assert r.process is not None and r.process.comm == comm
            assert "udp_workload.py" in (r.process.cmdline or "")
            assert r.netns == ns and r.connect is None and not r.loopback
            assert r.incomplete == [], (observer, t, r.incomplete)
            assert r.start <= r.end


def test_a_datagram_to_a_dead_port_gives_a_refused_client_flow(run):
    col, truth = run
    dead = [t for t in truth if t["mode"] == "dead"]
    assert len(dead) == 2
    for t in dead:
        (r,) = finals(col, "client", t["client_port"])
        assert r.connect == "refused" and r.server.port == 9109
        assert (r.packets_c2s, r.bytes_c2s, r.packets_s2c, r.bytes_s2c) == (1, 33, 0, 0)
        assert finals(col, "server", t["client_port"]) == []  # nobody there to see it


def test_a_datagram_to_a_dead_port_from_an_unconnected_socket_is_refused_once_correlated(run):
    """The client's socket learns nothing (its record: connect null); the server's namespace
    dropped the datagram as NO_SOCKET; both correlators join the two into one connection whose
    outcome is refused, IPv4 and IPv6, whatever the order of the records."""
    from aggregator.correlate import Correlator
    from aggregator.identity import IdentityResolver
    from tests.unit.correlate_workloads import Pair, assert_same_state, conns_of

    col, truth = run
    s_ns = netns_inode(SERVER_NS)
    for t in [t for t in truth if t["mode"] == "dead-unconnected"]:
        (client,) = finals(col, "client", t["client_port"])
        assert client.connect is None and client.server.port == 9109
        assert (client.packets_c2s, client.bytes_c2s, client.packets_s2c) == (1, 33, 0)
        assert finals(col, "server", t["client_port"]) == []
        (drop,) = [r for r in col.records if r.source == "drops" and r.final
                   and r.client.port == t["client_port"]]
        assert drop.key == client.key and drop.netns == s_ns
        assert [(d.reason, d.packets) for d in drop.drops or []] == [("NO_SOCKET", 1)]
        for recs in ([client, drop], [drop, client]):
            ref = Correlator(IdentityResolver())
            ref.commit(ref.plan(recs))
            [conn] = conns_of(ref)
            assert (conn.connect, conn.outcome()) == ("refused", "refused"), recs
            assert conn.observed_by == ["client", "drops"]
            with Pair(0, 10.0) as pair:  # the column correlator (C core), one batch each
                for r in recs:
                    pair.batch([r])
                assert_same_state(pair.ref, pair.col)


def test_the_client_is_the_sender_of_the_first_datagram_not_the_port_rule(run):
    # 5353 -> 40001: the port rule would make 5353 (outside the ephemeral range) the server
    col, truth = run
    low = [t for t in truth if t["mode"] == "low-client"]
    assert len(low) == 2
    for t in low:
        for observer in ("client", "server"):
            (r,) = [x for x in finals(col, observer, 5353) if x.family == t["family"]]
            assert r.server.port == 40001, observer
            assert (r.packets_c2s, r.bytes_c2s, r.packets_s2c) == (5, 1970, 5)


def test_server_flows_end_at_the_idle_timeout_while_the_socket_lives_and_nothing_is_lost(run):
    col, truth = run
    server_finals = [r for r in col.records if r.final and r.protocol == "udp"
                     and r.observer == "server"]
    assert len(server_finals) == sum(1 for t in truth if t["mode"] not in DEAD)
    assert col.ctx.drops.snapshot() == {}


def test_every_udp_exchange_of_the_lab_truth_once_per_side_exact(lab_factory, tmp_path):
    """The lab's resolver traffic, pods on three hosts across the VXLAN overlay (UDP between
    hosts): each exchange one client and one server record, the truth's bytes, comm, netns."""
    from tests.lab.test_socket_probes import lab_netns

    lab = lab_factory(name="ewu", hosts=3, pods_per_host=2)
    with Collected(lab_netns(lab.inventory), interval=1.0, idle_timeout=IDLE) as col:
        # The lab's UDP servers wait in select() (eastwest/lab/app.py `_recv_when_ready`), but a
        # thread caught inside recvfrom() when the probes attach would name no sender for its
        # datagram (counted, udp_no_peer). A first round of traffic moves every thread into a
        # call the probes saw begin.
        lab.traffic(duration=1.0, truth_path=tmp_path / "warm.jsonl", seed=2)
        time.sleep(IDLE + 1.5)
        warm = col.ctx.drops.snapshot()
        assert set(warm) <= {("socket", "udp_no_peer")}, warm
        since = len(col.records)
        truth = [t for t in lab.traffic(duration=3.0, truth_path=tmp_path / "t.jsonl", seed=1)
                 if t["protocol"] == "udp"]
        assert len(truth) >= 10, "the lab made too few UDP exchanges to prove anything"
        ok = [t for t in truth if t["outcome"] == "ok"]
        want = len(truth) + len(ok)  # a refused exchange has no server record

        def done(recs):
            return sum(1 for r in recs[since:] if r.final and r.protocol == "udp") >= want

        col.wait_for(done, timeout=30)
        time.sleep(1.5)
    for observer in ("client", "server"):
        finals = [r for r in col.records[since:] if r.final and r.protocol == "udp"
                  and r.observer == observer]
        by_key = {r.key: r for r in finals}
        assert len(by_key) == len(finals), f"a {observer} flow reported twice"
        expected = truth if observer == "client" else ok
        assert len(finals) == len(expected)
        for t in expected:
            r = by_key[("udp", t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])]
            assert (r.bytes_c2s, r.bytes_s2c) == (t["bytes_c2s"], t["bytes_s2c"]), (observer, t)
            assert (r.packets_c2s, r.packets_s2c) == (t["dgrams_c2s"], t["dgrams_s2c"]), (observer, t)
            assert r.process is not None and r.process.comm == t[f"{observer}_comm"]
            assert r.netns == netns_inode(t[f"{observer}_netns"])
            assert r.connect == ("refused" if t["outcome"] == "refused" else None), (observer, t)
    assert col.ctx.drops.snapshot() == warm  # nothing missed once every call was seen begin
