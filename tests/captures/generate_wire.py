"""Writes the generated link-type and tunnel captures of tests/captures (issue 18), the same bytes
on every run.

    python -m tests.captures.generate_wire            # rewrite them in tests/captures
    python -m tests.captures.generate_wire --out DIR  # write them elsewhere (the test compares)

No public capture with a compatible licence holds these cases together, so they are built here
with the helpers of generate.py (fixed times, documentation addresses, SHAKE-256 filler, the
classic pcap format written by hand), each with the truth per flow (`Wire.flows`):

- `generated_sll_geneve_gpe.pcap`, Linux cooked capture (LINKTYPE_LINUX_SLL, 113), as
  `tcpdump -i any` writes: a plain IPv4 HTTP connection; Geneve (RFC 8926, UDP/6081) with a
  critical option carrying IPv4 without Ethernet (protocol type 0x0800), VNI 5001, a TCP
  connection; Geneve with inner Ethernet (0x6558) and two options, VNI 5002, IPv6 DNS over UDP;
  VXLAN-GPE (UDP/4790) with next protocol IPv6 (2), VNI 6001, an IPv6 TCP connection; VXLAN-GPE
  with next protocol Ethernet (3), VNI 6002, an ICMP echo; and one ARP frame (not IP).
- `generated_sll2_ipv6.pcap`, LINKTYPE_LINUX_SLL2 (276), as `tcpdump -i any` writes since
  libpcap 1.10: plain IPv6, a TCP connection seen from its handshake, a UDP exchange, and a
  TCP connection seen mid-flow (orientation by the port rule).
- `generated_raw_ip.pcap`, LINKTYPE_RAW (101), as a tun device or WireGuard gives it: plain IPv4
  and IPv6 TCP, and a VXLAN (UDP/4789, VNI 7007) packet pair carrying an inner IPv4 UDP flow
  (a tunnel over a raw-IP link).
- `generated_nested_tunnels.pcap`, Ethernet: nested tunnels, as a Kubernetes cluster on VMs
  whose cloud network is itself an overlay puts them on the wire: an HTTP connection in VXLAN
  (VNI 7, inner Ethernet) inside Geneve (VNI 99) over an IPv6 underlay; the same inner
  connection (same addresses, ports and VNI 7) inside Geneve VNI 98, a different flow; a UDP
  exchange three tunnels deep (VXLAN in VXLAN in VXLAN-GPE carrying IPv4 without Ethernet); and
  one frame four tunnels deep (counted as `tunnel_depth`, not a flow).
"""

from __future__ import annotations

import argparse
import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

from scapy.contrib.geneve import GENEVE
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Packet, Raw

from tests.captures.generate import Flow, Tcp, Wire, filler, pcap_file

HERE = Path(__file__).resolve().parent
SLL_FILE = "generated_sll_geneve_gpe.pcap"
SLL2_FILE = "generated_sll2_ipv6.pcap"
RAW_FILE = "generated_raw_ip.pcap"
NESTED_FILE = "generated_nested_tunnels.pcap"
LINKTYPES = {SLL_FILE: 113, SLL2_FILE: 276, RAW_FILE: 101, NESTED_FILE: 1}
VTEP_A, VTEP_B = "198.51.100.21", "198.51.100.22"
VTEP6_A, VTEP6_B = "2001:db8:100::21", "2001:db8:100::22"
# the tunnel of each flow, as the records must show it: (type, vni, client VTEP, server VTEP,
# outer UDP port), by client port; None for plain traffic
TUNNELS: dict[str, dict[int, tuple | None]] = {}
# the nested capture's flows (Wire.flows, in order): each one's tunnels, outermost first, as
# (type, vni, client VTEP, server VTEP, outer UDP port)
NESTED_CHAINS: list[list[tuple]] = []


def sll(pkt: Packet, c2s: bool) -> bytes:
    """A Linux cooked header (16 bytes): packet type (0 to us, 4 outgoing), ARPHRD_ETHER, the
    sender's MAC, the protocol."""
    proto = 0x86DD if pkt.name == "IPv6" else 0x0806 if pkt.name == "ARP" else 0x0800
    mac = bytes.fromhex("020000000a01" if c2s else "020000000a02")
    return struct.pack("!HHH8sH", 4 if c2s else 0, 1, 6, mac + b"\0\0", proto) + bytes(pkt)


