"""Golden tests: captures -> flow records, through `eastwest collector --pcap` as a user runs
it. The captures are in tests/captures (provenance in its README.md); expected records live
in tests/golden/expected/<capture>.jsonl (regenerate, then review the diff, with
EASTWEST_REGEN_GOLDEN=1). Independent checks: tshark decodes the same files inside the test,
CESNET's published flow record, the truth tests/captures/generate.py built its captures with,
and a scapy-built capture with known truth."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, PcapWriter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vxlan_builders import build_known_truth  # noqa: E402

from collector.vxlan.packets import MAX_TUNNELS  # noqa: E402
from tests.captures import generate, generate_wire  # noqa: E402

EXPECTED = HERE / "expected"
EASTWEST = [sys.executable, "-m", "eastwest"]
# what each capture holds (tunnel types, "plain" traffic, non-Ethernet link types): tests pick
# their captures by content, and a capture added to the folder must be described here
HOLDS: dict[str, set[str]] = {
    "CESNET_FlowTest_vxlan.pcap": {"vxlan"},
    "generated_vxlan_vlan_dns_tls.pcap": {"vxlan"},
    "OISF_suricata-verify_vxlan.pcap": {"vxlan"},
    "OISF_suricata-verify_vxlan-non-zero-reserved-fields_input.pcap": {"vxlan"},
    "the-tcpdump-group_tcpdump_vxlan_port_8472.pcap": {"vxlan"},
    "the-tcpdump-group_tcpdump_geneve.pcap": {"geneve"},
    "CESNET_FlowTest_http_get.pcap": {"plain"},
    "generated_mixed_link_junk.pcap": {"plain"},
    "zeek_zeek_var-services-std-ports.pcap": {"plain"},
    generate_wire.SLL_FILE: {"sll", "plain", "geneve", "vxlan-gpe"},
    generate_wire.SLL2_FILE: {"sll2", "plain"},
    generate_wire.RAW_FILE: {"raw", "plain", "vxlan"},
    generate_wire.NESTED_FILE: {"nested", "vxlan", "geneve", "vxlan-gpe"},
    "zeek_zeek_tunnels_geneve-ipv6.pcap": {"geneve"},
    "zeek_zeek_tunnels_geneve-many-options.pcap": {"geneve"},
    "zeek_zeek_tunnels_geneve-vxlan-dns-truncated.pcap": {"nested", "geneve", "vxlan"},
    "zeek_zeek_tunnels_vxlan-triple-v2.pcap": {"nested", "vxlan"},
}
TUNNEL_TYPES = {"vxlan", "geneve", "vxlan-gpe"}
TUNNEL_PORTS = {4789, 8472, 6081, 4790}


def holding(*kinds: str, only: bool = False) -> list[str]:
    """The captures that hold any of `kinds` (with `only`: nothing else)."""
    want = set(kinds)
    return sorted(n for n, h in HOLDS.items() if (h <= want if only else h & want))


VXLAN_CAPTURES = holding("vxlan", only=True)
TUNNEL_CAPTURES = holding(*TUNNEL_TYPES)
ALL_CAPTURES = sorted(HOLDS)


def collector(path: Path, *extra: str) -> tuple[list[dict], str]:
    run = subprocess.run(EASTWEST + ["collector", "--pcap", str(path), "--stdout",
                                     "--collector-id", "golden", *extra],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()], run.stderr


def finals(records: list[dict]) -> list[dict]:
    return [r for r in records if r["final"]]


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_capture_gives_the_expected_records(pcaps: Path, name: str) -> None:
    records, stderr = collector(pcaps / name)
    lines = [json.dumps(r, sort_keys=True) for r in records]
    drops = [line for line in stderr.splitlines() if "dropped" in line]
    got = "\n".join(lines + drops) + "\n"
    expected = EXPECTED / (name.removesuffix(".pcap") + ".jsonl")
    if os.environ.get("EASTWEST_REGEN_GOLDEN"):
        expected.write_text(got)
    assert got == expected.read_text()


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_scapy_decoder_gives_the_same_records(pcaps: Path, name: str) -> None:
    assert collector(pcaps / name, "--decoder", "scapy") == collector(pcaps / name)


def test_cesnet_published_flow_record(pcaps: Path) -> None:
    """CESNET FlowTest's validation record for vxlan.pcap: 4/4 packets, 336/336 inner bytes."""
    (rec,) = finals(collector(pcaps / "CESNET_FlowTest_vxlan.pcap")[0])
    assert (rec["packets_c2s"], rec["packets_s2c"]) == (4, 4)
    assert (rec["l3_bytes_c2s"], rec["l3_bytes_s2c"]) == (336, 336)
    assert rec["tunnel"]["vni"] == 123
    assert rec["protocol"] == "icmp" and rec["client"]["ip"] == "10.0.0.1"


