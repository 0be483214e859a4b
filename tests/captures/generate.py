"""Writes the two generated captures of tests/captures, the same bytes on every run.

    python tests/captures/generate.py            # rewrite them in this folder
    python tests/captures/generate.py --out DIR  # write them elsewhere (the test compares)

They stand in for two public captures whose licences (LGPL-3.0, GPL-3.0) do not fit the
project's Apache-2.0, and exercise the same cases (README.md says what each holds):

- `generated_vxlan_vlan_dns_tls.pcap` (for nDPI's vxlan.pcap): an 802.1Q-tagged underlay
  (VLAN 5), outer IPv4, UDP/4789 VXLAN with one VNI (RFC 7348), and inside one client that
  resolves names (DNS A and AAAA, RFC 1035 / RFC 3596) and then opens two TLS 1.3-shaped TCP
  sessions (RFC 8446 record and handshake layout, no real cryptography): the first ends with a
  FIN and then the client's RSTs, the second downloads ~34 kB and closes with FIN/FIN/ACK.
- `generated_mixed_link_junk.pcap` (for tcpreplay's test.pcap): plain Ethernet, no tunnel.
  IPv4 HTTP to two servers, DNS with duplicate answers and ICMP port unreachable, IGMPv2
  queries (RFC 2236), MPLS with one and two labels (RFC 3032), an Ethernet pseudowire with a
  control word carrying Ethernet + 802.1Q + ICMP (RFC 4448), IPv6 HTTP, an EIGRP hello
  (RFC 7868), an IS-IS hello over 802.2 LLC padded to 1514 bytes (ISO/IEC 10589), an Ethernet
  configuration-testing ("loopback", ethertype 0x9000) reply, ARP (RFC 826).

Determinism: fixed times (microseconds from 2024-01-01T00:00:00Z), fixed addresses (the
documentation ranges of RFC 5737 and RFC 3849, names under example.com, RFC 2606), payload
bytes from SHAKE-256 of a label (`filler`), and the classic pcap format written here
(draft-ietf-opsawg-pcap), not by scapy's writer. scapy only builds the packets.
Self-contained on purpose (it does not share tests/golden/vxlan_builders.py): a change
there must not change a committed capture.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scapy.contrib.eigrp import EIGRP, EIGRPParam, EIGRPSwVer
from scapy.contrib.isis import (
    ISIS_AreaEntry,
    ISIS_AreaTlv,
    ISIS_CommonHdr,
    ISIS_IpInterfaceAddressTlv,
    ISIS_L1_LAN_Hello,
    ISIS_PaddingTlv,
    ISIS_ProtocolsSupportedTlv,
)
from scapy.contrib.mpls import MPLS
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.igmp import IGMP
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption_Router_Alert, UDPerror
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, LLC, Dot1Q, Dot3, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

HERE = Path(__file__).resolve().parent
VXLAN_FILE = "generated_vxlan_vlan_dns_tls.pcap"
JUNK_FILE = "generated_mixed_link_junk.pcap"
T0_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
VNI, UNDERLAY_VLAN = 1111, 5
VTEP_C, VTEP_S = "198.51.100.4", "198.51.100.5"   # client side, server side
CLIENT, RESOLVER, TLS_SERVER = "192.0.2.4", "192.0.2.53", "203.0.113.35"


def filler(label: str, n: int) -> bytes:
    """`n` pseudo-random bytes, a function of `label` (the seed) alone."""
    return hashlib.shake_256(label.encode()).digest(n)


def pcap_file(frames: list[tuple[int, bytes]], linktype: int = 1) -> bytes:
    """Classic little-endian pcap, microsecond times, snaplen 65535."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)]
    for t_us, frame in frames:
        sec, usec = divmod(t_us, 1_000_000)
        out.append(struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame)
    return b"".join(out)


@dataclass
class Flow:
    """What a correct flow builder reports for one flow: [client->server, server->client]."""
    protocol: str
    client: tuple[str, int]
    server: tuple[str, int]
    packets: list[int] = field(default_factory=lambda: [0, 0])
    payload: list[int] = field(default_factory=lambda: [0, 0])   # L4 payload bytes
    l3: list[int] = field(default_factory=lambda: [0, 0])        # IP header and everything after


