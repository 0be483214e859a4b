"""The native helper of the bulk VXLAN path against the Python, numpy and scapy code it speeds up.

- decoding: native columns == numpy columns == scapy columns, for hypothesis-generated frames
  (the strategies of test_vxlan_differential.py) and every capture in tests/captures;
- record walk: the C walker indexes every capture like the Python walker, and on randomly cut
  and corrupted pcap / pcapng files both give the same index or the same error message;
- one-pass file scan (`scan.py`): the same FlowRecords, in the same order, and the same drop
  counts as the numpy path (index, decode, `FlowTable.add`), on generated flows with port reuse,
  idle gaps, ticks and batch cuts; also when order hashes collide (both sides forced to);
- live blocks (`scan.scan_block` over pcap records as the ring drain writes them): the records
  of `FlowTable.add` on the numpy path, block after block;
- a corrupt file emits nothing before its error; a stale or foreign library is refused;
- the native file path imports neither numpy nor scapy (process start-up is part of its speed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from collector.pipeline import CollectorContext
from collector.vxlan import grouping, native, native_build, scan, source
from collector.vxlan.bulk import decode_native, decode_numpy
from collector.vxlan.packets import as_policy
from collector.vxlan.pcapfile import read_index
from collector.vxlan.reference import decode_reference
from eastwest.errors import CaptureError
from tests.sampling import fixed_sample
from tests.unit.test_vxlan_differential import PORTS, assert_same
from tests.unit.test_vxlan_differential import frame as junk_frame

T0 = 1_700_000_000_000_000
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def lib():
    """The venv's library. Where a compiler exists it must be built and current."""
    found = native.load()
    if found is None:
        if native_build.compiler() is None:
            pytest.skip(f"no C compiler here: {native.why_not()}")
        pytest.fail(f"the native helper is not usable: {native.why_not()}")
    return found


def test_the_helper_is_built_and_current(lib) -> None:
    assert lib.ew_source_digest().decode() == native.source_digest()


# -- decoding ---------------------------------------------------------------------------------
def three_ways(lib, frames: list[bytes]):
    buf = np.frombuffer(b"".join(frames) or b"\x00", dtype=np.uint8)
    cap = np.array([len(f) for f in frames], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(cap)[:-1]]).astype(np.int64) if frames else cap
    ts = np.arange(len(frames), dtype=np.int64) * 1000 + T0
    return (decode_native(lib, buf, off, cap, ts, PORTS), decode_numpy(buf, off, cap, ts, PORTS),
            decode_reference(frames, ts, PORTS))


@SETTINGS
@given(st.lists(junk_frame(), min_size=1, max_size=6))
def test_native_numpy_and_scapy_decode_generated_frames_alike(lib, frames: list[bytes]) -> None:
    ours, vectorized, ref = three_ways(lib, frames)
    assert_same(ours, ref)
    assert_same(vectorized, ref)


def test_native_numpy_and_scapy_decode_every_test_capture_alike(lib, pcaps: Path) -> None:
    for path in sorted(pcaps.glob("*.pcap")):
        ix = read_index(str(path))
        frames = [ix.buf[o:o + c].tobytes()
                  for o, c in zip(ix.off.tolist(), ix.cap.tolist(), strict=True)]
        ref = decode_reference(frames, ix.ts_us, PORTS, ix.linktype)
        for impl in (decode_numpy, lambda *a: decode_native(lib, *a)):
            assert_same(impl(ix.buf, ix.off, ix.cap, ix.ts_us, PORTS, ix.linktype), ref)


def test_a_packet_outside_the_buffer_is_refused_before_c_reads_it(lib) -> None:
    buf = np.zeros(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="outside the buffer"):
        decode_native(lib, buf, np.array([4]), np.array([7]), np.array([0]), PORTS)


