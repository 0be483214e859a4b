"""When a correlated connection is complete, once: the trigger of spans, failures and RTT.

Stage: exporters, fed by the fan-out's listener (aggregator/fanout.py). In: each
committed `Plan` (the new versions of the connections a batch touched). Out: `due()` returns the
connections that are complete, each exactly once, in the order they completed.

Complete = closed (an observer sent its final record), no record of it arrived for `settle_s`
seconds, and its names are final (`Connection.naming`, aggregator/correlate.py): the client's,
the server's and the wire's final records come from different collectors, in different batches,
so a connection is not told as soon as its first side closes (its bytes, its server side, its
VXLAN tunnel and the name of its server would still be missing). Later records of a connection that
was already told are ignored (it is not told twice). A connection that stays open is told when
it closes; one that never closes (its final record was lost) is given up after `keep_open_s`
without a record and counted as `exporters/never_closed`. At most `max_pending` connections wait;
beyond, new ones are counted as `exporters/pending_full` and not told.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from aggregator.connection import Connection
from aggregator.correlate import Plan
from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops

STAGE = "exporters"


class Completions:
    def __init__(self, settle_s: float, drops: Drops, *, max_pending: int = 200_000,
                 keep_open_s: float = 1800.0, clock: Clock | None = None) -> None:
        if settle_s < 0:
            raise ValueError(f"settle time {settle_s}: must be >= 0")
        self.settle_s = settle_s
        self.drops = drops
        self.max_pending = max_pending
        self.keep_open_s = keep_open_s
        self.clock: Clock = clock or SystemClock()
        # conn_id -> (latest version, last update, when its names are final), by last update
        self._pending: OrderedDict[str, tuple[Connection, float, float]] = OrderedDict()
        self._told: OrderedDict[str, None] = OrderedDict()  # recently told, to ignore late records
        self._lock = threading.Lock()
        self.told = 0

    def update(self, plan: Plan) -> None:
        now = self.clock.monotonic()
        with self._lock:
            for cid, conn in plan.connections.items():
                if cid in self._told:
                    continue
                if cid not in self._pending and len(self._pending) >= self.max_pending:
                    self.drops.count(STAGE, "pending_full")
                    continue
                naming = conn.naming
                named_at = now
                if naming is not None and plan.at is not None:
                    named_at = now + (naming.until - plan.at).total_seconds()
                self._pending[cid] = (conn, now, named_at)
                self._pending.move_to_end(cid)  # oldest update first: due() stops early

    def due(self, now: float | None = None, *, everything_closed: bool = False) -> list[Connection]:
        """Connections complete at `now`; `everything_closed` (at shutdown) tells every closed
        connection without waiting for it to settle."""
        now = self.clock.monotonic() if now is None else now
        out: list[Connection] = []
        with self._lock:
            told: list[str] = []
            gone: list[str] = []
            # no copy of the whole dict: up to `max_pending` entries, and this runs every tick
            for cid, (conn, at, named_at) in self._pending.items():
                age = now - at
                if age < self.settle_s and not everything_closed:
                    break  # ordered by last update: the rest are younger
                if named_at > now and not everything_closed:
                    continue  # its names may still change
                if conn.closed:
                    out.append(conn)
                    told.append(cid)
                elif age >= self.keep_open_s:
                    gone.append(cid)
            for cid in told:
                self._tell(cid)
            for cid in gone:
                self.drops.count(STAGE, "never_closed")
                del self._pending[cid]
            self.told += len(out)
        return out

    def _tell(self, cid: str) -> None:
        del self._pending[cid]
        self._told[cid] = None
        if len(self._told) > self.max_pending:
            self._told.popitem(last=False)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_connections(self) -> list[Connection]:
        with self._lock:
            return [c for c, _, _ in self._pending.values()]
