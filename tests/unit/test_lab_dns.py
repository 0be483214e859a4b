"""The lab's DNS zone from a planned inventory (no root): every service and pod name of each IP
family, the CNAME, the late name, NXDOMAIN, NODATA, and what a server ignores."""

from __future__ import annotations

import dns.message
import dns.rcode
import pytest

from eastwest.lab import dns as labdns
from eastwest.lab.plan import make_plan


def ask(zone: labdns.Zone, name: str, qtype: str) -> tuple[dns.message.Message, float]:
    q = dns.message.make_query(name, qtype, use_edns=False)
    got = zone.answer(q.to_wire())
    assert got is not None
    r = dns.message.from_wire(got[0])
    assert r.id == q.id and r.question == q.question
    return r, got[1]


def addrs(r: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in r.answer if rrset.rdtype in (1, 28) for rd in rrset)


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "dual"])
def test_every_service_and_pod_name_answers_its_addresses(family) -> None:
    inv = make_plan("ewf", 3, 3, 4789, family).inventory()
    zone = labdns.Zone(inv)
    for p in inv["pods"]:
        svc = labdns.service_name(p["service"], p["namespace"])
        peers = [q for q in inv["pods"] if q["service"] == p["service"]]
        for qtype, key in (("A", "ip4"), ("AAAA", "ip6")):
            want = sorted(q[key] for q in peers if q[key])
            r, delay = ask(zone, svc, qtype)
            assert (r.rcode(), addrs(r), delay) == (dns.rcode.NOERROR, want, 0.0)
            r, _ = ask(zone, f"{p['name']}.{svc}", qtype)
            assert addrs(r) == ([p[key]] if p[key] else [])  # no address: NODATA, not NXDOMAIN
            assert all(rrset.ttl == labdns.TTL for rrset in r.answer)


def test_cname_late_name_nxdomain_and_nodata() -> None:
    inv = make_plan("ewf", 3, 2, 4789).inventory()
    zone = labdns.Zone(inv)
    r, _ = ask(zone, labdns.CNAME_NAME, "A")
    assert [rrset.rdtype for rrset in r.answer] == [5, 1]
    assert addrs(r) == sorted(p["ip4"] for p in inv["pods"] if p["service"] == "frontend")
    r, delay = ask(zone, labdns.SLOW_NAME, "A")
    assert delay == labdns.SLOW_ANSWER_S and addrs(r)
    for name in ("nosuch.missing.example.com.", "api.example.com.", "x.svc.cluster.local."):
        r, _ = ask(zone, name, "A")
        assert (r.rcode(), r.answer) == (dns.rcode.NXDOMAIN, [])
    r, _ = ask(zone, "db.shop.svc.cluster.local.", "MX")
    assert (r.rcode(), r.answer) == (dns.rcode.NOERROR, [])


def test_what_is_no_query_gets_no_answer() -> None:
    zone = labdns.Zone(make_plan("ewf", 3, 2, 4789).inventory())
    q = dns.message.make_query("db.shop.svc.cluster.local.", "A")
    assert zone.answer(b"Q 100 20\n") is None
    assert zone.answer(dns.message.make_response(q).to_wire()) is None  # a response, not a query
