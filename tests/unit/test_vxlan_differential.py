"""Differential test: the bulk (numpy) decoder equals the scapy reference on every column of
every packet, for hypothesis-generated packets (VXLAN, Geneve with options and every protocol
type, VXLAN-GPE with every next protocol, plain traffic; random VNIs, IPv4/IPv6 inner and outer,
VLAN tags, IP and TCP options, IPv6 extension headers, nested tunnels; Ethernet, Linux cooked SLL/SLL2 and raw IP
link types; truncated and corrupted bytes) and for every capture in tests/captures; and the flow
records built from both are identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from collector.pipeline import CollectorContext
from collector.vxlan.bulk import decode_bulk
from collector.vxlan.flows import FlowTable
from collector.vxlan.packets import CODE, FALLBACK, MAX_TUNNELS, Decoded, Policy
from collector.vxlan.pcapfile import read_index
from collector.vxlan.reference import decode_reference
from tests.sampling import fixed_sample

PORTS = (4789, 8472)
v4 = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0)))
v6 = st.integers(0, 2**128 - 1).map(lambda n: ":".join(f"{(n >> s) & 0xFFFF:x}"
                                                        for s in range(112, -1, -16)))


@st.composite
def l2(draw):
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for _ in range(draw(st.integers(0, 3))):
        eth = eth / (Dot1AD if draw(st.booleans()) else Dot1Q)(vlan=draw(st.integers(0, 4095)))
    return eth


@st.composite
def ip_layer(draw, six: bool):
    if six:
        ip = IPv6(src=draw(v6), dst=draw(v6))
        for _ in range(draw(st.integers(0, 2))):
            ip = ip / (IPv6ExtHdrHopByHop() if draw(st.booleans()) else IPv6ExtHdrDestOpt())
        return ip
    opts = [IPOption_NOP()] * draw(st.sampled_from([0, 4, 8]))
    return IP(src=draw(v4), dst=draw(v4), options=opts,
              flags=draw(st.sampled_from([0, 0, 0, 1, 2])), frag=draw(st.sampled_from([0, 0, 5])))


@st.composite
def inner_frame(draw, ether: bool = True):
    """An inner packet: Ethernet (tags, IP, transport) or, with `ether` False, IP onwards."""
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "arp", "other"]))
    if kind == "arp":
        return draw(l2()) / ARP() if ether else Raw(draw(st.binary(min_size=1, max_size=30)))
    six = draw(st.booleans())
    ip = draw(ip_layer(six))
    if kind == "tcp":
        l4 = TCP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)),
                 flags=draw(st.integers(0, 255)),
                 options=draw(st.sampled_from([[], [("MSS", 1460)], [("NOP", None)] * 4])))
    elif kind == "udp":
        l4 = UDP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)))
    elif kind == "icmp":
        l4 = (draw(st.sampled_from([ICMPv6EchoRequest(), ICMPv6EchoRequest(), ICMPv6ND_NS(),
                                    ICMPv6ND_NA(), ICMPv6MLReport2()]))
              if six else ICMP(type=draw(st.sampled_from([0, 3, 8]))))
    else:
        l4 = Raw(b"\x00" * 8)
        ip = ip.copy()
        if six:
            ip.lastlayer().nh = 132
        else:
            ip.proto = 47
    pkt = ip / l4 / Raw(draw(st.binary(max_size=40)))
    return draw(l2()) / pkt if ether else pkt


@st.composite
def carried(draw, ether: bool, depth: int):
    """What a tunnel carries: an inner packet, or (now and then, up to one level deeper than
    the decoders take: `tunnel_depth`) an IP packet that is itself a tunnel (nested)."""
    if depth >= MAX_TUNNELS + 1 or draw(st.integers(0, 2)):
        return draw(inner_frame(ether=ether))
    pkt = draw(ip_layer(draw(st.booleans()))) / draw(tunnelled(depth + 1))
    return draw(l2()) / pkt if ether else pkt


@st.composite
def tunnelled(draw, depth: int = 1):
    """UDP to a tunnel port (or to 53) and what it carries; `depth`: tunnels so far."""
    vni = draw(st.integers(0, 2**24 - 1))
    kind = draw(st.sampled_from(["vxlan", "vxlan", "geneve", "geneve", "gpe", "dns"]))
    if kind == "vxlan":
        vx = VXLAN(vni=vni, flags=draw(st.sampled_from([0x08, 0x08, 0x00, 0xFF])))
        return UDP(sport=draw(st.integers(1, 65535)), dport=draw(st.sampled_from([4789, 8472]))) \
            / vx / draw(carried(True, depth))
    if kind == "geneve":
        proto = draw(st.sampled_from([0x6558, 0x6558, 0x0800, 0x86DD, 0x0806]))
        words = draw(st.sampled_from([0, 0, 1, 2, 5, 63]))
        gen = GENEVE(version=draw(st.sampled_from([0, 0, 0, 1, 2])), optionlen=words,
                     critical=draw(st.integers(0, 1)), oam=draw(st.integers(0, 1)), proto=proto,
                     vni=vni)
        inner = draw(carried(proto == 0x6558 or draw(st.integers(0, 5)) == 0, depth))
        return UDP(sport=1, dport=6081) / gen / Raw(draw(st.binary(min_size=words * 4,
                                                                   max_size=words * 4))) / inner
    if kind == "gpe":
        nxt = draw(st.sampled_from([1, 2, 3, 3, 4]))
        flags = draw(st.sampled_from([0x0C, 0x0C, 0x0D, 0x08, 0x04, 0x2C, 0x8C]))
        hdr = VXLAN(vni=vni, flags=flags) if not flags & 0x04 else VXLAN(vni=vni, flags=flags,
                                                                            NextProtocol=nxt)
        ether = nxt == 3 or not flags & 0x04
        return UDP(sport=2, dport=4790) / hdr / draw(carried(ether, depth))
    return UDP(sport=draw(st.integers(1, 65535)), dport=53) / Raw(draw(st.binary(max_size=30)))


LINKS = {1: "ethernet", 113: "sll", 276: "sll2", 101: "raw", 12: "raw", 228: "raw"}


@st.composite
def frame(draw, link: int = 1) -> bytes:
    """A frame of link type `link`, corrupted or cut now and then."""
    if draw(st.integers(0, 2)):
        pkt = draw(ip_layer(draw(st.booleans()))) / draw(tunnelled())
    else:
        pkt = draw(inner_frame(ether=False))
    et = 0x86DD if isinstance(pkt, IPv6) else 0x0800
    if LINKS[link] == "ethernet":
        pkt = draw(l2()) / pkt
    elif LINKS[link] == "sll":
        pkt = (CookedLinux(proto=et) / pkt if draw(st.integers(0, 4))
               else CookedLinux(proto=0x8100) / Dot1Q(vlan=3, type=et) / pkt)
    elif LINKS[link] == "sll2":
        pkt = CookedLinuxV2(proto=draw(st.sampled_from([et, et, 0x0806]))) / pkt
    raw = bytearray(bytes(pkt))
    for _ in range(draw(st.integers(0, 2))):  # corrupt bytes
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 2)) == 0:  # truncate
        raw = raw[:draw(st.integers(0, len(raw)))]
    return bytes(raw)


@st.composite
def linked_frame(draw) -> tuple[int, bytes]:
    link = draw(st.sampled_from([1, 113, 276, 101, 12, 228, 0, 105]))
    return link, draw(frame(link if link in LINKS else 1))


def both(frames: list[bytes], links: list[int] | None = None,
         policy: Policy | tuple[int, ...] = PORTS) -> tuple[Decoded, Decoded]:
    buf = np.frombuffer(b"".join(frames) or b"\x00", dtype=np.uint8)
    cap = np.array([len(f) for f in frames], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(cap)[:-1]]).astype(np.int64) if frames else cap
    ts = np.arange(len(frames), dtype=np.int64) * 1000 + 1_700_000_000_000_000
    lt = None if links is None else np.array(links, dtype=np.uint16)
    return (decode_bulk(buf, off, cap, ts, policy, lt),
            decode_reference(frames, ts, policy, lt))


def assert_same(bulk: Decoded, ref: Decoded) -> None:
    assert not (bulk.status == FALLBACK).any()
    for name in bulk.columns():
        a, b = getattr(bulk, name), getattr(ref, name)
        bad = np.flatnonzero(a != b)
        assert not len(bad), f"column {name} differs at rows {bad[:5]}: {a[bad[:5]]} != {b[bad[:5]]}"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frame(), min_size=1, max_size=6))
def test_bulk_equals_scapy_on_generated_packets(frames: list[bytes]) -> None:
    assert_same(*both(frames))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(linked_frame(), min_size=1, max_size=6), st.booleans())
def test_bulk_equals_scapy_on_every_link_type_and_policy(frames: list[tuple[int, bytes]],
                                                         plain: bool) -> None:
    policy = Policy(vxlan=PORTS, geneve=(6081,), gpe=(4790,), plain=plain)
    assert_same(*both([f for _, f in frames], [lt for lt, _ in frames], policy))


def records(d: Decoded) -> list:
    table = FlowTable(CollectorContext(collector_id="diff"), "pcap", idle_timeout=30)
    out = table.add(d) + table.tick(int(d.ts_us.max()) + 1) if len(d) else []
    return out + table.flush()


def test_bulk_equals_scapy_on_every_test_capture(pcaps: Path) -> None:
    captures = sorted(pcaps.glob("*.pcap"))
    assert len(captures) >= 9
    for path in captures:
        ix = read_index(str(path))
        frames = [ix.buf[o:o + c].tobytes() for o, c in zip(ix.off.tolist(), ix.cap.tolist(), strict=True)]
        bulk = decode_bulk(ix.buf, ix.off, ix.cap, ix.ts_us, PORTS, ix.linktype)
        ref = decode_reference(frames, ix.ts_us, PORTS, ix.linktype)
        assert_same(bulk, ref)
        assert records(bulk) == records(ref), path.name


def test_generated_mix_exercises_the_fallback_and_every_reason() -> None:
    """A guard that the generator reaches the cases it claims (a test that cannot fail is a
    defect): scapy fallback rows and several drop reasons must occur in a fixed sample."""
    from collector.vxlan.packets import REASONS
    frames = fixed_sample(frame(), 600)
    bulk, ref = both(frames)
    assert_same(bulk, ref)
    seen = {REASONS[s - 1] for s in np.unique(bulk.status).tolist() if s}
    # the message says how many frames were drawn and what each reason counted: a full-suite run
    # once missed `link_control` (not reproduced alone; 2026-12-07)
    codes, ns = np.unique(bulk.status, return_counts=True)
    counts = {REASONS[s - 1]: int(n) for s, n in zip(codes.tolist(), ns.tolist(), strict=True) if s}
    assert {"truncated", "malformed", "tunnel_version", "vxlan_no_vni", "inner_non_ip",
            "fragment", "link_control"} <= seen, (len(frames), counts)
    assert (bulk.status == 0).sum() > 10
    assert set(np.unique(bulk.ttype[bulk.status == 0]).tolist()) >= {0, 1}
    linked = fixed_sample(linked_frame(), 300)
    bulk, ref = both([f for _, f in linked], [lt for lt, _ in linked])
    assert_same(bulk, ref)
    seen = {REASONS[s - 1] for s in np.unique(bulk.status).tolist() if s}
    assert {"unsupported_linktype", "non_ip"} <= seen
    assert (bulk.status == 0).sum() > 10


def test_each_tunnel_type_and_inner_layer_decodes_to_its_type_vni_and_inner_flow() -> None:
    """Known answers, one frame per case: VXLAN; Geneve with options and the critical bit,
    inner Ethernet / IPv4 / IPv6; VXLAN-GPE next protocol IPv4 / IPv6 / Ethernet, and without
    the P bit; plain TCP. Every decoder agrees (`both`), and the row says what was built."""
    def inner(six: bool):
        ip = IPv6(src="fd00::1", dst="fd00::2") if six else IP(src="10.1.0.1", dst="10.1.0.2")
        return ip / TCP(sport=40000, dport=80, flags="S")

    opts = Raw(b"\x01\x02\x80\x01" + b"\xaa" * 4)  # class 0x0102, critical type 0x80, 4 bytes
    eth = Ether(src="0a:00:00:00:00:01", dst="0a:00:00:00:00:02")
    cases = [  # (what follows the outer UDP header, tunnel type, vni, six)
        (UDP(dport=4789) / VXLAN(vni=11, flags=0x08) / eth / inner(False), 1, 11, False),
        (UDP(dport=6081) / GENEVE(vni=21, proto=0x6558, optionlen=2, critical=1) / opts / eth
         / inner(True), 2, 21, True),
        (UDP(dport=6081) / GENEVE(vni=22, proto=0x0800) / inner(False), 2, 22, False),
        (UDP(dport=6081) / GENEVE(vni=23, proto=0x86DD, oam=1) / inner(True), 2, 23, True),
        (UDP(dport=4790) / VXLAN(vni=31, flags=0x0C, NextProtocol=1) / inner(False), 3, 31, False),
        (UDP(dport=4790) / VXLAN(vni=32, flags=0x0C, NextProtocol=2) / inner(True), 3, 32, True),
        (UDP(dport=4790) / VXLAN(vni=33, flags=0x0C, NextProtocol=3) / eth / inner(False), 3, 33,
         False),
        (UDP(dport=4790) / VXLAN(vni=34, flags=0x08) / eth / inner(True), 3, 34, True),
    ]
    frames = [bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / c[0]) for c in cases]
    frames.append(bytes(Ether() / inner(False)))
    bulk, ref = both(frames)
    assert_same(bulk, ref)
    assert bulk.status.tolist() == [0] * len(frames)
    assert bulk.ttype.tolist() == [c[1] for c in cases] + [0]
    assert bulk.vni.tolist() == [c[2] for c in cases] + [0]
    assert bulk.fam.tolist() == [6 if c[3] else 4 for c in cases] + [4]
    assert bulk.odport.tolist() == [int(bytes(c[0])[2:4].hex(), 16) for c in cases] + [0]
    assert bulk.ofam.tolist() == [4] * len(cases) + [0]
    assert set(bulk.sport.tolist()) == {40000} and set(bulk.flags.tolist()) == {0x02}
    underlay = both(frames, policy=Policy(plain=False))[0]
    assert underlay.status.tolist() == [0] * len(cases) + [CODE["not_tunnel"]]


def test_each_link_type_decodes_its_frames() -> None:
    """Known answers per link type: Ethernet, SLL (also with a VLAN tag), SLL2, raw IP under
    each number libpcap uses; an unknown link type is counted, never guessed."""
    ip4 = IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=5000, dport=53) / Raw(b"q" * 7)
    ip6 = IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5000, dport=53) / Raw(b"q" * 7)
    cases = [(1, Ether() / ip4), (113, CookedLinux(proto=0x0800) / ip4),
             (113, CookedLinux(proto=0x8100) / Dot1Q(vlan=9, type=0x86DD) / ip6),
             (276, CookedLinuxV2(proto=0x86DD) / ip6), (101, ip4), (101, ip6), (12, ip6),
             (14, ip4), (228, ip4), (229, ip6), (0, ip4), (113, CookedLinux(proto=0x0806) / ip4)]
    bulk, ref = both([bytes(p) for _, p in cases], [lt for lt, _ in cases])
    assert_same(bulk, ref)
    assert bulk.status.tolist() == [0] * 10 + [CODE["unsupported_linktype"], CODE["non_ip"]]
    assert bulk.fam[:10].tolist() == [4, 4, 6, 6, 4, 6, 6, 4, 4, 6]
    assert set(bulk.payload[:10].tolist()) == {7} and set(bulk.dport[:10].tolist()) == {53}


@st.composite
def nested_frame(draw) -> bytes:
    """Valid tunnels two to four deep (the fourth beyond the decoders: `tunnel_depth`), each
    level VXLAN, Geneve (inner Ethernet or IP) or VXLAN-GPE (next protocol IP or Ethernet),
    over IPv4 or IPv6, ending in a TCP or UDP packet."""
    levels = draw(st.integers(2, MAX_TUNNELS + 1))
    six = draw(st.booleans())
    ip = IPv6(src="fd00::1", dst="fd00::2") if six else IP(src="10.9.0.1", dst="10.9.0.2")
    pkt = ip / (TCP(sport=draw(st.integers(1, 65535)), dport=80) if draw(st.booleans())
                else UDP(sport=draw(st.integers(1, 65535)), dport=53)) / Raw(b"x" * 5)
    for _ in range(levels):
        vni = draw(st.integers(0, 2**24 - 1))
        kind = draw(st.sampled_from(["vxlan", "geneve", "geneve-ip", "gpe", "gpe-eth"]))
        eth = Ether(src="0a:00:00:00:00:01", dst="0a:00:00:00:00:02")
        ip_next = 0x86DD if isinstance(pkt, IPv6) else 0x0800
        if kind == "vxlan":
            head = UDP(dport=draw(st.sampled_from(PORTS))) / VXLAN(vni=vni, flags=0x08) / eth
        elif kind == "geneve":
            head = UDP(dport=6081) / GENEVE(vni=vni, proto=0x6558) / eth
        elif kind == "geneve-ip":
            head = UDP(dport=6081) / GENEVE(vni=vni, proto=ip_next)
        elif kind == "gpe":
            head = UDP(dport=4790) / VXLAN(vni=vni, flags=0x0C,
                                           NextProtocol=2 if ip_next == 0x86DD else 1)
        else:
            head = UDP(dport=4790) / VXLAN(vni=vni, flags=0x0C, NextProtocol=3) / eth
        six = draw(st.booleans())
        outer = IPv6(src=draw(v6), dst=draw(v6)) if six else IP(src=draw(v4), dst=draw(v4))
        pkt = outer / head / pkt
    return bytes(Ether() / pkt)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(nested_frame(), min_size=1, max_size=6))
def test_bulk_equals_scapy_on_nested_tunnels(frames: list[bytes]) -> None:
    bulk, ref = both(frames)
    assert_same(bulk, ref)
    assert set(bulk.status.tolist()) <= {0, CODE["tunnel_depth"]}
    assert (bulk.x1type[bulk.status == 0] != 0).all()


def test_nested_tunnels_decode_to_the_innermost_flow_with_the_whole_chain() -> None:
    """Known answers: VXLAN in Geneve (IPv6 underlay), three deep (VXLAN in VXLAN in
    VXLAN-GPE), and four deep (counted as `tunnel_depth`); x1 is the tunnel around the
    flow's own, x2 the one around that; the flow table keeps the chain, outermost first."""
    eth = Ether(src="0a:00:00:00:00:01", dst="0a:00:00:00:00:02")
    flow = IP(src="10.1.0.1", dst="10.1.0.2") / TCP(sport=40000, dport=80, flags="S")

    def vxlan(vni: int, a: str, b: str, port: int = 4789):
        return lambda p: IP(src=a, dst=b) / UDP(sport=1, dport=port) / VXLAN(vni=vni) / eth / p

    def geneve6(vni: int):
        return lambda p: (IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=2, dport=6081)
                          / GENEVE(vni=vni, proto=0x6558) / eth / p)

    def gpe(vni: int):
        return lambda p: (IP(src="192.0.2.7", dst="192.0.2.8") / UDP(sport=3, dport=4790)
                          / VXLAN(vni=vni, flags=0x0C, NextProtocol=1) / p)

    def build(*wraps) -> bytes:  # innermost wrap first
        pkt = flow
        for w in wraps:
            pkt = w(pkt)
        return bytes(Ether() / pkt)

    frames = [build(vxlan(7, "10.200.0.1", "10.200.0.2"), geneve6(99)),
              build(vxlan(12, "203.0.113.1", "203.0.113.2", 8472),
                    vxlan(11, "198.51.100.1", "198.51.100.2"), gpe(4001)),
              build(vxlan(1, "10.0.0.1", "10.0.0.2"), vxlan(2, "10.0.0.3", "10.0.0.4"),
                    vxlan(3, "10.0.0.5", "10.0.0.6"), vxlan(4, "10.0.0.7", "10.0.0.8"))]
    bulk, ref = both(frames)
    assert_same(bulk, ref)
    assert bulk.status.tolist() == [0, 0, CODE["tunnel_depth"]]
    assert bulk.ttype[:2].tolist() == [1, 1] and bulk.vni[:2].tolist() == [7, 12]
    assert bulk.odport[:2].tolist() == [4789, 8472]
    assert bulk.x1type[:2].tolist() == [2, 1] and bulk.x1vni[:2].tolist() == [99, 11]
    assert bulk.x1fam[:2].tolist() == [6, 4] and bulk.x1dport[:2].tolist() == [6081, 4789]
    assert bulk.x2type[:2].tolist() == [0, 3] and bulk.x2vni[:2].tolist() == [0, 4001]
    (r1, r2) = sorted((r for r in records(bulk) if r.final), key=lambda r: r.tunnel.vni)
    assert r1.tunnel.outer_src == "10.200.0.1" and r1.tunnel_outer is not None
    assert [(t.type, t.vni, t.outer_src, t.outer_dport) for t in r1.tunnel_outer] == [
        ("geneve", 99, "2001:db8::1", 6081)]
    assert r2.tunnel_outer is not None
    assert [(t.type, t.vni, t.outer_dst) for t in [*r2.tunnel_outer, r2.tunnel]] == [
        ("vxlan-gpe", 4001, "192.0.2.8"), ("vxlan", 11, "198.51.100.2"),
        ("vxlan", 12, "203.0.113.2")]