class Wire:
    """The frames of one capture, in time order; `to_frame` puts an IP packet on the link."""

    def __init__(self, to_frame: Callable[[Packet, bool], bytes]) -> None:
        self.to_frame = to_frame
        self.t = T0_US
        self.frames: list[tuple[int, bytes]] = []
        self.flows: list[Flow] = []
        self._ip_id: dict[str, int] = {}

    def raw(self, frame: bytes, gap_us: int) -> None:
        self.t += gap_us
        self.frames.append((self.t, frame))

    def ip(self, src: str, dst: str, **kw) -> Packet:
        self._ip_id[src] = self._ip_id.get(src, 0x1000) + 1
        if ":" in src:
            return IPv6(src=src, dst=dst, hlim=kw.pop("ttl", 64), **kw)
        return IP(src=src, dst=dst, id=self._ip_id[src], flags="DF", **kw)

    def send(self, flow: Flow, c2s: bool, l4: Packet, payload: bytes, gap_us: int) -> None:
        (cip, _), (sip, _) = flow.client, flow.server
        ip = self.ip(cip, sip) if c2s else self.ip(sip, cip, ttl=57)
        pkt = ip / l4 / Raw(payload) if payload else ip / l4
        d = 0 if c2s else 1
        flow.packets[d] += 1
        flow.payload[d] += len(payload)
        flow.l3[d] += len(bytes(pkt))
        self.raw(self.to_frame(pkt, c2s), gap_us)


class Tcp:
    """One TCP connection; sequence and acknowledgement numbers follow the bytes sent."""

    def __init__(self, wire: Wire, client: tuple[str, int], server: tuple[str, int],
                 mss: int = 1380) -> None:
        self.wire, self.mss = wire, mss
        self.flow = Flow("tcp", client, server)
        wire.flows.append(self.flow)
        isn = zlib.crc32(f"{client}{server}".encode())
        self.nxt = [isn, isn ^ 0x5A5A5A5A]   # next sequence number, client and server

    def seg(self, c2s: bool, flags: str, data: bytes = b"", gap_us: int = 200,
            options: list | None = None) -> None:
        me, peer = (0, 1) if c2s else (1, 0)
        (_, cport), (_, sport) = self.flow.client, self.flow.server
        ports = (cport, sport) if c2s else (sport, cport)
        ack = self.nxt[peer] if "A" in flags else 0
        window = (64240 if c2s else 65535) if "S" in flags else 0 if flags == "R" else (
            502 if c2s else 263)   # after the handshake, scaled by 2**7 and 2**8
        tcp = TCP(sport=ports[0], dport=ports[1], flags=flags, seq=self.nxt[me], ack=ack,
                  window=window, options=options or [])
        self.wire.send(self.flow, c2s, tcp, data, gap_us)
        self.nxt[me] = (self.nxt[me] + len(data) + ("S" in flags) + ("F" in flags)) % 2**32

    def open(self, rtt_us: int) -> None:
        self.seg(True, "S", options=[("MSS", 1410), ("SAckOK", b""), ("WScale", 7)], gap_us=300)
        self.seg(False, "SA", options=[("MSS", self.mss), ("SAckOK", b""), ("WScale", 8)],
                 gap_us=rtt_us)
        self.seg(True, "A", gap_us=40)

    def write(self, c2s: bool, data: bytes, rtt_us: int, ack_every: int = 2,
              ack_last: bool = True) -> None:
        """`data` in MSS-sized segments (PSH on the last), the peer ACKing every few; a reply
        that follows at once acknowledges the last segment instead (`ack_last=False`)."""
        chunks = [data[i:i + self.mss] for i in range(0, len(data), self.mss)]
        for i, chunk in enumerate(chunks, 1):
            last = i == len(chunks)
            self.seg(c2s, "PA" if last else "A", chunk, gap_us=rtt_us if i == 1 else 90)
            if (i % ack_every == 0 and not last) or (last and ack_last):
                self.seg(not c2s, "A", gap_us=60)


