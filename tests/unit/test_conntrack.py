"""collector/conntrack.py without a kernel: ctnetlink messages built byte for byte as
nfnetlink_conntrack.h lays them out, parsed into translations; the table that answers a client's
and a server's record. The same code against the kernel: tests/lab/test_lab_services.py."""

from __future__ import annotations

import socket
import struct

import pytest

from collector.conntrack import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_NEW,
    IPS_DST_NAT,
    IPS_SRC_NAT,
    NatTable,
    Translation,
    parse,
)

NESTED = 0x8000


def nla(typ: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), typ | (NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def ct_tuple(tag: int, src: str, sport: int, dst: str, dport: int, proto: int = 6) -> bytes:
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    a, b = (3, 4) if fam == socket.AF_INET6 else (1, 2)
    ip = nla(a, socket.inet_pton(fam, src)) + nla(b, socket.inet_pton(fam, dst))
    pr = nla(1, bytes([proto])) + (nla(2, struct.pack(">H", sport)) + nla(3, struct.pack(">H", dport))
                                    if proto in (6, 17) else b"")
    return nla(tag, nla(1, ip, True) + nla(2, pr, True), True)


def message(orig, reply, status: int, msg: int = IPCTNL_MSG_CT_NEW, proto: int = 6) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, 0)  # nfgenmsg
    body += ct_tuple(1, *orig, proto=proto) + ct_tuple(2, *reply, proto=proto)
    body += nla(3, struct.pack(">I", status))
    return struct.pack("=IHHII", 16 + len(body), (1 << 8) | msg, 0, 0, 0) + body


CLUSTERIP = (("10.244.1.10", 40000, "10.96.0.11", 9090), ("10.244.2.11", 9090, "10.244.1.10", 40000))
NODEPORT = (("10.244.1.10", 41000, "10.213.0.2", 30080), ("10.244.3.13", 8080, "10.244.2.1", 41001))


def test_a_dnat_and_a_masquerade_in_one_datagram():
    buf = message(*CLUSTERIP, IPS_DST_NAT | 0x8) + message(*NODEPORT, IPS_DST_NAT | IPS_SRC_NAT)
    (k1, t1), (k2, t2) = parse(buf)
    assert (k1, k2) == ("new", "new")
    assert t1 == Translation("tcp", *CLUSTERIP)
    assert t1.dnat and not t1.snat and t1.backend == ("10.244.2.11", 9090)
    assert t2.dnat and t2.snat and t2.seen_client == ("10.244.2.1", 41001)


def test_untranslated_portless_foreign_and_truncated_messages_are_passed_over():
    plain = (("10.244.1.10", 1, "10.244.2.11", 2), ("10.244.2.11", 2, "10.244.1.10", 1))
    icmp = message(*CLUSTERIP, IPS_DST_NAT, proto=1)
    other = struct.pack("=IHHII", 20, (2 << 8), 0, 0, 0) + b"\0" * 4  # another subsystem
    good = message(*CLUSTERIP, IPS_DST_NAT)
    assert list(parse(message(*plain, 0x8))) == []
    assert list(parse(icmp)) == []
    assert [t for _, t in parse(other + good)] == [Translation("tcp", *CLUSTERIP)]
    assert list(parse(good[:-6])) == []  # cut short: its length runs past the datagram


def test_destroy_and_udp_and_ipv6():
    udp = message(*CLUSTERIP, IPS_DST_NAT, IPCTNL_MSG_CT_DELETE, proto=17)
    assert list(parse(udp)) == [("destroy", Translation("udp", *CLUSTERIP))]
    v6 = (("fd00:ee::1:10", 5, "fd00:96::a", 80), ("fd00:ee::2:11", 8080, "fd00:ee::1:10", 5))
    assert [t for _, t in parse(message(*v6, IPS_DST_NAT))] == [Translation("tcp", *v6)]


def test_table_answers_the_client_and_the_server():
    table = NatTable()
    t = Translation("tcp", *NODEPORT)
    table.add(t)
    assert table.for_client("tcp", ("10.244.1.10", 41000), ("10.213.0.2", 30080)) is t
    assert table.for_server("tcp", ("10.244.3.13", 8080), ("10.244.2.1", 41001)) is t
    assert table.for_client("udp", ("10.244.1.10", 41000), ("10.213.0.2", 30080)) is None
    assert table.for_server("tcp", ("10.244.3.13", 8080), ("10.244.1.10", 41000)) is None


def test_table_is_bounded_oldest_first_and_counts_what_it_drops():
    table = NatTable(capacity=2)
    ts = [Translation("tcp", ("10.0.0.1", p, "10.96.0.1", 80), ("10.0.0.9", 80, "10.0.0.1", p))
          for p in (1, 2, 3)]
    for t in ts:
        table.add(t)
    assert len(table) == 2 and table.evicted == 1
    assert table.for_client("tcp", ("10.0.0.1", 1), ("10.96.0.1", 80)) is None
    assert table.for_server("tcp", ("10.0.0.9", 80), ("10.0.0.1", 1)) is None
    assert table.for_server("tcp", ("10.0.0.9", 80), ("10.0.0.1", 3)) is ts[2]
    # the same original tuple again (a reused port): the newer translation wins, both ways
    again = Translation("tcp", ts[2].original, ("10.0.0.8", 80, "10.0.0.1", 3))
    table.add(again)
    assert table.for_client("tcp", ("10.0.0.1", 3), ("10.96.0.1", 80)) is again
    assert table.for_server("tcp", ("10.0.0.9", 80), ("10.0.0.1", 3)) is None


@pytest.mark.parametrize("cut", [0, 3, 15])
def test_short_datagrams_yield_nothing(cut):
    assert list(parse(message(*CLUSTERIP, IPS_DST_NAT)[:cut])) == []
