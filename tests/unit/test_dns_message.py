"""The collector's DNS parser (dnspython) held to scapy's DNS layer on the same bytes: queries
and responses of many shapes (A, AAAA, CNAME chains, NXDOMAIN, SERVFAIL, compression, EDNS,
random ids and TTLs), and malformed payloads refused with a reason."""

from __future__ import annotations

import random

import dns.message
import dns.rcode
import dns.rrset
import pytest
from scapy.layers.dns import DNS

from collector.dns.message import DnsParseError, TcpStream, parse
from eastwest.lab.dns import Zone

TYPES = {1: "A", 28: "AAAA", 5: "CNAME", 15: "MX", 16: "TXT", 33: "SRV"}


def scapy_view(wire: bytes) -> tuple:
    """The same facts read by scapy (the reference)."""
    m = DNS(wire)
    q = m.qd[0] if m.qdcount else None
    name = q.qname.decode().lower() if q is not None else ""
    qtype = TYPES.get(q.qtype, f"TYPE{q.qtype}") if q is not None else ""
    answers = []
    for rr in (m.an or []):
        if rr.type in (1, 28):
            answers.append((TYPES[rr.type], rr.rrname.decode().lower(), str(rr.rdata), rr.ttl))
        elif rr.type == 5:
            answers.append(("CNAME", rr.rrname.decode().lower(), rr.rdata.decode().lower(), rr.ttl))
    rcode = dns.rcode.to_text(dns.rcode.Rcode(m.rcode))
    return (m.id, bool(m.qr), name, qtype, rcode, answers)


def ours(wire: bytes) -> tuple:
    m = parse(wire)
    return (m.id, m.response, m.name, m.qtype, m.rcode,
            [(a.type, a.owner, a.value, a.ttl) for a in m.answers])


def messages(seed: int, n: int) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        name = ".".join(rnd.choice(["api", "db", "x1", "svc", "example", "com", "a-b"])
                        for _ in range(rnd.randint(1, 5))) + "."
        qtype = rnd.choice(["A", "AAAA", "MX", "TXT", "SRV"])
        q = dns.message.make_query(name, qtype, use_edns=rnd.choice([False, 0]))
        q.id = rnd.randrange(65536)
        out.append(q.to_wire())
        r = dns.message.make_response(q)
        r.set_rcode(rnd.choice([dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL,
                                dns.rcode.REFUSED]))
        owner = name
        if rnd.random() < 0.3:
            target = f"alias{rnd.randint(0, 9)}.example.net."
            r.answer.append(dns.rrset.from_text(owner, rnd.randint(0, 86400), "IN", "CNAME", target))
            owner = target
        if qtype == "A":
            r.answer.append(dns.rrset.from_text_list(
                owner, rnd.randint(0, 86400), "IN", "A",
                [f"10.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{i}" for i in range(rnd.randint(0, 4))]
                or ["192.0.2.1"]))
        elif qtype == "AAAA":
            r.answer.append(dns.rrset.from_text(owner, rnd.randint(0, 86400), "IN", "AAAA",
                                                f"fd00:ee::{rnd.randint(1, 0xffff):x}"))
        elif qtype == "MX":
            r.answer.append(dns.rrset.from_text(owner, 60, "IN", "MX", "10 mail.example.com."))
        out.append(r.to_wire())
    return out


def test_parser_agrees_with_scapy_on_400_generated_messages() -> None:
    wires = messages(seed=17, n=200)
    assert len(wires) == 400
    for w in wires:
        assert ours(w) == scapy_view(w)


def test_parser_agrees_with_scapy_on_the_lab_zone_answers() -> None:
    inv = {"pods": [{"name": "db-1", "service": "db", "namespace": "shop", "ip": "10.244.1.10",
                     "ip4": "10.244.1.10", "ip6": "fd00:ee::1:10"},
                    {"name": "db-2", "service": "db", "namespace": "shop", "ip": "10.244.2.10",
                     "ip4": "10.244.2.10", "ip6": "fd00:ee::2:10"},
                    {"name": "frontend-1", "service": "frontend", "namespace": "shop",
                     "ip": "10.244.3.11", "ip4": "10.244.3.11", "ip6": None}]}
    zone = Zone(inv)
    cases = [("db.shop.svc.cluster.local.", "A", "NOERROR", ["10.244.1.10", "10.244.2.10"]),
             ("db-2.db.shop.svc.cluster.local.", "AAAA", "NOERROR", ["fd00:ee::2:10"]),
             ("store.example.com.", "A", "NOERROR", ["10.244.3.11"]),
             ("nosuch.missing.example.com.", "A", "NXDOMAIN", [])]
    for name, qtype, rcode, addrs in cases:
        q = dns.message.make_query(name, qtype, use_edns=False)
        answer = zone.answer(q.to_wire())
        assert answer is not None
        m = parse(answer[0])
        assert ours(answer[0]) == scapy_view(answer[0])
        assert (m.name, m.qtype, m.rcode, sorted(m.addresses)) == (name, qtype, rcode, addrs)
    m = parse(zone.answer(dns.message.make_query("store.example.com.", "A").to_wire())[0])
    assert m.cnames == ("frontend.shop.svc.cluster.local.",)


@pytest.mark.parametrize("payload, why", [
    (b"", "not a DNS message"), (b"\x12\x34\x01", "not a DNS message"),
    (b"Q 100 20\n" + b"q" * 20, "not a DNS message"),
    # header says one question, none follows
    (bytes.fromhex("123401000001000000000000"), "not a DNS message")])
def test_what_is_no_dns_message_is_refused_with_a_reason(payload, why) -> None:
    with pytest.raises(DnsParseError, match=why):
        parse(payload)


def test_tcp_stream_gives_whole_messages_however_the_bytes_are_cut() -> None:
    wires = messages(seed=3, n=5)
    stream = b"".join(len(w).to_bytes(2, "big") + w for w in wires)
    for cut in (1, 2, 3, 7, 64, len(stream)):
        s = TcpStream()
        got = []
        for i in range(0, len(stream), cut):
            got += s.feed(stream[i:i + cut])
        assert got == wires, cut
