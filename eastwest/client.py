"""The read-API client of the `eastwest` query commands (flows, graph, workloads, top, diff).

In:  where the aggregator is and the read token, from flags > environment (`EASTWEST_SERVER`,
     `EASTWEST_TOKEN`) > config file (`~/.config/eastwest/config.yaml`, or `$XDG_CONFIG_HOME`,
     or `--config FILE`) > default `http://127.0.0.1:8470`; with no token so far, the
     aggregator's own `EASTWEST_READ_TOKEN` (as `make run`'s tokens.env sets it).
Out: JSON documents and text from `GET /api/v1/...`, and Server-Sent Events from the stream
     route (parsed as the HTML Living Standard, "9.2 Server-sent events", says: `event:`,
     `data:` (joined with newlines), `id:`, a blank line dispatches, `:` lines are comments).

Errors are translated here, at the boundary, into one clear line each:
- the aggregator cannot be reached, times out, or fails (5xx)  -> TransportError (exit 1)
- the token is missing, refused (401) or of the wrong scope (403) -> TransportError (exit 1)
- an answer that is not JSON, a stream that is not SSE, a stream
  silent for longer than three of its keep-alives                 -> TransportError (exit 1)
- a route this aggregator does not have (404 `Not Found`)      -> TransportError (exit 1),
  "is it an older version?"; a 404 with the API's own reason (a
  workload it has not seen)                                      -> NotFound (exit 1), the reason
- the API rejects a parameter (400, naming it)                  -> ConfigError (exit 2)
- a bad server URL, config key or token file                    -> ConfigError (exit 2)
The token is sent as `Authorization: Bearer` (RFC 6750) and never printed.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import yaml

from eastwest import __version__
from eastwest.errors import ConfigError, TransportError

if TYPE_CHECKING:  # httpx costs ~0.2 s to import: only commands that talk to the API pay it
    import httpx

DEFAULT_SERVER = "http://127.0.0.1:8470"
SERVER_ENV = "EASTWEST_SERVER"
TOKEN_ENV = "EASTWEST_TOKEN"
READ_TOKEN_ENV = "EASTWEST_READ_TOKEN"  # what the aggregator reads; last resort here
CONFIG_KEYS = ("server", "token", "token_file", "ca_file", "timeout")
# The stream sends `: keep-alive` every 15 s when no flow matches (docs/api.md): three missed, or
# no answer at all, and the stream is dead (a peer gone without a FIN would wait forever).
STREAM_SILENCE_S = 45.0
Params = Sequence[tuple[str, str | int]]


class RejectedRequest(ConfigError):
    """A 400 from the API: a parameter it does not accept (the API's detail names it)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(path, None, detail)
        self.args = (f"the aggregator rejected {path}: {detail}",)


class NotFound(TransportError):
    """A 404 that names what the API did not find (`workload='x': not seen in this window`):
    the route exists, the thing does not. `detail` is the API's reason; the command that asked
    may say it better (eastwest/cli/workloads.py)."""

    def __init__(self, where: str, path: str, detail: str) -> None:
        super().__init__(f"the aggregator at {where} found nothing at {path}: {detail}")
        self.path, self.detail = path, detail


# FastAPI's answer for a path no route matches (and the only 404 body that means "no route")
UNKNOWN_ROUTE = {"detail": "Not Found"}


@dataclass(frozen=True)
class ClientSettings:
    server: str = DEFAULT_SERVER
    token: str | None = None
    ca_file: str | None = None
    timeout: float = 10.0
    origin: dict[str, str] = field(default_factory=dict)  # setting -> where it came from

    def __post_init__(self) -> None:
        import httpx

        url = httpx.URL(self.server)
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(self.origin.get("server", "--server"), self.server,
                              "not an http(s) URL, e.g. http://127.0.0.1:8470")
        if self.timeout <= 0:
            raise ConfigError(self.origin.get("timeout", "--timeout"), self.timeout, "must be > 0")


def default_config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "eastwest" / "config.yaml"


def load_config(path: Path, *, required: bool) -> dict[str, Any]:
    """The config file as a dict; a missing default file is empty, a missing --config an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError("--config", str(path), "no such file") from None
        return {}
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", str(path), f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "must be a mapping of server, token, ...")
    for key in data:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{path}: {key}", data[key] if key != "token" else "<hidden>",
                              f"unknown key; known: {', '.join(CONFIG_KEYS)}")
    return data


def read_token_file(path: str, key: str) -> str:
    """A bare token, or an env file with EASTWEST_TOKEN= or EASTWEST_READ_TOKEN= (what the
    aggregator's `make run` writes)."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise ConfigError(key, path, f"cannot be read: {exc.strerror}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    for name in (TOKEN_ENV, "EASTWEST_READ_TOKEN"):
        for ln in lines:
            k, eq, v = ln.partition("=")
            if eq and k.strip().removeprefix("export ").strip() == name:
                return v.strip().strip("'\"")
    if len(lines) == 1 and "=" not in lines[0]:
        return lines[0]
    raise ConfigError(key, path, f"holds neither a bare token nor a line {TOKEN_ENV}=...")


def resolve_settings(*, server: str | None = None, token: str | None = None,
                     token_file: str | None = None, config: str | None = None,
                     ca_file: str | None = None, timeout: float | None = None,
                     env: Mapping[str, str] | None = None) -> ClientSettings:
    """Flags > environment > config file > defaults; `origin` records which one won."""
    env = os.environ if env is None else env
    path = Path(config).expanduser() if config else default_config_path(env)
    conf = load_config(path, required=bool(config))
    origin: dict[str, str] = {}

    def pick(name: str, flag: Any, env_name: str | None) -> Any:
        if flag is not None:
            origin[name] = f"--{name.replace('_', '-')}"
            return flag
        if env_name and env.get(env_name):
            origin[name] = env_name
            return env[env_name]
        if conf.get(name) is not None:
            origin[name] = f"{path}: {name}"
            return conf[name]
        return None

    srv = pick("server", server, SERVER_ENV) or DEFAULT_SERVER
    tok = pick("token", token, TOKEN_ENV)
    if tok is None:
        tf = pick("token_file", token_file, None)
        if tf is not None:
            tok = read_token_file(str(tf), origin["token_file"])
            origin["token"] = origin["token_file"]
    if tok is None and env.get(READ_TOKEN_ENV):  # the aggregator's own variable (tokens.env)
        tok, origin["token"] = env[READ_TOKEN_ENV], READ_TOKEN_ENV
    raw_timeout = pick("timeout", timeout, None)
    try:
        tmo = float(raw_timeout) if raw_timeout is not None else 10.0
    except (TypeError, ValueError):
        raise ConfigError(origin["timeout"], raw_timeout, "not a number of seconds") from None
    return ClientSettings(server=str(srv).rstrip("/"), token=str(tok).strip() if tok else None,
                          ca_file=pick("ca_file", ca_file, None), timeout=tmo, origin=origin)


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        try:
            return msgspec.json.decode(self.data)
        except msgspec.DecodeError as exc:
            raise TransportError(f"the aggregator sent an event that is not JSON: {exc}") from None


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    event, last_id = "message", None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield SseEvent(event, "\n".join(data), last_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value


class ApiClient:
    """One connection pool to one aggregator; use as a context manager."""

    def __init__(self, settings: ClientSettings, transport: httpx.BaseTransport | None = None) -> None:
        import httpx

        self.settings = settings
        headers = {"User-Agent": f"eastwest-cli/{__version__}", "Accept": "application/json"}
        if settings.token:
            headers["Authorization"] = f"Bearer {settings.token}"
        verify: Any = True
        if settings.ca_file:
            try:
                verify = ssl.create_default_context(cafile=settings.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(settings.origin.get("ca_file", "--ca-file"), settings.ca_file,
                                  f"not a readable CA bundle: {exc}") from None
        self._http = httpx.Client(base_url=settings.server, headers=headers, verify=verify,
                                  timeout=settings.timeout, transport=transport)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- requests ---------------------------------------------------------------------------
    def get_json(self, path: str, params: Params = ()) -> Any:
        resp = self._send(path, params)
        try:
            return msgspec.json.decode(resp.content)
        except msgspec.DecodeError:
            raise TransportError(f"the aggregator at {self.settings.server} answered {path} "
                                 "with something that is not JSON") from None

    def get_text(self, path: str, params: Params = ()) -> str:
        return self._send(path, params).text

    def stream(self, path: str, params: Params = ()) -> Iterator[SseEvent]:
        """Server-Sent Events until the server closes the stream (or the caller stops)."""
        import httpx

        where = self.settings.server
        silence = max(self.settings.timeout, STREAM_SILENCE_S)
        timeout = httpx.Timeout(self.settings.timeout, read=silence)
        answered = False
        try:
            with self._http.stream("GET", path, params=list(params), timeout=timeout,
                                   headers={"Accept": "text/event-stream"}) as resp:
                answered = True
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp, path)
                ctype = resp.headers.get("content-type", "").partition(";")[0].strip().lower()
                if ctype != "text/event-stream":
                    raise TransportError(f"the aggregator at {where} answered {path} with "
                                         f"{ctype or 'no content type'}, not Server-Sent Events")
                yield from parse_sse(resp.iter_lines())
        except httpx.TimeoutException as exc:
            waited = silence if isinstance(exc, httpx.ReadTimeout) else self.settings.timeout
            if answered:
                raise TransportError(f"the aggregator at {where} sent nothing on {path} for "
                                     f"{waited:g}s, not even a keep-alive") from None
            raise TransportError(f"the aggregator at {where} did not answer within "
                                 f"{waited:g}s") from None
        except httpx.HTTPError as exc:
            raise self._translate(exc) from None

    def _send(self, path: str, params: Params) -> httpx.Response:
        import httpx

        try:
            resp = self._http.get(path, params=list(params))
        except httpx.HTTPError as exc:
            raise self._translate(exc) from None
        self._check(resp, path)
        return resp

    def _translate(self, exc: httpx.HTTPError) -> TransportError:
        import httpx

        where = self.settings.server
        if isinstance(exc, httpx.TimeoutException):
            return TransportError(f"the aggregator at {where} did not answer within "
                                  f"{self.settings.timeout:g}s")
        if isinstance(exc, httpx.ConnectError):
            reason = str(exc) or type(exc).__name__
            return TransportError(f"cannot reach the aggregator at {where}: {_short(reason)} "
                                  f"(server from {self.settings.origin.get('server', 'the default')})")
        return TransportError(f"talking to the aggregator at {where} failed: {_short(str(exc))}")

    def _check(self, resp: httpx.Response, path: str) -> None:
        code = resp.status_code
        if code < 400:
            return
        detail = _detail(resp)
        where = self.settings.server
        if code == 401:
            if not self.settings.token:
                raise TransportError(f"the aggregator at {where} needs a read token: pass --token "
                                     f"or --token-file, set {TOKEN_ENV} (or {READ_TOKEN_ENV}, as in make run's "
                                     "data/tokens.env), or put token: in ~/.config/eastwest/config.yaml")
            raise TransportError(f"the aggregator at {where} refused the token from "
                                 f"{self.settings.origin.get('token', '?')} (401: {detail})")
        if code == 403:
            raise TransportError(f"the aggregator at {where} refused the token from "
                                 f"{self.settings.origin.get('token', '?')} (403: {detail}); "
                                 "use the read token")
        if code == 400:
            raise RejectedRequest(path, detail)
        if code == 404:
            if _body(resp) == UNKNOWN_ROUTE:
                raise TransportError(f"the aggregator at {where} has no {path} (404: {detail}); "
                                     "is it an older version than this CLI?")
            raise NotFound(where, path, detail)
        raise TransportError(f"the aggregator at {where} failed on {path} ({code}: {detail})")


def _body(resp: httpx.Response) -> Any:
    """The JSON body of an error answer, or None when it is not JSON."""
    try:
        return resp.json()
    except ValueError:
        return None


def _detail(resp: httpx.Response) -> str:
    body = _body(resp)
    if body is None:
        return _short(resp.text) or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return _short(str(body["detail"]))
    return _short(resp.text)


def _short(text: str, n: int = 200) -> str:
    line = " ".join(text.split())
    return line[:n] + ("..." if len(line) > n else "")
