"""DNS messages as the collector reads them: one parse with dnspython, the facts a flow keeps.

Stage: inside the DNS source. In: the payload of one UDP datagram, or the bytes of one direction
of a TCP stream (RFC 1035 section 4.2.2: each message behind a two-byte length, RFC 7766).  Out:
`DnsMessage` (id, query or response, first question's name and type, rcode, answer addresses and
CNAMEs with their TTLs), or `DnsParseError` naming what was wrong. scapy's DNS layer is the
reference a differential test holds this parser to (tests/unit/test_dns_message.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype


class DnsParseError(ValueError):
    """A payload that is no DNS message (the reason says why)."""


@dataclass(frozen=True, slots=True)
class DnsAnswerRR:
    """One answer record the client got: an address (A/AAAA) or a CNAME target."""

    type: str  # A, AAAA or CNAME
    owner: str  # the record's owner name (the asked name, or a CNAME's target)
    value: str  # the address, or the CNAME's target name
    ttl: int


@dataclass(frozen=True, slots=True)
class DnsMessage:
    id: int
    response: bool
    name: str  # the first question's name, absolute, lower case ("" when there is none)
    qtype: str  # A, AAAA, ... (dnspython's mnemonic; TYPE<n> for unknown types)
    rcode: str  # NOERROR, NXDOMAIN, SERVFAIL, ... (a query carries NOERROR)
    answers: tuple[DnsAnswerRR, ...]

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a.value for a in self.answers if a.type != "CNAME")

    @property
    def cnames(self) -> tuple[str, ...]:
        return tuple(a.value for a in self.answers if a.type == "CNAME")


_KEEP = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME)


def parse(payload: bytes) -> DnsMessage:
    """One DNS message (a UDP payload). Raises DnsParseError."""
    try:
        m = dns.message.from_wire(payload, ignore_trailing=True, one_rr_per_rrset=True)
    except (dns.exception.DNSException, ValueError, IndexError) as exc:
        raise DnsParseError(f"not a DNS message: {type(exc).__name__}: {exc}") from None
    name, qtype = "", ""
    if m.question:
        q = m.question[0]
        name, qtype = q.name.to_text().lower(), dns.rdatatype.to_text(q.rdtype)
    answers = tuple(
        DnsAnswerRR(dns.rdatatype.to_text(rrset.rdtype), rrset.name.to_text().lower(),
                    rd.target.to_text().lower() if rrset.rdtype == dns.rdatatype.CNAME
                    else rd.address, rrset.ttl)
        for rrset in m.answer if rrset.rdtype in _KEEP for rd in rrset)
    return DnsMessage(m.id, bool(m.flags & dns.flags.QR), name, qtype,
                      dns.rcode.to_text(m.rcode()), answers)


class TcpStream:
    """One direction of a DNS-over-TCP connection: bytes in, whole messages out (RFC 7766 6.2.1).
    Segments are taken in the order they arrive; a segment seen again (a retransmission) or out
    of order breaks the framing, which `feed` reports as DnsParseError and then resynchronises
    nothing: the stream is marked broken and says so once."""

    MAX_BUFFER = 1 << 17  # two 64 KiB messages: more means the framing is lost

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.broken:
            return []
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 2:
            n = int.from_bytes(self._buf[:2], "big")
            if len(self._buf) < 2 + n:
                break
            out.append(bytes(self._buf[2:2 + n]))
            del self._buf[:2 + n]
        if len(self._buf) > self.MAX_BUFFER:
            self.broken = True
            self._buf.clear()
            raise DnsParseError("DNS over TCP: framing lost (over 128 KiB without a message)")
        return out
