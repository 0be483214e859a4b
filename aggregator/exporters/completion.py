"""When a correlated connection is complete, once: the trigger of spans, failures and RTT.

Stage: exporters, fed by the fan-out (aggregator/fanout.py). In: each written step's `Changes`
(aggregator/changes.py: the rows of the connections it touched). Out: `due()` returns the rows of
the connections that are complete, each exactly once.

Complete = closed (an observer sent its final record), no record of it arrived for `settle_s`
seconds, and its names are final (`Connection.naming`, aggregator/correlate.py): the client's,
the server's and the wire's final records come from different collectors, in different batches,
so a connection is not told as soon as its first side closes (its bytes, its server side, its
VXLAN tunnel and the name of its server would still be missing). Later records of a connection
that was already told are ignored (it is not told twice). A connection that stays open is told
when it closes; one that never closes (its final record was lost) is given up after `keep_open_s`
without a record and counted as `exporters/never_closed`. At most `max_pending` connections wait;
beyond, new ones are counted as `exporters/pending_full` and not told.

Columns: each step's rows are kept as one Arrow table in a bucket of their due time (update +
settle, 100 ms buckets); per connection only a version number is kept (which step has its latest
row), so a due bucket keeps the rows that are still their connection's latest. Python touches a
connection once per step (a dict entry), never its fields.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from aggregator.changes import Changes
from eastwest.clock import Clock, SystemClock, unix_us
from eastwest.drops import Drops

STAGE = "exporters"
BUCKET_S = 0.1


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
        self._version: dict[str, int] = {}   # conn_id -> the step that holds its latest row
        self._told: OrderedDict[str, None] = OrderedDict()  # recently told: later rows ignored
        # bucket -> [(step, when the step came, its rows with their names' deadline `_until`)]
        self._buckets: dict[int, list[tuple[int, float, pa.Table]]] = {}
        self._keys: list[int] = []
        self._step = 0
        self._lock = threading.Lock()
        self.told = 0

    def update(self, ch: Changes) -> None:
        if len(ch) == 0:
            return
        now = self.clock.monotonic()
        with self._lock:
            self._step += 1
            step = self._step
            ids = ch.rows.column("conn_id").to_pylist()
            told, version = self._told, self._version
            keep = np.fromiter((cid not in told for cid in ids), bool, len(ids))
            fresh = [cid for cid, k in zip(ids, keep, strict=True) if k and cid not in version]
            room = self.max_pending - len(version)
            if len(fresh) > room:  # new ones beyond the bound: counted, not told
                drop = set(fresh[max(room, 0):])
                self.drops.count(STAGE, "pending_full", len(drop))
                keep &= np.fromiter((cid not in drop for cid in ids), bool, len(ids))
            if not keep.any():
                return
            for cid, k in zip(ids, keep, strict=True):
                if k:
                    version[cid] = step
            rows = ch.rows.filter(pa.array(keep)).append_column(
                "_until", pa.array(ch.names_until_us[keep]))
            self._file(now + self.settle_s, step, now, rows)

    def _file(self, at: float, step: int, updated: float, rows: pa.Table) -> None:
        key = int(at / BUCKET_S) + 1
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = []
            heapq.heappush(self._keys, key)
        bucket.append((step, updated, rows))

    def due(self, now: float | None = None, *, everything_closed: bool = False) -> pa.Table | None:
        """Rows of the connections complete at `now`; `everything_closed` (at shutdown) tells
        every closed connection without waiting for it to settle."""
        now = self.clock.monotonic() if now is None else now
        wall = unix_us(self.clock.now())
        out: list[pa.Table] = []
        with self._lock:
            parts: list[tuple[int, float, pa.Table]] = []
            while self._keys and (everything_closed or self._keys[0] * BUCKET_S <= now):
                parts += self._buckets.pop(heapq.heappop(self._keys))
            for step, updated, rows in parts:
                latest = self._latest(step, rows)
                if not latest.any():
                    continue
                closed = rows.column("closed").to_numpy(zero_copy_only=False)
                until = rows.column("_until").to_numpy()
                named = (until <= wall) | everything_closed
                done = latest & closed & named
                later = latest & closed & ~named       # closed, names not final: until then
                open_ = latest & ~closed               # still open: given up after keep_open
                if done.any():
                    got = rows.filter(pa.array(done))
                    for cid in got.column("conn_id").to_pylist():
                        self._tell(cid)
                    out.append(got.drop_columns(["_until"]))
                if later.any():
                    sub = rows.filter(pa.array(later))
                    wait = float((sub.column("_until").to_numpy().max() - wall) / 1e6)
                    self._file(now + max(wait, BUCKET_S), step, updated, sub)
                if open_.any() and not everything_closed:
                    sub = rows.filter(pa.array(open_))
                    if now >= updated + self.keep_open_s:  # no record for that long: given up
                        gone = sub.column("conn_id").to_pylist()
                        for cid in gone:
                            del self._version[cid]
                        self.drops.count(STAGE, "never_closed", len(gone))
                    else:  # looked at again when it would be given up (or updated meanwhile)
                        self._file(updated + self.keep_open_s, step, updated, sub)
            told = sum(t.num_rows for t in out)
            self.told += told
        if not out:
            return None
        return pa.concat_tables(out)

    def _latest(self, step: int, rows: pa.Table) -> np.ndarray:
        """Which of a step's rows are still their connection's latest (not told, not newer)."""
        ids = rows.column("conn_id").to_pylist()
        return np.fromiter((self._version.get(cid) == step for cid in ids), bool, len(ids))

    def _tell(self, cid: str) -> None:
        del self._version[cid]
        self._told[cid] = None
        if len(self._told) > self.max_pending:
            self._told.popitem(last=False)

    @property
    def pending(self) -> int:
        return len(self._version)

    def told_ids(self) -> list[str]:
        """The connections told lately, oldest first (at most `max_pending`)."""
        with self._lock:
            return list(self._told)

    def pending_closed(self) -> int:
        """How many waiting connections are closed (told once they settle and their names are
        final); the rest of `pending` are still open."""
        n = 0
        with self._lock:
            for bucket in self._buckets.values():
                for step, _updated, rows in bucket:
                    latest = self._latest(step, rows)
                    closed = rows.column("closed").to_numpy(zero_copy_only=False)
                    n += int((latest & closed).sum())
        return n
