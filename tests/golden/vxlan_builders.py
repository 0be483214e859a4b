"""Known-truth VXLAN captures built with scapy, for the golden and differential tests.

`build_known_truth()` returns the frames (with times), the truth per inner flow (what a correct
decoder must report) and the exact drop counts the junk packets in it must produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

T0 = 1_700_000_000.0


def encap(inner, *, vni: int, vtep_src: str, vtep_dst: str, dport: int = 4789,
          outer6: bool = False, vlan: int | None = None, sport: int = 40000) -> bytes:
    outer_ip = IPv6(src=vtep_src, dst=vtep_dst) if outer6 else IP(src=vtep_src, dst=vtep_dst)
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    pkt = eth / outer_ip / UDP(sport=sport, dport=dport) / VXLAN(vni=vni, flags=0x08) / inner
    return bytes(pkt)


@dataclass
class TruthFlow:
    protocol: str
    client: tuple[str, int]
    server: tuple[str, int]
    vni: int
    vteps: tuple[str, str]   # client side VTEP, server side VTEP
    packets: list[int] = field(default_factory=lambda: [0, 0])   # c2s, s2c
    payload: list[int] = field(default_factory=lambda: [0, 0])
    l3: list[int] = field(default_factory=lambda: [0, 0])


@dataclass
class Capture:
    frames: list[tuple[float, bytes]] = field(default_factory=list)
    flows: list[TruthFlow] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)

    def send(self, t: float, flow: TruthFlow, c2s: bool, l4, payload: bytes, *,
             inner_vlan: int | None = None, v6ext: bool = False, **encap_kw) -> None:
        (cip, _), (sip, _) = flow.client, flow.server
        src, dst = (cip, sip) if c2s else (sip, cip)
        six = ":" in cip
        ip = IPv6(src=src, dst=dst) if six else IP(src=src, dst=dst)
        if v6ext:
            ip = ip / IPv6ExtHdrDestOpt()
        eth = Ether(src="0a:00:00:00:00:01", dst="0a:00:00:00:00:02")
        if inner_vlan is not None:
            eth = eth / Dot1Q(vlan=inner_vlan)
        inner = eth / ip / l4 / Raw(payload) if payload else eth / ip / l4
        vs, vd = flow.vteps if c2s else flow.vteps[::-1]
        frame = encap(inner, vni=flow.vni, vtep_src=vs, vtep_dst=vd, **encap_kw)
        d = 0 if c2s else 1
        flow.packets[d] += 1
        flow.payload[d] += len(payload)
        flow.l3[d] += len(bytes(ip / l4 / Raw(payload))) if payload else len(bytes(ip / l4))
        self.frames.append((t, frame))

    def junk(self, t: float, frame: bytes, reason: str) -> None:
        self.frames.append((t, frame))
        self.drops[reason] = self.drops.get(reason, 0) + 1


def build_known_truth() -> Capture:
    cap = Capture()
    t = T0
    # 1. TCP over IPv4: handshake, 3 requests/replies, FIN close; VNI 42, port 4789
    f = TruthFlow("tcp", ("10.244.1.11", 41000), ("10.244.2.12", 8080), 42,
                  ("10.213.0.1", "10.213.0.2"))
    cap.flows.append(f)
    seq = [(True, "S", b""), (False, "SA", b""), (True, "A", b"")]
    for i in range(3):
        seq += [(True, "PA", b"GET /%d" % i * 3), (False, "PA", b"x" * (100 + i)),
                (True, "A", b"")]
    seq += [(True, "FA", b""), (False, "FA", b""), (True, "A", b"")]
    for c2s, flags, data in seq:
        t += 0.01
        ports = (41000, 8080) if c2s else (8080, 41000)
        cap.send(t, f, c2s, TCP(sport=ports[0], dport=ports[1], flags=flags,
                                options=[("MSS", 1410)] if "S" in flags else []), data)
    # 2. UDP over IPv6 inside, outer IPv4 on 8472, inner VLAN tag; server port 5353 (no SYN)
    g = TruthFlow("udp", ("fd00::1:11", 45000), ("fd00::3:12", 5353), 7,
                  ("10.213.0.1", "10.213.0.3"))
    cap.flows.append(g)
    for i in range(4):
        t += 0.02
        cap.send(t, g, True, UDP(sport=45000, dport=5353), b"q" * (20 + i), dport=8472,
                 inner_vlan=100)
        cap.send(t + 0.001, g, False, UDP(sport=5353, dport=45000), b"r" * (60 + i), dport=8472,
                 inner_vlan=100)
    # 3. ICMP echo over an IPv6 underlay with an outer VLAN tag; server replies first? no:
    h = TruthFlow("icmp", ("10.244.3.11", 0), ("10.244.1.12", 0), 42, ("fd10::3", "fd10::1"))
    cap.flows.append(h)
    for i in range(2):
        t += 0.05
        cap.send(t, h, True, ICMP(type=8, id=7, seq=i), b"p" * 32, outer6=True, vlan=5)
        cap.send(t + 0.001, h, False, ICMP(type=0, id=7, seq=i), b"p" * 32, outer6=True, vlan=5)
    # 4. TCP inner IPv6 with a Destination Options header (the bulk path's scapy fallback),
    #    seen mid-flow (no SYN): the lower, non-ephemeral port is the server
    k = TruthFlow("tcp", ("fd00::2:11", 50000), ("fd00::1:12", 6379), 99,
                  ("10.213.0.2", "10.213.0.1"))
    cap.flows.append(k)
    for i in range(3):
        t += 0.01
        cap.send(t, k, True, TCP(sport=50000, dport=6379, flags="PA"), b"SET a %d" % i,
                 v6ext=True)
        cap.send(t + 0.001, k, False, TCP(sport=6379, dport=50000, flags="PA"), b"+OK",
                 v6ext=True)
    # junk, each with its exact reason
    arp = Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.244.1.11", pdst="10.244.2.12")
    cap.junk(t + 0.1, encap(arp, vni=42, vtep_src="10.213.0.1", vtep_dst="10.213.0.2"),
             "inner_non_ip")
    geneve = bytes(Ether() / IP(src="10.213.0.1", dst="10.213.0.2") / UDP(sport=1, dport=6081)
                   / Raw(b"\x40" + b"\x00" * 39))  # Geneve version 1
    cap.junk(t + 0.11, geneve, "tunnel_version")
    gpe = bytes(Ether() / IP(src="10.213.0.1", dst="10.213.0.2") / UDP(sport=1, dport=4790)
                / Raw(b"\x0c" + b"\x00" * 40))  # VXLAN-GPE, next protocol 0
    cap.junk(t + 0.12, gpe, "inner_non_ip")
    lldp = bytes(Ether(dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x02\x07\x04" + b"\x00" * 40))
    cap.junk(t + 0.13, lldp, "non_ip")
    full = encap(Ether() / IP(src="10.244.1.11", dst="10.244.2.12") / TCP(), vni=42,
                 vtep_src="10.213.0.1", vtep_dst="10.213.0.2")
    cap.junk(t + 0.14, full[:60], "truncated")
    noi = bytearray(full)
    noi[42] = 0x00  # VXLAN flags without the I bit
    cap.junk(t + 0.15, bytes(noi), "vxlan_no_vni")
    bad = bytearray(full)
    bad[14 + 20 + 8 + 8 + 14] = 0x43  # inner IPv4 with IHL 3
    cap.junk(t + 0.16, bytes(bad), "malformed")
    return cap