def sll2(pkt: Packet, c2s: bool) -> bytes:
    """A LINUX_SLL2 header (20 bytes): protocol, reserved, interface index, ARPHRD_ETHER,
    packet type, MAC length, the sender's MAC."""
    proto = 0x86DD if pkt.name == "IPv6" else 0x0800
    mac = bytes.fromhex("020000000b01" if c2s else "020000000b02")
    return struct.pack("!HHIHBB8s", proto, 0, 3, 1, 4 if c2s else 0, 6, mac + b"\0\0") + bytes(pkt)


def raw_ip(pkt: Packet, c2s: bool) -> bytes:
    return bytes(pkt)


def tunnel(link: Callable[[Packet, bool], bytes], wrap: Callable[[Packet, bool], Packet]
           ) -> Callable[[Packet, bool], bytes]:
    return lambda pkt, c2s: link(wrap(pkt, c2s), c2s)


def outer(c2s: bool, six: bool = False) -> Packet:
    a, b = (VTEP6_A, VTEP6_B) if six else (VTEP_A, VTEP_B)
    return (IPv6(src=a, dst=b) if six else IP(src=a, dst=b, flags="DF")) if c2s else (
        IPv6(src=b, dst=a) if six else IP(src=b, dst=a, flags="DF"))


def geneve_options(n: int, critical: bool) -> bytes:
    """n options of 4 bytes of data each (class 0x0102, type with the critical bit 0x80)."""
    return b"".join(struct.pack("!HBB", 0x0102, (0x80 if critical else 0) | i, 1)
                    + filler(f"opt/{i}", 4) for i in range(n))


