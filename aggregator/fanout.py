"""Fan-out: what a committed correlation step tells the world after it is stored.

Stage: the last of the pipeline (aggregator/pipeline.py). In: what each step the correlation
worker has written changed, as columns (`Changes`, aggregator/changes.py), in commit order.
Out: every listener (the exporters, aggregator/exporters/) gets them; the live hub (`LiveHub`)
sends the rows of the connections they touched to the SSE subscribers of
GET /api/v1/flows/stream (only while someone subscribes, as Arrow tables: a row becomes a dict
only when a subscriber reads it).

Listeners are called in commit order, one at a time: they must be quick and must not raise (a
failure is counted as `exporters/listener_error` and logged, never fails the pipeline). A slow
SSE subscriber loses events, counted (`stream/subscriber_slow`); nothing here ever blocks ingest.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.changes import Changes
from aggregator.store.sql import CONN_FILTER_COLUMNS, DuckParams, compile_filter
from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops
from eastwest.filters import Filter

Row = dict[str, Any]  # a connection's row without `views` (aggregator/api/views.py flow_json)

HOLD_S = 1.0  # the live stream holds a connection this long for the names of its ends
SLICE = 256   # rows turned into dicts at a time, as a subscriber reads them


class Subscription:
    """One subscriber's queue: the tables of rows the hub sent, turned into dicts `SLICE` rows
    at a time as the subscriber reads (a row nobody reads never becomes a dict). At most
    `limit` rows wait: a table that does not fit is dropped whole and its rows counted
    (`stream/subscriber_slow`). Read on the subscriber's loop (`get`); `get_nowait` and
    `empty` anywhere that loop is not running."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, drops: Drops,
                 flt: Filter | None = None) -> None:
        self.loop, self.limit, self.drops = loop, limit, drops
        # the subscriber's filter as SQL over the rows (the store's own compilation,
        # aggregator/store/sql.py), applied by the hub before a table is queued
        self.where: tuple[str, list[Any]] | None = None
        if flt is not None:
            params = DuckParams()
            self.where = (compile_filter(flt, CONN_FILTER_COLUMNS, params), params.values)
        self._tables: deque[pa.Table] = deque()
        self._offset = 0             # rows of the head table already turned into dicts
        self._rows: deque[Row] = deque()
        self._waiting = 0            # rows queued: in _tables (past _offset) and in _rows
        self._ready = asyncio.Event()

    def put(self, table: pa.Table) -> None:
        """On the subscriber's loop (the hub calls it there)."""
        n = table.num_rows
        if self._waiting + n > self.limit:
            self.drops.count("stream", "subscriber_slow", n)
            return
        self._tables.append(table)
        self._waiting += n
        self._ready.set()

    def empty(self) -> bool:
        return self._waiting == 0

    def get_nowait(self) -> Row:
        if not self._rows:
            if not self._tables:
                raise asyncio.QueueEmpty
            head = self._tables[0]
            part = head.slice(self._offset, SLICE)
            self._offset += part.num_rows
            if self._offset >= head.num_rows:
                self._tables.popleft()
                self._offset = 0
            if "views" in part.column_names:
                part = part.drop_columns(["views"])
            self._rows.extend(part.to_pylist())
        self._waiting -= 1
        return self._rows.popleft()

    async def get(self) -> Row:
        while True:
            try:
                return self.get_nowait()
            except asyncio.QueueEmpty:
                self._ready.clear()
                await self._ready.wait()