# -- TLS 1.3-shaped bytes (RFC 8446 section 4 layouts; the "encrypted" parts are filler) ----
def tls_record(content_type: int, body: bytes, legacy: int = 0x0303) -> bytes:
    return struct.pack("!BHH", content_type, legacy, len(body)) + body


def handshake(msg_type: int, body: bytes) -> bytes:
    return struct.pack("!B", msg_type) + len(body).to_bytes(3, "big") + body


def ext(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(body)) + body


def client_hello(label: str, server_name: bytes) -> bytes:
    sni = struct.pack("!BH", 0, len(server_name)) + server_name
    exts = (ext(0, struct.pack("!H", len(sni)) + sni)                 # server_name
            + ext(10, struct.pack("!HH", 2, 0x001D))                  # supported_groups: x25519
            + ext(13, struct.pack("!HHH", 4, 0x0403, 0x0804))         # signature_algorithms
            + ext(43, struct.pack("!BH", 2, 0x0304))                  # supported_versions: 1.3
            + ext(51, struct.pack("!HHH", 36, 0x001D, 32) + filler(label + "/key", 32)))
    body = (struct.pack("!H", 0x0303) + filler(label + "/random", 32)
            + struct.pack("!B", 32) + filler(label + "/session", 32)
            + struct.pack("!H3H", 6, 0x1301, 0x1302, 0x1303) + b"\x01\x00"
            + struct.pack("!H", len(exts)) + exts)
    return tls_record(22, handshake(1, body), legacy=0x0301)


def server_flight(label: str, encrypted: int) -> bytes:
    """ServerHello, ChangeCipherSpec, then the encrypted EncryptedExtensions..Finished."""
    exts = (ext(43, struct.pack("!H", 0x0304))
            + ext(51, struct.pack("!HH", 0x001D, 32) + filler(label + "/skey", 32)))
    body = (struct.pack("!H", 0x0303) + filler(label + "/srandom", 32)
            + struct.pack("!B", 32) + filler(label + "/session", 32)
            + struct.pack("!HB", 0x1301, 0) + struct.pack("!H", len(exts)) + exts)
    return (tls_record(22, handshake(2, body)) + tls_record(20, b"\x01")
            + tls_record(23, filler(label + "/flight", encrypted)))


def app_data(label: str, *sizes: int) -> bytes:
    return b"".join(tls_record(23, filler(f"{label}/{i}", n)) for i, n in enumerate(sizes))


# -- capture 1: VXLAN over a VLAN-tagged underlay, DNS then TLS ------------------------------
def vxlan_frame(inner_ip: Packet, c2s: bool) -> bytes:
    client_mac, gateway_mac = "0a:58:c0:00:02:04", "0a:58:c0:00:02:01"
    inner = (Ether(src=client_mac, dst=gateway_mac) if c2s
             else Ether(src=gateway_mac, dst=client_mac)) / inner_ip
    l4 = inner_ip.payload
    key = f"{inner_ip.src}|{inner_ip.dst}|{l4.sport}|{l4.dport}".encode()
    sport = 49152 + zlib.crc32(key) % 16384   # RFC 7348 section 5: a hash of the inner flow
    vs, vd = (VTEP_C, VTEP_S) if c2s else (VTEP_S, VTEP_C)
    vs_mac, vd_mac = ("02:00:c6:33:64:04", "02:00:c6:33:64:05")[:: 1 if c2s else -1]
    return bytes(Ether(src=vs_mac, dst=vd_mac) / Dot1Q(vlan=UNDERLAY_VLAN)
                 / IP(src=vs, dst=vd, id=0, flags="DF", ttl=64)
                 / UDP(sport=sport, dport=4789, chksum=0)   # zero checksum: RFC 7348 section 5
                 / VXLAN(vni=VNI, flags=0x08) / inner)