def test_neighbor_discovery_and_mld_are_link_control_not_flows() -> None:
    """ICMPv6 Neighbor Discovery (RS, RA, NS, NA, redirect) and MLD are IPv6's ARP: counted as
    `link_control`, plain or in a tunnel; an echo between the same addresses is a flow."""
    ip6 = IPv6(src="2001:db8::1", dst="2001:db8::2")
    eth = Ether(src="0a:00:00:00:00:01", dst="0a:00:00:00:00:02")
    from scapy.layers.inet6 import (
        ICMPv6MLQuery,
        ICMPv6ND_RA,
        ICMPv6ND_Redirect,
        ICMPv6ND_RS,
    )
    control = [ICMPv6ND_RS(), ICMPv6ND_RA(), ICMPv6ND_NS(tgt="2001:db8::2"), ICMPv6ND_NA(),
               ICMPv6ND_Redirect(), ICMPv6MLQuery(), ICMPv6MLReport2()]
    frames = [bytes(Ether() / ip6 / m) for m in control]
    frames += [bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(dport=4789)
                     / VXLAN(vni=5) / eth / ip6 / ICMPv6ND_NA()),
               bytes(Ether() / ip6 / ICMPv6EchoRequest())]
    bulk, ref = both(frames)
    assert_same(bulk, ref)
    assert bulk.status.tolist() == [CODE["link_control"]] * (len(control) + 1) + [0]


def test_icmp_types_with_longer_bodies_end_at_the_header() -> None:
    """An ICMP address-mask request (type 17) or timestamp (13) that ends after the 8-byte
    header: both decoders give its type (scapy's ICMP layer wanted the fields after the header
    and the reference raised instead; found by the generated-packets test)."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    frames = [bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2", proto=1) / bytes([t, 0]) / (b"\0" * 6))
              for t in (17, 13, 8)]
    assert_same(*both(frames))
