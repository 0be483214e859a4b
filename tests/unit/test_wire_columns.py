"""Wire batch -> columns: the native decoder (aggregator/store/ewwire.c) against the reference
(`codec.decode_batch` + `flat_table`), on valid records of every shape, on invalid records and
batches built by hand, byte for byte: same rows, same `extra` bytes, same rejections, same
exceptions. And the native decoder really decodes the ordinary records (it does not quietly
defer everything to msgspec)."""

from __future__ import annotations

import ipaddress
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.store import wire_columns
from aggregator.store.columns import _extra_dec, flat_table
from aggregator.store.wire_columns import ColumnBatch, decode_columns, native_available
from eastwest import codec, native_build
from eastwest.record import Cgroup, Endpoint, FlowRecord, Nat, Tunnel, Workload
from tests.sampling import fixed_sample
from tests.unit.test_record import full_record
from tests.unit.test_store_columns import records

SENT = datetime(2026, 11, 28, 5, 0, 0, 250000, tzinfo=UTC)
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def lib():
    """The venv's decoder. Where a compiler exists it must be built and current."""
    ok, why = native_available()
    if not ok:
        if native_build.compiler() is None:
            pytest.skip(f"no C compiler here: {why}")
        pytest.fail(f"the native wire decoder is not usable: {why}")


# -- building batches -------------------------------------------------------------------------------
def compress(payload: bytes) -> bytes:
    return codec.MAGIC + zstandard.ZstdCompressor(level=1).compress(payload)


def body_of(recs: list[Any], collector: str = "h1", seq: int = 7, sent_at: Any = SENT) -> bytes:
    """A batch of records given as FlowRecords, dicts (encoded by msgspec) or raw msgpack."""
    raws = [msgspec.Raw(r) if isinstance(r, bytes) else r for r in recs]
    return compress(msgspec.msgpack.encode(
        {"collector": collector, "batch_seq": seq, "sent_at": sent_at, "records": raws}))


def as_dict(rec: FlowRecord) -> dict[str, Any]:
    """The record as msgpack builtins (datetimes stay datetimes: the timestamp extension)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(rec))


# -- comparing ----------------------------------------------------------------------------------------
def rows(batch: ColumnBatch) -> list[tuple]:
    t = batch.table.to_pydict()
    names = list(t)
    out = []
    for i in range(batch.table.num_rows):
        row = tuple(t[n][i] for n in names)
        extra = row[-1]
        out.append(row + (None if extra is None else _extra_dec.decode(extra),))
    return sorted(out, key=repr)


def same(body: bytes) -> ColumnBatch | None:
    """Decode both ways; assert every result (or exception) is the same. The native result."""
    try:
        ref = decode_columns(body, native=False)
    except Exception as exc:  # noqa: BLE001 - compared below
        with pytest.raises(type(exc)) as got:
            decode_columns(body, native=True)
        assert str(got.value) == str(exc)
        return None
    nat = decode_columns(body, native=True)
    assert (nat.collector, nat.batch_seq, nat.sent_at, nat.total) == (
        ref.collector, ref.batch_seq, ref.sent_at, ref.total)
    assert nat.sent_at.tzinfo is UTC
    assert _no_addr(nat.rejected) == _no_addr(ref.rejected)
    assert nat.table.schema == ref.table.schema
    assert nat.table.column_names == [*wire_columns.NAMES]
    assert rows(nat) == rows(ref)  # includes the exact `extra` bytes and their decoded form
    assert nat.records() == ref.records()
    # the reference path is what `decode_batch` + `flat_table` give
    b = codec.decode_batch(body)
    good = [r for r in b.records if r.collector == b.collector]
    if good:
        assert rows(ref) == sorted(rows(_as_batch(flat_table(good))), key=repr)
    return nat


def _no_addr(rejected: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Reasons that name an object's repr (an unknown extension: `<... at 0x7f...>`) differ in
    the address from one decode to the next, on either path."""
    return [(i, f, re.sub(r" at 0x[0-9a-f]+>", ">", why)) for i, f, why in rejected]


