"""UDP flows of the socket probes without the kernel: record building (orientation by the first
datagram or by the shared port rule, directions, datagrams, refused, the local address of a
wildcard socket), flow lifetimes (idle timeout, closed sockets, counters taken at the end), the
live-socket lookup on a fake /proc, and UDP losses counted apart from TCP. No root, no bcc."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest

from collector.orientation import client_by_ports
from collector.pipeline import CollectorContext
from collector.probes.records import RecordBuilder
from collector.probes.source import ProbeLoop
from collector.probes.udpflow import FIRST_RECV, FIRST_SENT, UdpState
from collector.probes.udprecords import LocalAddresses, UdpRecordBuilder, local_is_client
from collector.probes.udptrack import SocketLiveness, UdpTracker
from collector.proc import ProcessCache
from eastwest.clock import FakeClock
from tests.unit.test_probes_loop import T0, FakeKernel, FakeKernelClock, conn

S = 1_000_000_000
IDLE = 30 * S
NS = 4026531999


def flow(sk: int = 1, **kw) -> UdpState:
    base = dict(key=sk.to_bytes(8, "little") + bytes(32), sk=sk, ino=100 + sk, family=2,
                raddr=bytes([10, 0, 0, 2]) + bytes(12), rport=53, start_ns=40 * S,
                last_ns=41 * S, bytes_sent=120, bytes_recv=480, dgrams_sent=3, dgrams_recv=2,
                cgroup_id=0, pid=42, netns=NS, lport=40000 + sk, lfamily=2,
                laddr=bytes([10, 0, 0, 1]) + bytes(12), first=FIRST_SENT, refused=False,
                connected=False, comm="dig")
    base.update(kw)
    return UdpState(**base)


def builder(resolve=None, attach_ns: int = 0) -> tuple[CollectorContext, UdpRecordBuilder]:
    ctx = CollectorContext(collector_id="t", clock=FakeClock(T0))
    base = RecordBuilder(ctx, FakeKernelClock(), ProcessCache(cgroup_root=None))
    b = UdpRecordBuilder(base, IDLE, LocalAddresses(resolve or (lambda ns, pid, peer: None)))
    b.attached_at(attach_ns)
    return ctx, b


def one(b: UdpRecordBuilder, s: UdpState, final: bool = True):
    (r,) = b.build_many([s], final=final, now=T0 + timedelta(seconds=100))
    return r


# -- orientation ------------------------------------------------------------------------------
@pytest.mark.parametrize("pa, pb, expected", [
    (40000, 53, True), (53, 40000, False),          # a well-known port is the server's
    (40000, 5353, True), (5353, 40000, False),      # outside the ephemeral range: the server
    (61000, 5000, True), (9000, 8000, True),        # both outside, both inside: the lower port
    (7000, 7000, None),                             # equal: the caller's first packet decides
])
def test_the_port_rule_is_the_wire_views(pa, pb, expected):
    assert client_by_ports(pa, pb) is expected


def test_a_flow_seen_from_its_start_is_oriented_by_its_first_datagram():
    # the sender of the first datagram is on port 5353, the port rule would say server
    s = flow(lport=5353, rport=40001, first=FIRST_SENT)
    assert local_is_client(s, known=True) is True
    assert local_is_client(s, known=False) is False
    assert local_is_client(flow(lport=7000, rport=7000, first=FIRST_RECV), known=False) is False


def test_flows_first_seen_within_one_idle_timeout_of_attaching_use_the_port_rule():
    _, b = builder(attach_ns=20 * S)  # known from 50 s on
    early = flow(start_ns=49 * S, lport=5353, rport=40001)
    late = flow(start_ns=50 * S, lport=5353, rport=40001)
    assert one(b, early).observer == "server" and one(b, early).client.port == 40001
    assert one(b, late).observer == "client" and one(b, late).client.port == 5353


# -- records ----------------------------------------------------------------------------------
def test_the_sender_of_the_first_datagram_is_the_client_with_its_counts_c2s():
    _, b = builder()
    r = one(b, flow())
    assert (r.protocol, r.source, r.observer, r.family) == ("udp", "socket", "client", 4)
    assert r.key == ("udp", "10.0.0.1", 40001, "10.0.0.2", 53)
    assert (r.bytes_c2s, r.packets_c2s, r.bytes_s2c, r.packets_s2c) == (120, 3, 480, 2)
    assert r.connect is None and r.process is not None and r.process.comm == "dig"
    assert r.netns == NS and r.incomplete == [] and not r.loopback
    assert r.end == T0 + timedelta(seconds=41)  # a final record ends at the last datagram


def test_the_receiver_of_the_first_datagram_is_the_server_with_directions_swapped():
    _, b = builder()
    r = one(b, flow(first=FIRST_RECV, lport=53, rport=40001))
    assert r.observer == "server" and r.key == ("udp", "10.0.0.2", 40001, "10.0.0.1", 53)
    assert (r.bytes_c2s, r.packets_c2s, r.bytes_s2c, r.packets_s2c) == (480, 2, 120, 3)


def test_an_interim_record_ends_now_and_a_refused_flow_says_so():
    _, b = builder()
    r = one(b, flow(refused=True, bytes_recv=0, dgrams_recv=0), final=False)
    assert not r.final and r.end == T0 + timedelta(seconds=100) and r.connect == "refused"


def test_a_wildcard_socket_takes_the_address_routing_picks_for_the_peer():
    calls = []

    def resolve(ns, pid, peer):
        calls.append((ns, pid, peer))
        return "10.0.0.9"

    _, b = builder(resolve)
    recs = b.build_many([flow(1, laddr=bytes(16)), flow(2, laddr=bytes(16))], final=True, now=T0)
    assert [r.client.ip for r in recs] == ["10.0.0.9", "10.0.0.9"]
    assert calls == [(NS, 42, "10.0.0.2")]  # cached per (netns, peer)


def test_an_unknown_local_address_is_marked_not_invented():
    _, b = builder()
    r = one(b, flow(laddr=bytes(16)))
    assert r.client.ip == "0.0.0.0" and r.incomplete == ["local_address"]


def test_an_ipv6_socket_talking_to_an_ipv4_mapped_peer_is_reported_as_ipv4():
    mapped = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
    _, b = builder(lambda ns, pid, peer: "10.0.0.1")
    r = one(b, flow(family=10, lfamily=10, raddr=mapped, laddr=bytes(16)))
    assert r.family == 4 and r.key == ("udp", "10.0.0.1", 40001, "10.0.0.2", 53)


def test_ipv6_and_loopback():
    _, b = builder()
    lo6 = bytes(15) + b"\x01"
    r = one(b, flow(family=10, lfamily=10, raddr=lo6, laddr=lo6))
    assert r.family == 6 and r.client.ip == "::1" and r.loopback


def test_a_flow_without_ports_is_dropped_with_a_reason():
    ctx, b = builder()
    assert b.build_many([flow(rport=0)], final=True, now=T0) == []
    assert ctx.drops.snapshot() == {("socket", "no_tuple"): 1}


# -- lifetimes --------------------------------------------------------------------------------
class FakeUdpKernel:
    def __init__(self, flows: list[UdpState]) -> None:
        self.flows = {s.key: s for s in flows}
        self.changed: dict[bytes, UdpState] = {}  # what a datagram does between read and end
        self.ended: list[int] = []

    def udp_flows(self) -> list[UdpState]:
        return list(self.flows.values())

    def udp_end(self, states: list[UdpState]) -> list[UdpState]:
        out = []
        for s in states:
            if self.flows.pop(s.key, None) is not None:
                out.append(self.changed.get(s.key, s))
                self.ended.append(s.sk)
        return out


class FakeLiveness(SocketLiveness):
    def __init__(self, closed: set[int]) -> None:
        super().__init__()
        self.closed = closed

    def refresh(self, states) -> None:
        pass

    def alive(self, s: UdpState) -> bool:
        return s.ino not in self.closed


def tracker(flows, now_ns, closed=()):
    _, b = builder()
    kernel = FakeUdpKernel(flows)
    t = UdpTracker(b, 30.0, mono_ns=lambda: now_ns, liveness=FakeLiveness(set(closed)))
    t.attach(kernel, 0)
    return t, kernel


def test_an_idle_flow_ends_and_a_busy_one_gets_an_interim_record():
    t, kernel = tracker([flow(1, last_ns=10 * S), flow(2, last_ns=41 * S)], now_ns=41 * S)
    recs = t.drain(T0)
    assert sorted((r.client.port, r.final) for r in recs) == [(40001, True), (40002, False)]
    assert kernel.ended == [1] and t.tracked == 2


def test_a_flow_ends_when_its_socket_is_closed_before_the_idle_timeout():
    t, kernel = tracker([flow(1), flow(2)], now_ns=42 * S, closed={102})
    recs = t.drain(T0)
    assert [(r.client.port, r.final) for r in recs] == [(40001, False), (40002, True)]
    assert kernel.ended == [2]


def test_the_final_record_has_the_counters_of_the_moment_the_flow_was_taken_out():
    t, kernel = tracker([flow(1, last_ns=0)], now_ns=41 * S)
    kernel.changed[flow(1).key] = flow(1, last_ns=0, dgrams_sent=4, bytes_sent=130)
    (r,) = t.drain(T0)
    assert r.final and (r.packets_c2s, r.bytes_c2s) == (4, 130)


def test_live_sockets_are_read_from_a_process_in_the_namespace(tmp_path):
    proc = tmp_path
    (proc / "7" / "ns").mkdir(parents=True)
    (proc / "7" / "net").mkdir()
    (proc / "7" / "ns" / "net").write_text("")
    netns = os.stat(proc / "7" / "ns" / "net").st_ino
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"
    (proc / "7" / "net" / "udp").write_text(
        head + "  1: 0100000A:9C41 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 101 2 0 0\n")
    (proc / "7" / "net" / "udp6").write_text(head)
    live = SocketLiveness(proc)
    states = [flow(1, pid=7, netns=netns), flow(2, pid=7, netns=netns),
              flow(3, pid=8, netns=NS)]  # pid 8 does not exist: its sockets are gone
    live.refresh(states)
    assert [live.alive(s) for s in states] == [True, False, False]
    assert live.alive(flow(4, ino=0))  # no inode to look for: alive until idle


def test_udp_losses_are_counted_and_mark_udp_records_only():
    clock = FakeClock(T0)
    ctx = CollectorContext(collector_id="t", clock=clock)
    kernel = FakeKernel(clock, [[]] * 5)
    kernel.map[1] = conn(1)
    kernel.counters["udp_no_peer"] = 2
    base = RecordBuilder(ctx, FakeKernelClock(), ProcessCache(cgroup_root=None))
    udp = UdpTracker(UdpRecordBuilder(base, IDLE, LocalAddresses(lambda *a: None)), 30.0,
                     mono_ns=lambda: 42 * S, liveness=FakeLiveness(set()))
    udp.attach(FakeUdpKernel([flow(1)]), 0)
    loop = ProbeLoop(ctx, lambda: kernel, base, interval=1.0, udp=udp)
    stop = threading.Event()
    kernel.stop = stop
    batches: list = []
    loop.run(batches.append, stop)
    recs = [r for b in batches for r in b]
    assert ctx.drops.snapshot() == {("socket", "udp_no_peer"): 2}
    assert {r.protocol for r in recs} == {"tcp", "udp"}
    first_udp = next(r for r in recs if r.protocol == "udp")
    first_tcp = next(r for r in recs if r.protocol == "tcp")
    assert "lost_events" in first_udp.incomplete and first_tcp.incomplete == []
    gauges = loop.gauges(4096, 2048)
    assert gauges[("eastwest_probe_map_capacity", (("map", "udp_flows"),))] == 2048
    assert gauges[("eastwest_probe_map_entries", (("map", "udp_flows"),))] == 1


def test_no_udp_turns_the_udp_hooks_off_and_a_bad_idle_timeout_is_named():
    import argparse

    from collector.probes import probe_config
    from eastwest.errors import ConfigError

    args = argparse.Namespace(map_entries=4096, interval=1.0, netns=[], idle_timeout=30.0,
                              no_udp=False)
    assert probe_config(args).udp() and probe_config(args).udp_entries == 4096
    args.no_udp = True
    assert not probe_config(args).udp() and "bytes" in probe_config(args).hooks
    args.idle_timeout = 0.0
    with pytest.raises(ConfigError, match="--idle-timeout=0.0: must be > 0"):
        probe_config(args)
