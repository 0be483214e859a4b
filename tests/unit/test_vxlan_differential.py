"""Differential test: the bulk (numpy) decoder equals the scapy reference on every column of
every packet, for hypothesis-generated packets (random VNIs, IPv4/IPv6 inner and outer, VLAN
tags, IP and TCP options, IPv6 extension headers, truncated and corrupted bytes) and for every
capture in tests/captures; and the flow records built from both are identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from collector.pipeline import CollectorContext
from collector.vxlan.bulk import decode_bulk
from collector.vxlan.flows import FlowTable
from collector.vxlan.packets import FALLBACK, Decoded
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
def inner_frame(draw):
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "arp", "other"]))
    if kind == "arp":
        return draw(l2()) / ARP()
    six = draw(st.booleans())
    ip = draw(ip_layer(six))
    if kind == "tcp":
        l4 = TCP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)),
                 flags=draw(st.integers(0, 255)),
                 options=draw(st.sampled_from([[], [("MSS", 1460)], [("NOP", None)] * 4])))
    elif kind == "udp":
        l4 = UDP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)))
    elif kind == "icmp":
        l4 = ICMPv6EchoRequest() if six else ICMP(type=draw(st.sampled_from([0, 3, 8])))
    else:
        l4 = Raw(b"\x00" * 8)
        ip = ip.copy()
        if six:
            ip.lastlayer().nh = 132
        else:
            ip.proto = 47
    return draw(l2()) / ip / l4 / Raw(draw(st.binary(max_size=40)))


@st.composite
def frame(draw) -> bytes:
    outer6 = draw(st.booleans())
    outer = draw(l2()) / draw(ip_layer(outer6))
    dport = draw(st.sampled_from([4789, 4789, 8472, 6081, 4790, 53]))
    vx = VXLAN(vni=draw(st.integers(0, 2**24 - 1)), flags=draw(st.sampled_from([0x08, 0x08, 0x00,
                                                                                 0xFF])))
    raw = bytearray(bytes(outer / UDP(sport=draw(st.integers(1, 65535)), dport=dport) / vx
                          / draw(inner_frame())))
    for _ in range(draw(st.integers(0, 2))):  # corrupt bytes
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # truncate
        raw = raw[:draw(st.integers(0, len(raw)))]
    return bytes(raw)


def both(frames: list[bytes]) -> tuple[Decoded, Decoded]:
    buf = np.frombuffer(b"".join(frames) or b"\x00", dtype=np.uint8)
    cap = np.array([len(f) for f in frames], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(cap)[:-1]]).astype(np.int64) if frames else cap
    ts = np.arange(len(frames), dtype=np.int64) * 1000 + 1_700_000_000_000_000
    return decode_bulk(buf, off, cap, ts, PORTS), decode_reference(frames, ts, PORTS)


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
    frames = fixed_sample(frame(), 300)
    bulk, ref = both(frames)
    assert_same(bulk, ref)
    seen = {REASONS[s - 1] for s in np.unique(bulk.status).tolist() if s}
    assert {"truncated", "not_vxlan", "inner_non_ip"} <= seen
    assert (bulk.status == 0).sum() > 10
