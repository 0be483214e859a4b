"""Record building from kernel states: orientation, bytes per direction, connect outcomes,
dual-stack addresses, loopback, attribution and completeness, checked field by field."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest

from collector.pipeline import CollectorContext
from collector.probes.conn import OWNER_CONTEXT, OWNER_NONE, ROLE_CLIENT, ROLE_SERVER, ConnState
from collector.probes.records import RecordBuilder, address, connect_outcome
from collector.proc import ProcessCache

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class KClock:
    def to_utc(self, ns: int) -> datetime:
        return T0 + timedelta(microseconds=ns // 1000)


def state(**kw) -> ConnState:
    base = dict(sk=1, start_ns=1_000_000, role=ROLE_CLIENT, phase=2, family=2,
                saddr=bytes([10, 244, 1, 11]), daddr=bytes([10, 244, 2, 11]), sport=40001,
                dport=5432, netns=4026532000, end_ns=3_000_000, bytes_sent=111, bytes_recv=2222,
                pid=77, comm="ew-api", owner=OWNER_CONTEXT, tcp_closed=True, close_oldstate=1)
    base.update(kw)
    return ConnState(**base)


def build(s: ConnState, final: bool = True, missing=()):
    ctx = CollectorContext(collector_id="n1")
    b = RecordBuilder(ctx, KClock(), ProcessCache(proc=__import__("pathlib").Path("/nonexistent"),
                                                   cgroup_root=None), missing)
    return b.build(s, final=final, now=T0 + timedelta(seconds=9))


def test_client_record_is_oriented_from_its_own_socket():
    r = build(state())
    assert (r.observer, r.client.ip, r.client.port, r.server.ip, r.server.port) == (
        "client", "10.244.1.11", 40001, "10.244.2.11", 5432)
    assert (r.bytes_c2s, r.bytes_s2c, r.connect, r.final) == (111, 2222, "ok", True)
    assert (r.start, r.end) == (T0 + timedelta(milliseconds=1), T0 + timedelta(milliseconds=3))
    assert r.process.pid == 77 and r.process.comm == "ew-api" and r.netns == 4026532000


def test_server_record_swaps_ends_and_directions():
    r = build(state(role=ROLE_SERVER, saddr=bytes([10, 244, 2, 11]), daddr=bytes([10, 244, 1, 11]),
                    sport=5432, dport=40001, bytes_sent=2222, bytes_recv=111))
    assert (r.observer, r.client.ip, r.client.port, r.server.port) == ("server", "10.244.1.11", 40001, 5432)
    assert (r.bytes_c2s, r.bytes_s2c) == (111, 2222)


def test_interim_record_ends_now():
    r = build(state(tcp_closed=False, end_ns=0), final=False)
    assert r.final is False and r.end == T0 + timedelta(seconds=9) and r.connect == "ok"


@pytest.mark.parametrize("kw, final, expected", [
    (dict(phase=1, close_oldstate=2, sk_err=111, resets_recv=1), True, "refused"),
    (dict(phase=1, close_oldstate=2, sk_err=110), True, "timeout"),
    (dict(phase=1, close_oldstate=2, sk_err=0), True, None),
    (dict(resets_sent=1), True, "reset"),
    (dict(resets_recv=1), True, "reset"),
    (dict(resets_recv=1), False, "ok"),
    (dict(), True, "ok"),
])
def test_connect_outcome(kw, final, expected):
    assert connect_outcome(state(**kw), final) == expected


def test_ipv4_mapped_ipv6_is_reported_as_ipv4():
    mapped = ipaddress.IPv6Address("::ffff:10.1.2.3").packed
    assert address(10, mapped) == (4, "10.1.2.3")
    assert address(10, ipaddress.IPv6Address("fd00::1").packed) == (6, "fd00::1")
    r = build(state(family=10, saddr=mapped, daddr=ipaddress.IPv6Address("::ffff:10.1.2.4").packed))
    assert (r.family, r.client.ip, r.server.ip) == (4, "10.1.2.3", "10.1.2.4")


def test_loopback_is_marked():
    lo = bytes([127, 0, 0, 1])
    assert build(state(saddr=lo, daddr=lo)).loopback is True
    assert build(state()).loopback is False


def test_unknown_owner_and_missing_hooks_are_marked_incomplete():
    r = build(state(owner=OWNER_NONE, pid=0, comm=""), missing=("bytes",))
    assert r.process is None and r.incomplete == ["bytes", "process"]


def test_rtt_summary():
    r = build(state(rtt_count=4, rtt_sum_us=100, rtt_min_us=10, rtt_max_us=60))
    assert (r.rtt_us.min, r.rtt_us.avg, r.rtt_us.max) == (10, 25, 60)


def test_records_of_one_process_share_one_process_object_and_one_cmdline_read(tmp_path):
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "cmdline").write_bytes(b"python3\0-m\0api\0")
    cache = ProcessCache(proc=proc, cgroup_root=None)
    b = RecordBuilder(CollectorContext(collector_id="n1"), KClock(), cache)
    states = [state(sport=40001 + i) for i in range(3)]
    first = b.build_many(states[:1], final=True, now=T0 + timedelta(seconds=9))
    (proc / "77" / "cmdline").unlink()  # the process is gone: the cached line still names it
    rest = b.build_many(states[1:], final=True, now=T0 + timedelta(seconds=9))
    recs = first + rest
    assert [r.process.cmdline for r in recs] == ["python3 -m api"] * 3
    assert recs[0].process is recs[1].process is recs[2].process
    assert [r.record_id for r in recs] == ["n1:1", "n1:2", "n1:3"]


def test_an_announced_process_keeps_its_cmdline_after_it_exits(tmp_path):
    proc = tmp_path / "proc"
    (proc / "78").mkdir(parents=True)
    (proc / "78" / "cmdline").write_bytes(b"curl\0http://x\0")
    cache = ProcessCache(proc=proc, cgroup_root=None)
    cache.process(78, "curl")  # what the loader does on a `procs` ring event
    (proc / "78" / "cmdline").unlink()
    b = RecordBuilder(CollectorContext(collector_id="n1"), KClock(), cache)
    (r,) = b.build_many([state(pid=78, comm="curl")], final=True, now=T0)
    assert r.process.cmdline == "curl http://x"


def test_a_cgroup_path_is_cached_once_known_and_looked_up_again_while_unknown(tmp_path):
    root = tmp_path / "cg"
    (root / "kubepods" / ("f" * 64)).mkdir(parents=True)
    cache = ProcessCache(proc=tmp_path, cgroup_root=root, rescan_s=0.0)
    cid = (root / "kubepods" / ("f" * 64)).stat().st_ino
    b = RecordBuilder(CollectorContext(collector_id="n1"), KClock(), cache)
    unknown = cid + 12345
    r1, r2 = b.build_many([state(cgroup_id=cid), state(cgroup_id=unknown)], final=True, now=T0)
    assert (r1.cgroup.path, r1.container) == ("/kubepods/" + "f" * 64, "f" * 64)
    assert (r2.cgroup.id, r2.cgroup.path, r2.container) == (unknown, None, None)
    (root / "late").mkdir()  # a cgroup created after the first scan is found by the next one
    late = (root / "late").stat().st_ino
    (r3,) = b.build_many([state(cgroup_id=late)], final=True, now=T0)
    assert r3.cgroup.path == "/late"


def test_build_many_equals_build_one_by_one():
    states = [state(sport=40001 + i, role=ROLE_CLIENT if i % 2 else ROLE_SERVER,
                    resets_recv=int(i % 3 == 0)) for i in range(6)]
    many = RecordBuilder(CollectorContext(collector_id="n1"), KClock(),
                         ProcessCache(proc=__import__("pathlib").Path("/nonexistent"),
                                      cgroup_root=None))
    one = RecordBuilder(CollectorContext(collector_id="n1"), KClock(),
                        ProcessCache(proc=__import__("pathlib").Path("/nonexistent"),
                                     cgroup_root=None))
    now = T0 + timedelta(seconds=9)
    assert many.build_many(states, final=True, now=now) == [
        one.build(s, final=True, now=now) for s in states]
