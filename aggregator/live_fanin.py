"""Live fan-in: every replica's live stream carries every partition's connections.

Stage: beside the fan-out (aggregator/fanout.py) of an aggregator replica consuming partitions
from NATS (aggregator/partitioned.py; wired in aggregator/pipeline.py, off with
`--no-live-fanin`). In: the rows each correlation step of this replica stored (`Changes`, a
listener of the fan-out), and the rows of the other replicas, over NATS core pub/sub on
`<subject-prefix>.live`. Out: this replica's rows published there (Arrow IPC, chunked under
the server's max_payload, headers naming the replica, its message sequence, the partition and
the partition's lease revision); the peers' rows fed into this replica's `LiveHub`, so an SSE
subscriber of GET /api/v1/flows/stream on any replica sees every partition's connections.

Once each: a connection's rows come only from the replica that owns its partition (its own
rows are never fed back: the connection asks the server for no echo, and the header is checked).
Order: NATS keeps one publisher's messages in order, and the hub keeps them in order (the held
version of a connection is replaced by a newer one). When a partition changes owner, the new
owner's lease revision is higher than every revision of the old one (one bucket, one sequence):
a row of the partition carrying a lower revision than one already seen from another replica
is the old owner's, late, and is dropped (`stream/fanin_stale`), so it cannot regress a newer
version.

Cost: rows are published only while some other replica has a stream subscriber (each one with
subscribers says so on `<subject-prefix>.live.want` every `WANT_S` and at once when its first
subscriber comes); without, a step costs one clock read. With, one Arrow IPC encode of the
step's rows (without `views`) on the writer's thread; the send is the NATS loop's. Nothing here
blocks ingest: a publish that fails, or finds more than `MAX_PENDING` bytes not sent yet (NATS
slow or down), is dropped and counted (`stream/fanin_publish_failed`, rows). What a replica
misses is counted by the gaps in each peer's sequence (`stream/fanin_lost`, messages: NATS
restarted, a slow consumer); a replica that dies takes its unsent rows with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from aggregator.changes import Changes
from aggregator.fanout import LiveHub
from eastwest.drops import Drops
from eastwest.jetstream import LoopThread, NatsOptions, connect

log = logging.getLogger("eastwest.live_fanin")
WANT_S = 1.0                   # a replica with subscribers says so this often
MAX_PENDING = 8 * 1024 * 1024  # bytes handed to the NATS loop and not sent yet
_KNOWN = "_ends_known"
H_REPLICA, H_SEQ, H_PART, H_REV = ("Eastwest-Replica", "Eastwest-Seq", "Eastwest-Partition",
                                   "Eastwest-Lease-Rev")


def subject_of(opts: NatsOptions) -> str:
    return f"{opts.subject_prefix}.live"


def encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def chunks(table: pa.Table, max_bytes: int) -> tuple[list[bytes], int]:
    """The table as Arrow IPC streams of at most `max_bytes` each, and the rows of a single
    row too large to fit (left out)."""
    out: list[bytes] = []
    too_big = 0
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    step = max(1, int(max_bytes * 0.8) // per_row)
    i = 0
    while i < table.num_rows:
        part = table.slice(i, step)
        data = encode(part)
        if len(data) > max_bytes:
            if part.num_rows > 1:
                step = max(1, part.num_rows // 2)
                continue
            too_big += 1
        else:
            out.append(data)
        i += part.num_rows
    return out, too_big


class LiveFanIn:
    """This replica's end of the fan-in: `on_changes` is the fan-out's listener; `start` and
    `stop` run the NATS side in its own loop thread. `partition()` names the partition whose
    step is being told (PartitionedCorrelation.current), `revision(k)` this replica's lease
    revision of partition k (None: not held)."""

    def __init__(self, opts: NatsOptions, replica: str, hub: LiveHub, drops: Drops,
                 partition: Callable[[], int | None],
                 revision: Callable[[int], int | None]) -> None:
        self.opts, self.replica, self.hub, self.drops = opts, replica, hub, drops
        self.partition, self.revision = partition, revision
        self.subject = subject_of(opts)
        self.want_subject = f"{self.subject}.want"
        self.loop: LoopThread | None = None
        self.nc: Any = None
        self._stopping = threading.Event()
        self._task: Any = None
        self._lock = threading.Lock()
        self._seq = 0
        self._pending = 0                     # bytes handed to the loop, not sent yet
        self._wanted_until = 0.0              # a peer had subscribers until then (monotonic)
        self._epochs: dict[int, tuple[int, str]] = {}  # partition -> (highest rev, replica)
        self._last_seq: dict[str, int] = {}   # peer -> its last message's sequence
        self.published_rows = 0
        self.received_rows = 0
        self.ready = threading.Event()        # connected and subscribed

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.loop = LoopThread("live-fanin")
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.loop.loop)

    def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            try:
                self._task.result(10)
            except Exception as exc:  # noqa: BLE001 - reported, shutdown goes on
                log.warning("live fan-in ended with %s: %s", type(exc).__name__, exc)
        if self.loop is not None:
            self.loop.stop()

    @property
    def peers_want(self) -> bool:
        """Some other replica has stream subscribers (said so within 3 x WANT_S)."""
        return time.monotonic() < self._wanted_until

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                # no echo: this replica's own rows never come back to it
                self.nc = await connect(self.opts, f"eastwest-live:{self.replica}", no_echo=True)
                await self.nc.subscribe(self.subject, cb=self._on_rows)
                await self.nc.subscribe(self.want_subject, cb=self._on_want)
                await self.nc.flush(5)
                self.ready.set()
                had = 0
                next_want = 0.0
                while not self._stopping.is_set():
                    now = time.monotonic()
                    subs = self.hub.subscribers
                    if subs and (not had or now >= next_want) and self.nc.is_connected:
                        await self.nc.publish(self.want_subject, b"",
                                              headers={H_REPLICA: self.replica})
                        next_want = now + WANT_S
                    had = subs
                    await asyncio.sleep(0.05)
            except Exception as exc:  # noqa: BLE001 - NATS down at start: try again
                self.drops.count("stream", "fanin_unavailable",
                                 detail=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
            finally:
                nc, self.nc = self.nc, None
                if nc is not None and not nc.is_closed:
                    await self._flush_sent(nc)
                    await nc.close()

    async def _flush_sent(self, nc: Any, bound_s: float = 2.0) -> None:
        """Stopping (a rolling restart: this replica's leases go to another): the rows already
        handed to NATS reach it first, or the peers' streams would lose this replica's last
        steps (bounded: a NATS that does not answer costs `bound_s`, what is unsent is lost)."""
        deadline = time.monotonic() + bound_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            if nc.is_connected:
                await nc.flush(max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - shutting down: said, never raised
            log.warning("live fan-in: rows sent at stop may not have reached NATS (%s: %s)",
                        type(exc).__name__, exc)

    # -- out: this replica's rows ---------------------------------------------------------------
    def on_changes(self, ch: Changes) -> None:
        """The fan-out's listener (the writer's thread, commit order): never blocks."""
        k = self.partition()
        rev = self.revision(k) if k is not None else None
        if k is not None and rev is not None:
            self._seen(k, rev, self.replica)  # a late row of the previous owner is stale here
        if not len(ch) or not self.peers_want:
            return
        nc, loop = self.nc, self.loop
        rows = ch.rows
        if "views" in rows.column_names:
            rows = rows.drop_columns(["views"])
        rows = rows.append_column(_KNOWN, pa.array(ch.ends_known, pa.bool_()))
        if nc is None or loop is None or not nc.is_connected:
            self.drops.count("stream", "fanin_publish_failed", rows.num_rows,
                             detail="NATS not connected")
            return
        # headers take a few hundred bytes of max_payload
        datas, too_big = chunks(rows, max(1024, nc.max_payload - 1024))
        if too_big:
            self.drops.count("stream", "fanin_publish_failed", too_big,
                             detail="a row larger than NATS max_payload")
        size = sum(len(d) for d in datas)
        with self._lock:
            if self._pending + size > MAX_PENDING:
                self.drops.count("stream", "fanin_publish_failed", rows.num_rows - too_big,
                                 detail=f"more than {MAX_PENDING} bytes not sent yet")
                return
            self._pending += size
            msgs = []
            for d in datas:
                self._seq += 1
                msgs.append((d, {H_REPLICA: self.replica, H_SEQ: str(self._seq),
                                 H_PART: "" if k is None else str(k),
                                 H_REV: "" if rev is None else str(rev)}))
        self.published_rows += rows.num_rows - too_big
        try:
            loop.loop.call_soon_threadsafe(self._send_soon, nc, msgs, size)
        except RuntimeError:  # the loop is closed: stopping
            with self._lock:
                self._pending -= size

    def _send_soon(self, nc: Any, msgs: list[tuple[bytes, dict[str, str]]], size: int) -> None:
        asyncio.ensure_future(self._send(nc, msgs, size))

    async def _send(self, nc: Any, msgs: list[tuple[bytes, dict[str, str]]], size: int) -> None:
        try:
            for data, headers in msgs:
                try:
                    await nc.publish(self.subject, data, headers=headers)
                except Exception as exc:  # noqa: BLE001 - dropped, counted: never retried
                    self.drops.count("stream", "fanin_publish_failed", 1,
                                     detail=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._pending -= size

    # -- in: the peers' rows --------------------------------------------------------------------
    async def _on_want(self, msg: Any) -> None:
        if (msg.headers or {}).get(H_REPLICA) != self.replica:
            self._wanted_until = time.monotonic() + 3 * WANT_S

    def _seen(self, k: int, rev: int, replica: str) -> bool:
        """Record partition k's lease revision `rev` from `replica`; False when an owner
        with a higher revision was seen before (the row is an earlier owner's, late)."""
        with self._lock:
            top = self._epochs.get(k)
            if top is not None and rev < top[0] and replica != top[1]:
                return False
            if top is None or rev >= top[0]:
                self._epochs[k] = (rev, replica)
            return True

    async def _on_rows(self, msg: Any) -> None:
        h = msg.headers or {}
        peer = h.get(H_REPLICA)
        if not peer or peer == self.replica:
            return
        try:
            seq = int(h.get(H_SEQ, "0"))
            last = self._last_seq.get(peer)
            if last is not None and seq > last + 1:
                self.drops.count("stream", "fanin_lost", seq - last - 1,
                                 detail=f"messages of replica {peer!r}")
            self._last_seq[peer] = seq
            table = pa.ipc.open_stream(msg.data).read_all()
            k, rev = h.get(H_PART, ""), h.get(H_REV, "")
            if k and rev and not self._seen(int(k), int(rev), peer):
                self.drops.count("stream", "fanin_stale", table.num_rows,
                                 detail=f"partition {k} from replica {peer!r}, a previous owner")
                return
            self.received_rows += table.num_rows
            if not self.hub.subscribers or not table.num_rows:
                return
            known = table.column(_KNOWN).to_numpy(zero_copy_only=False).astype(bool)
            rows = table.drop_columns([_KNOWN])
            n = rows.num_rows
            self.hub.publish(Changes(datetime.now(UTC), rows, np.zeros(n, bool),
                                     np.zeros((n, 6), np.int64), np.zeros(n, np.int64), known))
        except Exception as exc:  # noqa: BLE001 - a bad message never stops the fan-in
            self.drops.count("stream", "fanin_bad_message", detail=f"{type(exc).__name__}: {exc}")

