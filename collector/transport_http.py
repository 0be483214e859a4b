"""Export over HTTP: one spooled batch -> one POST to the aggregator's ingest endpoint.

Stage: the sending end of export (collector/export.py batches and spools, collector/retry.py
retries). In: one encoded batch (eastwest/codec.py wire form). Out: the `SendResult`
(collector/transport.py) of one `POST <aggregator>/api/v1/ingest` with the ingest token:
- 2xx -> `Accepted` with the aggregator's JSON (a `duplicate` answer too: it was applied before);
- 429, 500, 502, 503, 504 -> `Retry` `http_<status>`, with the answer's Retry-After (RFC 9110
  10.2.3: delta-seconds or an HTTP-date);
- no answer -> `Retry` `http_timeout`, `http_connect_error`, `http_network_error` (the
  connection broke), `http_protocol_error` or `http_transport_error`;
- 401, 403 -> `Retry` `http_401` / `http_403` with `auth`: the token is wrong;
- any other status (400, 413, 415, 422...) -> `Refused` `http_<status>`: never retried.
"""

from __future__ import annotations

import email.utils
from typing import Any

import httpx

from collector.transport import Accepted, Refused, Retry, SendResult
from eastwest import __version__
from eastwest.clock import Clock, SystemClock
from eastwest.codec import CONTENT_TYPE

INGEST_PATH = "/api/v1/ingest"
RETRYABLE = frozenset({429, 500, 502, 503, 504})
AUTH = frozenset({401, 403})


class HttpSender:
    """POSTs one encoded batch; `clock` dates a Retry-After given as an HTTP-date."""

    def __init__(self, client: httpx.Client, url: str, token: str, *,
                 clock: Clock | None = None) -> None:
        self.client, self.url, self.clock = client, url, clock or SystemClock()
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE,
                        "User-Agent": f"eastwest-collector/{__version__}"}

    def send(self, body: bytes) -> SendResult:
        try:
            resp = self.client.post(self.url, content=body, headers=self.headers)
        except httpx.TransportError as exc:  # connect, read, write, timeouts, protocol
            return Retry(_no_answer(exc), f"{type(exc).__name__}: {exc}")
        status = resp.status_code
        if 200 <= status < 300:
            return Accepted(_json(resp))
        reason, detail = f"http_{status}", _detail(resp)
        if status in AUTH:
            return Retry(reason, detail, auth=True)
        if status in RETRYABLE:
            after = parse_retry_after(resp.headers.get("retry-after"),
                                      now=self.clock.now().timestamp())
            return Retry(reason, detail, retry_after=after)
        return Refused(reason, detail)

    def close(self) -> None:
        self.client.close()


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds, or an HTTP-date minus `now`
    (seconds since the epoch). None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def _no_answer(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "http_timeout"
    if isinstance(exc, httpx.ConnectError):
        return "http_connect_error"
    if isinstance(exc, httpx.NetworkError):  # read, write, close: the connection broke
        return "http_network_error"
    if isinstance(exc, httpx.ProtocolError):
        return "http_protocol_error"
    return "http_transport_error"


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _detail(resp: httpx.Response) -> str:
    body = _json(resp)
    if isinstance(body, dict) and "detail" in body:
        return f"HTTP {resp.status_code}: {body['detail']}"
    return f"HTTP {resp.status_code}"
