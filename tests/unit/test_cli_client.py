"""The API client of the query commands: settings from flags > environment > config file >
default; errors translated into one clear line with the right exit code (unreachable or refused
token: 1; a parameter the API rejects: 2); Server-Sent Events parsed as the standard says.
The network boundary is faked with httpx.MockTransport, except for the unreachable aggregator,
which is a real closed port on loopback."""

from __future__ import annotations

import socket

import httpx
import pytest

from eastwest.cli import main
from eastwest.client import (
    DEFAULT_SERVER,
    ApiClient,
    ClientSettings,
    NotFound,
    RejectedRequest,
    parse_sse,
    resolve_settings,
)
from eastwest.errors import ConfigError, TransportError

TOKEN = "r" * 32


@pytest.fixture()
def closed_port():
    """A loopback port bound but not listening: connecting to it is refused, deterministically."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture()
def no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("EASTWEST_SERVER", raising=False)
    monkeypatch.delenv("EASTWEST_TOKEN", raising=False)
    return tmp_path / "xdg" / "eastwest" / "config.yaml"


# -- settings ---------------------------------------------------------------------------------
def test_defaults_without_flags_env_or_file():
    s = resolve_settings(env={"XDG_CONFIG_HOME": "/nonexistent"})
    assert (s.server, s.token, s.timeout) == (DEFAULT_SERVER, None, 10.0)


def test_flags_beat_environment_beats_config_file(tmp_path):
    conf = tmp_path / "eastwest" / "config.yaml"
    conf.parent.mkdir()
    conf.write_text("server: http://file:1\ntoken: file-token\ntimeout: 3\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    s = resolve_settings(env=env)
    assert (s.server, s.token, s.timeout) == ("http://file:1", "file-token", 3.0)
    assert s.origin["server"] == f"{conf}: server"
    env |= {"EASTWEST_SERVER": "http://env:2/", "EASTWEST_TOKEN": "env-token"}
    s = resolve_settings(env=env)
    assert (s.server, s.token, s.origin["token"]) == ("http://env:2", "env-token", "EASTWEST_TOKEN")
    s = resolve_settings(server="http://flag:3", token="flag-token", timeout=1, env=env)
    assert (s.server, s.token, s.timeout) == ("http://flag:3", "flag-token", 1.0)


def test_the_aggregators_read_token_variable_is_the_last_resort(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path), "EASTWEST_READ_TOKEN": "agg-token"}
    s = resolve_settings(env=env)  # `. data/tokens.env` is enough after `make run`
    assert (s.token, s.origin["token"]) == ("agg-token", "EASTWEST_READ_TOKEN")
    assert resolve_settings(env=env | {"EASTWEST_TOKEN": "mine"}).token == "mine"
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    assert resolve_settings(token_file=str(f), env=env).token == "from-file"


@pytest.mark.parametrize("text", [TOKEN, f"EASTWEST_TOKEN={TOKEN}",
                                  f"# make run\nEASTWEST_INGEST_TOKEN=x\nexport EASTWEST_READ_TOKEN='{TOKEN}'\n"])
def test_token_file_holds_a_bare_token_or_env_lines(text, tmp_path):
    f = tmp_path / "tok"
    f.write_text(text)
    assert resolve_settings(token_file=str(f), env={"XDG_CONFIG_HOME": "/x"}).token == TOKEN


@pytest.mark.parametrize(("conf", "key"), [
    ("server: http://x:1\ntokn: abc\n", "tokn"),
    ("- a\n- b\n", "--config"),
    ("server: [unclosed\n", "--config"),
    ("timeout: soon\n", "timeout"),
    ("server: localhost:8470\n", "server"),
])
def test_bad_config_file_names_the_key(conf, key, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(conf)
    with pytest.raises(ConfigError) as exc:
        resolve_settings(config=str(f), env={})
    assert key in exc.value.key


def test_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve_settings(config=str(tmp_path / "none.yaml"), env={})


# -- errors at the boundary -------------------------------------------------------------------
def client(handler, token=TOKEN) -> ApiClient:
    s = ClientSettings(server="http://agg.test:8470", token=token,
                       origin={"token": "EASTWEST_TOKEN"})
    return ApiClient(s, transport=httpx.MockTransport(handler))


def test_token_is_sent_as_bearer_and_params_repeat():
    seen = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["auth"] = req.headers.get("authorization")
        seen["params"] = list(req.url.params.multi_items())
        return httpx.Response(200, json={"flows": []})

    with client(handler) as c:
        assert c.get_json("/api/v1/flows", [("port", "80"), ("port", "443")]) == {"flows": []}
    assert seen == {"auth": f"Bearer {TOKEN}", "params": [("port", "80"), ("port", "443")]}


@pytest.mark.parametrize(("status", "token", "exc", "text"), [
    (401, TOKEN, TransportError, "refused the token from EASTWEST_TOKEN (401: invalid token)"),
    (401, None, TransportError, "needs a read token: pass --token"),
    (403, TOKEN, TransportError, "(403: this token is the ingest token"),
    (400, TOKEN, RejectedRequest, "rejected /api/v1/flows: port=x: not a port"),
    (404, TOKEN, TransportError, "has no /api/v1/flows (404"),
    (503, TOKEN, TransportError, "failed on /api/v1/flows (503: store unavailable"),
])
def test_http_errors_become_one_clear_line(status, token, exc, text):
    detail = {401: "invalid token", 403: "this token is the ingest token: it cannot be used",
              400: "port=x: not a port", 404: "Not Found", 503: "store unavailable: locked"}
    with client(lambda r: httpx.Response(status, json={"detail": detail[status]}), token) as c:
        with pytest.raises(exc) as info:
            c.get_json("/api/v1/flows")
    msg = str(info.value)
    assert text in msg and "\n" not in msg
    assert TOKEN not in msg


@pytest.mark.parametrize(("answer", "text"), [
    (httpx.Response(404, json={"detail": "Not Found"}),  # FastAPI: no route has this path
     "the aggregator at http://agg.test:8470 has no /api/v1/workloads/x (404: Not Found); is it "
     "an older version than this CLI?"),
    (httpx.Response(404, json={"detail": "workload='x': not seen in this window"}),
     "the aggregator at http://agg.test:8470 found nothing at /api/v1/workloads/x: "
     "workload='x': not seen in this window"),
])
def test_a_404_asks_about_versions_only_when_the_route_is_unknown(answer, text):
    with client(lambda r: answer) as c, pytest.raises(TransportError) as info:
        c.get_json("/api/v1/workloads/x")
    assert str(info.value) == text
    assert isinstance(info.value, NotFound) == ("older version" not in text)
    if isinstance(info.value, NotFound):
        assert info.value.detail == "workload='x': not seen in this window"


def test_unreachable_aggregator(closed_port):
    s = ClientSettings(server=f"http://127.0.0.1:{closed_port}", origin={"server": "--server"})
    with ApiClient(s) as c, pytest.raises(TransportError) as info:
        c.get_json("/api/v1/flows")
    assert str(info.value).startswith(f"cannot reach the aggregator at http://127.0.0.1:{closed_port}")


def test_cli_unreachable_aggregator_is_one_line_and_exit_1(closed_port, capsys, no_user_config):
    rc = main(["flows", "--server", f"http://127.0.0.1:{closed_port}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"eastwest flows: cannot reach the aggregator at http://127.0.0.1:{closed_port}")
    assert err.count("\n") == 1


def test_cli_server_from_environment(closed_port, capsys, no_user_config, monkeypatch):
    monkeypatch.setenv("EASTWEST_SERVER", f"http://127.0.0.1:{closed_port}")
    assert main(["flows"]) == 1
    assert "(server from EASTWEST_SERVER)" in capsys.readouterr().err


def test_timeout_is_one_line():
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=req)

    with client(handler) as c, pytest.raises(TransportError, match="did not answer within 10s"):
        c.get_json("/api/v1/graph")


def test_non_json_answer_is_an_error():
    with client(lambda r: httpx.Response(200, text="<html>")) as c:
        with pytest.raises(TransportError, match="not JSON"):
            c.get_json("/api/v1/graph")


# -- Server-Sent Events -----------------------------------------------------------------------
def test_sse_parsing_follows_the_standard():
    lines = [": keep-alive", "", "event: flow", "id: 7", 'data: {"a":', "data: 1}", "",
             "data:no-space", "", "event: other", "", "retry: 100", "data: x"]
    events = list(parse_sse(iter(lines)))
    assert [(e.event, e.data, e.id) for e in events] == [
        ("flow", '{"a":\n1}', "7"), ("message", "no-space", "7")]
    assert events[0].json() == {"a": 1}


def test_stream_yields_events_and_translates_a_refused_token():
    body = b"event: flow\ndata: {\"n\": 1}\n\n: ping\n\nevent: flow\ndata: {\"n\": 2}\n\n"

    def ok(req: httpx.Request) -> httpx.Response:
        assert req.headers["accept"] == "text/event-stream"
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with client(ok) as c:
        assert [e.json() for e in c.stream("/api/v1/flows/stream")] == [{"n": 1}, {"n": 2}]
    with client(lambda r: httpx.Response(401, json={"detail": "invalid token"})) as c:
        with pytest.raises(TransportError, match="refused the token"):
            list(c.stream("/api/v1/flows/stream"))


def test_a_stream_silent_past_its_keep_alives_fails_after_the_events_it_gave():
    class GoesSilent(httpx.SyncByteStream):
        def __iter__(self):
            yield b'event: flow\ndata: {"n": 1}\n\n'
            raise httpx.ReadTimeout("timed out")

    got = []
    sse_headers = {"content-type": "text/event-stream; charset=utf-8"}
    with client(lambda r: httpx.Response(200, stream=GoesSilent(), headers=sse_headers)) as c:
        with pytest.raises(TransportError) as info:
            got.extend(e.json() for e in c.stream("/api/v1/flows/stream"))
    assert got == [{"n": 1}]
    assert str(info.value) == ("the aggregator at http://agg.test:8470 sent nothing on "
                               "/api/v1/flows/stream for 45s, not even a keep-alive")


@pytest.mark.parametrize(("status", "rc"), [(401, 1), (403, 1), (400, 2), (503, 1)])
def test_cli_exit_codes_for_api_answers(status, rc, capsys, monkeypatch):
    fake = client(lambda r: httpx.Response(status, json={"detail": "no"}))
    monkeypatch.setattr("eastwest.cli._common.client_from_args", lambda args: fake)
    assert main(["flows", "--to-workload", "db"]) == rc
    err = capsys.readouterr().err
    assert err.startswith("eastwest flows: ") and err.count("\n") == 1
