"""Retrying one batch: a `Sender`'s attempts, spaced by jittered exponential backoff, inside a
deadline, honouring the receiver's Retry-After.

Stage: export, between the spool and the transport (collector/export.py calls `deliver` for the
oldest spooled batch). In: a `Sender` (collector/transport.py) and one encoded batch. Out: a
`Delivery`: the last attempt's result, how many attempts were made and the reason of every
`Retry` answer (what the sink counts as `eastwest_export_retries_total{reason}`).

Only a `Retry` is tried again, and only while the next wait still ends inside the deadline: a
`Refused` batch (`drop`) and refused credentials (`auth`) end the round at once, so does a
wait that would end past the deadline (`gave_up`, the batch stays spooled for the next round).
The waits are slept on the injected clock and end early when `stop` is set (shutdown): the round
then ends as `gave_up` without another attempt. Same policy for every transport, as the
OpenTelemetry exporters do it (retry only what may succeed later, within a deadline).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from collector.transport import Accepted, Refused, Sender, SendResult
from eastwest.clock import Clock

Outcome = Literal["ok", "drop", "auth", "gave_up"]


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


@dataclass(frozen=True)
class Delivery:
    """What one round of attempts came to."""

    last: SendResult
    attempts: int
    retries: tuple[str, ...] = field(default=())  # the reason of every `Retry` answer, in order

    @property
    def outcome(self) -> Outcome:
        if isinstance(self.last, Accepted):
            return "ok"
        if isinstance(self.last, Refused):
            return "drop"
        return "auth" if self.last.auth else "gave_up"


@dataclass(frozen=True)
class RetryPolicy:
    backoff: Backoff
    deadline: float  # seconds for one round, waits included (--send-deadline)
    clock: Clock

    def deliver(self, sender: Sender, body: bytes,
                stop: threading.Event | None = None) -> Delivery:
        """Send `body` until it is accepted, refused, or no retry fits in the deadline."""
        give_up_at = self.clock.monotonic() + self.deadline
        retries: list[str] = []
        attempt = 0
        while True:
            result = sender.send(body)
            attempt += 1
            if isinstance(result, Accepted | Refused):
                return Delivery(result, attempt, tuple(retries))
            retries.append(result.reason)
            if result.auth:
                return Delivery(result, attempt, tuple(retries))
            wait = self.backoff.delay(attempt - 1, result.retry_after)
            if self.clock.monotonic() + wait > give_up_at:
                return Delivery(result, attempt, tuple(retries))
            if self.clock.sleep(wait, until=stop):  # shutting down: no more attempts
                return Delivery(result, attempt, tuple(retries))
