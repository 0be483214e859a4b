"""Export: flow records -> batches -> spool -> HTTP POST to the aggregator's ingest endpoint.

In:  lists of `FlowRecord`s from the pipeline (`AggregatorSink.write`, under the pipeline lock).
Out: batches in the wire form of eastwest/codec.py, POSTed with the ingest bearer token to
`<aggregator>/api/v1/ingest`; counts of records in, out and dropped by reason.

Stages, each replaceable in tests (fake transport, fake clock, no sleeps):
1. Batching (`AggregatorSink`): interim and final records go to separate batches (so the spool
   can shed interim first), sealed at `batch_size` records or `batch_age` seconds, whichever
   comes first, numbered by the spool's never-repeating `batch_seq`.
2. Spool (collector/spool.py): every sealed batch is on disk before it is sent. The sink takes
   the spool folder's lock (collector/spool_lock.py) at its start and keeps it after `close()`,
   until the process ends (`sink.spool.close()` releases it sooner, for tests): a successor
   waiting for the folder starts only once this process is gone, with its sockets (the
   `--metrics-listen` port) and BPF programs.
3. Sending (`BatchSender`): oldest batch first; retried with jittered exponential backoff within a
   deadline on connection errors, 429 and 5xx only, honouring Retry-After (RFC 9110 10.2.3).
   2xx removes the batch from the spool (a `duplicate` answer too: it was applied before).
   400/413/415/422 will never succeed: the batch is dropped and counted (`export/http_<code>`).
   401/403 mean the token is wrong: the batch stays spooled and the sender pauses, loudly.
   A deadline that runs out leaves the batch spooled; the sender pauses and tries again.
`close()` seals what is buffered, then drains the spool for up to `shutdown_timeout` seconds;
what is left stays spooled for the next start (see the crash bound in collector/spool.py).
"""

from __future__ import annotations

import argparse
import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from collector import identity
from collector.metrics import CollectorMetrics
from collector.pipeline import CollectorContext
from collector.spool import DEFAULT_MAX_BYTES, Kind, Spool
from collector.spool_lock import DEFAULT_WAIT
from eastwest import __version__
from eastwest.codec import CONTENT_TYPE, Batch, encode_batch
from eastwest.errors import ConfigError
from eastwest.record import FlowRecord

# The sender thread (HTTP to the aggregator) releases the GIL on every socket call and needs it
# back promptly while the pipeline encodes batches in Python: at CPython's default 5 ms switch
# interval each hand-back waited up to 5 ms. The collector process sets this (collector/main.py).
SWITCH_INTERVAL_S = 0.0005
log = logging.getLogger("eastwest.export")
INGEST_PATH = "/api/v1/ingest"
TOKEN_ENV = "EASTWEST_INGEST_TOKEN"
RETRYABLE = frozenset({429, 500, 502, 503, 504})
DROPPING = frozenset({400, 413, 415, 422})


@dataclass(frozen=True)
class ExportSettings:
    url: str
    token: str
    spool_dir: Path
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    spool_lock_wait: float = DEFAULT_WAIT  # for another process to leave the spool folder
    batch_size: int = 5000
    batch_age: float = 1.0
    deadline: float = 30.0
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    request_timeout: float = 10.0
    shutdown_timeout: float = 10.0
    ca_file: str | None = None
    transport: Literal["http", "nats"] = "http"  # nats: collector/transport_nats.py, url = --nats

    def __post_init__(self) -> None:
        if self.transport == "nats":
            pass  # NatsOptions (eastwest/jetstream.py) checks the URL, credentials and TLS
        elif not self.url.startswith(("http://", "https://")):
            raise ConfigError("--aggregator", self.url, "must be an http:// or https:// URL")
        elif not self.token:
            raise ConfigError(TOKEN_ENV, None, "the ingest token is required: set it or pass "
                              "--ingest-token-file")
        if self.batch_size < 1:
            raise ConfigError("--batch-size", self.batch_size, "must be at least 1")
        if self.batch_age <= 0:
            raise ConfigError("--batch-age", self.batch_age, "must be positive")
        if self.spool_lock_wait < 0:
            raise ConfigError("--spool-lock-wait", self.spool_lock_wait, "must be 0 or more seconds")

    @property
    def ingest_url(self) -> str:
        return self.url.rstrip("/") + INGEST_PATH

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: dict[str, str] | None = None) -> ExportSettings:
        import os

        env = dict(os.environ) if env is None else env
        nats = getattr(args, "nats", None)
        token = "" if nats else (env.get(TOKEN_ENV, "").strip()
                                 or _token_from_file(args.ingest_token_file))
        spool = args.spool_dir or identity.spool_dir(args)  # main resolved it already
        return cls(url=nats or args.aggregator, token=token or "", spool_dir=Path(spool),
                   transport="nats" if nats else "http",
                   spool_max_bytes=args.spool_max_bytes,
                   spool_lock_wait=getattr(args, "spool_lock_wait", DEFAULT_WAIT),
                   batch_size=args.batch_size,
                   batch_age=args.batch_age, deadline=args.send_deadline,
                   shutdown_timeout=args.shutdown_timeout, ca_file=args.ca_file)