def dns_exchange(wire: Wire, port: int, name: str, answers: dict[str, list[tuple[str, str]]],
                 first_id: int) -> Flow:
    """A and AAAA queries for `name` on one socket, then both answers (as resolvers do)."""
    flow = Flow("udp", (CLIENT, port), (RESOLVER, 53))
    wire.flows.append(flow)
    queries = [(first_id, "A"), (first_id + 1, "AAAA")]
    for qid, qtype in queries:
        wire.send(flow, True, UDP(sport=port, dport=53),
                  bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype))), 150)
    for qid, qtype in queries:
        owner, an = name, None
        for rtype, rdata in answers[qtype]:   # a CNAME's target owns the next record
            rr = DNSRR(rrname=owner, type=rtype, ttl=300, rdata=rdata)
            an = rr if an is None else an / rr
            owner = rdata if rtype == "CNAME" else owner
        wire.send(flow, False, UDP(sport=53, dport=port),
                  bytes(DNS(id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=name, qtype=qtype),
                            an=an)), 21_000 if qtype == "A" else 900)
    return flow


def build_vxlan_dns_tls() -> Wire:
    wire = Wire(vxlan_frame)
    dns_exchange(wire, 40101, "example.com.",
                 {"A": [("A", TLS_SERVER)], "AAAA": [("AAAA", "2001:db8::35")]}, 0x1001)
    first = Tcp(wire, (CLIENT, 50100), (TLS_SERVER, 443))
    first.open(rtt_us=9_000)
    first.write(True, client_hello("s1", b"example.com"), rtt_us=400, ack_every=1)
    first.write(False, server_flight("s1", 3000), rtt_us=9_000, ack_every=1)
    first.write(True, tls_record(20, b"\x01") + app_data("s1/fin", 53), rtt_us=500)
    first.write(True, app_data("s1/req", 140), rtt_us=9_000, ack_last=False)
    first.write(False, app_data("s1/resp", 150), rtt_us=9_000, ack_last=False)
    first.seg(True, "A", gap_us=40_000)
    first.write(False, app_data("s1/ticket", 640), rtt_us=80_000)
    # a second name, a second session; the first one closes while the second runs
    dns_exchange(wire, 40102, "www.example.com.",
                 {"A": [("CNAME", "edge.example.com."), ("A", TLS_SERVER)],
                  "AAAA": [("CNAME", "edge.example.com."), ("AAAA", "2001:db8::35")]}, 0x2001)
    second = Tcp(wire, (CLIENT, 50102), (TLS_SERVER, 443))
    second.open(rtt_us=9_500)
    second.write(True, client_hello("s2", b"www.example.com"), rtt_us=400, ack_every=1)
    second.write(False, server_flight("s2", 3000), rtt_us=9_000, ack_every=1)
    second.write(True, tls_record(20, b"\x01") + app_data("s2/fin", 53), rtt_us=500)
    second.write(True, app_data("s2/req", 160), rtt_us=9_000, ack_last=False)
    second.write(False, app_data("s2/resp", 150, 420), rtt_us=9_000)
    first.seg(True, "FA", gap_us=30_000)                 # the browser closes the first one...
    first.write(False, app_data("s1/close", 19), rtt_us=9_000, ack_last=False)
    first.seg(False, "FA", gap_us=50)
    first.seg(True, "R", gap_us=100)                      # ...and resets what still arrives
    first.seg(True, "R", gap_us=30)
    second.write(True, app_data("s2/get", 180), rtt_us=1_000, ack_last=False)
    second.write(False, app_data("s2/body", *[4000] * 8, 1500), rtt_us=14_000)
    second.seg(True, "FA", gap_us=2_000)
    second.seg(False, "FA", gap_us=9_500)
    second.seg(True, "A", gap_us=9_000)
    return wire


# -- capture 2: no tunnel, mixed and odd link content ----------------------------------------
LAN_HOST, GATEWAY = "192.0.2.12", "192.0.2.1"
HOST_MAC, GW_MAC = "02:00:00:0b:00:0c", "02:00:00:0b:00:01"
WEB_A, WEB_B, TLS_PEER = "203.0.113.45", "203.0.113.172", "198.51.100.17"
V6_HOST, V6_WEB = "2001:db8:15a0::12", "2001:db8:4700::69c"


def lan_frame(ip: Packet, c2s: bool) -> bytes:
    """The LAN host's side: client->server frames go from its MAC to the gateway's."""
    src, dst = (HOST_MAC, GW_MAC) if c2s else (GW_MAC, HOST_MAC)
    return bytes(Ether(src=src, dst=dst) / ip)


