"""The wire sources' configuration, without root: tunnel ports from the flags (and their
errors), the live kernel filter run on frames by a small classic-BPF interpreter, the link type
a device's ARPHRD gives, and which live sources `--wire-interface` / `--underlay` start."""

from __future__ import annotations

import argparse
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from collector import main
from collector.pipeline import CollectorContext
from collector.vxlan import capture, live
from collector.vxlan.packets import Policy
from collector.vxlan.source import policy_from
from eastwest.errors import ConfigError


def ns(**kw) -> argparse.Namespace:
    base = {"vxlan_port": [], "geneve_port": [], "gpe_port": [], "pcap": [], "no_socket": True,
            "no_vxlan": False, "underlay": [], "wire_interface": [], "netns": [],
            "decoder": "bulk", "interval": 5.0, "idle_timeout": 30.0}
    return argparse.Namespace(**(base | kw))


# -- tunnel ports ---------------------------------------------------------------------------
def test_default_tunnel_ports_and_each_flag_replacing_its_own() -> None:
    assert policy_from(ns(), plain=True) == Policy((4789, 8472), (6081,), (4790,), True)
    got = policy_from(ns(geneve_port=[6082, 6081], gpe_port=[4791]), plain=False)
    assert got == Policy((4789, 8472), (6082, 6081), (4791,), False)
    assert got.kinds() == {4789: 1, 8472: 1, 6082: 2, 6081: 2, 4791: 3}
    assert got.table()[6082] == 2 and got.table()[53] == 0 and len(got.table()) == 65536


@pytest.mark.parametrize(("kw", "message"), [
    ({"geneve_port": [4789]}, "--geneve-port=4789: is already a tunnel port of --vxlan-port"),
    ({"gpe_port": [70000]}, "--gpe-port=70000: must be a UDP port 1..65535"),
    ({"vxlan_port": [0]}, "--vxlan-port=0: must be a UDP port 1..65535"),
])
def test_a_bad_or_shared_tunnel_port_names_its_flag_and_value(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        policy_from(ns(**kw), plain=True)
    assert message in str(err.value)


# -- the kernel filter ----------------------------------------------------------------------
def run_bpf(prog: list[tuple[int, int, int, int]], pkt: bytes) -> int:
    """The classic BPF instructions capture.kernel_filter uses, on one packet: bytes kept."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == capture.LDH_ABS:
            a = struct.unpack_from("!H", pkt, k)[0] if k + 2 <= len(pkt) else None
        elif code == capture.LDB_ABS:
            a = pkt[k] if k < len(pkt) else None
        elif code == capture.LDH_IND:
            a = struct.unpack_from("!H", pkt, x + k)[0] if x + k + 2 <= len(pkt) else None
        elif code == capture.LDXB_MSH:
            x = (pkt[k] & 0x0F) * 4
        elif code == capture.JEQ:
            pc += jt if a == k else jf
        elif code == capture.JSET:
            pc += jt if a & k else jf
        elif code == 0x05:  # JA
            pc += k
        elif code == capture.RET:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")
        if a is None:  # a load past the end: the kernel returns 0
            return 0


def frame(dport: int, *, six: bool = False, tcp: bool = False, vlan: bool = False) -> bytes:
    ip = IPv6(src="fd00::1", dst="fd00::2") if six else IP(src="10.0.0.1", dst="10.0.0.2")
    l4 = TCP(dport=dport) if tcp else UDP(sport=40000, dport=dport)
    eth = Ether() / Dot1Q(vlan=5) if vlan else Ether()
    return bytes(eth / ip / l4 / Raw(b"\x08" + b"\x00" * 20))


def test_the_underlay_filter_keeps_udp_to_every_tunnel_port_and_vlan_frames_only() -> None:
    prog = capture.kernel_filter(policy_from(ns(), plain=False).ports)
    for port in (4789, 8472, 6081, 4790):
        assert run_bpf(prog, frame(port)) == capture.SNAP
        assert run_bpf(prog, frame(port, six=True)) == capture.SNAP
    assert run_bpf(prog, frame(53)) == 0
    assert run_bpf(prog, frame(6081, tcp=True)) == 0
    assert run_bpf(prog, frame(80, tcp=True, vlan=True)) == capture.SNAP  # sorted out later
    custom = capture.kernel_filter(policy_from(ns(geneve_port=[6082]), plain=False).ports)
    assert run_bpf(custom, frame(6082)) == capture.SNAP and run_bpf(custom, frame(6081)) == 0


def test_device_types_map_to_the_link_types_the_decoder_reads() -> None:
    assert capture.ARPHRD_LINKTYPES[1] == 1          # Ethernet
    assert capture.ARPHRD_LINKTYPES[772] == 1        # loopback: a zeroed Ethernet header
    assert capture.ARPHRD_LINKTYPES[0xFFFE] == 101   # tun, WireGuard: raw IP
    assert 24 not in capture.ARPHRD_LINKTYPES        # e.g. FireWire: refused at start


# -- which live sources -----------------------------------------------------------------------
class FakeLive:
    def __init__(self, ctx: CollectorContext, args: argparse.Namespace, *,
                 wire: bool = False) -> None:
        self.wire = wire
        self.specs = list(args.wire_interface if wire else args.underlay or ["<vxlan devices>"])


@pytest.mark.parametrize(("kw", "has_vxlan_devices", "want"), [
    ({}, True, [(False, ["<vxlan devices>"])]),
    ({"wire_interface": ["eth0"]}, True, [(True, ["eth0"])]),
    ({"wire_interface": ["eth0", "ns1/eth1"], "underlay": ["eth2"]}, False,
     [(True, ["eth0", "ns1/eth1"]), (False, ["eth2"])]),
    ({"wire_interface": ["eth0"], "no_vxlan": True}, True, [(True, ["eth0"])]),
    ({"underlay": ["eth2"], "no_vxlan": True}, True, "error"),
])
def test_wire_interfaces_replace_the_default_underlay_and_only_it(monkeypatch, kw: dict,
                                                                   has_vxlan_devices: bool,
                                                                   want) -> None:
    monkeypatch.setattr(live, "LiveVxlanSource", FakeLive)
    monkeypatch.setattr(live, "live_capture_wanted",
                        lambda args: bool(args.underlay) or has_vxlan_devices)
    ctx = CollectorContext(collector_id="t")
    if want == "error":
        with pytest.raises(ConfigError, match="every source is disabled"):
            main.make_sources(ctx, ns(**kw))
        return
    got = main.make_sources(ctx, ns(**kw))
    assert [(s.wire, s.specs) for s in got] == want  # type: ignore[attr-defined]


def test_collector_help_names_the_new_flags() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "eastwest", "collector", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--wire-interface", "--geneve-port", "--gpe-port", "--vxlan-port"):
        assert flag in out