# -- capture files ----------------------------------------------------------------------------
def pcap_bytes(pkts: list[tuple[int, bytes]], *, big: bool = False, nano: bool = False) -> bytes:
    e = ">" if big else "<"
    out = [struct.pack(e + "IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for t, f in pkts:
        sec, us = divmod(t, 1_000_000)
        out.append(struct.pack(e + "IIII", sec, us * 1000 if nano else us, len(f), len(f)) + f)
    return b"".join(out)


def ng_block(e: str, btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    return struct.pack(e + "II", btype, len(body) + 12) + body + struct.pack(e + "I", len(body) + 12)


def pcapng_bytes(pkts: list[tuple[int, bytes]], *, big: bool = False, tsresol: int = 9,
                 simple_every: int = 0) -> bytes:
    """SHB, a custom block (skipped), two IDBs (the second one's packets at if_tsresol), EPBs;
    every `simple_every`-th packet as a Simple Packet Block (no time) instead."""
    e = ">" if big else "<"
    per_s = 2 ** (tsresol & 0x7F) if tsresol & 0x80 else 10 ** tsresol
    out = [ng_block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1)),
           ng_block(e, 0x0BAD, b"custom"),
           ng_block(e, 1, struct.pack(e + "HHI", 1, 0, 65535)),
           ng_block(e, 1, struct.pack(e + "HHI", 1, 0, 65535) + struct.pack(e + "HHB3x", 9, 1, tsresol)
                    + struct.pack(e + "HH", 0, 0))]
    for i, (t, f) in enumerate(pkts):
        if simple_every and i % simple_every == simple_every - 1:
            out.append(ng_block(e, 3, struct.pack(e + "I", len(f)) + f))
            continue
        ticks = t * per_s // 1_000_000
        out.append(ng_block(e, 6, struct.pack(e + "IIIII", 1, ticks >> 32, ticks & 0xFFFFFFFF,
                                              len(f), len(f)) + f))
    return b"".join(out)


def python_index(path: str):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "_state", {"lib": None, "why": "test: Python walker", "refused": False})
        return read_index(path)


def index_or_error(path: str, python: bool):
    try:
        ix = python_index(path) if python else read_index(path)
    except CaptureError as exc:
        return str(exc)
    return [a.tolist() for a in (ix.off, ix.cap, ix.wirelen, ix.ts_us, ix.linktype)]


def test_native_walker_indexes_every_test_capture_like_python(lib, pcaps: Path) -> None:
    for path in sorted(pcaps.glob("*.pcap")):
        assert index_or_error(str(path), False) == index_or_error(str(path), True), path.name


@SETTINGS
@given(kind=st.sampled_from(["pcap", "pcap-ns", "pcap-be", "pcapng", "pcapng-be", "pcapng-us",
                             "pcapng-2^20", "pcapng-spb"]),
       sizes=st.lists(st.integers(0, 90), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 2000)),
       edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=3))
def test_walkers_agree_on_cut_and_corrupted_files(lib, tmp_path_factory, kind, sizes, cut,
                                                   edits) -> None:
    pkts = [(T0 + 7 * i * 1000 + 123, bytes(range(n))) for i, n in enumerate(sizes)]
    raw = bytearray({
        "pcap": lambda: pcap_bytes(pkts), "pcap-ns": lambda: pcap_bytes(pkts, nano=True),
        "pcap-be": lambda: pcap_bytes(pkts, big=True), "pcapng": lambda: pcapng_bytes(pkts),
        "pcapng-be": lambda: pcapng_bytes(pkts, big=True),
        "pcapng-us": lambda: pcapng_bytes(pkts, tsresol=6),
        "pcapng-2^20": lambda: pcapng_bytes(pkts, tsresol=0x80 | 20),
        "pcapng-spb": lambda: pcapng_bytes(pkts, simple_every=2),
    }[kind]())
    for pos, value in edits:
        if 4 <= pos < len(raw):  # keep the magic: the header check is shared code
            raw[pos] = value
    if cut is not None:
        raw = raw[:max(cut, 4)]
    path = tmp_path_factory.mktemp("walk") / f"x.{kind.split('-')[0]}"
    path.write_bytes(bytes(raw))
    assert index_or_error(str(path), False) == index_or_error(str(path), True)