def pad60(frame: bytes) -> bytes:
    """Ethernet's minimum frame (without FCS): short frames reach a receiver padded."""
    return frame + b"\x00" * max(0, 60 - len(frame))


def http_request(path: str, host: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: eastwest-test/1\r\n"
            "Accept: */*\r\n\r\n").encode()


def http_response(status: str, body: bytes, ctype: str = "text/html") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Server: test\r\n\r\n").encode() + body


def echo(wire: Wire, frame: Callable[[Packet], bytes], src: str, dst: str, seq: int,
         size: int, gap_us: int) -> None:
    wire.raw(frame(IP(src=src, dst=dst, ttl=255) / ICMP(type=8, id=5, seq=seq)
                   / Raw(filler(f"echo/{src}/{seq}", size))), gap_us)


def mpls(*labels: int) -> Packet:
    stack: Packet = Ether(src="02:00:00:0c:00:01", dst="02:00:00:0c:00:02", type=0x8847)
    for i, label in enumerate(labels):
        stack = stack / MPLS(label=label, s=int(i == len(labels) - 1), ttl=255)
    return stack


def isis_hello() -> bytes:
    tlvs = [ISIS_AreaTlv(areas=[ISIS_AreaEntry(areaid="49.0001")]),
            ISIS_ProtocolsSupportedTlv(nlpids=["IPv4"]),
            ISIS_IpInterfaceAddressTlv(addresses=["10.0.12.1"])]
    hello = ISIS_L1_LAN_Hello(circuittype="L1", sourceid="3200.0000.0001", holdingtime=30,
                              priority=64, lanid="3200.0000.0001.01", tlvs=tlvs)

    def frame(pad: list) -> bytes:
        hello.tlvs = tlvs + pad
        return bytes(Dot3(src="02:00:00:0d:00:01", dst="01:80:c2:00:00:14")
                     / LLC(dsap=0xFE, ssap=0xFE, ctrl=3) / ISIS_CommonHdr() / hello)

    pad: list = []
    while len(frame(pad)) < 1514:   # padded to the MTU (ISO/IEC 10589 section 8.4.1)
        room = 1514 - len(frame(pad)) - 2
        pad.append(ISIS_PaddingTlv(padding=b"\x00" * min(255, max(room, 0))))
    return frame(pad)


