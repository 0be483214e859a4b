"""The sending end of export, as one interface: a `Sender` makes one attempt to hand one encoded
batch over, and says what came of it, in terms that do not depend on the transport.

Stage: export, after the spool (collector/export.py). In: one batch in the wire form of
eastwest/codec.py. Out: a `SendResult`, one of
- `Accepted`: the receiver holds the batch; the spool may forget it. `answer` is what the
  receiver said (the aggregator's JSON with the records it rejected; a NATS PubAck);
- `Refused`: this batch can never succeed (malformed, too large): it is dropped and counted as
  `eastwest_dropped_total{stage="export",reason=<reason>}`;
- `Retry`: not now; the batch stays spooled. `retry_after` is the receiver's own wait
  (RFC 9110 10.2.3 Retry-After), `auth` says that the credentials were refused: no retry can
  succeed before an operator fixes them.
`reason` names the transport's real outcome (`http_413`, `http_timeout`, `nats_max_payload`,
`nats_no_responders`...; docs/transport.md lists them); `detail` is for logs.

Implementations: `HttpSender` (collector/transport_http.py, POST to the aggregator) and
`NatsSender` (collector/transport_nats.py, JetStream publish). When to try again, and for how
long, is not theirs to decide: collector/retry.py does it, the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Accepted:
    answer: Any = None


@dataclass(frozen=True)
class Refused:
    reason: str
    detail: str


@dataclass(frozen=True)
class Retry:
    reason: str
    detail: str
    retry_after: float | None = None
    auth: bool = False


SendResult = Accepted | Refused | Retry


class Sender(Protocol):
    def send(self, body: bytes) -> SendResult:
        """One attempt to deliver one encoded batch. Never raises for what the network or the
        receiver does: that is a `Retry` or a `Refused`."""

    def close(self) -> None:
        """Release connections; the sender is not used again."""