# -- one-pass scan == numpy path -----------------------------------------------------------------
V4, V6 = ["10.244.1.11", "10.244.2.12", "10.244.3.13"], ["fd00::11", "fd00::12"]
VTEPS = ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
FLAGS = [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x01, 0x02, 0x18]
GAPS_US = [0, 1, 300, 200_000, 900_000, 1_600_000, 2_500_000, -400_000]


BURSTS = {"open": [(1, 0x02), (0, 0x12), (1, 0x10)], "refused": [(1, 0x02), (0, 0x14)],
          "reset": [(1, 0x02), (0, 0x12), (1, 0x18), (0, 0x04)],
          "close": [(1, 0x11), (0, 0x11), (1, 0x10)], "syn": [(1, 0x02)]}


@st.composite
def flow_spec(draw) -> dict:
    six = draw(st.integers(0, 3)) == 0
    src, dst = draw(st.permutations(V6 if six else V4))[:2]
    sport, dport = draw(st.sampled_from([(40000, 80), (80, 40000), (40001, 80), (5353, 5353),
                                         (45000, 9000)]))
    vs, vd = draw(st.permutations(VTEPS))[:2]
    return {"six": six, "src": src, "dst": dst, "sport": sport, "dport": dport, "vs": vs,
            "vd": vd, "kind": draw(st.sampled_from(["tcp", "tcp", "tcp", "udp", "icmp", "other"])),
            "vni": draw(st.sampled_from([42, 43])), "vlan": draw(st.integers(0, 5)) == 0,
            "port": draw(st.sampled_from(PORTS)),
            "tunnel": draw(st.sampled_from(["vxlan", "vxlan", "geneve", "gpe", "none", "nested"])),
            "cloud_vni": draw(st.sampled_from([98, 99])), "cloud_six": draw(st.booleans())}


UNDERLAY_MAC, UNDERLAY_PEER_MAC = "0a:00:00:00:01:01", "0a:00:00:00:01:02"


def flow_frame(f: dict, c2s: bool, flags: int, size: int, icmp_type: int) -> bytes:
    """A frame of flow `f` (client `src`), in one direction, in its tunnel (or none)."""
    src, dst = (f["src"], f["dst"]) if c2s else (f["dst"], f["src"])
    sport, dport = (f["sport"], f["dport"]) if c2s else (f["dport"], f["sport"])
    ip = IPv6(src=src, dst=dst) if f["six"] else IP(src=src, dst=dst)
    if f["kind"] == "tcp":
        l4 = TCP(sport=sport, dport=dport, flags=flags)
    elif f["kind"] == "udp":
        l4 = UDP(sport=sport, dport=dport)
    elif f["kind"] == "icmp":
        l4 = ((ICMPv6EchoRequest() if icmp_type == 8 else ICMPv6EchoReply()) if f["six"]
              else ICMP(type=icmp_type))
    else:
        l4 = Raw(b"\x00" * 8)
        if f["six"]:
            ip.nh = 132
        else:
            ip.proto = 47
    eth = Ether(src="0a:00:00:00:00:01", dst="0a:00:00:00:00:02")
    if f["vlan"]:
        eth = eth / Dot1Q(vlan=7)
    vs, vd = (f["vs"], f["vd"]) if c2s else (f["vd"], f["vs"])
    outer = Ether(src=UNDERLAY_MAC, dst=UNDERLAY_PEER_MAC) / IP(src=vs, dst=vd)
    if f["tunnel"] == "none":
        plain = (Ether(src=UNDERLAY_MAC, dst=UNDERLAY_PEER_MAC) / Dot1Q(vlan=7) if f["vlan"]
                 else Ether(src=UNDERLAY_MAC, dst=UNDERLAY_PEER_MAC))
        return bytes(plain / ip / l4 / Raw(b"x" * size))
    if f["tunnel"] == "geneve":  # options (4 bytes), inner IP without Ethernet when tagged
        gen = GENEVE(vni=f["vni"], optionlen=1, proto=0x0800 if f["vlan"] and not f["six"]
                     else 0x6558) / Raw(b"\x01\x02\x03\x04")
        inner = ip if f["vlan"] and not f["six"] else eth / ip
        return bytes(outer / UDP(sport=49152, dport=6081) / gen / inner / l4 / Raw(b"x" * size))
    if f["tunnel"] == "gpe":
        gpe = VXLAN(vni=f["vni"], flags=0x0C, NextProtocol=3)
        return bytes(outer / UDP(sport=49152, dport=4790) / gpe / eth / ip / l4
                     / Raw(b"x" * size))
    outer = outer / UDP(sport=49152, dport=f["port"]) / VXLAN(vni=f["vni"], flags=0x08)
    vxlan = outer / eth / ip / l4 / Raw(b"x" * size)
    if f["tunnel"] == "nested":  # that VXLAN frame inside Geneve: flows kept apart by cloud VNI
        a, b = ("2001:db8:c::1", "2001:db8:c::2") if f["cloud_six"] else ("192.0.2.91", "192.0.2.92")
        cloud = IPv6(src=a, dst=b) if f["cloud_six"] else IP(src=a, dst=b)
        if not c2s:
            cloud = IPv6(src=b, dst=a) if f["cloud_six"] else IP(src=b, dst=a)
        return bytes(Ether(src=UNDERLAY_MAC, dst=UNDERLAY_PEER_MAC) / cloud
                     / UDP(sport=49153, dport=6081)
                     / GENEVE(vni=f["cloud_vni"], proto=0x6558) / vxlan)
    return bytes(vxlan)


