"""The generated captures of tests/captures: `generate.py` writes the committed bytes again, and
the files hold what tests/captures/README.md says they hold, read back with scapy (not with the
collector under test, and not with the generator's own bookkeeping)."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, LLC, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from tests.captures import generate

SCRIPT = Path(generate.__file__)


def test_regenerating_writes_the_committed_bytes(tmp_path: Path, pcaps: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    for name in generate.CAPTURES:
        assert (tmp_path / name).read_bytes() == (pcaps / name).read_bytes(), name


def test_the_vxlan_capture_is_tagged_tunnelled_and_holds_four_inner_flows(pcaps: Path) -> None:
    frames = rdpcap(str(pcaps / generate.VXLAN_FILE))
    assert len(frames) == 89
    flows: collections.Counter = collections.Counter()
    for f in frames:
        assert f[Dot1Q].vlan == 5 and f[Dot1Q].type == 0x0800
        assert {f[IP].src, f[IP].dst} == {"198.51.100.4", "198.51.100.5"}
        assert f[UDP].dport == 4789 and f[UDP].chksum == 0
        assert f[VXLAN].vni == 1111 and f[VXLAN].flags == 0x08
        inner = f[VXLAN].payload[IP]
        l4 = inner[TCP] if TCP in inner else inner[UDP]
        ends = frozenset({(inner.src, l4.sport), (inner.dst, l4.dport)})
        flows[(type(l4).__name__, ends)] += 1
    client = "192.0.2.4"
    assert flows == {
        ("UDP", frozenset({(client, 40101), ("192.0.2.53", 53)})): 4,
        ("TCP", frozenset({(client, 50100), ("203.0.113.35", 443)})): 23,
        ("UDP", frozenset({(client, 40102), ("192.0.2.53", 53)})): 4,
        ("TCP", frozenset({(client, 50102), ("203.0.113.35", 443)})): 58,
    }
    resets = [f for f in frames if TCP in f[VXLAN].payload and "R" in f[VXLAN].payload[TCP].flags]
    assert len(resets) == 2


def label_stack(frame: bytes) -> tuple[int, int]:
    """(labels, offset after the bottom label) of an MPLS frame (RFC 3032: S bit, 4-byte entries)."""
    labels, off = 0, 14
    while True:
        labels, bottom, off = labels + 1, frame[off + 2] & 1, off + 4
        if bottom:
            return labels, off


def kind(f) -> str:
    b = bytes(f)
    if b[12:14] == b"\x88\x47":   # MPLS: an IP packet starts with 4 or 6, a control word with 0
        labels, off = label_stack(b)
        return "mpls-pw" if b[off] >> 4 == 0 else f"mpls-{labels}-label"
    if LLC in f:
        return "llc"
    if ARP in f:
        return "arp"
    if IPv6 in f:
        return "ipv6-tcp" if TCP in f else "ipv6"
    if f.type == 0x9000:
        return "loopback"
    return {6: "ipv4-tcp", 17: "ipv4-udp", 1: "ipv4-icmp", 2: "ipv4-igmp", 88: "ipv4-eigrp"}[
        f[IP].proto]


def test_the_junk_capture_has_no_tunnel_and_every_kind_of_odd_frame(pcaps: Path) -> None:
    frames = rdpcap(str(pcaps / generate.JUNK_FILE))
    assert len(frames) == 157
    assert not any(UDP in f and 4789 in (f[UDP].sport, f[UDP].dport) for f in frames)
    assert collections.Counter(kind(f) for f in frames) == {
        "ipv4-tcp": 99, "ipv4-udp": 16, "ipv4-icmp": 9, "ipv4-igmp": 3, "ipv4-eigrp": 1,
        "arp": 1, "mpls-2-label": 1, "mpls-1-label": 5, "mpls-pw": 10, "ipv6-tcp": 10,
        "llc": 1, "loopback": 1}
    for f in frames:
        if kind(f) == "mpls-pw":   # control word, then Ethernet + 802.1Q VLAN 1 + IPv4 ICMP
            b = bytes(f)
            _, off = label_stack(b)
            inner = Ether(b[off + 4:])
            assert b[off:off + 4] == bytes(4)
            assert inner[Dot1Q].vlan == 1 and inner[IP].proto == 1
    assert len(bytes(frames[kind_index(frames, "llc")])) == 1514
    assert len(bytes(frames[kind_index(frames, "arp")])) == 42


def kind_index(frames, k: str) -> int:
    (i,) = [i for i, f in enumerate(frames) if kind(f) == k]
    return i