def build_mixed_link_junk() -> Wire:
    wire = Wire(lan_frame)
    # 1. the tail of an HTTPS connection seen mid-flow: alert, FINs, retransmissions, dup ACKs
    tail = Tcp(wire, (LAN_HOST, 50565), (TLS_PEER, 443))
    tail.seg(True, "PA", tls_record(21, filler("alert", 26)), gap_us=0)
    tail.seg(True, "FA", gap_us=100)
    tail.seg(False, "A", gap_us=20_000)
    tail.nxt[0] -= 1
    tail.seg(True, "FA", gap_us=200)                                  # FIN again
    tail.seg(False, "FA", gap_us=300)
    tail.nxt[0] -= 1
    tail.seg(True, "FA", gap_us=100)                                  # and again
    tail.seg(False, "A", gap_us=5_000)
    tail.seg(True, "A", gap_us=100)
    tail.seg(False, "A", gap_us=14_000, options=[("SAck", (tail.nxt[0] - 1, tail.nxt[0]))])
    # 2. ARP from the gateway, unpadded (captured on the sender)
    wire.raw(bytes(Ether(src=GW_MAC, dst="ff:ff:ff:ff:ff:ff")
                   / ARP(op=1, hwsrc=GW_MAC, psrc=GATEWAY, pdst="192.0.2.194")), 3_000)
    # 3. ICMP echo through two MPLS labels; the reply comes back unlabelled
    echo(wire, lambda p: bytes(mpls(18, 16) / p), "10.31.0.1", "10.34.0.1", 1, 80, 1_000)
    wire.raw(bytes(Ether(src="02:00:00:0c:00:02", dst="02:00:00:0c:00:01")
                   / IP(src="10.34.0.1", dst="10.31.0.1", ttl=253)
                   / ICMP(type=0, id=5, seq=1) / Raw(filler("echo/10.31.0.1/1", 80))), 2_000)
    # 4. HTTP to server A, and IGMPv2 general queries from a router in between
    web_a = Tcp(wire, (LAN_HOST, 50581), (WEB_A, 80), mss=1448)
    web_a.open(rtt_us=25_000)
    for i in range(3):
        wire.raw(pad60(bytes(Ether(src="02:00:00:0b:00:fe", dst="01:00:5e:00:00:01")
                             / IP(src="192.0.2.254", dst="224.0.0.1", ttl=1,
                                  options=[IPOption_Router_Alert()])
                             / IGMP(type=0x11, mrcode=100, gaddr="0.0.0.0"))), 300 + i)
    web_a.write(True, http_request("/", "www.example.com"), rtt_us=500)
    # 5. DNS for server B, IPv6 HTTP meanwhile; a duplicate answer meets a closed port
    dns = Flow("udp", (LAN_HOST, 53001), (GATEWAY, 53))
    ask = [(0x13A2, "A"), (0x152B, "AAAA")]
    for qid, qtype in ask:
        wire.send(dns, True, UDP(sport=53001, dport=53),
                  bytes(DNS(id=qid, rd=1, qd=DNSQR(qname="static.example.com.", qtype=qtype))),
                  300)
    wire.send(dns, False, UDP(sport=53, dport=53001),
              bytes(DNS(id=0x13A2, qr=1, rd=1, ra=1, qd=DNSQR(qname="static.example.com."),
                        an=DNSRR(rrname="static.example.com.", ttl=60, rdata=WEB_B))), 800)
    web6 = Tcp(wire, (V6_HOST, 43250), (V6_WEB, 80))
    web6.open(rtt_us=11_000)
    web6.write(True, http_request("/", "v6.example.com"), rtt_us=200)
    web6.write(False, http_response("200 OK", b"hello over IPv6\n" * 40, "text/plain"),
               rtt_us=11_000)
    web6.seg(True, "FA", gap_us=300)
    web6.seg(False, "FA", gap_us=11_000)
    web6.seg(True, "A", gap_us=100)
    web_a.write(False, http_response("200 OK", filler("page-a", 30_000)), rtt_us=25_000)
    late = DNS(id=0x152B, qr=1, rd=1, ra=1, qd=DNSQR(qname="static.example.com.", qtype="AAAA"))
    wire.send(dns, False, UDP(sport=53, dport=53001), bytes(late), 400)
    wire.raw(lan_frame(IP(src=LAN_HOST, dst=GATEWAY) / ICMP(type=3, code=3)
                       / IPerror(src=GATEWAY, dst=LAN_HOST, len=28 + len(bytes(late)))
                       / UDPerror(sport=53, dport=53001, len=8 + len(bytes(late))), True), 100)
    # 6. four connections to server B: GETs, 200 and 304 answers, one closed by the server
    conns = [Tcp(wire, (LAN_HOST, 50582 + i), (WEB_B, 80), mss=1448) for i in range(4)]
    for i, c in enumerate(conns):
        c.open(rtt_us=8_000 + 100 * i)
    for i, c in enumerate(conns):
        c.write(True, http_request(f"/sd/{i}.css", "static.example.com"), rtt_us=300)
    conns[0].write(False, http_response("304 Not Modified", b""), rtt_us=8_000)
    conns[1].write(False, http_response("200 OK", filler("icon", 3_700), "image/png"),
                   rtt_us=200)
    conns[2].write(False, http_response("304 Not Modified", b""), rtt_us=200)
    conns[3].write(False, http_response("304 Not Modified", b""), rtt_us=200)
    # 7. routing protocols and a loopback test frame
    wire.raw(isis_hello(), 5_000)
    wire.raw(bytes(Ether(src="02:00:00:0d:00:02", dst="01:00:5e:00:00:0a")
                   / IP(src="10.1.2.2", dst="224.0.0.10", ttl=2)
                   / EIGRP(opcode="Hello", asn=100,
                           tlvlist=[EIGRPParam(k1=1, k2=0, k3=1, k4=0, k5=0, holdtime=15),
                                    EIGRPSwVer(ios="v12.4", eigrp="v1.2")])), 2_000)
    wire.raw(pad60(bytes(Ether(src="02:00:00:0d:00:03", dst="02:00:00:0d:00:03", type=0x9000)
                         / Raw(struct.pack("<HHH", 0, 1, 7)))), 3_000)  # skip 0, reply, receipt
    conns[0].seg(False, "FA", gap_us=1_000)
    conns[0].seg(True, "A", gap_us=100)
    for i in (1, 2):
        conns[i].write(True, http_request(f"/sd/{i}.png", "static.example.com"), rtt_us=200)
        conns[i].write(False, http_response("304 Not Modified", b""), rtt_us=8_000)
    # 8. ICMP echo under one MPLS label, replies unlabelled
    for seq in range(5):
        echo(wire, lambda p: bytes(mpls(18) / p), "192.168.10.1", "192.168.40.1", seq, 76, 900)
        wire.raw(bytes(Ether(src="02:00:00:0c:00:02", dst="02:00:00:0c:00:01")
                       / IP(src="192.168.40.1", dst="192.168.10.1", ttl=253)
                       / ICMP(type=0, id=5, seq=seq)
                       / Raw(filler(f"echo/192.168.10.1/{seq}", 76))), 1_500)
    # 9. more names, two asked twice: the second answers find the port closed
    for n, (name, twice) in enumerate([("a.example.com.", True), ("b.example.com.", False),
                                       ("c.example.com.", True), ("d.example.com.", False)]):
        q = Flow("udp", (LAN_HOST, 53010 + n), (GATEWAY, 53))
        query = DNS(id=0x4000 + n, rd=1, qd=DNSQR(qname=name))
        for _ in range(1 + twice):
            wire.send(q, True, UDP(sport=53010 + n, dport=53), bytes(query), 200)
        answer = DNS(id=0x4000 + n, qr=1, rd=1, ra=1, qd=DNSQR(qname=name),
                     an=DNSRR(rrname=name, ttl=60, rdata=f"203.0.113.{60 + n}"))
        for k in range(1 + twice):
            wire.send(q, False, UDP(sport=53, dport=53010 + n), bytes(answer), 3_000)
            if k:
                wire.raw(lan_frame(IP(src=LAN_HOST, dst=GATEWAY) / ICMP(type=3, code=3)
                                   / IPerror(src=GATEWAY, dst=LAN_HOST,
                                             len=28 + len(bytes(answer)))
                                   / UDPerror(sport=53, dport=53010 + n,
                                              len=8 + len(bytes(answer))), True), 100)
    # 10. an Ethernet pseudowire (control word) carrying VLAN 1 + ICMP echo, both directions
    for seq in range(5):
        for req, labels in ((True, (19, 16)), (False, (18, 16))):
            src, dst = ("192.168.1.1", "192.168.1.2")[:: 1 if req else -1]
            # MACs that let a reader tell the control word from a bare frame (Wireshark
            # guesses from them; with these it finds the control word, as in the original)
            macs = ("ce:00:0e:00:00:01", "ce:00:0e:00:00:02")[:: 1 if req else -1]
            inner = Ether(src=macs[0], dst=macs[1]) / Dot1Q(vlan=1) / IP(src=src, dst=dst, ttl=255) / ICMP(
                type=8 if req else 0, id=1, seq=seq) / Raw(filler(f"pw/{seq}", 80))
            wire.raw(bytes(mpls(*labels) / Raw(b"\x00\x00\x00\x00" + bytes(inner))), 700)
    for c in conns:
        if c is not conns[0]:
            c.seg(True, "FA", gap_us=500)
            c.seg(False, "FA", gap_us=8_000)
            c.seg(True, "A", gap_us=100)
    web_a.seg(True, "FA", gap_us=500)
    web_a.seg(False, "FA", gap_us=25_000)
    web_a.seg(True, "A", gap_us=100)
    return wire


CAPTURES: dict[str, Callable[[], Wire]] = {VXLAN_FILE: build_vxlan_dns_tls,
                                           JUNK_FILE: build_mixed_link_junk}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: here)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in CAPTURES.items():
        data = pcap_file(build().frames)
        (args.out / name).write_bytes(data)
        print(f"{args.out / name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