@st.composite
def capture(draw) -> list[tuple[int, bytes]]:
    """A few flows; scripted bursts (handshake, refusal, reset, close, bare SYN) and single
    packets in random directions with random flags, at gaps that cross the idle timeout and
    the interval, sometimes backwards; one packet in ten is junk (the differential strategy)."""
    flows = draw(st.lists(flow_spec(), min_size=1, max_size=3))
    t, out = T0, []
    for _ in range(draw(st.integers(1, 14))):
        f = draw(st.sampled_from(flows))
        burst = draw(st.sampled_from([None, None, *BURSTS]))
        steps = BURSTS[burst] if burst else [(int(draw(st.booleans())),
                                              draw(st.sampled_from(FLAGS)))]
        for c2s, flags in steps:
            t = max(T0, t + draw(st.sampled_from(GAPS_US)))
            if draw(st.integers(0, 9)) == 0:
                out.append((t, draw(junk_frame())))
            out.append((t, flow_frame(f, bool(c2s), flags, draw(st.integers(0, 30)),
                                      draw(st.sampled_from([8, 0, 3])))))
    return out


def run_source(path: Path, lib, *, chunk: int, interval: float = 1.0, idle: float = 2.0,
               hold: int = scan.HOLD) -> tuple[list, dict]:
    """Records and drops of PcapSource on `path`: native one-pass scan if `lib`, else the
    numpy path (Python walker, numpy decoder, numpy grouping)."""
    ctx = CollectorContext(collector_id="t")
    args = argparse.Namespace(vxlan_port=[], decoder="bulk", interval=interval,
                              idle_timeout=idle)
    out: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "_state", {"lib": lib, "why": None if lib else "test", "refused": False})
        mp.setattr(source, "CHUNK", chunk)
        mp.setattr(scan, "HOLD", hold)
        source.PcapSource(ctx, str(path), args).run(out.extend, threading.Event())
    return out, ctx.drops.snapshot()


@SETTINGS
@given(cap=capture(), chunk=st.sampled_from([1, 2, 5, 1000]), hold=st.sampled_from([0, 3, 10**6]),
       ng=st.booleans())
