"""Export over NATS JetStream: spooled batches -> one JetStream subject per collector.

Stage: the sending end of export (collector/export.py batches and spools; this replaces only its
HTTP POST). In: one encoded batch (eastwest/codec.py wire form, unchanged). Out: the batch stored
in the JetStream stream (eastwest/jetstream.py), confirmed by the server's PubAck; the spool
removes it only then.

Same outcomes as the HTTP sender (`SendResult`), so `AggregatorSink` needs no other change:
- PubAck -> `ok`;
- not connected, timeout, no responders, stream full (discard new), NATS restarting -> retried
  with jittered backoff inside the deadline, then `gave_up`: the batch stays spooled and is sent
  when NATS is back (this is how collectors ride out a NATS restart);
- a batch larger than the server's max_payload can never be published -> `drop`, counted as
  `export/nats_max_payload`;
- an authorization failure -> `auth`: the batch stays spooled, the sender pauses, loudly.
The stream is created or validated at the first connection (`ensure_stream`); a stream that
belongs to someone else is a `ConfigError` at start.
Idempotency stays `(collector, batch_seq)` at the aggregators: a batch published twice (a
PubAck lost in a restart) is stored once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from collector.export import Backoff, SendResult
from eastwest.jetstream import LoopThread, NatsOptions, connect, ensure_stream

log = logging.getLogger("eastwest.export.nats")


class NatsSender:
    """Publishes one encoded batch to the collector's subject, retrying within `deadline`."""

    def __init__(self, opts: NatsOptions, collector: str, backoff: Backoff, deadline: float, *,
                 publish_timeout: float = 5.0, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        self.opts, self.subject = opts, opts.subject_for(collector)
        self.collector = collector
        self.backoff, self.deadline, self.publish_timeout = backoff, deadline, publish_timeout
        self.monotonic, self.sleep = monotonic, sleep
        self.loop = LoopThread("export-nats")
        self.nc: Any = None
        self.js: Any = None
        self._connect_at_start()

    def _connect_at_start(self) -> None:
        """Create or validate the stream now: a stream that is not ours stops the collector
        here (ConfigError); NATS being down does not (batches spool until it answers)."""
        from eastwest.errors import ConfigError

        try:
            self.loop.run(self._ensure(), self.opts.connect_timeout + 10)
        except ConfigError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable now: the sender keeps trying
            self._reset()
            log.warning("NATS %s not reachable at start (%s: %s): batches wait in the spool",
                        self.opts.url, type(exc).__name__, exc)

    async def _ensure(self) -> None:
        if self.nc is None or self.nc.is_closed:
            self.nc = await connect(self.opts, f"eastwest-collector:{self.collector}")
            self.js = self.nc.jetstream()
            await ensure_stream(self.js, self.opts)

    async def _publish(self, body: bytes) -> Any:
        await self._ensure()
        return await self.js.publish(self.subject, body, timeout=self.publish_timeout,
                                     stream=self.opts.stream)

    def send(self, body: bytes) -> SendResult:
        from nats import errors as nerr
        from nats.js import errors as jerr

        give_up_at = self.monotonic() + self.deadline
        attempt = 0
        while True:
            try:
                ack = self.loop.run(self._publish(body), self.publish_timeout + self.opts.connect_timeout + 5)
                return SendResult("ok", attempt + 1, None, {"stream": ack.stream, "seq": ack.seq})
            except nerr.MaxPayloadError as exc:
                return SendResult("drop", attempt + 1, None, error=f"nats_max_payload: {exc}")
            except (nerr.AuthorizationError, nerr.NoRespondersError) as exc:
                if isinstance(exc, nerr.AuthorizationError):
                    return SendResult("auth", attempt + 1, None, error=f"NATS: {exc}")
                error = f"{type(exc).__name__}: no stream answers on {self.subject}"
            except jerr.APIError as exc:  # stream full (discard new), leader election, ...
                error = f"JetStream: {exc}"
            except Exception as exc:  # noqa: BLE001 - connection refused, timeouts, closed conn
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, (OSError, nerr.NoServersError, nerr.ConnectionClosedError)):
                    self._reset()
            wait = self.backoff.delay(attempt)
            attempt += 1
            if self.monotonic() + wait > give_up_at:
                return SendResult("gave_up", attempt, None, error=error)
            self.sleep(wait)

    def _reset(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None:
            try:
                self.loop.run(nc.close(), 5)
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        self._reset()
        self.loop.stop()

