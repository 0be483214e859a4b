"""Export: flow records -> batches -> spool -> the aggregator (HTTP POST or NATS JetStream).

In:  lists of `FlowRecord`s from the pipeline (`AggregatorSink.write`, under the pipeline lock).
Out: batches in the wire form of eastwest/codec.py, handed to a `Sender` (collector/transport.py):
POSTed with the ingest bearer token to `<aggregator>/api/v1/ingest` (collector/transport_http.py)
or published to JetStream (collector/transport_nats.py); counts of records in, out and dropped
by reason, of attempts and of retries by reason.

Stages, each replaceable in tests (fake sender or transport, `FakeClock`, no sleeps):
1. Batching (`AggregatorSink`): interim and final records go to separate batches (so the spool
   can shed interim first), sealed at `batch_size` records or `batch_age` seconds, whichever
   comes first, numbered by the spool's never-repeating `batch_seq`.
2. Spool (collector/spool.py): every sealed batch is on disk before it is sent. The sink takes
   the spool folder's lock (collector/spool_lock.py) at its start and keeps it after `close()`,
   until the process ends (`sink.spool.close()` releases it sooner, for tests): a successor
   waiting for the folder starts only once this process is gone, with its sockets (the
   `--metrics-listen` port) and BPF programs.
3. Sending: oldest batch first, through the retry policy (collector/retry.py): a `Retry` answer
   (connection errors, timeouts, 429 and 5xx, NATS not answering) is tried again with jittered
   exponential backoff within a deadline, honouring Retry-After (RFC 9110 10.2.3), and counted
   in `eastwest_export_retries_total{reason}`.
   `Accepted` removes the batch from the spool (a `duplicate` answer too: it was applied before).
   `Refused` (HTTP 400/413/415/422..., a batch whose every record alone is over NATS'
   max_payload) will never succeed: the batch is dropped and counted as `export/<reason>`
   (`export/http_413`, `export/nats_max_payload`). An `Accepted` may name records the sender
   could not hand over with the rest (`dropped`: NATS' lone records over max_payload,
   `export/nats_max_payload`; sub-shares past the mark's space, `export/nats_share_space`):
   those are counted, the rest is delivered.
   Refused credentials (HTTP 401/403, NATS authorization) leave the batch spooled and the sender
   pauses, loudly. A deadline that runs out leaves the batch spooled; the sender pauses and tries
   again.
All waits are slept on the context's clock (`ctx.clock`), the shutdown's included.
`close()` seals what is buffered, then drains the spool for up to `shutdown_timeout` seconds;
what is left stays spooled for the next start (see the crash bound in collector/spool.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from collector import identity
from collector.metrics import CollectorMetrics
from collector.pipeline import CollectorContext
from collector.retry import Backoff, RetryPolicy
from collector.spool import DEFAULT_MAX_BYTES, Kind, Spool
from collector.spool_lock import DEFAULT_WAIT
from collector.transport import Accepted, Refused, Sender
from collector.transport_http import INGEST_PATH, HttpSender
from collector.transport_nats import NatsSender
from eastwest.codec import Batch, encode_batch
from eastwest.errors import ConfigError
from eastwest.jetstream import NatsOptions
from eastwest.record import FlowRecord

# The sender thread (HTTP to the aggregator) releases the GIL on every socket call and needs it
# back promptly while the pipeline encodes batches in Python: at CPython's default 5 ms switch
# interval each hand-back waited up to 5 ms. The collector process sets this (collector/main.py).
SWITCH_INTERVAL_S = 0.0005
log = logging.getLogger("eastwest.export")
TOKEN_ENV = "EASTWEST_INGEST_TOKEN"


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


# -- the sink ----------------------------------------------------------------------------------
class AggregatorSink:
    """Pipeline sink that batches, spools and sends records to the aggregator.

    The sender is the `--aggregator` HTTP POST or the `--nats` JetStream publisher, unless one
    is given (tests). `start=False` (tests) runs no threads: call `tick()` and `drain_once()` by
    hand."""

    def __init__(self, ctx: CollectorContext, args: argparse.Namespace | None = None, *,
                 settings: ExportSettings | None = None, client: httpx.Client | None = None,
                 metrics: CollectorMetrics | None = None,
                 rand: Callable[[], float] = random.random, start: bool = True,
                 sender: Sender | None = None) -> None:
        if settings is None:
            if args is None:
                raise ConfigError("export", None, "AggregatorSink needs args or settings")
            settings = ExportSettings.from_args(args)
        self.ctx, self.settings, self.clock = ctx, settings, ctx.clock
        self.metrics = metrics or CollectorMetrics(ctx.drops)
        # waits (bounded) while another process holds the folder: BusyError past the wait
        self.spool = Spool(settings.spool_dir, settings.spool_max_bytes, ctx.drops,
                           lock_wait=settings.spool_lock_wait, clock=self.clock)
        self.metrics.watch_spool(self.spool)
        self._stop = threading.Event()      # stop batching/sending loops
        self._abort = threading.Event()     # shutdown deadline passed: stop retrying now
        self._work = threading.Event()      # something new in the spool
        self._buf: dict[Kind, list[FlowRecord]] = {"interim": [], "final": []}
        self._since: dict[Kind, float | None] = {"interim": None, "final": None}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.retry = RetryPolicy(Backoff(settings.backoff_initial, settings.backoff_max, rand),
                                 settings.deadline, self.clock)
        self.server = None
        try:  # a sink that fails to start leaves the spool folder to the next process at once
            self.sender = sender or _make_sender(settings, args, ctx, client)
            self.metrics.watch_sources([self.sender])  # NatsSender: its sub-share counters
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
            now = self.clock.monotonic()
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
            now = self.clock.monotonic()
            for kind in ("interim", "final"):
                since = self._since[kind]
                if since is not None and now - since >= self.settings.batch_age:
                    self._seal(kind)

    def _seal(self, kind: Kind) -> None:
        records, self._buf[kind], self._since[kind] = self._buf[kind], [], None
        if not records:
            return
        seq = self.spool.allocate_seq()
        batch = Batch(self.ctx.collector_id, seq, self.clock.now(), records)
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
        started = self.clock.monotonic()
        delivery = self.retry.deliver(self.sender, body, stop=self._abort)
        self.metrics.attempts.inc(delivery.attempts)
        for reason in delivery.retries:
            self.metrics.retries.labels(reason).inc()
        last = delivery.last
        if isinstance(last, Accepted):
            self.metrics.latency.observe(self.clock.monotonic() - started)
            self._count_ok(entry.records, last.answer)
            self.spool.remove(entry)
            return True
        if isinstance(last, Refused):
            self.ctx.drops.count("export", last.reason, entry.records,
                                 detail=f"batch {entry.seq} refused: {last.detail}")
            self.spool.remove(entry)
            return True
        self.spool.release()
        self.metrics.failures.labels(delivery.outcome).inc()
        log.error("aggregator %s: batch %d not delivered (%s after %d attempts: %s); kept in the "
                  "spool", self.settings.url, entry.seq, delivery.outcome, delivery.attempts,
                  last.detail)
        return False

    def _count_ok(self, records: int, answer: Any) -> None:
        rejected = answer.get("rejected", []) if isinstance(answer, dict) else []
        bad = len(rejected) if isinstance(rejected, list) else 0
        # records the sender could not hand over with the rest (NATS: a record alone over
        # max_payload), as (reason, records, detail)
        dropped = answer.get("dropped", []) if isinstance(answer, dict) else []
        lost = sum(n for _, n, _ in dropped)
        self.metrics.records_out.inc(records - bad - lost)
        if bad:
            self.ctx.drops.count("export", "rejected_by_aggregator", bad,
                                 detail=f"first: {rejected[0]}")
        for reason, n, detail in dropped:
            self.ctx.drops.count("export", reason, n, detail=detail)

    def _ager(self) -> None:
        step = min(self.settings.batch_age / 2, 0.25)
        while not self.clock.sleep(step, until=self._stop):
            self.tick()

    def _sender(self) -> None:
        while not self._abort.is_set():
            self._work.clear()  # before looking, so a batch spooled meanwhile wakes us
            if self.drain_once():
                continue
            if len(self.spool) and not self._abort.is_set():
                self.clock.sleep(self.settings.backoff_max, until=self._abort)  # failed: pause
                continue
            if self._stop.is_set():
                return
            self.clock.sleep(0.5, until=self._work)

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
        deadline = self.clock.monotonic() + self.settings.shutdown_timeout
        if not self._threads:  # no sender thread (tests, start=False): drain here
            while self.clock.monotonic() < deadline and self.drain_once():
                pass
        for t in self._threads:
            while t.is_alive() and self.clock.monotonic() < deadline:
                t.join(0.1)
        self._abort.set()
        for t in self._threads:
            t.join(self.settings.request_timeout + 1)
        left = len(self.spool)
        if left:
            log.warning("shutdown: %d batches (%d records) stay in %s for the next start", left,
                        self.spool.records(), self.settings.spool_dir)
        self.sender.close()
        if self.server is not None:
            self.server.shutdown()


def _make_sender(settings: ExportSettings, args: argparse.Namespace | None,
                 ctx: CollectorContext, client: httpx.Client | None) -> Sender:
    """The transport `settings.transport` names: NATS JetStream, or the HTTP POST."""
    if settings.transport == "nats":
        opts = NatsOptions.from_args(args) if args is not None else NatsOptions(settings.url)
        return NatsSender(opts, ctx.collector_id)
    client = client or httpx.Client(timeout=settings.request_timeout,
                                    verify=settings.ca_file or True)
    return HttpSender(client, settings.ingest_url, settings.token, clock=ctx.clock)