def test_scan_gives_the_numpy_paths_records_in_its_order(lib, tmp_path_factory, cap, chunk,
                                                          hold, ng) -> None:
    path = tmp_path_factory.mktemp("scan") / ("c.pcapng" if ng else "c.pcap")
    path.write_bytes(pcapng_bytes(cap) if ng else pcap_bytes(cap))
    ours = run_source(path, lib, chunk=chunk, hold=hold)
    assert ours == run_source(path, None, chunk=chunk)


def native_rows(lib, path: Path, idle_us: int) -> list[int]:
    """The session rows of one batch holding the whole file (ew_scan_batch)."""
    import ctypes

    from collector.vxlan.pcapfile import open_capture
    from collector.vxlan.rows import NFIELDS

    fd, size, form = open_capture(str(path))
    walk = lib.ew_walk_new(None, fd, size, form.fmt, form.big, form.nano, form.linktype,
                           form.start)
    state = lib.ew_scan_new()
    try:
        out = (ctypes.c_int64 * 5)()
        kinds, plain = native.policy_args(as_policy(PORTS))
        assert lib.ew_scan_batch(state, walk, kinds, plain, idle_us, 2**62, 2**40, out) == 0
        assert out[3] == 1  # one batch: the whole file
        flat = ctypes.string_at(lib.ew_scan_rows(state), out[4] * NFIELDS * 8)
        return memoryview(flat).cast("Q").tolist()
    finally:
        lib.ew_scan_free(state)
        lib.ew_walk_free(walk)
        os.close(fd)


@SETTINGS
@given(cap=capture())
def test_scan_rows_equal_the_numpy_grouping_field_for_field(lib, tmp_path_factory, cap) -> None:
    """Every field of every session row, not only what the records show (e.g. the direction
    of a first echo reply after a request)."""
    path = tmp_path_factory.mktemp("rows") / "c.pcap"
    path.write_bytes(pcap_bytes(cap))
    ix = read_index(str(path))
    decoded = decode_numpy(ix.buf, ix.off, ix.cap, ix.ts_us, PORTS, ix.linktype)
    rows, _ = grouping.session_rows(decoded, 2_000_000)
    assert native_rows(lib, path, 2_000_000) == rows


@SETTINGS
@given(cap=capture(), cuts=st.lists(st.integers(1, 40), max_size=6))
def test_live_blocks_scanned_in_c_give_the_numpy_paths_records(lib, tmp_path_factory, cap,
                                                               cuts) -> None:
    """A live block (capture.Block with pcap=True: pcap records back to back, as the ring
    drain writes them) through `scan.scan_block` == `FlowTable.add(decode_numpy(...))` of the
    same packets, block after block into one table: the same records in the same order, the
    same drop counts and packet totals."""
    from collector.vxlan.flows import FlowTable

    path = tmp_path_factory.mktemp("live") / "c.pcap"
    data = pcap_bytes(cap)
    path.write_bytes(data)
    ix = read_index(str(path))
    bounds, n = [0], len(ix.off)
    for c in cuts:
        bounds.append(min(n, bounds[-1] + c))
    bounds.append(n)
    sides = []
    for native_side in (True, False):
        ctx = CollectorContext(collector_id="t")
        table = FlowTable(ctx, "vxlan", idle_timeout=2.0)
        state = lib.ew_scan_new() if native_side else None
        out: list = []
        try:
            for a, b in zip(bounds, bounds[1:], strict=False):
                if a == b:
                    continue
                if native_side:
                    start, end = int(ix.off[a]) - 16, int(ix.off[b - 1] + ix.cap[b - 1])
                    block = np.frombuffer(data[start:end], dtype=np.uint8)
                    out += scan.scan_block(lib, state, block.ctypes.data, len(block), PORTS,
                                           table)
                else:
                    d = decode_numpy(ix.buf, ix.off[a:b], ix.cap[a:b], ix.ts_us[a:b], PORTS,
                                     ix.linktype[a:b])
                    out += table.add(d)
            out += table.flush()
        finally:
            if state:
                lib.ew_scan_free(state)
        sides.append((out, ctx.drops.snapshot(), table.packets))
    assert sides[0] == sides[1]