class LiveHub:
    """Fan-out of updated connections to SSE subscribers; a slow subscriber loses events, and
    the loss is counted (`stream/subscriber_slow`), never blocks ingest.

    What a step changed goes to each subscriber as one Arrow table (no per-row work on the
    writer's thread; rows become dicts as the subscriber reads them, `Subscription`), narrowed
    first to the rows its filter matches (one DuckDB query on the table: at 25,000 connections
    a second, a stream for one port would otherwise lose its rows among everyone's).

    A connection whose ends are not both named by what their best-placed observers know yet
    (`Changes.ends_known`: the client's or the server's own record has not arrived, so an end
    may still be renamed, aggregator/correlate.py) is held up to `hold_s` (1 s) for it:
    a newer version replaces the held one, and it is sent once it knows its ends or the second
    is up. The stream so shows a connection under the names it keeps, unless an observer
    reports more than a second after another (then the later event carries the new names,
    with the same `id`)."""

    def __init__(self, drops: Drops, queue_size: int = 10_000, *, hold_s: float = HOLD_S,
                 clock: Clock | None = None) -> None:
        self.drops = drops
        self.queue_size = queue_size
        self.hold_s = hold_s
        self.clock: Clock = clock or SystemClock()
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self._held: dict[str, tuple[pa.Table, float]] = {}  # conn_id -> (its row, held since)
        self._releaser: threading.Thread | None = None
        self._db: duckdb.DuckDBPyConnection | None = None  # in memory: filters the tables
        self._db_lock = threading.Lock()

    def subscribe(self, flt: Filter | None = None) -> Subscription:
        """On the subscriber's running loop; `flt`: only rows it matches are queued (the
        subscriber checks each row it reads again: the SQL only narrows)."""
        sub = Subscription(asyncio.get_running_loop(), self.queue_size, self.drops, flt)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def held(self) -> int:
        return len(self._held)

    def publish(self, ch: Changes) -> None:
        now = self.clock.monotonic()
        rows, known = ch.rows, ch.ends_known
        with self._lock:
            held = self._held
            if self.hold_s <= 0 or (not held and bool(known.all())):
                ready = rows
            else:
                # per row only where it matters: ends not known yet, or a version held before
                look = ~known
                if held:
                    look |= pc.is_in(rows.column("conn_id"),
                                     value_set=pa.array(list(held), pa.string())
                                     ).to_numpy(zero_copy_only=False)
                send = np.ones(rows.num_rows, dtype=bool)
                ids = rows.column("conn_id")
                for i in np.flatnonzero(look).tolist():
                    cid = ids[i].as_py()
                    since = held.get(cid)
                    t0 = since[1] if since is not None else now
                    if known[i] or now - t0 >= self.hold_s:
                        if since is not None:
                            del held[cid]
                    else:
                        held[cid] = (rows.slice(i, 1), t0)
                        send[i] = False
                ready = rows if send.all() else rows.filter(pa.array(send))
            # the releaser runs while anything is held: it ends only under this lock, when
            # nothing is (a thread still alive but past its last look would strand a row)
            if held and self._releaser is None:
                self._releaser = threading.Thread(target=self._release_held,
                                                  name="eastwest-stream-hold", daemon=True)
                self._releaser.start()
        self._send([ready])

    def release(self, now: float | None = None) -> int:
        """Send the held connections whose second is up by `now`; how many are still held."""
        now = self.clock.monotonic() if now is None else now
        with self._lock:
            due = [cid for cid, (_, t0) in self._held.items() if now - t0 >= self.hold_s]
            ready = [self._held.pop(cid)[0] for cid in due]
            left = len(self._held)
        self._send(ready)
        return left

    def _release_held(self) -> None:
        try:
            while True:
                if not self.release():
                    with self._lock:  # a row held since `release` looked keeps it going
                        if not self._held:
                            self._releaser = None
                            return
                self.clock.sleep(min(0.1, self.hold_s / 4))
        except BaseException:  # a bug here: the next held row starts a new releaser
            with self._lock:
                self._releaser = None
            raise

    def _send(self, tables: list[pa.Table]) -> None:
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                for t in tables:
                    if sub.where is not None:
                        t = self._matching(t, *sub.where)
                        if not t.num_rows:
                            continue
                    sub.loop.call_soon_threadsafe(sub.put, t)
            except RuntimeError:
                self.unsubscribe(sub)  # its loop is gone

    def _matching(self, table: pa.Table, where: str, values: list[Any]) -> pa.Table:
        with self._db_lock:
            if self._db is None:
                self._db = duckdb.connect(":memory:")
            _ew_rows = table  # noqa: F841 - read by the SQL text
            try:
                return self._db.sql(f"SELECT * FROM _ew_rows WHERE {where}",
                                    params=values).to_arrow_table()
            except duckdb.Error as exc:  # the subscriber still checks each row it reads
                self.drops.count("stream", "filter_error", detail=repr(exc))
                return table


class FanOut:
    """The listeners of written steps and the live hub, in one place."""

    def __init__(self, drops: Drops, hub: LiveHub | None = None) -> None:
        self.drops = drops
        self.hub = hub or LiveHub(drops)
        self.listeners: list[Callable[[Changes], None]] = []
        self._lock = threading.Lock()  # steps are told one at a time, in commit order

    def add_listener(self, fn: Callable[[Changes], None]) -> None:
        self.listeners.append(fn)

    def tell(self, ch: Changes) -> None:
        with self._lock:
            for fn in self.listeners:
                try:
                    fn(ch)
                except Exception as exc:  # noqa: BLE001 - an exporter never fails the pipeline
                    self.drops.count("exporters", "listener_error", detail=f"{fn!r}: {exc!r}")
        if len(ch) and self.hub.subscribers:
            self.hub.publish(ch)
