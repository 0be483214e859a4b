"""The flow record contract: every field round-trips through JSON and the binary batch form,
and every bad value is named with its field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
import zstandard

from eastwest import codec
from eastwest.errors import CodecError, RecordError
from eastwest.record import (
    Cgroup,
    Endpoint,
    FlowRecord,
    Process,
    Rtt,
    Tunnel,
    Workload,
    flags_from_bits,
)

T0 = datetime(2026, 11, 28, 4, 0, 0, 123456, tzinfo=UTC)


def full_record(**over) -> FlowRecord:
    """A record with every field set to a non-default value."""
    base = dict(
        record_id="node-1:42", collector="node-1", source="vxlan", start=T0,
        end=T0 + timedelta(seconds=5, microseconds=7), final=True, protocol="tcp", family=6,
        client=Endpoint("fd00::1", 40001), server=Endpoint("fd00::2", 5432), observer="path",
        bytes_c2s=1234, bytes_s2c=98765, packets_c2s=11, packets_s2c=13, l3_bytes_c2s=2000,
        l3_bytes_s2c=99999, connect="reset", retransmits=3, resets=1, rtt_us=Rtt(10, 20, 35),
        process=Process(4242, "ew-api", "python -m api"), netns=4026531840,
        cgroup=Cgroup(1234, "/kubepods/pod1/abc"), container="abc",
        tunnel=Tunnel("vxlan", 42, "10.0.0.1", "10.0.0.2", 4789),
        client_workload=Workload("api", "shop", "Deployment", "h1", {"app": "api"}),
        server_workload=Workload("db", "shop", "StatefulSet", "h2", {"app": "db", "tier": "data"}),
        tcp_flags=["SYN", "ACK", "RST"], loopback=True, incomplete=["rtt"],
    )
    base.update(over)
    return FlowRecord(**base)


FIELDS = [f for f in FlowRecord.__struct_fields__]


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_round_trips_through_json(field):
    rec = full_record()
    back = codec.from_json(codec.to_json(rec))
    assert getattr(back, field) == getattr(rec, field)
    assert back == rec


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_round_trips_through_the_binary_batch(field):
    rec = full_record()
    batch = codec.Batch("node-1", 7, T0, [rec, full_record(record_id="node-1:43")])
    out = codec.decode_batch(codec.encode_batch(batch))
    assert (out.collector, out.batch_seq, out.sent_at, out.errors) == ("node-1", 7, T0, [])
    assert getattr(out.records[0], field) == getattr(rec, field)


def test_every_field_of_the_contract_is_in_the_json():
    names = set(msgspec.json.decode(codec.to_json(full_record())))
    contract = {
        "schema", "record_id", "collector", "source", "start", "end", "final", "protocol", "family",
        "client", "server", "observer", "bytes_c2s", "bytes_s2c", "packets_c2s", "packets_s2c",
        "l3_bytes_c2s", "l3_bytes_s2c", "connect", "retransmits", "resets", "rtt_us", "process",
        "netns", "cgroup", "container", "tunnel", "client_workload", "server_workload",
    }
    assert contract <= names


def test_timestamps_are_rfc3339_utc_with_microseconds():
    j = msgspec.json.decode(codec.to_json(full_record()))
    assert j["start"] == "2026-11-28T04:00:00.123456Z"
    assert j["end"] == "2026-11-28T04:00:05.123463Z"


def test_tcp_flags_from_header_bits():
    assert flags_from_bits(0x12) == ["SYN", "ACK"]
    assert flags_from_bits(0x14) == ["RST", "ACK"]


BAD_VALUES = [
    (("client", "port"), 70000, "client.port", 70000),
    (("server", "port"), -1, "server.port", -1),
    (("client", "ip"), "10.0.0.300", "client.ip", "10.0.0.300"),
    (("server", "ip"), "10.0.0.9", "server.ip", "10.0.0.9"),  # family is 6
    (("client", "ip"), "FD00::0001", "client.ip", "FD00::0001"),  # not canonical
    (("protocol",), "tcpx", "protocol", "tcpx"),
    (("source",), "netflow", "source", "netflow"),
    (("observer",), "both", "observer", "both"),
    (("connect",), "maybe", "connect", "maybe"),
    (("family",), 5, "family", 5),
    (("bytes_c2s",), -3, "bytes_c2s", -3),
    (("packets_s2c",), -1, "packets_s2c", -1),
    (("retransmits",), "many", "retransmits", "many"),
    (("tunnel", "vni"), 1 << 24, "tunnel.vni", 1 << 24),
    (("tunnel", "outer_src"), "nope", "tunnel.outer_src", "nope"),
    (("rtt_us", "min"), -5, "rtt_us.min", -5),
    (("schema",), 2, "schema", 2),
    (("record_id",), "other:1", "record_id", "other:1"),
    (("start",), "2026-11-28T04:00:00", "start", "2026-11-28T04:00:00"),
    (("end",), "2026-11-28T03:00:00Z", "end", None),
    (("tcp_flags",), ["SYN", "XMAS"], "tcp_flags", "XMAS"),
]


@pytest.mark.parametrize(("path", "value", "field", "shown"), BAD_VALUES,
                         ids=[".".join(b[0]) for b in BAD_VALUES])
def test_a_bad_value_is_named_with_its_field_and_value(path, value, field, shown):
    data = full_record().to_builtins()
    cur = data
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    with pytest.raises(RecordError) as err:
        FlowRecord.from_builtins(data)
    assert err.value.field == field
    if shown is not None:
        assert err.value.value == shown
    assert field in str(err.value)
    # the JSON path reports the same field
    with pytest.raises(RecordError) as err2:
        codec.from_json(msgspec.json.encode(data))
    assert err2.value.field == field


def test_unknown_and_missing_fields_are_named():
    data = full_record().to_builtins()
    data["colour"] = "blue"
    with pytest.raises(RecordError, match="colour"):
        FlowRecord.from_builtins(data)
    data = full_record().to_builtins()
    del data["observer"]
    with pytest.raises(RecordError, match="observer"):
        FlowRecord.from_builtins(data)


def test_construction_checks_meaning_too():
    with pytest.raises(RecordError, match="end"):
        full_record(end=T0 - timedelta(seconds=1))
    with pytest.raises(RecordError, match="start"):
        full_record(start=T0.replace(tzinfo=timezone(timedelta(hours=1))))


def test_a_bad_record_in_a_batch_is_rejected_alone():
    good = full_record().to_builtins()
    bad = full_record().to_builtins()
    bad["client"]["port"] = 99999
    payload = msgspec.msgpack.encode(
        {"collector": "node-1", "batch_seq": 3, "sent_at": T0, "records": [good, bad, good, "x"]}
    )
    out = codec.decode_batch(codec.MAGIC + zstandard.ZstdCompressor().compress(payload))
    assert len(out.records) == 2
    assert [i for i, _ in out.errors] == [1, 3]
    assert out.errors[0][1].field == "client.port"


def test_a_batch_that_is_not_a_batch_names_the_problem_and_offset():
    with pytest.raises(CodecError, match="magic") as err:
        codec.decode_batch(b"GET / HTTP/1.1")
    assert err.value.offset == 0
    with pytest.raises(CodecError, match="zstd") as err:
        codec.decode_batch(codec.MAGIC + b"\x00garbage")
    assert err.value.offset == 4
    with pytest.raises(CodecError, match="envelope"):
        codec.decode_batch(codec.MAGIC + zstandard.ZstdCompressor().compress(b"\x93\x01\x02\x03"))


def test_a_record_with_invalid_utf8_is_rejected_alone():
    good = msgspec.msgpack.encode(full_record())
    bad = msgspec.msgpack.encode(full_record(collector="node-1", record_id="node-1:ZZZZ"))
    bad = bad.replace(b"ZZZZ", b"\xff\xfe\xfd\xfc")
    raw = msgspec.msgpack.encode({"collector": "node-1", "batch_seq": 9, "sent_at": T0,
                                  "records": [msgspec.Raw(good), msgspec.Raw(bad)]})
    out = codec.decode_batch(codec.MAGIC + zstandard.ZstdCompressor().compress(raw))
    assert len(out.records) == 1
    assert [i for i, _ in out.errors] == [1] and "UTF-8" in str(out.errors[0][1])


def test_counters_are_bounded_to_signed_64_bits():
    data = full_record().to_builtins()
    data["bytes_c2s"] = 2**63
    with pytest.raises(RecordError) as err:
        codec.from_json(msgspec.json.encode(data))
    assert err.value.field == "bytes_c2s"


def test_record_ids_do_not_repeat_across_collector_restarts():
    import time

    from collector.pipeline import CollectorContext, live_first_seq

    first = CollectorContext("node-1", first_seq=live_first_seq()).next_record_id()
    time.sleep(0.001)  # a restart takes longer than this
    second = CollectorContext("node-1", first_seq=live_first_seq()).next_record_id()
    assert first != second and int(second.split(":")[1]) > int(first.split(":")[1])