def test_generated_flows_reach_splits_ticks_and_every_connect_outcome(lib, tmp_path) -> None:
    """A guard that the strategy above reaches what it claims (a test that cannot fail is a
    defect): split sessions (port reuse, idle gaps), interim records, several outcomes."""
    import random

    rnd = random.Random(5)
    examples = fixed_sample(capture(), 300)
    records = []
    for i, cap in enumerate(examples):
        path = tmp_path / f"g{i}.pcap"
        path.write_bytes(pcap_bytes(cap))
        records += run_source(path, lib, chunk=rnd.choice([1, 3, 1000]))[0]
    keys = [(r.protocol, r.client, r.server, r.tunnel) for r in records if r.final]
    assert len(keys) > len(set(keys))  # one key, several flows
    assert any(not r.final for r in records)
    assert {"ok", "refused", "reset"} <= {r.connect for r in records}
    assert {"tcp", "udp", "icmp", "icmpv6", "gre", "sctp"} <= {r.protocol for r in records}
    assert {None, "vxlan"} <= {r.tunnel and r.tunnel.type for r in records}


def test_scan_keys_flows_by_tunnel_type_like_the_numpy_path(lib, tmp_path) -> None:
    """One TCP handshake per tunnel (VXLAN, Geneve with an option, VXLAN-GPE, none) between
    the same inner endpoints and VNI: four flows of four types on both paths, equal records."""
    spec = {"six": False, "src": V4[0], "dst": V4[1], "sport": 40000, "dport": 80,
            "vs": VTEPS[0], "vd": VTEPS[1], "kind": "tcp", "vni": 42, "vlan": False,
            "port": 4789}
    pkts, t = [], T0
    for tun in ("vxlan", "geneve", "gpe", "none"):
        for c2s, flags in BURSTS["open"]:
            t += 1000
            pkts.append((t, flow_frame(spec | {"tunnel": tun}, bool(c2s), flags, 5, 8)))
    path = tmp_path / "tunnels.pcap"
    path.write_bytes(pcap_bytes(pkts))
    ours, drops = run_source(path, lib, chunk=1000)
    assert (ours, drops) == run_source(path, None, chunk=1000)
    got = {r.tunnel.type if r.tunnel else None: r for r in ours if r.final}
    assert set(got) == {None, "vxlan", "geneve", "vxlan-gpe"} and not drops
    assert all((r.packets_c2s, r.packets_s2c, r.connect) == (2, 1, "ok") for r in got.values())
    assert {r.tunnel.vni for r in got.values() if r.tunnel} == {42}


def test_hash_collisions_are_ordered_like_numpy(tmp_path) -> None:
    """Order hashes narrowed to 2 bits on both sides: every batch has collisions, and both
    fall back to the exact key order."""
    if native_build.compiler() is None:
        pytest.skip("no C compiler here")
    built = native_build.build(tmp_path / "collide.so", force=True,
                               defines=("EW_ORDER_HASH_MASK=0x3ull",))
    pkts = [(T0 + i * 10_000, f) for i, f in enumerate(
        bytes(Ether() / IP(src=VTEPS[0], dst=VTEPS[1]) / UDP(dport=4789) / VXLAN(vni=7)
              / Ether() / IP(src=f"10.0.{i % 5}.1", dst="10.9.9.9")
              / TCP(sport=1000 + i % 11, dport=80, flags=0x18)) for i in range(120))]
    path = tmp_path / "many.pcap"
    path.write_bytes(pcap_bytes(pkts))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native.ENV, str(built))
        mp.setattr(native, "_state", {})
        collide = native.load()
        assert collide is not None, native.why_not()
        mp.setattr(grouping, "ORDER_HASH_MASK", 0x3)
        ours = run_source(path, collide, chunk=50)
        assert ours == run_source(path, None, chunk=50)
        assert sum(r.final for r in ours[0]) == 55  # 5 sources x 11 ports