def test_every_capture_in_the_folder_is_described_and_checked(pcaps: Path) -> None:
    assert sorted(ALL_CAPTURES) == sorted(p.name for p in pcaps.glob("*.pcap"))
    assert sorted(p.name.removesuffix(".jsonl") + ".pcap" for p in EXPECTED.glob("*.jsonl")) \
        == sorted(ALL_CAPTURES)


def test_generated_vxlan_capture_gives_the_flows_it_was_built_with(pcaps: Path) -> None:
    """generate.py counted what it put on the wire; the collector must find exactly that: four
    inner flows (two DNS, two TLS-shaped TCP sessions), all VNI 1111 between the two VTEPs,
    although every frame carries an 802.1Q tag on the underlay."""
    wire = generate.build_vxlan_dns_tls()
    records, stderr = collector(pcaps / generate.VXLAN_FILE)
    got = {(r["protocol"], r["client"]["port"]): r for r in finals(records)}
    assert len(got) == len(wire.flows) == 4
    assert [(f.protocol, f.packets) for f in wire.flows] == [
        ("udp", [2, 2]), ("tcp", [13, 10]), ("udp", [2, 2]), ("tcp", [25, 33])]
    for truth in wire.flows:
        r = got[(truth.protocol, truth.client[1])]
        assert (r["client"]["ip"], r["server"]["ip"], r["server"]["port"]) == (
            truth.client[0], *truth.server)
        assert [r["packets_c2s"], r["packets_s2c"]] == truth.packets
        assert [r["bytes_c2s"], r["bytes_s2c"]] == truth.payload
        assert [r["l3_bytes_c2s"], r["l3_bytes_s2c"]] == truth.l3
        assert r["tunnel"] == {"type": "vxlan", "vni": generate.VNI, "outer_dport": 4789,
                               "outer_src": generate.VTEP_C, "outer_dst": generate.VTEP_S}
    assert got[("tcp", 50100)]["connect"] == "reset" and got[("tcp", 50100)]["resets"] == 2
    assert got[("tcp", 50102)]["connect"] == "ok" and got[("tcp", 50102)]["resets"] == 0
    assert "dropped" not in stderr


def test_generated_plain_capture_gives_its_tcp_connections_and_counts_the_rest(pcaps: Path) -> None:
    """No tunnel: every TCP connection generate.py built is a plain flow (tunnel null) with its
    exact packets and bytes; the 19 frames that are not IP (ARP, 16 MPLS, LLC, loopback) are
    counted as non_ip, and nothing else is dropped."""
    wire = generate.build_mixed_link_junk()
    assert len(wire.frames) == 157
    records, stderr = collector(pcaps / generate.JUNK_FILE)
    got = {(r["client"]["ip"], r["client"]["port"]): r for r in finals(records)
           if r["protocol"] == "tcp"}
    assert len(got) == len(wire.flows) == 7
    for truth in wire.flows:
        r = got[truth.client]
        assert (r["server"]["ip"], r["server"]["port"]) == truth.server
        assert [r["packets_c2s"], r["packets_s2c"]] == truth.packets
        assert [r["bytes_c2s"], r["bytes_s2c"]] == truth.payload
        assert [r["l3_bytes_c2s"], r["l3_bytes_s2c"]] == truth.l3
        assert r["tunnel"] is None and r["observer"] == "path" and r["source"] == "pcap"
    assert all(r["tunnel"] is None for r in records)
    assert stderr.strip() == "eastwest collector: dropped vxlan/non_ip=19"


