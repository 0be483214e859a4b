"""Fuzzed ingest never produces a 5xx and never corrupts stored data: schemathesis against the
app's own OpenAPI spec, random bytes, truncated batches and bit-flipped payloads. After the storm
a valid batch is still stored, and every stored record still decodes and validates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import schemathesis
import zstandard
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from aggregator.store import open_store
from eastwest import codec
from eastwest.codec import Batch
from eastwest.record import Endpoint, FlowRecord

INGEST, READ = "ingest-token-fuzz-0123", "read-token-fuzz-012345"
T0 = datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)
OK_STATUSES = {200, 400, 401, 403, 404, 405, 413, 415}


def rec(n: int, collector: str = "h1") -> FlowRecord:
    return FlowRecord(record_id=f"{collector}:{n}", collector=collector, source="socket", start=T0,
                      end=T0 + timedelta(seconds=n), final=True, protocol="tcp", family=4,
                      client=Endpoint("10.0.0.1", 1000 + n), server=Endpoint("10.0.0.2", 80),
                      observer="client", bytes_c2s=n)


VALID = codec.encode_batch(Batch("h1", 1, T0, [rec(n) for n in range(20)]))
# after the storm: a collector no fuzzed batch can turn into (a bit flip makes "h9" "h1", and
# its records, all "h1", then valid: that batch would be stored as ("h1", 1), VALID's key)
AFTER = codec.encode_batch(Batch("after-storm", 1, T0, [rec(n, "after-storm") for n in range(20)]))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    s = AggregatorSettings(data_dir=tmp_path_factory.mktemp("fuzz"), ingest_token=INGEST,
                           read_token=READ, max_body_bytes=256 * 1024, max_batch_records=1000)
    # the store is the fixture's, not the app's: schemathesis' ASGI client runs the app's
    # lifespan around every call, which would close an app-owned store
    store = open_store("duckdb", s.data_dir)
    yield create_app(s, store=store)
    store.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def post(client, body: bytes, ctype: str = codec.CONTENT_TYPE):
    return client.post("/api/v1/ingest", content=body,
                       headers={"Authorization": f"Bearer {INGEST}", "Content-Type": ctype})


def assert_store_intact(app) -> None:
    for r in app.state.pipeline.read().records():
        assert FlowRecord.from_builtins(r.to_builtins()) == r  # decodes and still validates


# -- schemathesis -----------------------------------------------------------------------------
@schemathesis.serializer(codec.CONTENT_TYPE)
def _raw_bytes(ctx, value):
    return value if isinstance(value, bytes) else str(value).encode()


def _operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("path", ["/api/v1/ingest", "/api/v1/records", "/healthz", "/readyz",
                                  "/metrics", "/api/v1/policy/observed", "/api/v1/policy/suggest"])
def test_schemathesis_finds_no_server_error(app, path):
    ops = [op for op in _operations(app) if op.path == path]
    assert ops, f"{path} is missing from /openapi.json"
    token = INGEST if path == "/api/v1/ingest" else READ

    @settings(max_examples=80, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=st.one_of(*[op.as_strategy() for op in ops]))
    def run(case):
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        assert response.status_code < 500, (case.path, response.status_code, response.text[:300])
        case.validate_response(response, checks=[not_a_server_error])

    run()


# -- raw fuzzing -------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2048),
       ctype=st.sampled_from([codec.CONTENT_TYPE, "application/json", "application/octet-stream",
                              "", "text/plain"]))
def test_random_bytes_never_give_a_5xx(client, body, ctype):
    assert post(client, body, ctype).status_code in OK_STATUSES


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=512).map(lambda b: codec.MAGIC + b),
                      st.binary(max_size=512).map(
                          lambda b: codec.MAGIC + zstandard.ZstdCompressor().compress(b))))
def test_random_payloads_behind_the_magic_never_give_a_5xx(client, body):
    assert post(client, body).status_code in OK_STATUSES


def test_every_truncation_of_a_valid_batch_is_refused_and_stores_nothing(client, app):
    before = app.state.pipeline.correlation.count()
    for cut in range(len(VALID)):
        r = post(client, VALID[:cut])
        assert r.status_code == 400, (cut, r.status_code, r.text)
    assert app.state.pipeline.correlation.count() == before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bit_flipped_msgpack_is_stored_only_where_it_validates(client, app, data):
    payload = bytearray(msgspec.msgpack.encode(Batch("h9", 1, T0, [rec(1), rec(2), rec(3)])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= 1 << data.draw(st.integers(0, 7))
    body = codec.MAGIC + zstandard.ZstdCompressor().compress(bytes(payload))
    r = post(client, body)
    assert r.status_code in (200, 400, 413), r.text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.dictionaries(
    st.sampled_from(["record_id", "collector", "source", "start", "end", "final", "protocol",
                     "family", "client", "server", "observer", "bytes_c2s", "tunnel", "rtt_us"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
              st.text(max_size=20), st.lists(st.integers(), max_size=3),
              st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))), max_size=5))
def test_json_batches_of_junk_records_are_rejected_per_record(client, records):
    body = msgspec.json.encode({"collector": "h1", "batch_seq": 7, "sent_at": T0.isoformat(),
                                "records": records})
    r = post(client, body, "application/json")
    assert r.status_code == 200, r.text
    assert len(r.json()["rejected"]) == len(records)


def test_after_the_storm_a_valid_batch_is_stored_and_the_store_is_intact(client, app):
    r = post(client, AFTER)
    assert r.status_code == 200 and r.json()["accepted"] == 20, r.text
    mine = [x for x in app.state.pipeline.read().records() if x.collector == "after-storm"]
    assert sorted(x.record_id for x in mine) == sorted(f"after-storm:{n}" for n in range(20))
    assert_store_intact(app)
