"""The lab's DNS: the zone the resolver pods serve and the client side the demo resolves with.

In: the lab inventory (pods, their services and addresses).  Out: DNS answers (RFC 1035 wire
format, built and parsed with dnspython) the way a cluster's CoreDNS gives them, and for each
exchange a truth record (name, type, rcode, answers, CNAMEs) the demo writes as ground truth.

Names (Kubernetes' shape, RFC 1034 section 3.6.2 for CNAMEs):
- `<service>.<namespace>.svc.cluster.local`   A/AAAA: every pod of the service
- `<pod>.<service>.<namespace>.svc.cluster.local`   A/AAAA: that pod
- `store.example.com`   CNAME frontend.shop.svc.cluster.local, then its addresses (the resolver
  chases the CNAME in the same answer, as recursive resolvers do)
- `slow.platform.svc.cluster.local`   answered SLOW_ANSWER_S late (a latency the collector measures)
- names under `missing.example.com` (the demo asks them on purpose): NXDOMAIN
- any other name: NXDOMAIN; a type other than A/AAAA of a known name: NOERROR, no answer (NODATA)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

ZONE = "svc.cluster.local."
TTL = 2  # seconds: short, so a few seconds of lab traffic re-resolve (and the cache expires)
SLOW_NAME = "slow.platform.svc.cluster.local."
SLOW_ANSWER_S = 0.25
CNAME_NAME = "store.example.com."
CNAME_TARGET = "frontend.shop.svc.cluster.local."
MISSING_SUFFIX = "missing.example.com."
# what the demo asks on purpose, besides the services it calls (one drawn per lookup)
PURPOSE_NAMES = ("nosuch.missing.example.com.", SLOW_NAME, CNAME_NAME,
                 "auth.shop.svc.cluster.local.")


def service_name(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.{ZONE}"


def zone_of(inv: dict[str, Any]) -> dict[str, dict[int, list[str]]]:
    """name -> {4: [IPv4 addresses], 6: [IPv6 addresses]} of every service and pod."""
    zone: dict[str, dict[int, list[str]]] = {}
    for p in inv["pods"]:
        svc = service_name(p["service"], p.get("namespace") or "default")
        for name in (svc, f"{p['name']}.{svc}"):
            entry = zone.setdefault(name, {4: [], 6: []})
            for fam, key in ((4, "ip4"), (6, "ip6")):
                addr = p.get(key) or (p["ip"] if fam == 4 and ":" not in p["ip"] else None)
                if addr:
                    entry[fam].append(str(addr))
    if service_name("resolver", "platform") in zone:
        zone[SLOW_NAME] = zone[service_name("resolver", "platform")]
    return zone


class Zone:
    """Answers queries from the lab's names (the resolver pods' server side)."""

    def __init__(self, inv: dict[str, Any]) -> None:
        self.names = zone_of(inv)

    def answer(self, wire: bytes) -> tuple[bytes, float] | None:
        """The response to query `wire` and how long to hold it back; None for a datagram that
        is no DNS query (dropped, as a server drops garbage)."""
        try:
            q = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - any malformed datagram: no answer
            return None
        if q.flags & dns.flags.QR or len(q.question) != 1:
            return None
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        rr = q.question[0]
        name = rr.name.to_text().lower()
        delay = SLOW_ANSWER_S if name == SLOW_NAME else 0.0
        chain = [rr.name]
        if name == CNAME_NAME:
            target = dns.name.from_text(CNAME_TARGET)
            r.answer.append(dns.rrset.from_text(rr.name, TTL, "IN", "CNAME", CNAME_TARGET))
            chain.append(target)
            name = CNAME_TARGET
        known = self.names.get(name)
        if known is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif rr.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            addrs = known[4 if rr.rdtype == dns.rdatatype.A else 6]
            if addrs:
                r.answer.append(dns.rrset.from_text_list(
                    chain[-1], TTL, dns.rdataclass.IN, rr.rdtype, addrs))
        return r.to_wire(), delay


@dataclass(frozen=True)
class Lookup:
    """One exchange as the client saw it: its truth record (`truth()`), the addresses got."""

    id: int
    name: str
    qtype: str
    rcode: str  # NOERROR, NXDOMAIN, ... ; "" when no answer came (timeout)
    answers: tuple[str, ...]
    cnames: tuple[str, ...]
    ttl: int
    query: bytes = field(repr=False)
    response: bytes = field(repr=False)

    def truth(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "type": self.qtype, "rcode": self.rcode or None,
                "answers": list(self.answers), "cnames": list(self.cnames), "ttl": self.ttl}


def make_query(name: str, family: int) -> dns.message.Message:
    return dns.message.make_query(name, "AAAA" if family == 6 else "A", use_edns=False)


def read_response(query: dns.message.Message, wire: bytes, response: bytes) -> Lookup:
    """The Lookup of `query` (sent as `wire`) from the `response` bytes (b"": none came)."""
    rr = query.question[0]
    if not response:
        return Lookup(query.id, rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype), "", (), (),
                      0, wire, b"")
    r = dns.message.from_wire(response)
    addrs: list[str] = []
    cnames: list[str] = []
    ttls: list[int] = []
    for rrset in r.answer:
        ttls.append(rrset.ttl)
        for rd in rrset:
            if rrset.rdtype == dns.rdatatype.CNAME:
                cnames.append(rd.target.to_text())
            elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addrs.append(rd.address)
    return Lookup(query.id, rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype),
                  dns.rcode.to_text(r.rcode()), tuple(addrs), tuple(cnames),
                  min(ttls) if ttls else 0, wire, response)


class Cache:
    """A client's stub cache: a name's addresses until their TTL runs out (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}

    def get(self, name: str, family: int, now: float) -> tuple[str, ...] | None:
        with self._lock:
            hit = self._entries.get((name, family))
        return hit[1] if hit and hit[0] > now else None

    def put(self, name: str, family: int, now: float, lookup: Lookup) -> None:
        if lookup.rcode == "NOERROR" and lookup.answers:
            with self._lock:
                self._entries[(name, family)] = (now + lookup.ttl, lookup.answers)