# frames in more tunnels than the decoders take (packets.MAX_TUNNELS): counted as
# `tunnel_depth`, not flows (tshark counts VXLAN-GPE as `vxlan`; count() of a protocol the frame
# lacks has no value, so each protocol alone and the sum are tested)
TOO_DEEP = (f"count(vxlan) > {MAX_TUNNELS} || count(geneve) > {MAX_TUNNELS} || "
            f"count(vxlan) + count(geneve) > {MAX_TUNNELS}")


def tshark_flows(path: Path) -> collections.Counter:
    """(tunnel chain, protocol, {endpoint, endpoint}) -> packets, as tshark decodes the
    tunnelled packets of the capture (VXLAN also on 8472; Geneve and VXLAN-GPE on their ports,
    tshark's defaults). The chain is each tunnel's (type, VNI), outermost first, in the order of
    the frame's protocol stack: each UDP header to a tunnel port with more layers after it, its
    type by the port as tshark dissects it (6081 Geneve, 4790 VXLAN-GPE, which tshark leaves
    out of frame.protocols, 4789 and 8472 VXLAN), its VNI the next of tshark's `vxlan.vni` or
    `geneve.vni` values. The innermost IP header and ports are the last occurrence of each
    field."""
    fields = ["frame.protocols", "vxlan.vni", "geneve.vni", "udp.dstport", "ip.src", "ip.dst",
              "ipv6.src", "ipv6.dst", "ip.proto", "ipv6.nxt", "tcp.srcport", "tcp.dstport",
              "udp.srcport"]
    cmd = ["tshark", "-n", "-r", str(path), "-d", "udp.port==8472,vxlan", "-Y",
           f"(vxlan || geneve) && !({TOO_DEEP})", "-T", "fields", "-E", "separator=|",
           "-E", "occurrence=a"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    counts: collections.Counter = collections.Counter()
    for line in out.splitlines():
        values = [v.split(",") for v in line.split("|")]
        (stack, vxvni, gvni, ud, s4, d4, s6, d6, p4, p6, ts, td, us) = (v[-1] for v in values)
        vx_vnis, gen_vnis = iter(values[1]), iter(values[2])
        layers = stack.split(":")
        udp_at = [i for i, layer in enumerate(layers) if layer == "udp"]
        chain, last_tunnel = [], 0
        for at, port in zip(udp_at, map(int, values[3]), strict=True):
            if port not in TUNNEL_PORTS or at == len(layers) - 1:
                continue
            if port == 6081:
                chain.append(("geneve", int(next(gen_vnis), 16)))
            else:
                chain.append(("vxlan-gpe" if port == 4790 else "vxlan", int(next(vx_vnis))))
            last_tunnel = at
        inner = [x for x in layers[last_tunnel + 1:] if x in ("ip", "ipv6")]
        if not inner:
            continue  # inner ARP and other non-IP frames: not flows
        src, dst, proto = (s6, d6, int(p6)) if inner[0] == "ipv6" else (s4, d4, int(p4))
        sport, dport = {6: (ts, td), 17: (us, ud)}.get(proto, ("0", "0"))
        name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(proto, "other")
        counts[(tuple(chain), name, frozenset({(src, int(sport)), (dst, int(dport))}))] += 1
    return counts


def tunnel_chain(record: dict) -> tuple[tuple[str, int], ...]:
    """A record's tunnels as (type, VNI), outermost first: `tunnel_outer` + [`tunnel`]."""
    return tuple((t["type"], t["vni"]) for t in [*(record["tunnel_outer"] or []),
                                                   record["tunnel"]])


@pytest.mark.parametrize("name", TUNNEL_CAPTURES)
def test_tshark_agrees_on_tunnels_vnis_tuples_and_packet_counts(pcaps: Path, name: str) -> None:
    """Per flow: the whole tunnel chain (each tunnel's type and VNI, nested ones too), the
    inner protocol and endpoints, and the packets, as tshark decodes them."""
    ours: collections.Counter = collections.Counter()
    for r in finals(collector(pcaps / name)[0]):
        if r["tunnel"] is None:
            continue
        key = (tunnel_chain(r), r["protocol"],
               frozenset({(r["client"]["ip"], r["client"]["port"]),
                          (r["server"]["ip"], r["server"]["port"])}))
        ours[key] += r["packets_c2s"] + r["packets_s2c"]
    theirs = tshark_flows(pcaps / name)
    assert theirs, "tshark decoded no tunnelled packet"
    assert {t for k in ours for t, _ in k[0]} == HOLDS[name] & TUNNEL_TYPES
    assert any(len(k[0]) > 1 for k in ours) == ("nested" in HOLDS[name])
    assert ours == theirs


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_frames_in_too_many_tunnels_are_the_ones_counted_as_tunnel_depth(pcaps: Path,
                                                                         name: str) -> None:
    """The frames tshark finds in more than MAX_TUNNELS tunnels (left out of its flows above)
    are exactly the `tunnel_depth` drops the collector reports."""
    out = subprocess.run(["tshark", "-n", "-r", str(pcaps / name), "-d", "udp.port==8472,vxlan",
                          "-Y", TOO_DEEP, "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, check=True).stdout
    stderr = collector(pcaps / name)[1]
    counted = [int(w.split("=")[1]) for w in stderr.split() if w.startswith("vxlan/tunnel_depth=")]
    assert sum(counted) == len(out.split())
    assert (name == generate_wire.NESTED_FILE) == bool(counted)


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory):
    cap = build_known_truth()
    d = tmp_path_factory.mktemp("known")
    paths = {"pcap": d / "known.pcap", "pcapng": d / "known.pcapng"}
    for kind, writer in (("pcap", PcapWriter), ("pcapng", PcapNgWriter)):
        w = writer(str(paths[kind]), linktype=1) if kind == "pcap" else writer(str(paths[kind]))
        for t, frame in cap.frames:
            pkt = Ether(frame)
            pkt.time = Decimal(round(t * 1e6)) / 1_000_000  # exact µs in both formats
            w.write(pkt)
        w.close()
    return cap, paths


@pytest.mark.parametrize("decoder", ["bulk", "scapy"])
@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_known_truth_capture(known, kind: str, decoder: str) -> None:
    cap, paths = known
    records, stderr = collector(paths[kind], "--decoder", decoder)
    got = finals(records)
    assert len(got) == len(cap.flows)
    for truth in cap.flows:
        (r,) = [r for r in got if (r["client"]["ip"], r["client"]["port"]) == truth.client]
        assert r["protocol"] == truth.protocol
        assert (r["server"]["ip"], r["server"]["port"]) == truth.server
        assert r["tunnel"]["vni"] == truth.vni
        assert (r["tunnel"]["outer_src"], r["tunnel"]["outer_dst"]) == truth.vteps
        assert [r["packets_c2s"], r["packets_s2c"]] == truth.packets
        assert [r["bytes_c2s"], r["bytes_s2c"]] == truth.payload
        assert [r["l3_bytes_c2s"], r["l3_bytes_s2c"]] == truth.l3
    tcp = [r for r in got if r["client"]["port"] == 41000][0]
    assert tcp["connect"] == "ok" and tcp["tcp_flags"] == ["FIN", "SYN", "PSH", "ACK"]
    drops = dict(item.split("=") for item in
                 stderr.split("dropped ", 1)[1].strip().split(", "))
    assert {k.removeprefix("vxlan/"): int(v) for k, v in drops.items()} == cap.drops


def test_pcapng_and_pcap_give_identical_records(known) -> None:
    _, paths = known
    assert collector(paths["pcap"]) == collector(paths["pcapng"])


def test_not_a_capture_fails_naming_file_and_offset(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, this is not a capture\n")
    run = subprocess.run(EASTWEST + ["collector", "--pcap", str(bad), "--stdout"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert run.stderr.strip() == (f"eastwest collector: {bad} at byte 0: not a pcap or pcapng "
                                  "file (magic 68656c6c)")


def test_cut_capture_fails_naming_the_record_offset(pcaps: Path, tmp_path: Path) -> None:
    data = (pcaps / "CESNET_FlowTest_vxlan.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-10])
    run = subprocess.run(EASTWEST + ["collector", "--pcap", str(cut), "--stdout"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1
    last_record = len(data) - (148 + 16)  # every frame of this file is 148 bytes
    assert f"{cut} at byte {last_record}: pcap record cut short" in run.stderr
    assert "Traceback" not in run.stderr