def http(wire: Wire, client: tuple[str, int], server: tuple[str, int], page: int) -> Tcp:
    c = Tcp(wire, client, server)
    c.open(rtt_us=2_000)
    c.write(True, b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n", rtt_us=300)
    c.write(False, filler(f"page/{client}", page), rtt_us=2_000)
    c.seg(True, "FA", gap_us=400)
    c.seg(False, "FA", gap_us=2_000)
    c.seg(True, "A", gap_us=100)
    return c


def build_sll_geneve_gpe() -> Wire:
    tunnels = TUNNELS.setdefault(SLL_FILE, {})
    wire = Wire(sll)
    http(wire, ("192.0.2.31", 51001), ("203.0.113.80", 80), 5_000)
    tunnels[51001] = None
    # Geneve, inner IPv4 without Ethernet, one critical option (a transit observer decodes it)
    opt = geneve_options(1, critical=True)
    wire.to_frame = tunnel(sll, lambda p, c2s: outer(c2s) / UDP(sport=40001, dport=6081)
                           / GENEVE(vni=5001, proto=0x0800, optionlen=len(opt) // 4, critical=1)
                           / Raw(opt) / p)
    http(wire, ("10.50.1.11", 51002), ("10.50.2.22", 8080), 3_000)
    tunnels[51002] = ("geneve", 5001, VTEP_A, VTEP_B, 6081)
    # Geneve, inner Ethernet, two options: DNS over IPv6
    opts = geneve_options(2, critical=False)
    wire.to_frame = tunnel(sll, lambda p, c2s: outer(c2s) / UDP(sport=40002, dport=6081)
                           / GENEVE(vni=5002, proto=0x6558, optionlen=len(opts) // 4) / Raw(opts)
                           / Ether(src="0a:00:00:00:00:01", dst="0a:00:00:00:00:02") / p)
    dns = Flow("udp", ("fd00:50::11", 51003), ("fd00:50::53", 53))
    wire.flows.append(dns)
    for qid in (0x2001, 0x2002):
        q = DNS(id=qid, rd=1, qd=DNSQR(qname="svc.example.com.", qtype="AAAA"))
        wire.send(dns, True, UDP(sport=51003, dport=53), bytes(q), 500)
        a = DNS(id=qid, qr=1, rd=1, ra=1, qd=q.qd,
                an=DNSRR(rrname="svc.example.com.", type="AAAA", ttl=30, rdata="fd00:50::80"))
        wire.send(dns, False, UDP(sport=53, dport=51003), bytes(a), 700)
    tunnels[51003] = ("geneve", 5002, VTEP_A, VTEP_B, 6081)
    # VXLAN-GPE, next protocol IPv6 (no Ethernet), over an IPv6 underlay
    wire.to_frame = tunnel(sll, lambda p, c2s: outer(c2s, six=True) / UDP(sport=40003, dport=4790)
                           / VXLAN(flags=0x0C, NextProtocol=2, vni=6001) / p)
    http(wire, ("fd00:60::11", 51004), ("fd00:60::22", 443), 2_000)
    tunnels[51004] = ("vxlan-gpe", 6001, VTEP6_A, VTEP6_B, 4790)
    # VXLAN-GPE, next protocol Ethernet: an ICMP echo, twice
    wire.to_frame = tunnel(sll, lambda p, c2s: outer(c2s) / UDP(sport=40004, dport=4790)
                           / VXLAN(flags=0x0C, NextProtocol=3, vni=6002)
                           / Ether(src="0a:00:00:00:00:03", dst="0a:00:00:00:00:04") / p)
    ping = Flow("icmp", ("10.60.1.11", 0), ("10.60.2.22", 0))
    wire.flows.append(ping)
    for seq in range(2):
        wire.send(ping, True, ICMP(type=8, id=9, seq=seq), filler(f"ping/{seq}", 56), 1_000)
        wire.send(ping, False, ICMP(type=0, id=9, seq=seq), filler(f"ping/{seq}", 56), 400)
    tunnels[0] = ("vxlan-gpe", 6002, VTEP_A, VTEP_B, 4790)
    wire.raw(sll(ARP(op=1, hwsrc="02:00:00:00:0a:01", psrc="192.0.2.31", pdst="192.0.2.1"),
                 True), 1_000)
    return wire


def build_sll2_ipv6() -> Wire:
    tunnels = TUNNELS.setdefault(SLL2_FILE, {})
    wire = Wire(sll2)
    http(wire, ("2001:db8:1::31", 52001), ("2001:db8:2::80", 80), 4_000)
    tunnels[52001] = None
    ntp = Flow("udp", ("2001:db8:1::31", 52002), ("2001:db8:2::123", 123))
    wire.flows.append(ntp)
    for i in range(3):
        wire.send(ntp, True, UDP(sport=52002, dport=123), filler(f"ntp/q{i}", 48), 10_000)
        wire.send(ntp, False, UDP(sport=123, dport=52002), filler(f"ntp/a{i}", 48), 900)
    tunnels[52002] = None
    mid = Tcp(wire, ("2001:db8:1::31", 52003), ("2001:db8:2::6379", 6379))  # no handshake seen
    for i in range(3):
        mid.write(True, b"GET key%d\r\n" % i, rtt_us=500, ack_last=False)
        mid.write(False, b"$5\r\nvalue\r\n", rtt_us=300, ack_last=False)
    tunnels[52003] = None
    return wire


def build_raw_ip() -> Wire:
    tunnels = TUNNELS.setdefault(RAW_FILE, {})
    wire = Wire(raw_ip)
    http(wire, ("192.0.2.41", 53001), ("203.0.113.81", 80), 2_500)
    tunnels[53001] = None
    http(wire, ("2001:db8:3::41", 53002), ("2001:db8:4::81", 8443), 1_500)
    tunnels[53002] = None
    wire.to_frame = tunnel(raw_ip, lambda p, c2s: outer(c2s) / UDP(sport=40005, dport=4789)
                           / VXLAN(vni=7007, flags=0x08)
                           / Ether(src="0a:00:00:00:00:05", dst="0a:00:00:00:00:06") / p)
    syslog = Flow("udp", ("10.70.1.11", 53003), ("10.70.2.22", 514))
    wire.flows.append(syslog)
    wire.send(syslog, True, UDP(sport=53003, dport=514), b"<13>hello from 10.70.1.11", 3_000)
    wire.send(syslog, False, UDP(sport=514, dport=53003), b"ack", 500)
    tunnels[53003] = ("vxlan", 7007, VTEP_A, VTEP_B, 4789)
    return wire


def ether(pkt: Packet, c2s: bool) -> bytes:
    a, b = "02:00:00:00:0c:01", "02:00:00:00:0c:02"
    return bytes(Ether(src=a if c2s else b, dst=b if c2s else a) / pkt)


def wrap(layers: list[tuple[str, int, str, str, int, int]]) -> Callable[[Packet, bool], Packet]:
    """Tunnels around an IP packet, outermost first: (type, vni, client VTEP, server VTEP, UDP
    port, source port); VXLAN and Geneve carry Ethernet, VXLAN-GPE IPv4 or IPv6 without it."""
    def put(pkt: Packet, c2s: bool) -> Packet:
        for kind, vni, vc, vs, port, sport in reversed(layers):
            src, dst = (vc, vs) if c2s else (vs, vc)
            ip = (IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst, flags="DF"))
            inner_eth = Ether(src="0a:00:00:00:0c:01", dst="0a:00:00:00:0c:02")
            if kind == "vxlan":
                head = VXLAN(vni=vni, flags=0x08) / inner_eth
            elif kind == "geneve":
                head = GENEVE(vni=vni, proto=0x6558) / inner_eth
            else:
                head = VXLAN(flags=0x0C, NextProtocol=2 if pkt.name == "IPv6" else 1, vni=vni)
            pkt = ip / UDP(sport=sport, dport=port) / head / pkt
        return pkt
    return put


def build_nested() -> Wire:
    NESTED_CHAINS.clear()
    wire = Wire(ether)
    under = ("2001:db8:200::1", "2001:db8:200::2")  # the cloud's hosts (IPv6 underlay)
    vms = ("10.200.0.1", "10.200.0.2")              # the VMs, the cluster's VTEPs
    for cloud_vni, sport in ((99, 40101), (98, 40102)):
        chain = [("geneve", cloud_vni, *under, 6081, sport), ("vxlan", 7, *vms, 4789, 40201)]
        wire.to_frame = tunnel(ether, wrap(chain))
        http(wire, ("10.244.1.5", 54001), ("10.244.2.7", 8080), 3_000)
        NESTED_CHAINS.append([c[:5] for c in chain])
    chain = [("vxlan-gpe", 4001, "192.0.2.201", "192.0.2.202", 4790, 40301),
             ("vxlan", 11, "198.51.100.201", "198.51.100.202", 4789, 40302),
             ("vxlan", 12, "203.0.113.201", "203.0.113.202", 8472, 40303)]
    wire.to_frame = tunnel(ether, wrap(chain))
    stats = Flow("udp", ("10.245.1.9", 54002), ("10.245.2.9", 8125))
    wire.flows.append(stats)
    for i in range(2):
        wire.send(stats, True, UDP(sport=54002, dport=8125), b"requests:1|c", 2_000)
        wire.send(stats, False, UDP(sport=8125, dport=54002), b"ok %d" % i, 300)
    NESTED_CHAINS.append([c[:5] for c in chain])
    deeper = [("vxlan", 1, "192.0.2.1", "192.0.2.2", 4789, 40401), *chain]
    wire.raw(ether(wrap(deeper)(IP(src="10.245.1.9", dst="10.245.2.9") / UDP(sport=54003, dport=53)
                                / Raw(b"too deep"), True), True), 1_000)
    return wire


CAPTURES: dict[str, Callable[[], Wire]] = {SLL_FILE: build_sll_geneve_gpe,
                                           SLL2_FILE: build_sll2_ipv6, RAW_FILE: build_raw_ip,
                                           NESTED_FILE: build_nested}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: here)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in CAPTURES.items():
        data = pcap_file(build().frames, LINKTYPES[name])
        (args.out / name).write_bytes(data)
        print(f"{args.out / name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