def _token_from_file(path: str | None) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--ingest-token-file", path, f"cannot be read: {exc.strerror}") from None
    for line in text.splitlines():
        name, eq, value = line.strip().partition("=")
        if eq and name.removeprefix("export ").strip() == TOKEN_ENV:
            return value.strip().strip("'\"")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) == 1 and "=" not in lines[0]:
        return lines[0]
    raise ConfigError("--ingest-token-file", path, f"holds neither a bare token nor {TOKEN_ENV}=...")


# -- retry policy ------------------------------------------------------------------------------
class Backoff:
    """Exponential backoff with jitter: attempt n waits uniformly in [b/2, b], b = min(max,
    initial * 2**n). Retry-After, when given, replaces the computed wait."""

    def __init__(self, initial: float, maximum: float, rand: Callable[[], float] = random.random):
        self.initial, self.maximum, self.rand = initial, maximum, rand

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return max(0.0, retry_after)
        base = min(self.maximum, self.initial * (2 ** attempt))
        return base / 2 + self.rand() * base / 2


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110)."""
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
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


Outcome = Literal["ok", "drop", "auth", "gave_up"]


@dataclass
class SendResult:
    outcome: Outcome
    attempts: int
    status: int | None = None
    body: Any = None
    error: str | None = None


class BatchSender:
    """POSTs one encoded batch, retrying what may succeed later within `deadline` seconds."""

    def __init__(self, client: httpx.Client, url: str, token: str, backoff: Backoff,
                 deadline: float, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        self.client, self.url, self.backoff, self.deadline = client, url, backoff, deadline
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE,
                        "User-Agent": f"eastwest-collector/{__version__}"}
        self.monotonic, self.sleep = monotonic, sleep

    def send(self, body: bytes) -> SendResult:
        give_up_at = self.monotonic() + self.deadline
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                resp = self.client.post(self.url, content=body, headers=self.headers)
            except httpx.TransportError as exc:  # connect, read, write, timeouts, protocol
                status, error = None, f"{type(exc).__name__}: {exc}"
            else:
                status, error = resp.status_code, _detail(resp)
                if 200 <= status < 300:
                    return SendResult("ok", attempt + 1, status, _json(resp))
                if status in (401, 403):
                    return SendResult("auth", attempt + 1, status, error=error)
                if status not in RETRYABLE:
                    return SendResult("drop", attempt + 1, status, error=error)
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            wait = self.backoff.delay(attempt, retry_after)
            attempt += 1
            if self.monotonic() + wait > give_up_at:
                return SendResult("gave_up", attempt, status, error=error)
            self.sleep(wait)


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


# -- the sink ----------------------------------------------------------------------------------
class AggregatorSink:
    """Pipeline sink that batches, spools and sends records to the aggregator.

    `start=False` (tests) runs no threads: call `tick()` and `drain_once()` by hand."""

    def __init__(self, ctx: CollectorContext, args: argparse.Namespace | None = None, *,
                 settings: ExportSettings | None = None, client: httpx.Client | None = None,
                 metrics: CollectorMetrics | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] | None = None,
                 rand: Callable[[], float] = random.random, start: bool = True,
                 sender: Any = None) -> None:
        if settings is None:
            if args is None:
                raise ConfigError("export", None, "AggregatorSink needs args or settings")
            settings = ExportSettings.from_args(args)
        self.ctx, self.settings = ctx, settings
        self.metrics = metrics or CollectorMetrics(ctx.drops)
        # waits (bounded) while another process holds the folder: BusyError past the wait
        self.spool = Spool(settings.spool_dir, settings.spool_max_bytes, ctx.drops,
                           lock_wait=settings.spool_lock_wait)
        self.metrics.watch_spool(self.spool)
        self.monotonic = monotonic
        self._stop = threading.Event()      # stop batching/sending loops
        self._abort = threading.Event()     # shutdown deadline passed: stop retrying now
        self._work = threading.Event()      # something new in the spool
        self._sleep = sleep or self._abort.wait
        self._buf: dict[Kind, list[FlowRecord]] = {"interim": [], "final": []}
        self._since: dict[Kind, float | None] = {"interim": None, "final": None}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.server = None
        try:  # a sink that fails to start leaves the spool folder to the next process at once
            self.client = client or httpx.Client(
                timeout=settings.request_timeout, verify=settings.ca_file or True)
            backoff = Backoff(settings.backoff_initial, settings.backoff_max, rand)
            if sender is None and settings.transport == "nats":
                from collector.transport_nats import NatsSender
                from eastwest.jetstream import NatsOptions

                opts = NatsOptions.from_args(args) if args is not None else NatsOptions(settings.url)
                sender = NatsSender(opts, ctx.collector_id, backoff, settings.deadline,
                                    monotonic=monotonic, sleep=self._sleep)
            # the HTTP POST (BatchSender) or NATS JetStream (collector/transport_nats.py)
            self.sender = sender or BatchSender(self.client, settings.ingest_url, settings.token,
                                                backoff, settings.deadline, monotonic=monotonic,
                                                sleep=self._sleep)
            if metrics is None and args is not None and getattr(args, "metrics_listen", None):
                self.server = self.metrics.serve(args.metrics_listen)  # else the owner serves
        except BaseException:
            self.spool.close()
            raise
        if start:
            self._threads = [threading.Thread(target=self._ager, name="export-ager", daemon=True),
                             threading.Thread(target=self._sender, name="export-send", daemon=True)]
            for t in self._threads:
                t.start()
        if len(self.spool):
            log.warning("spool %s holds %d batches (%d records) from before: sending them first",
                        settings.spool_dir, len(self.spool), self.spool.records())
            self._work.set()

    # -- batching -----------------------------------------------------------------------------
    def write(self, records: list[FlowRecord]) -> None:
        if not records:
            return
        self.metrics.records_in.inc(len(records))
        with self._lock:
            now = self.monotonic()
            for r in records:
                kind: Kind = "final" if r.final else "interim"
                buf = self._buf[kind]
                if not buf:
                    self._since[kind] = now
                buf.append(r)
                if len(buf) >= self.settings.batch_size:
                    self._seal(kind)

    def tick(self) -> None:
        """Seal every buffer older than `batch_age`."""
        with self._lock:
            now = self.monotonic()
            for kind in ("interim", "final"):
                since = self._since[kind]
                if since is not None and now - since >= self.settings.batch_age:
                    self._seal(kind)

    def _seal(self, kind: Kind) -> None:
        records, self._buf[kind], self._since[kind] = self._buf[kind], [], None
        if not records:
            return
        seq = self.spool.allocate_seq()
        batch = Batch(self.ctx.collector_id, seq, self.ctx.clock.now(), records)
        if self.spool.put(seq, kind, len(records), encode_batch(batch)):
            self._work.set()

    # -- sending ------------------------------------------------------------------------------
    def drain_once(self) -> bool:
        """Send the oldest spooled batch; True when it left the spool (sent or dropped)."""
        entry = self.spool.oldest()
        if entry is None:
            return False
        try:
            body = self.spool.read(entry)
        except OSError as exc:
            self.ctx.drops.count("export", "spool_read_error", entry.records, detail=str(exc))
            self.spool.remove(entry)
            return True
        started = self.monotonic()
        result = self.sender.send(body)
        self.metrics.attempts.inc(result.attempts)
        if result.outcome == "ok":
            self.metrics.latency.observe(self.monotonic() - started)
            self._count_ok(entry.records, result.body)
            self.spool.remove(entry)
            return True
        if result.outcome == "drop":
            self.ctx.drops.count("export", f"http_{result.status}", entry.records,
                                 detail=f"batch {entry.seq} refused: {result.error}")
            self.spool.remove(entry)
            return True
        self.spool.release()
        self.metrics.failures.labels(result.outcome).inc()
        log.error("aggregator %s: batch %d not delivered (%s after %d attempts: %s); kept in the "
                  "spool", self.settings.url, entry.seq, result.outcome, result.attempts,
                  result.error)
        return False

    def _count_ok(self, records: int, body: Any) -> None:
        rejected = body.get("rejected", []) if isinstance(body, dict) else []
        bad = len(rejected) if isinstance(rejected, list) else 0
        self.metrics.records_out.inc(records - bad)
        if bad:
            self.ctx.drops.count("export", "rejected_by_aggregator", bad,
                                 detail=f"first: {rejected[0]}")

    def _ager(self) -> None:
        step = min(self.settings.batch_age / 2, 0.25)
        while not self._stop.wait(step):
            self.tick()

    def _sender(self) -> None:
        while not self._abort.is_set():
            self._work.clear()  # before looking, so a batch spooled meanwhile wakes us
            if self.drain_once():
                continue
            if len(self.spool) and not self._abort.is_set():
                self._abort.wait(self.settings.backoff_max)  # failed: pause, then retry
                continue
            if self._stop.is_set():
                return
            self._work.wait(0.5)

    # -- shutdown -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Seal everything buffered (it is then in the spool)."""
        with self._lock:
            for kind in ("interim", "final"):
                self._seal(kind)

    def close(self) -> None:
        self.flush()
        self._stop.set()
        self._work.set()
        deadline = self.monotonic() + self.settings.shutdown_timeout
        if not self._threads:  # no sender thread (tests, start=False): drain here
            while self.monotonic() < deadline and self.drain_once():
                pass
        for t in self._threads:
            while t.is_alive() and self.monotonic() < deadline:
                t.join(0.1)
        self._abort.set()
        for t in self._threads:
            t.join(self.settings.request_timeout + 1)
        left = len(self.spool)
        if left:
            log.warning("shutdown: %d batches (%d records) stay in %s for the next start", left,
                        self.spool.records(), self.settings.spool_dir)
        self.client.close()
        if hasattr(self.sender, "close"):
            self.sender.close()
        if self.server is not None:
            self.server.shutdown()
