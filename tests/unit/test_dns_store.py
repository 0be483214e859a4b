"""A record with a `dns` summary through the aggregator's ingest and store: the native batch decoder
leaves it to Python (as `tunnel_outer`), both decoders give the same columns, the DuckDB store
gives the record back field for field, and records without one keep their extra bytes exactly."""

from __future__ import annotations

from datetime import UTC, datetime

from aggregator.store import wire_columns
from aggregator.store.columns import flat_table
from aggregator.store.duckdb import DuckDBStore
from eastwest.record import (
    DnsAnswer,
    DnsLatency,
    DnsName,
    DnsSummary,
    Endpoint,
    FlowRecord,
    Process,
)
from tests.unit.test_wire_columns import body_of, same

T0 = datetime(2026, 12, 7, 8, 0, 0, 123456, tzinfo=UTC)
DNS = DnsSummary(
    queries=3, responses=2, timeouts=1, rcodes={"NOERROR": 1, "NXDOMAIN": 1},
    latency_us=DnsLatency(800, 1200, 1600),
    names=[DnsName("api.example.com.", "A", 2, {"NOERROR": 1}, 1),
           DnsName("gone.example.com.", "AAAA", 1, {"NXDOMAIN": 1})],
    other_names=0,
    answers=[DnsAnswer("api.example.com.", "CNAME", "edge.example.net.", 30, T0),
             DnsAnswer("api.example.com.", "A", "203.0.113.7", 30, T0)])


def rec(i: int, dns: DnsSummary | None) -> FlowRecord:
    return FlowRecord(record_id=f"h1:{i}", collector="h1", source="wire", start=T0, end=T0,
                      final=True, protocol="udp", family=4, client=Endpoint("10.0.0.5", 40000 + i),
                      server=Endpoint("10.0.0.53", 53), observer="path", bytes_c2s=90,
                      bytes_s2c=200, packets_c2s=3, packets_s2c=2, dns=dns,
                      process=Process(7, "ew-api") if i % 2 else None)


def test_native_decoder_defers_dns_records_and_both_give_the_same_columns() -> None:
    batch = [rec(1, DNS), rec(2, None), rec(3, None), rec(4, DNS)]
    ok, why = wire_columns.native_available()
    assert ok, why  # the native decoder is built here (scripts/setup-venv.sh)
    nat = same(body_of(batch))
    assert nat is not None and nat.native and nat.rejected == []
    assert nat.deferred == 2  # exactly the two with `dns`
    assert sorted(nat.records(), key=lambda r: r.record_id) == batch


def test_extra_of_a_record_without_dns_is_unchanged() -> None:
    t = flat_table([rec(1, None), rec(2, None)]).to_pydict()
    assert t["extra"] == [None, None]  # nothing beyond the flat columns: no blob
    with_dns = flat_table([rec(1, DNS)]).to_pydict()["extra"][0]
    assert with_dns is not None and with_dns[0] == 0x9D  # the 12 fields + dns


def test_duckdb_store_gives_dns_records_back_field_for_field(tmp_path) -> None:
    batch = [rec(1, DNS), rec(2, None), rec(3, DNS.__class__(queries=1, responses=0, timeouts=1))]
    store = DuckDBStore(tmp_path)
    try:
        store.ingest("h1", 1, batch)
        assert sorted(store.records(), key=lambda r: r.record_id) == batch
    finally:
        store.close()
