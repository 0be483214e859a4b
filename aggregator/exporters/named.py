"""Edge deltas of connections whose names are final: what counters may count.

Stage: exporters, between the fan-out's listener (aggregator/fanout.py) and the per-edge counters
(prometheus.py, otlp.py). In: each committed `Plan`: per connection the increase of its counters
(`plan.deltas`), the connections it opened (`plan.created`), and each connection's `naming`
(aggregator/correlate.py: names may change until `naming.until`). Out: `Release`s, each a
connection under its final names with the counters and the opening not yet told.

Why: a connection's names may change for a few seconds after it opened, when an observer that
knows more of an end reports (the server's own process, say). The store and the graph move the
volumes to the new names; a counter cannot move what it already counted. So the counters of a
connection whose names may still change are held here, and told once, under the final names,
when `naming.until` has passed (measured on this module's clock from the plan's own wall-clock
time, `plan.at`) or a later plan shows the names final. The delay is the correlator's settle
time (`--identity-settle`, 10 s by default), about one Prometheus scrape.

Link-local and multicast connections (eastwest.filters.LINK_LOCAL_NETS) are not told unless
`link_local` (the aggregator's `--export-link-local`): the default views leave them out too.
At most `max_pending` connections are held; beyond, a connection's counters are told at once
under the names it has (`exporters/names_pending_full`), never lost.

A counter never goes down: a connection's deltas are negative where its first socket view
arrived behind a wire view (aggregator/correlate.py); what was told already stays told, and the
decrease is kept as the connection's debt, paid by its next increases (at most `max_pending`
debts are kept, the oldest forgotten). So a counter may exceed the graph by what the wire saw
and the sockets did not count (retransmitted payload), never fall short.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from aggregator.connection import Connection
from aggregator.correlate import Plan
from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops
from eastwest.filters import is_link_local

STAGE = "exporters"
_ZERO = (0, 0, 0, 0, 0, 0)


class Release(NamedTuple):
    """What to count for one connection: its counters' increase (bytes c2s, s2c, packets c2s,
    s2c, retransmits, resets) and whether it opened, under `conn`'s names."""

    conn: Connection
    counters: tuple[int, int, int, int, int, int]
    opened: bool


def link_local(conn: Connection) -> bool:
    return is_link_local(conn.client_ip) or is_link_local(conn.server_ip)


class _Held:
    __slots__ = ("conn", "counters", "opened", "final_at")

    def __init__(self, conn: Connection, counters: tuple[int, ...], opened: bool,
                 final_at: float) -> None:
        self.conn, self.counters, self.opened, self.final_at = conn, counters, opened, final_at

    def release(self) -> Release:
        c = self.counters
        return Release(self.conn, (c[0], c[1], c[2], c[3], c[4], c[5]), self.opened)


class NamedDeltas:
    def __init__(self, drops: Drops, *, link_local: bool = False, max_pending: int = 200_000,
                 clock: Clock | None = None) -> None:
        self.drops = drops
        self.link_local = link_local
        self.max_pending = max_pending
        self.clock: Clock = clock or SystemClock()
        self._held: dict[str, _Held] = {}  # latest version, counters so far, opened, final at
        self._debt: dict[str, tuple[int, ...]] = {}  # told in excess, to subtract from what follows
        self._lock = threading.Lock()

    def on_plan(self, plan: Plan) -> list[Release]:
        """The releases this plan makes due at once; the rest is held."""
        now = self.clock.monotonic()
        out: list[Release] = []
        with self._lock:
            for cid, conn in plan.connections.items():
                if not self.link_local and link_local(conn):
                    continue
                delta = plan.deltas.get(cid)
                opened = cid in plan.created
                held = self._held.get(cid)
                if delta is None and not opened and held is None:
                    continue
                counters: tuple[int, ...] = tuple(delta) if delta is not None else _ZERO
                if held is not None:
                    counters = tuple(a + b for a, b in zip(held.counters, counters, strict=True))
                    opened = opened or held.opened
                naming = conn.naming
                final_at = now
                if naming is not None and plan.at is not None:
                    final_at = now + (naming.until - plan.at).total_seconds()
                entry = _Held(conn, counters, opened, final_at)
                if final_at <= now:
                    self._held.pop(cid, None)
                    out.append(self._pay(cid, entry.release()))
                elif held is None and len(self._held) >= self.max_pending:
                    self.drops.count(STAGE, "names_pending_full")
                    out.append(self._pay(cid, entry.release()))
                else:
                    self._held[cid] = entry
        return out

    def _pay(self, cid: str, r: Release) -> Release:
        """The release with its negative parts (and any earlier debt) taken from the debt."""
        debt = self._debt.pop(cid, _ZERO)
        if not any(d < 0 for d in r.counters) and not any(debt):
            return r
        net = [c - d for c, d in zip(r.counters, debt, strict=True)]
        left = tuple(-n if n < 0 else 0 for n in net)
        if any(left):
            if len(self._debt) >= self.max_pending:
                self._debt.pop(next(iter(self._debt)))
            self._debt[cid] = left
        told = [n if n > 0 else 0 for n in net]
        return Release(r.conn, (told[0], told[1], told[2], told[3], told[4], told[5]), r.opened)

    def due(self, now: float | None = None, *, everything: bool = False) -> list[Release]:
        """Held connections whose names are final by `now` (every one with `everything`, at
        shutdown)."""
        now = self.clock.monotonic() if now is None else now
        out: list[Release] = []
        with self._lock:
            for cid in [c for c, h in self._held.items() if everything or h.final_at <= now]:
                out.append(self._pay(cid, self._held.pop(cid).release()))
        return out

    @property
    def pending(self) -> int:
        return len(self._held)
