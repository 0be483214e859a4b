"""Tokens: ingest needs the ingest token, reads need the read token; no token, a wrong token and
the other scope's token are all refused; --insecure-open only on loopback; token files."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings, parse_listen, read_token
from eastwest import codec
from eastwest.errors import ConfigError

INGEST, READ = "ingest-token-0123456789", "read-token-0123456789ab"


@pytest.fixture
def client(tmp_path):
    s = AggregatorSettings(data_dir=tmp_path, ingest_token=INGEST, read_token=READ)
    with TestClient(create_app(s)) as c:
        yield c


def ingest(c, headers):
    return c.post("/api/v1/ingest", content=b"EWB1", headers={**headers,
                  "Content-Type": codec.CONTENT_TYPE})


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong-token-xxxxxxxxxx"}, 401),
    ({"Authorization": f"Basic {INGEST}"}, 401),
    ({"Authorization": f"Bearer {READ}"}, 403),
])
def test_ingest_refuses_no_token_a_wrong_token_and_the_read_token(client, headers, status):
    r = ingest(client, headers)
    assert r.status_code == status
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_ingest_with_the_ingest_token_reaches_the_decoder(client):
    r = ingest(client, {"Authorization": f"Bearer {INGEST}"})
    assert r.status_code == 400 and "zstd" in r.json()["detail"]  # past auth: the body is bad


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"Authorization": "Bearer nope-nope-nope-nope"}, 401),
    ({"Authorization": f"Bearer {INGEST}"}, 403),
    ({"Authorization": f"Bearer {READ}"}, 200),
])
def test_reads_need_the_read_token(client, headers, status):
    assert client.get("/api/v1/records", headers=headers).status_code == status


def test_health_and_metrics_need_no_token(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/metrics").status_code == 200


def test_insecure_open_serves_reads_without_a_token_on_loopback(tmp_path):
    s = AggregatorSettings(data_dir=tmp_path, host="127.0.0.1", insecure_open=True)
    with TestClient(create_app(s)) as c:
        assert c.get("/api/v1/records").status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.org", "::"])
def test_insecure_open_is_refused_off_loopback(tmp_path, host):
    with pytest.raises(ConfigError, match="--insecure-open"):
        AggregatorSettings(data_dir=tmp_path, host=host, insecure_open=True)


def test_insecure_open_keeps_the_ingest_token_when_one_is_set(tmp_path):
    s = AggregatorSettings(data_dir=tmp_path, insecure_open=True, ingest_token=INGEST)
    with TestClient(create_app(s)) as c:
        assert ingest(c, {}).status_code == 401
        assert c.get("/api/v1/records").status_code == 200


@pytest.mark.parametrize("kw,key", [
    ({"ingest_token": None, "read_token": READ}, "EASTWEST_INGEST_TOKEN"),
    ({"ingest_token": INGEST, "read_token": None}, "EASTWEST_READ_TOKEN"),
    ({"ingest_token": "short", "read_token": READ}, "ingest token"),
    ({"ingest_token": INGEST, "read_token": INGEST}, "read token"),
])
def test_missing_weak_or_shared_tokens_are_config_errors_naming_the_key(tmp_path, kw, key):
    with pytest.raises(ConfigError) as err:
        AggregatorSettings(data_dir=tmp_path, **kw)
    assert err.value.key == key


def test_tokens_come_from_the_environment_before_a_token_file(tmp_path):
    f = tmp_path / "tokens.env"
    f.write_text(f"EASTWEST_INGEST_TOKEN={INGEST}\nEASTWEST_READ_TOKEN='{READ}'\n")
    os.chmod(f, 0o600)
    assert read_token("EASTWEST_READ_TOKEN", {}, str(f)) == READ
    assert read_token("EASTWEST_INGEST_TOKEN", {}, str(f)) == INGEST
    assert read_token("EASTWEST_INGEST_TOKEN", {"EASTWEST_INGEST_TOKEN": "from-env"}, str(f)) == "from-env"
    bare = tmp_path / "bare"
    bare.write_text(INGEST + "\n")
    assert read_token("EASTWEST_INGEST_TOKEN", {}, str(bare)) == INGEST
    with pytest.raises(ConfigError, match="cannot be read"):
        read_token("EASTWEST_INGEST_TOKEN", {}, str(tmp_path / "missing"))


@pytest.mark.parametrize("text,expected", [("127.0.0.1:8470", ("127.0.0.1", 8470)),
                                           ("[::1]:9000", ("::1", 9000))])
def test_listen_addresses_parse(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8470", "host:", "host:http", "h:70000"])
def test_bad_listen_addresses_name_the_flag(text):
    with pytest.raises(ConfigError, match="--listen"):
        parse_listen(text)