def _as_batch(table) -> ColumnBatch:
    return ColumnBatch("x", 0, SENT, table.num_rows, table, [])


# -- valid records ---------------------------------------------------------------------------------
HEXTET = st.one_of(st.just(0), st.integers(1, 0xF), st.integers(0x10, 0xFFFF))
IPV6 = st.lists(HEXTET, min_size=8, max_size=8).map(
    lambda hs: str(ipaddress.IPv6Address(sum(h << (16 * (7 - i)) for i, h in enumerate(hs)))))
IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
LABELS = st.dictionaries(UNICODE, UNICODE, max_size=4)
BIG = st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1])


@st.composite
def wide_records(draw, n: int) -> FlowRecord:
    """`test_store_columns.records`, widened: IPv6 of every shape, edge-size ints, unicode."""
    rec = draw(records(n))
    ip = IPV6 if rec.family == 6 else IPV4
    over: dict[str, Any] = {
        "client": Endpoint(draw(ip), rec.client.port), "server": Endpoint(draw(ip), rec.server.port),
        "bytes_c2s": draw(BIG), "packets_s2c": draw(st.one_of(st.none(), BIG)),
        "l3_bytes_c2s": draw(st.one_of(st.none(), BIG)),
        "cgroup": draw(st.one_of(st.none(), st.builds(Cgroup, BIG, st.one_of(st.none(), UNICODE)))),
        "container": draw(st.one_of(st.none(), UNICODE))}
    if rec.tunnel is not None:
        over["tunnel"] = Tunnel("vxlan", rec.tunnel.vni, draw(st.one_of(IPV4, IPV6)),
                                draw(st.one_of(IPV4, IPV6)), rec.tunnel.outer_dport)
    if draw(st.booleans()):
        over["client_workload"] = Workload(draw(UNICODE), draw(st.one_of(st.none(), UNICODE)),
                                           None, draw(st.one_of(st.none(), UNICODE)), draw(LABELS))
    if draw(st.booleans()):  # a Service call's translations (issue 16), of the record's family
        port = st.integers(0, 65535)
        over["nat"] = draw(st.lists(st.builds(
            Nat, st.sampled_from(["dnat", "snat", "redirect"]), st.builds(Endpoint, ip, port),
            st.builds(Endpoint, ip, port), st.one_of(st.none(), BIG)), max_size=3))
    return rec.replace(**over)


def deferred_by_design(r: FlowRecord) -> bool:
    """What the native decoder leaves to msgspec on purpose: odd IPv6 forms, nested tunnels."""
    return (odd_ipv6(r) or r.tunnel_outer is not None or r.drops is not None
            or any(odd_ipv6_text(e.ip) for n in r.nat or () for e in (n.original, n.translated)))


def odd_ipv6_text(text: str) -> bool:
    a = ipaddress.ip_address(text)
    return a.version == 6 and (a.ipv4_mapped is not None or (int(a) >> 32 == 0 and int(a) > 1))


def odd_ipv6(r: FlowRecord) -> bool:
    """Addresses the native decoder leaves to Python (IPv4-mapped or -compatible IPv6)."""
    ips = [r.client.ip, r.server.ip] + ([r.tunnel.outer_src, r.tunnel.outer_dst] if r.tunnel else [])
    for text in ips:
        a = ipaddress.ip_address(text)
        if a.version == 6 and (a.ipv4_mapped is not None or (int(a) >> 32 == 0 and int(a) > 1)):
            return True
    return False


@SETTINGS
@given(data=st.data())
def test_valid_records_decode_natively_to_the_same_columns(data) -> None:
    batch = [data.draw(wide_records(i)) for i in range(data.draw(st.integers(0, 8)))]
    nat = same(body_of(batch))
    assert nat is not None and nat.native and nat.rejected == []
    assert nat.deferred == sum(deferred_by_design(r) for r in batch)


