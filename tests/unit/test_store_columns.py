"""The stored form of raw records: flat columns + `extra` (DuckDB) give back every record exactly,
whatever its optional fields; `to_table` (the whole-record layout) is unchanged; a DuckDB file
written before `extra` existed is migrated in place and its old rows still read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb
import msgspec
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.store.columns import COLUMN_NAMES, flows_table, to_table
from aggregator.store.duckdb import FILE_NAME, DuckDBStore
from eastwest import codec
from eastwest.record import (
    TCP_FLAG_NAMES,
    Cgroup,
    Drop,
    Endpoint,
    FlowRecord,
    Nat,
    Process,
    Rtt,
    Tunnel,
    Workload,
)
from tests.unit.test_record import full_record

T0 = datetime(2026, 11, 28, 4, 0, 0, 123456, tzinfo=UTC)
COUNT = st.integers(0, 2**63 - 1)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
OPT_TEXT = st.one_of(st.none(), TEXT)
WORKLOAD = st.builds(Workload, TEXT, OPT_TEXT, OPT_TEXT, OPT_TEXT,
                     st.dictionaries(TEXT, TEXT, max_size=2))


TUNNEL = st.builds(Tunnel, st.sampled_from(["vxlan", "geneve", "vxlan-gpe"]),
                   st.integers(0, 2**24 - 1), st.sampled_from(["10.213.0.1", "fd00:ed::1"]),
                   st.just("10.213.0.2"), st.integers(0, 65535))


@st.composite
def records(draw, n: int):
    rtt = draw(st.one_of(st.none(), st.tuples(COUNT, COUNT, COUNT).map(sorted)))
    v6 = draw(st.booleans())
    ip = st.sampled_from(["fd00::1", "::ffff:a00:9"] if v6 else ["10.0.0.1", "127.0.0.1"])
    start = T0 + timedelta(microseconds=draw(st.integers(0, 10**9)))
    return FlowRecord(
        record_id=f"h1:{n}", collector="h1", source=draw(st.sampled_from(["socket", "vxlan"])),
        start=start, end=start + timedelta(microseconds=draw(st.integers(0, 10**7))),
        final=draw(st.booleans()), protocol=draw(st.sampled_from(["tcp", "udp", "icmp"])),
        family=6 if v6 else 4, client=Endpoint(draw(ip), draw(st.integers(0, 65535))),
        server=Endpoint(draw(ip), draw(st.integers(0, 65535))),
        observer=draw(st.sampled_from(["client", "server", "path"])),
        bytes_c2s=draw(COUNT), bytes_s2c=draw(COUNT),
        packets_c2s=draw(st.one_of(st.none(), COUNT)), packets_s2c=draw(st.one_of(st.none(), COUNT)),
        l3_bytes_c2s=draw(st.one_of(st.none(), COUNT)), l3_bytes_s2c=draw(st.one_of(st.none(), COUNT)),
        connect=draw(st.sampled_from([None, "ok", "refused", "timeout", "reset"])),
        retransmits=draw(COUNT), resets=draw(COUNT),
        rtt_us=None if rtt is None else Rtt(*rtt),
        process=draw(st.one_of(st.none(), st.builds(Process, COUNT, TEXT, OPT_TEXT))),
        netns=draw(st.one_of(st.none(), COUNT)),
        cgroup=draw(st.one_of(st.none(), st.builds(Cgroup, COUNT, OPT_TEXT))),
        container=draw(OPT_TEXT),
        tunnel=draw(st.one_of(st.none(), TUNNEL)),
        # nested tunnels are rare on a real underlay: most drawn records have none
        tunnel_outer=draw(st.one_of(st.none(), st.none(), st.none(), st.none(),
                                    st.lists(TUNNEL, min_size=1, max_size=2))),
        client_workload=draw(st.one_of(st.none(), WORKLOAD)),
        server_workload=draw(st.one_of(st.none(), WORKLOAD)),
        tcp_flags=draw(st.one_of(st.none(), st.lists(st.sampled_from(TCP_FLAG_NAMES), max_size=3))),
        loopback=draw(st.booleans()), incomplete=draw(st.lists(TEXT, max_size=2)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_record_comes_back_field_for_field(tmp_path_factory, data):
    batch = [data.draw(records(i)) for i in range(data.draw(st.integers(1, 6)))]
    store = DuckDBStore(tmp_path_factory.mktemp("cols"))
    store.ingest("h1", 1, batch)
    back = store.records()
    key = lambda r: (r.end, r.record_id)  # noqa: E731 - the store's order
    assert back == sorted(batch, key=key)
    # the public JSON form too (times in UTC with Z, None vs [] kept apart)
    assert [codec.to_json(r) for r in back] == [codec.to_json(r) for r in sorted(batch, key=key)]
    store.close()


def test_a_record_with_drops_comes_back_with_them(tmp_path):
    """`drops` (issue 21) is stored in `extra`: a drop flow and a connection with drops."""
    syn = FlowRecord(record_id="node-1:7", collector="node-1", source="drops", start=T0, end=T0,
                     final=True, protocol="tcp", family=4, client=Endpoint("10.0.0.1", 40000),
                     server=Endpoint("10.0.0.2", 5432), observer="path",
                     drops=[Drop("NETFILTER_DROP", 3)])
    both = full_record().replace(source="drops", drops=[Drop("NO_SOCKET", 1), Drop("TCP_CSUM", 2)])
    store = DuckDBStore(tmp_path)
    store.ingest("node-1", 1, [syn, both])
    assert sorted(store.records(), key=lambda r: r.record_id) == sorted([syn, both],
                                                                      key=lambda r: r.record_id)
    store.close()


def test_a_record_with_nat_comes_back_with_it(tmp_path):
    """`nat` (issue 16) is stored in `extra`, after `dns` and `drops`: with and without them."""
    chain = [Nat("redirect", Endpoint("10.96.0.10", 80), Endpoint("127.0.0.1", 15001), 7),
             Nat("dnat", Endpoint("10.96.0.10", 80), Endpoint("10.244.2.11", 8080), 9)]
    alone = full_record().replace(record_id="node-1:8", nat=chain[1:])
    both = full_record().replace(record_id="node-1:9", source="drops", drops=[Drop("NO_SOCKET", 1)],
                                 nat=chain)
    store = DuckDBStore(tmp_path)
    store.ingest("node-1", 1, [alone, both])
    assert sorted(store.records(), key=lambda r: r.record_id) == [alone, both]
    store.close()


def test_full_and_empty_records_round_trip(tmp_path):
    full = full_record()
    bare = FlowRecord(record_id="node-1:43", collector="node-1", source="socket", start=T0,
                      end=T0, final=False, protocol="udp", family=4,
                      client=Endpoint("10.0.0.1", 1), server=Endpoint("10.0.0.2", 2),
                      observer="client")
    store = DuckDBStore(tmp_path)
    store.ingest("node-1", 1, [full, bare])
    assert sorted(store.records(), key=lambda r: r.record_id) == [full, bare]
    # nothing beyond the flat columns: no extra blob at all
    assert store._query("SELECT extra IS NULL FROM flows WHERE record_id = 'node-1:43'") == [(True,)]
    store.close()


def test_to_table_keeps_the_whole_record_layout():
    recs = [full_record(), full_record(record_id="node-1:7", tunnel=None, process=None)]
    t = to_table("node-1", 3, recs, T0)
    assert t.column_names == COLUMN_NAMES
    dec = msgspec.msgpack.Decoder(FlowRecord)
    assert [dec.decode(b) for b in t.column("record").to_pylist()] == recs
    assert t.column("client_ip").to_pylist() == ["fd00::1"] * 2
    assert t.column("pid").to_pylist() == [4242, None]
    flat = flows_table("node-1", 3, recs, T0)
    for name in set(COLUMN_NAMES) - {"record"}:
        assert flat.column(name).to_pylist() == t.column(name).to_pylist(), name


OLD_FLOWS_DDL = (  # the flows table as files written before `extra` have it
    "CREATE TABLE flows (collector VARCHAR NOT NULL, batch_seq BIGINT NOT NULL, record_id VARCHAR "
    "NOT NULL, source VARCHAR NOT NULL, start_ts TIMESTAMPTZ NOT NULL, end_ts TIMESTAMPTZ NOT NULL, "
    "final BOOLEAN NOT NULL, protocol VARCHAR NOT NULL, family TINYINT NOT NULL, client_ip VARCHAR "
    "NOT NULL, client_port INTEGER NOT NULL, server_ip VARCHAR NOT NULL, server_port INTEGER NOT "
    "NULL, observer VARCHAR NOT NULL, bytes_c2s BIGINT NOT NULL, bytes_s2c BIGINT NOT NULL, "
    "packets_c2s BIGINT, packets_s2c BIGINT, connect VARCHAR, retransmits BIGINT NOT NULL, resets "
    "BIGINT NOT NULL, rtt_min_us BIGINT, rtt_avg_us BIGINT, rtt_max_us BIGINT, pid BIGINT, comm "
    "VARCHAR, netns BIGINT, container VARCHAR, vni INTEGER, outer_src VARCHAR, outer_dst VARCHAR, "
    "loopback BOOLEAN NOT NULL, incomplete BOOLEAN NOT NULL, ingested_at TIMESTAMPTZ NOT NULL, "
    "record BLOB NOT NULL)")


def test_a_file_of_the_old_layout_is_migrated_and_old_rows_still_read(tmp_path):
    old = full_record(record_id="node-1:1")
    con = duckdb.connect(str(tmp_path / FILE_NAME))
    con.execute(OLD_FLOWS_DDL)
    con.register("t", to_table("node-1", 1, [old], T0))
    old_names = [n for n in COLUMN_NAMES if n != "tunnel_type"]  # added after `extra`
    con.execute(f"INSERT INTO flows SELECT {', '.join(old_names)} FROM t")
    con.close()
    store = DuckDBStore(tmp_path)
    new = full_record(record_id="node-1:2", end=old.end + timedelta(seconds=1))
    store.ingest("node-1", 2, [new])
    assert store.records() == [old, new]
    assert store.count() == 2
    store.close()
    again = DuckDBStore(tmp_path)  # a second open finds it migrated
    assert again.records() == [old, new]
    again.close()


@pytest.mark.parametrize("field", ["client_workload", "tcp_flags", "incomplete", "cgroup"])
def test_each_extra_field_alone_round_trips(tmp_path, field):
    keep = {field: getattr(full_record(), field)}
    rec = FlowRecord(record_id="node-1:9", collector="node-1", source="socket", start=T0, end=T0,
                     final=True, protocol="tcp", family=4, client=Endpoint("10.0.0.1", 1),
                     server=Endpoint("10.0.0.2", 2), observer="server", **keep)
    store = DuckDBStore(tmp_path)
    store.ingest("node-1", 1, [rec])
    assert store.records() == [rec]
    store.close()


@pytest.mark.parametrize("same_layout", [True, False])
def test_a_step_of_several_batches_keeps_each_rows_collector_and_batch(tmp_path, same_layout):
    """A correlation step writes its raw batches in one INSERT (a dictionary column names each
    row's collector); batches of different layouts fall back to an INSERT per batch. Either way
    every row keeps its own batch's collector and batch_seq, and every mark is written."""
    from aggregator.correlate import Plan
    from aggregator.store.base import RawBatch, WriteStep
    from aggregator.store.columns import flat_table
    from aggregator.store.derived import Derived

    def bare(i: int, collector: str) -> FlowRecord:
        return FlowRecord(record_id=f"{collector}:{i}", collector=collector, source="socket",
                          start=T0, end=T0 + timedelta(seconds=i), final=True, protocol="tcp",
                          family=4, client=Endpoint("10.0.0.1", 1000 + i),
                          server=Endpoint("10.0.0.2", 80), observer="client")

    batches = [("h1", 1, [bare(0, "h1"), bare(1, "h1")]), ("h2", 7, [bare(2, "h2")]),
               ("h1", 2, [bare(3, "h1"), bare(4, "h1"), bare(5, "h1")]), ("h3", 1, [])]
    raw = []
    for collector, seq, recs in batches:
        table = flat_table(recs) if recs else None
        if table is not None and not same_layout and collector == "h2":  # another layout
            table = table.cast(table.schema.set(table.schema.get_field_index("client_port"),
                                                pa.field("client_port", pa.int64())))
        raw.append(RawBatch(collector, seq, len(recs), table))
    store = DuckDBStore(tmp_path)
    store.write_batches(WriteStep(raw, Derived(Plan())))
    rows = store._query("SELECT record_id, collector, batch_seq FROM flows ORDER BY record_id")
    assert sorted(rows) == sorted((r.record_id, c, seq) for c, seq, recs in batches for r in recs)
    assert sorted(store._query("SELECT collector, batch_seq, records FROM ingested_batches")) == [
        ("h1", 1, 2), ("h1", 2, 3), ("h2", 7, 1), ("h3", 1, 0)]
    assert {r.record_id for r in store.records()} == {f"h1:{i}" for i in (0, 1, 3, 4, 5)} | {"h2:2"}
    store.close()
