"""Fan-out: what a committed correlation step tells the world after it is stored.

Stage: the last of the pipeline (aggregator/pipeline.py). In: what each step the correlation
worker has written changed, as columns (`Changes`, aggregator/changes.py), in commit order.
Out: every listener (the exporters, aggregator/exporters/) gets them; the live hub (`LiveHub`)
sends the rows of the connections they touched to the SSE subscribers of
GET /api/v1/flows/stream (only while someone subscribes: a row becomes a dict only then).

Listeners are called in commit order, one at a time: they must be quick and must not raise (a
failure is counted as `exporters/listener_error` and logged, never fails the pipeline). A slow
SSE subscriber loses events, counted (`stream/subscriber_slow`); nothing here ever blocks ingest.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from aggregator.changes import Changes
from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops

Row = dict[str, Any]  # a connection's row without `views` (aggregator/api/views.py flow_json)

HOLD_S = 1.0  # the live stream holds a connection this long for the names of its ends


class LiveHub:
    """Fan-out of updated connections to SSE subscribers; a slow subscriber loses events, and
    the loss is counted (`stream/subscriber_slow`), never blocks ingest.

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
        self._subs: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Row]]] = set()
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Row, float]] = {}  # conn_id -> (latest row, held since)
        self._releaser: threading.Thread | None = None

    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue[Row]]:
        queue: asyncio.Queue[Row] = asyncio.Queue(self.queue_size)
        sub = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: tuple[asyncio.AbstractEventLoop, asyncio.Queue[Row]]) -> None:
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
        ready: list[Row] = []
        rows = ch.rows.drop_columns(["views"]).to_pylist()
        with self._lock:
            held = self._held
            for row, known in zip(rows, ch.ends_known.tolist(), strict=True):
                cid = row["conn_id"]
                since = held.get(cid)
                t0 = since[1] if since is not None else now
                if self.hold_s <= 0 or known or now - t0 >= self.hold_s:
                    if since is not None:
                        del held[cid]
                    ready.append(row)
                else:
                    held[cid] = (row, t0)
            if held and (self._releaser is None or not self._releaser.is_alive()):
                self._releaser = threading.Thread(target=self._release_held,
                                                  name="eastwest-stream-hold", daemon=True)
                self._releaser.start()
        self._send(ready)

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
        while self.release():
            self.clock.sleep(min(0.1, self.hold_s / 4))

    def _send(self, rows: list[Row]) -> None:
        if not rows:
            return
        with self._lock:
            subs = list(self._subs)
        for loop, queue in subs:
            try:
                loop.call_soon_threadsafe(self._put, queue, rows)
            except RuntimeError:
                self.unsubscribe((loop, queue))  # its loop is gone

    def _put(self, queue: asyncio.Queue[Row], rows: list[Row]) -> None:
        for r in rows:
            try:
                queue.put_nowait(r)
            except asyncio.QueueFull:
                self.drops.count("stream", "subscriber_slow")


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