def test_a_fixed_sample_decodes_without_deferring() -> None:
    """The guard: ordinary records take the native path (the test fails if it defers them)."""
    sample = [r.replace(record_id=f"h1:{i}") for i, r in enumerate(fixed_sample(wide_records(0), 60))]
    batch = [r for r in sample if not deferred_by_design(r)]
    assert len(batch) > 40
    nat = same(body_of(batch))
    assert nat is not None and nat.deferred == 0 and nat.table.num_rows == len(batch)


def test_every_ipv6_shape() -> None:
    for text in ["::", "::1", "1::", "1::2", "fd00::1", "1:0:0:2::3", "1::2:0:0:3", "0:1::",
                 "1:2:3:4:5:6:7:8", "1:0:2:0:3:0:4:0", "::2:3:4:5:6:7:8", "1:2:3:4:5:6:7::",
                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:a00:1", "::a00:1", "::2"]:
        canonical = str(ipaddress.IPv6Address(text))
        rec = full_record(record_id="h1:1", collector="h1",
                          client=Endpoint(canonical, 1), server=Endpoint("fd00::2", 2))
        nat = same(body_of([rec]))
        assert nat is not None and nat.table.column("client_ip").to_pylist() == [canonical]
        assert nat.deferred == odd_ipv6(rec), canonical


def test_the_bench_workloads_decode_natively() -> None:
    from bench.bench_store import batches_of, make_merged, make_new

    for per in (make_merged(400), make_new(200)):
        for coll, seq, recs in batches_of(per, 150):
            nat = same(body_of(recs, coll, seq))
            assert nat is not None and nat.deferred == 0 and nat.table.num_rows == len(recs)


def test_fields_in_another_order_and_defaults_left_out() -> None:
    d = as_dict(full_record(record_id="h1:1", collector="h1"))
    shuffled = dict(random.Random(3).sample(list(d.items()), len(d)))
    bare = {k: v for k, v in as_dict(full_record(record_id="h1:2", collector="h1")).items()
            if k in ("record_id", "collector", "source", "start", "end", "final", "protocol",
                     "family", "client", "server", "observer")}
    nat = same(body_of([shuffled, bare]))
    assert nat is not None and nat.deferred == 0 and nat.table.num_rows == 2
    assert nat.table.column("extra").to_pylist()[1] is None


def test_extra_is_null_only_when_all_of_it_is_empty() -> None:
    base = dict(process=None, cgroup=None, tunnel=None, l3_bytes_c2s=None, l3_bytes_s2c=None,
                client_workload=None, server_workload=None, tcp_flags=None, incomplete=[],
                collector="h1")
    recs = [full_record(record_id="h1:1", **base),
            full_record(record_id="h1:2", **{**base, "tcp_flags": []}),
            full_record(record_id="h1:3", **{**base, "incomplete": ["x"]}),
            full_record(record_id="h1:4", **{**base, "client_workload": Workload("w")})]
    nat = same(body_of(recs))
    assert nat is not None and nat.deferred == 0
    extra = dict(zip(nat.table.column("record_id").to_pylist(),
                     nat.table.column("extra").to_pylist(), strict=True))
    assert extra["h1:1"] is None and all(extra[k] is not None for k in ("h1:2", "h1:3", "h1:4"))


# -- invalid records: each mutation of a valid record, next to a valid one ---------------------------
def _mut(**changes: Any):
    def apply(d: dict[str, Any]) -> dict[str, Any]:
        for path, value in changes.items():
            cur = d
            *heads, last = path.split("__")
            for h in heads:
                cur = cur[h]
            if value is DELETE:
                cur.pop(last)
            else:
                cur[last] = value
        return d
    return apply


DELETE = object()
MUTATIONS: dict[str, Any] = {
    "port as str": _mut(client__port="80"),
    "port 65536": _mut(server__port=65536),
    "port -1": _mut(server__port=-1),
    "bytes -1": _mut(bytes_c2s=-1),
    "bytes 2^63": _mut(bytes_c2s=2**63),
    "bytes 2^64-1": _mut(bytes_s2c=2**64 - 1),
    "bytes float": _mut(bytes_c2s=1.0),
    "bytes bool": _mut(retransmits=True),
    "bytes nil": _mut(resets=None),
    "family 5": _mut(family=5),
    "family str": _mut(family="6"),
    "schema 2": _mut(schema=2),
    "schema 0": _mut(schema=0),
    "schema left out": _mut(schema=DELETE),
    "source": _mut(source="ebpf"),
    "source sockdiag (no longer in the contract)": _mut(source="sockdiag"),
    "observer": _mut(observer="middle"),
    "connect": _mut(connect="nope"),
    "connect nil": _mut(connect=None),
    "protocol": _mut(protocol="TCP"),
    "tcp flag": _mut(tcp_flags=["SYN", "XYZ"]),
    "tcp flags nil": _mut(tcp_flags=None),
    "tcp flags not a list": _mut(tcp_flags="SYN"),
    "incomplete nil": _mut(incomplete=None),
    "incomplete int": _mut(incomplete=[1]),
    "final int": _mut(final=1),
    "loopback nil": _mut(loopback=None),
    "unknown key": _mut(bogus=1),
    "unknown key in client": _mut(client__bogus=1),
    "unknown key in workload": _mut(client_workload__bogus="x"),
    "unknown key in tunnel": _mut(tunnel__bogus=1),
    "no record_id": _mut(record_id=DELETE),
    "record_id nil": _mut(record_id=None),
    "no port": _mut(client__port=DELETE),
    "no vni": _mut(tunnel__vni=DELETE),
    "no rtt avg": _mut(rtt_us__avg=DELETE),
    "no comm": _mut(process__comm=DELETE),
    "no cmdline": _mut(process__cmdline=DELETE),
    "no cgroup path": _mut(cgroup__path=DELETE),
    "no workload name": _mut(server_workload__name=DELETE),
    "workload name nil": _mut(server_workload__name=None),
    "workload labels int": _mut(server_workload__labels={"a": 1}),
    "workload labels nil": _mut(server_workload__labels=None),
    "workload labels left out": _mut(server_workload__labels=DELETE),
    "workload namespace int": _mut(client_workload__namespace=5),
    "workload kind nil": _mut(client_workload__kind=None),
    "vni 2^24": _mut(tunnel__vni=2**24),
    "tunnel type": _mut(tunnel__type="gre"),
    "tunnel type geneve": _mut(tunnel__type="geneve"),
    "tunnel type gpe": _mut(tunnel__type="vxlan-gpe"),
    "source wire": _mut(source="wire"),
    "tunnel outer nil": _mut(tunnel_outer=None),
    "tunnel outer nested": _mut(tunnel_outer=[{"type": "vxlan", "vni": 7, "outer_src": "192.0.2.1",
                                               "outer_dst": "192.0.2.2", "outer_dport": 4789}]),
    "tunnel outer bad": _mut(tunnel_outer=[{"type": "vxlan", "vni": 2**24,
                                            "outer_src": "192.0.2.1", "outer_dst": "192.0.2.2",
                                            "outer_dport": 4789}]),
    "drops nil": _mut(drops=None),
    "drops": _mut(drops=[{"reason": "NETFILTER_DROP", "packets": 3}]),
    "drops bad reason": _mut(drops=[{"reason": "netfilter drop", "packets": 3}]),
    "drops negative": _mut(drops=[{"reason": "NO_SOCKET", "packets": -1}]),
    "source drops": _mut(source="drops"),
    "nat nil": _mut(nat=None),
    "nat dnat": _mut(nat=[{"type": "dnat", "original": {"ip": "10.96.0.10", "port": 80},
                           "translated": {"ip": "10.244.2.11", "port": 8080}, "netns": 4026532}]),
    "nat bad type": _mut(nat=[{"type": "masq", "original": {"ip": "10.96.0.10", "port": 80},
                               "translated": {"ip": "10.244.2.11", "port": 8080}}]),
    "nat mixed family": _mut(nat=[{"type": "dnat", "original": {"ip": "10.96.0.10", "port": 80},
                                   "translated": {"ip": "fd00::1", "port": 8080}}]),
    "nat empty": _mut(nat=[]),
    "nat chain, keys in another order, netns left out": _mut(nat=[
        {"translated": {"port": 15001, "ip": "127.0.0.1"}, "type": "redirect",
         "original": {"ip": "10.96.0.10", "port": 80}},
        {"type": "dnat", "original": {"ip": "127.0.0.1", "port": 15001},
         "translated": {"ip": "10.244.2.11", "port": 8080}, "netns": None},
        {"type": "snat", "original": {"ip": "10.244.1.11", "port": 40000},
         "translated": {"ip": "10.244.2.1", "port": 61000}, "netns": 2**40}]),
    "nat v6": _mut(nat=[{"type": "dnat", "original": {"ip": "fd00:96::10", "port": 80},
                         "translated": {"ip": "fd00::11", "port": 8080}}]),
    "nat ip not canonical": _mut(nat=[{"type": "dnat", "original": {"ip": "10.96.0.010", "port": 80},
                                       "translated": {"ip": "10.244.2.11", "port": 8080}}]),
    "nat port 65536": _mut(nat=[{"type": "dnat", "original": {"ip": "10.96.0.10", "port": 65536},
                                 "translated": {"ip": "10.244.2.11", "port": 8080}}]),
    "nat netns -1": _mut(nat=[{"type": "dnat", "original": {"ip": "10.96.0.10", "port": 80},
                               "translated": {"ip": "10.244.2.11", "port": 8080}, "netns": -1}]),
    "nat unknown key": _mut(nat=[{"type": "dnat", "original": {"ip": "10.96.0.10", "port": 80},
                                  "translated": {"ip": "10.244.2.11", "port": 8080}, "at": 1}]),
    "nat not a list": _mut(nat={"type": "dnat"}),
    "rtt min > avg": _mut(rtt_us__min=30),
    "rtt as list": _mut(rtt_us=[1, 2, 3]),
    "client as list": _mut(client=["10.0.0.1", 1]),
    "record_id prefix": _mut(record_id="h2:1"),
    "record_id no colon": _mut(record_id="h1"),
    "collector empty": _mut(collector="", record_id=":1"),
    "collector other": _mut(collector="h2", record_id="h2:1"),
    "end before start": _mut(end=datetime(2020, 1, 1, tzinfo=UTC)),
    "start as str": _mut(start="2026-11-28T04:00:00Z"),
    "start as int": _mut(start=1_700_000_000),
    "start in 1960": _mut(start=datetime(1960, 1, 1, tzinfo=UTC)),
    "end in 9999": _mut(end=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    "start ns": _mut(start=msgspec.msgpack.Ext(-1, (1 << 34 | 1_700_000_000).to_bytes(8, "big"))),
    "start 1e9 ns": _mut(start=msgspec.msgpack.Ext(
        -1, (1_000_000_000 << 34 | 1_700_000_000).to_bytes(8, "big"))),
    "start 96-bit": _mut(start=msgspec.msgpack.Ext(
        -1, (1000).to_bytes(4, "big") + (1_700_000_000).to_bytes(8, "big"))),
    "start 96-bit year 10000": _mut(end=msgspec.msgpack.Ext(
        -1, (0).to_bytes(4, "big") + (253402300800).to_bytes(8, "big"))),
    "start other extension": _mut(start=msgspec.msgpack.Ext(5, b"1234")),
    "ip v6 for family 4": _mut(family=4),
    "ip leading zero": _mut(family=4, client__ip="010.0.0.1", server__ip="10.0.0.2"),
    "ip leading zero last": _mut(family=4, client__ip="10.0.0.01", server__ip="10.0.0.2"),
    "ip 256": _mut(family=4, client__ip="10.0.0.256", server__ip="10.0.0.2"),
    "ip 3 parts": _mut(family=4, client__ip="1.2.3", server__ip="10.0.0.2"),
    "ip space": _mut(family=4, client__ip=" 10.0.0.1", server__ip="10.0.0.2"),
    "ip v4 ok": _mut(family=4, client__ip="0.0.0.0", server__ip="255.255.255.255"),
    "ip upper": _mut(client__ip="FD00::1"),
    "ip zero group kept": _mut(client__ip="fd00:0::1"),
    "ip leading zeros": _mut(client__ip="fd00::0001"),
    "ip single zero as ::": _mut(client__ip="1:2:3:4:5:6:7::"),
    "ip :: not longest": _mut(client__ip="1::2:0:0:0:3"),
    "ip mapped dotted": _mut(client__ip="::ffff:10.0.0.1"),
    "ip mapped": _mut(client__ip="::ffff:a00:1"),
    "ip scope": _mut(client__ip="fe80::1%eth0"),
    "ip nine groups": _mut(client__ip="1:2:3:4:5:6:7:8:9"),
    "ip empty": _mut(client__ip=""),
    "outer ip bad": _mut(tunnel__outer_src="10.0.0.1.5"),
    "outer ip v6": _mut(tunnel__outer_dst="fd00::9"),
    "outer ip upper": _mut(tunnel__outer_dst="FD00::9"),
}
# byte-level changes of the encoded record (old bytes -> new bytes, once)
BYTE_MUTATIONS: dict[str, tuple[dict[str, Any], bytes, bytes]] = {
    "bad utf-8 in record_id": ({"record_id": "h1:\x01\x02"}, b"h1:\x01\x02", b"h1:\xff\x02"),
    "surrogate in comm": ({"process__comm": "ab\x01\x02\x03"}, b"ab\x01\x02\x03", b"\xed\xa0\x80ab"),
    "overlong in label": ({"client_workload__labels": {"k": "\x01\x02"}}, b"\xa2\x01\x02",
                          b"\xa2\xc0\x80"),
    "bad utf-8 in incomplete": ({"incomplete": ["\x01\x02\x03\x04"]}, b"\x01\x02\x03\x04",
                                b"\xf4\x90\x80\x80"),
    "bad utf-8 in key": ({"bogus\x01": 1}, b"bogus\x01", b"bogus\xff"),
    "duplicate key": ({"resetz": 5}, b"\xa6resetz", b"\xa6resets"),
    "duplicate label": ({"client_workload__labels": {"dupkey1": "a", "dupkey2": "b"}},
                        b"dupkey2", b"dupkey1"),
    "duplicate port": ({"client__pört": 5}, b"\xa5" + "pört".encode(), b"\xa4port"),
    "int64 schema": ({}, b"\xa6schema\x01", b"\xa6schema\xd3" + (1).to_bytes(8, "big")),
    "uint16 port": ({"client__port": 1}, b"\xa4port\x01", b"\xa4port\xcd\x00\x01"),
    "str8 short comm": ({"process__comm": "ab"}, b"\xa4comm\xa2ab", b"\xa4comm\xd9\x02ab"),
    "str16 short ip": ({}, b"\xa2ip\xa7fd00::1", b"\xa2ip\xda\x00\x07fd00::1"),
    "bin for str": ({"container": "abc"}, b"\xa3abc", b"\xc4\x03abc"),
    "map16 rtt": ({}, b"\xa6rtt_us\x83", b"\xa6rtt_us\xde\x00\x03"),
    "array16 flags": ({"tcp_flags": ["SYN"]}, b"\x91\xa3SYN", b"\xdc\x00\x01\xa3SYN"),
    "nested too deep": ({"container": "zz"}, b"\xa2zz", b"\x91" * 40 + b"\x90"),
    "reserved byte": ({"container": "zz"}, b"\xa2zz", b"\xc1"),
}


def mutated(name: str) -> bytes:
    d = as_dict(full_record(record_id="h1:1", collector="h1"))
    if name in MUTATIONS:
        return msgspec.msgpack.encode(MUTATIONS[name](d))
    changes, old, new = BYTE_MUTATIONS[name]
    raw = msgspec.msgpack.encode(_mut(**changes)(d))
    assert old in raw, name
    return raw.replace(old, new, 1)


@pytest.mark.parametrize("name", [*MUTATIONS, *BYTE_MUTATIONS])
def test_an_invalid_or_unusual_record_gives_the_reference_result(name: str) -> None:
    good = full_record(record_id="h1:0", collector="h1")
    body = body_of([good, mutated(name), full_record(record_id="h1:2", collector="h1")])
    nat = same(body)
    if nat is not None and nat.native:  # the valid neighbours were decoded natively
        assert nat.table.num_rows + len(nat.rejected) == nat.total == 3
        assert nat.deferred == (0 if name in NATIVE_OK else 1), name
    else:
        assert name not in NATIVE_OK


# valid and ordinary after the change: the native decoder must take them itself
NATIVE_OK = {
    "schema left out", "connect nil", "tcp flags nil", "no cmdline", "no cgroup path",
    "workload labels left out", "workload kind nil", "end in 9999", "start 96-bit", "ip v4 ok",
    "outer ip v6", "int64 schema", "uint16 port", "str8 short comm", "str16 short ip",
    "map16 rtt", "array16 flags", "tunnel type geneve", "tunnel type gpe", "source wire",
    "tunnel outer nil", "drops nil", "nat nil", "nat dnat", "nat empty",
    "nat chain, keys in another order, netns left out", "nat v6"}


@SETTINGS
@given(data=st.data())
def test_batches_mixing_valid_and_invalid_records(data) -> None:
    names = sorted([*MUTATIONS, *BYTE_MUTATIONS])
    recs: list[Any] = []
    for i in range(data.draw(st.integers(1, 10))):
        if data.draw(st.booleans()):
            recs.append(data.draw(wide_records(i)))
        else:
            recs.append(mutated(data.draw(st.sampled_from(names))))
    same(body_of(recs, collector=data.draw(st.sampled_from(["h1", "h1", "h2"]))))


# -- envelopes ------------------------------------------------------------------------------------------
def payload_of(recs: list[Any], **env: Any) -> dict[str, Any]:
    return {"collector": "h1", "batch_seq": 7, "sent_at": SENT,
            "records": [msgspec.Raw(msgspec.msgpack.encode(r)) for r in recs], **env}


def test_envelopes() -> None:
    recs = [full_record(record_id=f"h1:{i}", collector="h1") for i in range(3)]
    enc = msgspec.msgpack.encode
    ok = enc(payload_of(recs))
    bodies = [
        b"", b"EWB", b"XXXX" + ok, codec.MAGIC + b"not zstd", compress(ok) + b"x",
        compress(ok + b"\x00"),  # trailing bytes
        compress(enc([1, 2])),
        compress(enc({"collector": "h1", "batch_seq": 1, "sent_at": SENT})),
        compress(enc(payload_of(recs, records=5))),
        compress(enc(payload_of(recs, batch_seq=2**64 - 1))),
        compress(enc(payload_of(recs, batch_seq=-3))),
        compress(enc(payload_of(recs, batch_seq="1"))),
        compress(enc(payload_of(recs, sent_at="2026-11-28T05:00:00Z"))),
        compress(enc(payload_of(recs, sent_at=datetime(1900, 1, 1, tzinfo=UTC)))),
        compress(enc(payload_of(recs, collector=5))),
        compress(enc({**payload_of(recs), "extra": 1})),  # unknown envelope key: ignored
        compress(enc(dict(reversed(list(payload_of(recs).items()))))),  # another key order
        compress(enc(payload_of([]))),
        compress(enc(payload_of(recs, collector="h\x01")).replace(b"h\x01", b"h\xff", 1)),
    ]
    for cut in (1, 5, 20, len(ok) // 2, len(ok) - 1):  # truncated payloads
        bodies.append(compress(ok[:cut]))
    for body in bodies:
        same(body)
    nat = same(compress(ok))
    assert nat is not None and nat.native and nat.deferred == 0


def test_records_are_served_lazily_in_batch_order() -> None:
    recs = [full_record(record_id=f"h1:{i}", collector="h1") for i in range(4)]
    body = body_of([recs[0], mutated("port 65536"), recs[1], mutated("collector other"),
                    recs[2], recs[3]])
    nat = same(body)
    assert nat is not None and nat.records() == recs and nat.records() is nat.records()
    assert [i for i, _, _ in nat.rejected] == [1, 3]
    assert nat.rejected[1] == (3, "collector", "collector='h2': differs from the batch's 'h1'")


def test_disabled_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(wire_columns.ENV, "0")
    monkeypatch.setattr(wire_columns, "_state", {})
    assert native_available() == (False, "disabled by EASTWEST_WIRE_NATIVE=0")
    b = decode_columns(body_of([full_record(record_id="h1:0", collector="h1")]))
    assert not b.native and b.table.num_rows == 1
    with pytest.raises(RuntimeError, match="not available"):
        decode_columns(b"", native=True)


def test_a_stale_build_is_refused(tmp_path, monkeypatch) -> None:
    cc = native_build.compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    import subprocess

    stale = tmp_path / "stale.so"
    spec = wire_columns.SPEC
    subprocess.run([cc, *spec.cflags, '-DEW_SOURCE_DIGEST="00000000"', "-o", str(stale),
                    *(str(spec.here / n) for n in spec.sources if n.endswith(".c"))], check=True)
    monkeypatch.setenv(wire_columns.ENV, str(stale))
    monkeypatch.setattr(wire_columns, "_state", {})
    ok, why = native_available()
    assert not ok and "built from other sources (digest 00000000" in why
    assert wire_columns.refused()


def test_threads_decode_concurrently() -> None:
    from concurrent.futures import ThreadPoolExecutor

    bodies = [body_of([full_record(record_id=f"h1:{k}-{i}", collector="h1",
                                   end=full_record().end + timedelta(seconds=i))
                       for i in range(300)]) for k in range(8)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(decode_columns, bodies * 3))
    for k, b in enumerate(got):
        assert b.table.num_rows == 300 and b.deferred == 0
        assert rows(b) == rows(decode_columns(bodies[k % 8], native=False))


@SETTINGS
@given(data=st.data())
def test_random_byte_damage_gives_the_reference_result(data) -> None:
    """Bytes overwritten, dropped or inserted anywhere in a record or the envelope."""
    recs = [data.draw(wide_records(i)) for i in range(data.draw(st.integers(1, 3)))]
    payload = bytearray(msgspec.msgpack.encode(
        {"collector": "h1", "batch_seq": 7, "sent_at": SENT, "records": recs}))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(payload) - 1))
        how = data.draw(st.sampled_from(["set", "drop", "insert"]))
        byte = data.draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xA0, 0xC0, 0xC1, 0xC3, 0xCC,
                                          0xCF, 0xD3, 0xD7, 0xD9, 0xDC, 0xDE, 0xFF]))
        if how == "set":
            payload[at] = byte
        elif how == "drop":
            del payload[at]
        else:
            payload.insert(at, byte)
    same(compress(bytes(payload)))
