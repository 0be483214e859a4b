"""Ingest and the DuckDB store: good records stored, bad ones rejected alone with index and
reason, batches applied exactly once (also across a reopen), limits answered with 413."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import zstandard
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from aggregator.store import BACKENDS, open_store
from aggregator.store.query import RecordQuery
from eastwest import codec
from eastwest.codec import Batch
from eastwest.record import Endpoint, FlowRecord, Process, Rtt, Tunnel, Workload
from tests.servers import store_location

T0 = datetime(2026, 11, 28, 4, 0, 0, 123456, tzinfo=UTC)
INGEST, READ = "i" * 24, "r" * 24


def rec(n: int, collector: str = "h1", **over) -> FlowRecord:
    base = dict(record_id=f"{collector}:{n}", collector=collector, source="socket",
                start=T0 + timedelta(seconds=n), end=T0 + timedelta(seconds=n + 1),
                final=n % 2 == 0, protocol="tcp", family=4,
                client=Endpoint("10.244.1.11", 40000 + n), server=Endpoint("10.244.2.11", 8080),
                observer="client", bytes_c2s=100 + n, bytes_s2c=200 + n, connect="ok",
                rtt_us=Rtt(10, 20, 30), process=Process(42, "ew-api"), netns=4026532000,
                tunnel=Tunnel("vxlan", 42, "10.213.0.1", "10.213.0.2", 4789),
                client_workload=Workload("api", "shop", labels={"app": "api"}))
    base.update(over)
    return FlowRecord(**base)


def wire(records, collector="h1", seq=1) -> bytes:
    return codec.encode_batch(Batch(collector, seq, T0, list(records)))


def raw_wire(collector: str, seq: int, items: list) -> bytes:
    """A batch whose records are arbitrary builtins (to smuggle bad records in)."""
    payload = msgspec.msgpack.encode({"collector": collector, "batch_seq": seq, "sent_at": T0,
                                      "records": items})
    return codec.MAGIC + zstandard.ZstdCompressor().compress(payload)


@pytest.fixture
def settings(tmp_path):
    return AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST, read_token=READ,
                              max_body_bytes=1024 * 1024, max_batch_records=50)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def post(client, body: bytes, token=INGEST, ctype=codec.CONTENT_TYPE):
    return client.post("/api/v1/ingest", content=body,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})


def stored(client) -> list[dict]:
    r = client.get("/api/v1/records", params={"limit": 1000},
                   headers={"Authorization": f"Bearer {READ}"})
    assert r.status_code == 200, r.text
    return r.json()["records"]


# -- the store, per backend ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_store_round_trips_every_field_and_marks_the_batch(tmp_path, backend):
    store = open_store(backend, store_location(backend, tmp_path))
    records = [rec(n) for n in range(7)]
    result = store.ingest("h1", 5, records)
    assert (result.stored, result.duplicate) == (7, False)
    assert store.batch_applied("h1", 5) and not store.batch_applied("h1", 6)
    assert store.records() == records
    assert store.count() == 7
    store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_applies_a_batch_once_even_after_reopening(tmp_path, backend):
    store = open_store(backend, store_location(backend, tmp_path))
    store.ingest("h1", 1, [rec(1), rec(2)])
    assert store.ingest("h1", 1, [rec(1), rec(2)]).duplicate
    store.close()
    again = open_store(backend, store_location(backend, tmp_path))
    assert again.ingest("h1", 1, [rec(1), rec(2)]).duplicate
    assert again.ingest("h2", 1, [rec(1, "h2")]).stored == 1  # same seq, other collector
    assert again.count() == 3
    again.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_selects_by_time_range_and_collector(tmp_path, backend):
    store = open_store(backend, store_location(backend, tmp_path))
    store.ingest("h1", 1, [rec(n) for n in range(10)])
    store.ingest("h2", 1, [rec(n, "h2") for n in range(3)])
    window = store.records(RecordQuery(T0 + timedelta(seconds=3), T0 + timedelta(seconds=6), "h1"))
    assert [r.record_id for r in window] == ["h1:2", "h1:3", "h1:4"]  # end in [3 s, 6 s)
    assert len(store.records(RecordQuery(limit=4))) == 4
    store.close()


# -- the endpoint -------------------------------------------------------------------------------
def test_a_binary_batch_is_stored_and_a_retry_is_applied_once(client):
    body = wire([rec(n) for n in range(5)], seq=9)
    first = post(client, body)
    assert first.status_code == 200
    assert first.json() == {"collector": "h1", "batch_seq": 9, "duplicate": False,
                            "accepted": 5, "rejected": []}
    second = post(client, body)
    assert second.status_code == 200 and second.json()["duplicate"] is True
    assert len(stored(client)) == 5


def test_the_json_form_is_accepted_for_scripts(client):
    body = msgspec.json.encode(Batch("h1", 3, T0, [rec(1), rec(2), rec(3)]))
    r = post(client, body, ctype="application/json")
    assert r.status_code == 200 and r.json()["accepted"] == 3
    assert [x["record_id"] for x in stored(client)] == ["h1:1", "h1:2", "h1:3"]


def test_bad_records_are_rejected_alone_with_index_and_reason(client):
    good = [msgspec.to_builtins(rec(n)) for n in range(4)]
    items = [good[0], dict(good[1], client={"ip": "10.0.0.1", "port": 70000}), good[2],
             dict(good[3], collector="h9", record_id="h9:3"), {"nonsense": True},
             dict(msgspec.to_builtins(rec(5)), bytes_c2s=2**64 - 1)]
    r = post(client, raw_wire("h1", 1, items))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2
    rejected = {x["index"]: x for x in body["rejected"]}
    assert sorted(rejected) == [1, 3, 4, 5]
    assert rejected[1]["field"] == "client.port" and "70000" in rejected[1]["reason"]
    assert rejected[3]["field"] == "collector" and "'h9'" in rejected[3]["reason"]
    assert rejected[5]["field"] == "bytes_c2s"
    assert [x["record_id"] for x in stored(client)] == ["h1:0", "h1:2"]


@pytest.mark.parametrize("form", ["wire", "json"])
def test_an_unknown_field_is_named_with_its_own_value(client, form):
    """An unknown field's reason shows the field (its dotted path) and the value it had
    (`bad=True`), not `bad=None` nor the whole object holding it."""
    good = msgspec.to_builtins(rec(1))
    items = [dict(good, bad=True), dict(good, client={"ip": "10.244.1.11", "port": 1, "bad": 0})]
    if form == "wire":
        r = post(client, raw_wire("h1", 1, items))
    else:
        r = post(client, msgspec.json.encode({"collector": "h1", "batch_seq": 1,
                                              "sent_at": T0.isoformat(), "records": items}),
                 ctype="application/json")
    assert r.status_code == 200, r.text
    rejected = [(x["field"], x["reason"]) for x in r.json()["rejected"]]
    assert rejected == [("bad", "bad=True: Object contains unknown field `bad`"),
                        ("client.bad", "client.bad=0: Object contains unknown field `bad`")]


def test_metrics_count_records_in_out_and_dropped_by_reason(client):
    items = [msgspec.to_builtins(rec(1)), {"broken": 1}, msgspec.to_builtins(rec(2))]
    assert post(client, raw_wire("h1", 1, items)).status_code == 200
    text = client.get("/metrics").text
    assert "eastwest_records_in_total 3.0" in text
    assert "eastwest_records_out_total 2.0" in text
    assert 'eastwest_dropped_total{reason="invalid_record",stage="ingest"} 1.0' in text
    assert 'eastwest_ingest_batches_total{result="stored"} 1.0' in text
    assert "eastwest_store_records 2.0" in text
    assert "eastwest_ingest_batch_seconds_count 1.0" in text
    # /metrics waits for the worker: the journal has nothing left to apply, correlation no lag
    assert "eastwest_journal_bytes 0.0" in text and "eastwest_correlation_lag_records 0.0" in text


def test_an_acknowledged_batch_is_in_the_journal_until_the_store_has_applied_it(client):
    """The 200 comes once the batch is synced to the journal; the worker applies it behind. Held
    here (its planner gated), the batch is counted stored (/readyz, the journal's bytes) and a
    retry is a duplicate; the records read waits for it."""
    import threading

    pipe = client.app.state.pipeline
    worker = pipe.correlation
    gate = threading.Event()
    plan = worker._correlate
    worker._correlate = lambda take: (gate.wait(10), plan(take))[1]
    try:
        assert post(client, wire([rec(1), rec(2)])).status_code == 200
        assert worker.journal.bytes() > 0 and pipe.store.count() == 0
        assert client.get("/readyz").json()["records"] == 2
        assert post(client, wire([rec(1), rec(2)])).json()["duplicate"] is True
    finally:
        gate.set()
    assert [x["record_id"] for x in stored(client)] == ["h1:1", "h1:2"]
    assert worker.journal.bytes() == 0 and pipe.store.count() == 2


@pytest.mark.parametrize("body,fragment", [
    (b"", "magic"),
    (b"EWB1", "zstd"),
    (b"EWB1" + zstandard.ZstdCompressor().compress(b"\x93\x01\x02\x03"), "malformed"),
    (b"\x00" * 100, "magic"),
])
def test_an_envelope_that_is_not_a_batch_is_a_400_naming_why(client, body, fragment):
    r = post(client, body)
    assert r.status_code == 400 and fragment in r.json()["detail"]


@pytest.mark.parametrize("collector,seq", [("", 1), ("h1", -1), ("h1", 2**63), ("x" * 300, 1)])
def test_a_bad_envelope_key_is_a_400(client, collector, seq):
    r = post(client, raw_wire(collector, seq, []))
    assert r.status_code == 400 and ("collector" in r.text or "batch_seq" in r.text)


def test_a_body_over_the_limit_is_a_413(client, settings):
    r = post(client, b"EWB1" + b"\x00" * settings.max_body_bytes)
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]


def test_a_batch_over_the_record_limit_is_a_413_and_stores_nothing(client):
    r = post(client, wire([rec(n) for n in range(51)]))
    assert r.status_code == 413 and "51 records" in r.json()["detail"]
    assert stored(client) == []


def test_an_unknown_content_type_is_a_415(client):
    r = post(client, b"hello", ctype="text/plain")
    assert r.status_code == 415


def test_bad_read_parameters_are_400s_naming_them(client):
    h = {"Authorization": f"Bearer {READ}"}
    for params, name in (({"since": "yesterday"}, "since"), ({"until": "soon"}, "until"),
                         ({"limit": 0}, "limit"), ({"limit": "many"}, "limit"),
                         ({"collector": "x" * 254}, "collector"),
                         ({"since": "1h", "until": "2h"}, "since"),
                         ({"colector": "h2"}, "colector")):
        r = client.get("/api/v1/records", params=params, headers=h)
        assert r.status_code == 400 and r.json()["parameter"] == name, (params, r.text)
        assert name in r.json()["detail"]


def test_records_take_the_times_of_every_route_and_a_typo_never_widens_them(client):
    """`since`/`until` are `now`, a duration ago or RFC 3339 (UTC without a zone), as on every
    other route; `colector=` (a typo) is a 400, not every record."""
    h = {"Authorization": f"Bearer {READ}"}
    now = datetime.now(UTC)
    recent = rec(2, start=now - timedelta(minutes=20), end=now - timedelta(minutes=10))
    assert post(client, wire([rec(1), recent, rec(3, collector="h2")])).json()["accepted"] == 2
    post(client, wire([rec(3, collector="h2")], collector="h2"))

    def ids(**params):
        r = client.get("/api/v1/records", params=params, headers=h)
        assert r.status_code == 200, r.text
        return [x["record_id"] for x in r.json()["records"]]

    assert ids() == ["h1:1", "h2:3", "h1:2"]
    assert ids(since="1h") == ["h1:2"]
    assert ids(until="1h") == ["h1:1", "h2:3"]
    assert ids(since="now") == []
    assert ids(since=(T0 + timedelta(seconds=3)).replace(tzinfo=None).isoformat()) == ["h2:3", "h1:2"]
    assert ids(collector="h2") == ["h2:3"]
    r = client.get("/api/v1/records", params={"colector": "h2"}, headers=h)
    assert r.status_code == 400 and r.json()["parameter"] == "colector"


def test_a_failing_store_is_a_503_with_retry_after(settings):
    """What the ack waits for fails (the journal's disk is full): 503 + Retry-After, counted,
    and nothing is stored; the retry goes through once the disk has room."""
    from aggregator.store import StoreError

    with TestClient(create_app(settings)) as c:
        journal = c.app.state.pipeline.correlation.journal
        append = journal.append

        def full(*a):
            raise StoreError("disk full")

        journal.append = full
        r = post(c, wire([rec(1)]))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "disk full" in r.json()["detail"]
        assert c.app.state.drops.snapshot()[("ingest", "store_unavailable")] == 1
        journal.append = append
        assert post(c, wire([rec(1)])).status_code == 200
        assert [x["record_id"] for x in stored(c)] == ["h1:1"]


def test_a_string_that_is_not_utf8_rejects_its_record_alone_not_a_500(client):
    payload = msgspec.msgpack.encode({"collector": "h1", "batch_seq": 1, "sent_at": T0,
                                      "records": [{**msgspec.to_builtins(rec(1)), "container": "Q"},
                                                  msgspec.to_builtins(rec(2))]})
    assert payload.count(b"\xa1Q") == 1
    body = codec.MAGIC + zstandard.ZstdCompressor().compress(payload.replace(b"\xa1Q", b"\xa1\xff"))
    r = post(client, body)
    assert r.status_code == 200, r.text
    assert [x["index"] for x in r.json()["rejected"]] == [0]
    assert "UTF-8" in r.json()["rejected"][0]["reason"]
    assert [x["record_id"] for x in stored(client)] == [rec(2).record_id]


def test_a_whole_backlog_behind_answers_429_with_retry_after(client):
    import threading

    from aggregator.worker import WorkerSettings

    worker = client.app.state.pipeline.correlation
    worker.settings = WorkerSettings(max_pending=1, admit_wait_s=0.1)
    gate = threading.Event()
    plan = worker._correlate
    worker._correlate = lambda take: (gate.wait(10), plan(take))[1]
    try:
        assert post(client, wire([rec(1)])).status_code == 200
        r = post(client, wire([rec(2)], seq=2))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "records behind (--correlation-backlog 1)" in r.json()["detail"]
    finally:
        gate.set()
    assert post(client, wire([rec(2)], seq=2)).status_code == 200
    assert [x["record_id"] for x in stored(client)] == ["h1:1", "h1:2"]
