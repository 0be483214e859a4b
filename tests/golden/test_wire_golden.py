"""Golden tests of the wire view beyond VXLAN (issue 18): plain traffic, Geneve, VXLAN-GPE and
the Linux cooked / raw-IP link types, through the commands a user runs (`eastwest collector
--pcap`, `eastwest flows --input-file`). Independent truths: tshark's conversation tables of
every capture of tests/captures, CESNET FlowTest's published record of http_get.pcap, the flows
tests/captures/generate_wire.py built its captures from, and tshark's Geneve VNIs."""

from __future__ import annotations

import collections
import re
import subprocess
from pathlib import Path

import pytest

from tests.captures import generate_wire
from tests.golden.test_vxlan_golden import (
    ALL_CAPTURES,
    EASTWEST,
    HOLDS,
    TOO_DEEP,
    TUNNEL_PORTS,
    collector,
    finals,
    tunnel_chain,
)

# tshark -z conv: "A:port <-> B:port  frames bytes unit  frames bytes unit  frames bytes unit ..."
# (the first pair is B->A, "<-", the second A->B, "->"); IPv6 addresses end with ":port" too
CONV_LINE = re.compile(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s+(\d+) \S+ \S+\s+(\d+) \S+ \S+\s+(\d+) ")


def tshark_conversations(path: Path) -> collections.Counter:
    """(protocol, endpoint) -> packets that endpoint sent, over tshark's TCP and UDP
    conversations; UDP conversations to a tunnel port are the tunnels' own outer headers,
    which are not flows (their inner conversations are in the table too)."""
    keep = f"!({TOO_DEEP})"  # frames in too many tunnels: counted, not flows (test below)
    out = subprocess.run(["tshark", "-n", "-q", "-r", str(path), "-d", "udp.port==8472,vxlan",
                          "-z", f"conv,tcp,{keep}", "-z", f"conv,udp,{keep}"],
                         capture_output=True, text=True, check=True).stdout
    counts: collections.Counter = collections.Counter()
    proto = None
    for line in out.splitlines():
        if line.endswith(" Conversations"):
            proto = line.split()[0].lower()
            continue
        m = CONV_LINE.match(line)
        if not m:
            continue
        a, pa, b, pb, b_to_a, a_to_b, total = m.groups()
        assert int(b_to_a) + int(a_to_b) == int(total)
        if proto == "udp" and TUNNEL_PORTS & {int(pa), int(pb)}:
            continue
        pair = frozenset({(a, int(pa)), (b, int(pb))})
        counts[(proto, pair, (a, int(pa)))] += int(a_to_b)
        counts[(proto, pair, (b, int(pb)))] += int(b_to_a)
    return +counts


def our_conversations(records: list[dict]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for r in finals(records):
        if r["protocol"] not in ("tcp", "udp"):
            continue
        c = (r["client"]["ip"], r["client"]["port"])
        s = (r["server"]["ip"], r["server"]["port"])
        pair = frozenset({c, s})
        counts[(r["protocol"], pair, c)] += r["packets_c2s"]
        counts[(r["protocol"], pair, s)] += r["packets_s2c"]
    return +counts


@pytest.mark.parametrize("name", ALL_CAPTURES)
def test_every_tcp_and_udp_conversation_tshark_finds_eastwest_finds(pcaps: Path,
                                                                     name: str) -> None:
    """Per conversation and per direction, the same packet counts as tshark's -z conv,tcp and
    -z conv,udp, in every capture (tunnelled conversations by their inner endpoints; a
    connection whose two directions travel in different VNIs is two records here, one
    conversation there: the sums per endpoint are compared)."""
    theirs = tshark_conversations(pcaps / name)
    ours = our_conversations(collector(pcaps / name)[0])
    assert ours == theirs  # (empty in captures of ICMP in VXLAN only; see the guard below)


def test_tshark_conversations_are_parsed(pcaps: Path) -> None:
    """A guard for the test above: the parser finds the conversations of the folder (an empty
    parse would make it pass vacuously)."""
    pairs = {name: len({k[1] for k in tshark_conversations(pcaps / name)})
             for name in ALL_CAPTURES}
    assert pairs["CESNET_FlowTest_http_get.pcap"] == 1
    assert pairs["the-tcpdump-group_tcpdump_geneve.pcap"] == 1
    assert pairs[generate_wire.SLL_FILE] == 4
    assert sum(pairs.values()) > 60


def test_cesnet_http_get_matches_its_published_flow_record(pcaps: Path) -> None:
    """CESNET FlowTest testing/validation/http_get.yml (commit e3bd542f): 192.168.1.140:57678
    -> 174.143.213.184:80, packets 21 / 19, bytes (IP) 1234 / 23041; no tunnel."""
    records, stderr = collector(pcaps / "CESNET_FlowTest_http_get.pcap")
    (rec,) = finals(records)
    assert (rec["client"], rec["server"]) == ({"ip": "192.168.1.140", "port": 57678},
                                              {"ip": "174.143.213.184", "port": 80})
    assert (rec["protocol"], rec["family"], rec["observer"]) == ("tcp", 4, "path")
    assert (rec["packets_c2s"], rec["packets_s2c"]) == (21, 19)
    assert (rec["l3_bytes_c2s"], rec["l3_bytes_s2c"]) == (1234, 23041)
    assert rec["tunnel"] is None and rec["tunnel_outer"] is None and rec["connect"] == "ok"
    assert "dropped" not in stderr


def test_tcpdump_geneve_capture_gives_geneve_flows_with_tsharks_vnis(pcaps: Path) -> None:
    """tcpdump's geneve.pcap: 39 packets, each direction of an SSH session and of a ping in
    its own VNI (10 one way, 11 the other, some with options): 4 flows, no drop."""
    records, stderr = collector(pcaps / "the-tcpdump-group_tcpdump_geneve.pcap")
    got = sorted((r["tunnel"]["vni"], r["protocol"], r["packets_c2s"] + r["packets_s2c"])
                 for r in finals(records))
    assert got == [(10, "icmp", 3), (10, "tcp", 16), (11, "icmp", 3), (11, "tcp", 17)]
    assert {r["tunnel"]["type"] for r in records} == {"geneve"}
    assert {r["tunnel"]["outer_dport"] for r in records} == {6081}
    assert "dropped" not in stderr


@pytest.mark.parametrize("name", sorted(set(generate_wire.CAPTURES) - {generate_wire.NESTED_FILE}))
def test_generated_link_type_capture_gives_the_flows_it_was_built_with(pcaps: Path,
                                                                       name: str) -> None:
    """generate_wire.py counted what it put on the wire: every flow, its tunnel (or none),
    packets, payload and IP bytes per direction, on SLL, SLL2 and raw-IP links."""
    wire = generate_wire.CAPTURES[name]()
    records, stderr = collector(pcaps / name)
    got = {r["client"]["port"]: r for r in finals(records)}
    assert len(got) == len(wire.flows)
    for truth in wire.flows:
        r = got[truth.client[1]]
        assert (r["protocol"], r["client"]["ip"]) == (truth.protocol, truth.client[0])
        assert (r["server"]["ip"], r["server"]["port"]) == truth.server
        assert [r["packets_c2s"], r["packets_s2c"]] == truth.packets
        assert [r["bytes_c2s"], r["bytes_s2c"]] == truth.payload
        assert [r["l3_bytes_c2s"], r["l3_bytes_s2c"]] == truth.l3
        tun = generate_wire.TUNNELS[name][truth.client[1]]
        assert r["tunnel"] == (None if tun is None else dict(zip(
            ("type", "vni", "outer_src", "outer_dst", "outer_dport"), tun, strict=True)))
    tcp = [r for r in got.values() if r["protocol"] == "tcp"]
    assert {r["connect"] for r in tcp} <= {"ok", None}
    assert stderr.strip() == ("eastwest collector: dropped vxlan/non_ip=1"
                              if name == generate_wire.SLL_FILE else "")


def test_generated_nested_capture_gives_each_flow_its_whole_tunnel_chain(pcaps: Path) -> None:
    """generate_wire.py's nested tunnels: each flow with its packets and bytes per direction and
    its whole chain (types, VNIs, both VTEPs of every level oriented client -> server, UDP
    ports), outermost first; one inner connection in two cloud VNIs is two flows; the frame
    four tunnels deep is counted, not a flow."""
    wire = generate_wire.CAPTURES[generate_wire.NESTED_FILE]()
    records, stderr = collector(pcaps / generate_wire.NESTED_FILE)
    keys = ("type", "vni", "outer_src", "outer_dst", "outer_dport")
    got = {tunnel_chain(r): r for r in finals(records)}
    assert len(got) == len(wire.flows) == 3
    for truth, chain in zip(wire.flows, generate_wire.NESTED_CHAINS, strict=True):
        r = got[tuple((t[0], t[1]) for t in chain)]
        assert (r["protocol"], r["client"]["ip"], r["client"]["port"]) == (truth.protocol,
                                                                            *truth.client)
        assert (r["server"]["ip"], r["server"]["port"]) == truth.server
        assert [r["packets_c2s"], r["packets_s2c"]] == truth.packets
        assert [r["bytes_c2s"], r["bytes_s2c"]] == truth.payload
        assert [r["l3_bytes_c2s"], r["l3_bytes_s2c"]] == truth.l3
        assert [*r["tunnel_outer"], r["tunnel"]] == [dict(zip(keys, t, strict=True))
                                                     for t in chain]
    assert stderr.strip() == "eastwest collector: dropped vxlan/tunnel_depth=1"


def test_generated_link_type_captures_are_the_committed_bytes(tmp_path: Path, pcaps: Path) -> None:
    generate_wire.main(["--out", str(tmp_path)])
    for name in generate_wire.CAPTURES:
        assert (tmp_path / name).read_bytes() == (pcaps / name).read_bytes(), name


def test_flows_input_file_reads_a_capture_like_the_collector(pcaps: Path) -> None:
    """`eastwest flows --input-file capture.pcap`: the capture's final records, decoded by
    the same source; undecoded packets named on stderr, exit 0."""
    path = pcaps / generate_wire.SLL_FILE
    run = subprocess.run(EASTWEST + ["flows", "--input-file", str(path), "-o", "jsonl"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    import json

    rows = [json.loads(line) for line in run.stdout.splitlines()]
    ours = sorted((r["client"]["port"], r["server"]["port"]) for r in rows)
    want = sorted((r["client"]["port"], r["server"]["port"]) for r in finals(collector(path)[0]))
    assert ours == want and len(ours) == 5
    assert run.stderr.strip() == (f"eastwest flows: {path}: packets not decoded: "
                                  "vxlan/non_ip=1 (docs/vxlan.md)")


def test_every_capture_is_described(pcaps: Path) -> None:
    assert set(HOLDS) == {p.name for p in pcaps.glob("*.pcap")}