# -- errors, refusal, imports -----------------------------------------------------------------
@pytest.mark.parametrize("hold", [0, scan.HOLD])
def test_a_cut_file_emits_nothing_and_names_the_offset_like_the_index(lib, tmp_path, hold) -> None:
    pkts = [(T0 + i * 1000, bytes(Ether() / IP() / UDP(dport=4789) / VXLAN(vni=1) / Ether()
                                  / IP() / TCP())) for i in range(50)]
    path = tmp_path / "cut.pcap"
    path.write_bytes(pcap_bytes(pkts)[:-9])
    with pytest.raises(CaptureError) as ours:
        run_source(path, lib, chunk=4, hold=hold)
    with pytest.raises(CaptureError) as theirs:
        python_index(str(path))
    assert str(ours.value) == str(theirs.value)
    assert "pcap record cut short" in str(ours.value)
    emitted: list = []
    with pytest.MonkeyPatch.context() as mp, pytest.raises(CaptureError):
        mp.setattr(scan, "HOLD", hold)
        scan.scan_file(lib, str(path), PORTS, 1_000_000, 4, source.FlowTable(
            CollectorContext(collector_id="t"), "pcap", idle_timeout=30), emitted.extend,
            threading.Event())
    assert emitted == []


def test_a_stale_or_disabled_library_is_refused(tmp_path) -> None:
    cc = native_build.compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    stale = tmp_path / "stale.so"
    subprocess.run([cc, *native.CFLAGS, '-DEW_SOURCE_DIGEST="00000000"', "-o", str(stale),
                    *(str(native.HERE / n) for n in native.SOURCES if n.endswith(".c"))],
                   check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(native.ENV, str(stale))
        mp.setattr(native, "_state", {})
        assert native.load() is None and native.refused()
        assert "built from other sources (digest 00000000" in native.why_not()
        mp.setenv(native.ENV, "0")
        mp.setattr(native, "_state", {})
        assert native.load() is None and not native.refused()
        mp.setenv(native.ENV, str(tmp_path / "absent.so"))
        mp.setattr(native, "_state", {})
        assert native.load() is None and not native.refused()
        assert "not built" in native.why_not()


def test_the_native_file_path_imports_neither_numpy_nor_scapy(lib, pcaps: Path) -> None:
    code = (
        "import sys, argparse, threading\n"
        "from collector.pipeline import CollectorContext\n"
        "from collector.vxlan import PcapSource\n"
        "out = []\n"
        "a = argparse.Namespace(vxlan_port=[], decoder='bulk', interval=5.0, idle_timeout=30.0)\n"
        f"PcapSource(CollectorContext('t'), {str(pcaps / 'generated_vxlan_vlan_dns_tls.pcap')!r}, a)"
        ".run(out.extend, threading.Event())\n"
        "assert out, 'no records'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'scapy')))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["CESNET_FlowTest_vxlan.pcap", "generated_vxlan_vlan_dns_tls.pcap",
                                  "OISF_suricata-verify_vxlan.pcap",
                                  "the-tcpdump-group_tcpdump_vxlan_port_8472.pcap",
                                  "generated_mixed_link_junk.pcap"])
def test_the_command_gives_the_same_output_with_and_without_the_helper(lib, pcaps, name) -> None:
    def run(env: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "eastwest", "collector", "--pcap",
                               str(pcaps / name), "--stdout", "--collector-id", "n"],
                              capture_output=True, text=True, env={**os.environ, **env},
                              check=True)

    ours, theirs = run({}), run({native.ENV: "0"})
    assert ours.stdout or "dropped" in ours.stderr  # a non-VXLAN capture: only drops
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)


def test_setup_builds_the_helper_where_it_says(tmp_path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here")
    out = tmp_path / "lib" / "libewvxlan.so"
    assert native_build.main(["--output", str(out), "--quiet"]) == 0
    assert native_build.built_digest(out) == native.source_digest()
