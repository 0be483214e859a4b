"""Collector pipeline wiring: sources -> sink.

In: `Source` objects (socket probes, live VXLAN capture, pcap files), each producing lists of
`FlowRecord`s.  Out: a `Sink` (JSON lines on stdout or a file, or the aggregator export of
collector/export.py).

Each source runs in its own thread and calls `emit(records)` with batches it has drained; the
sink is called under one lock, so sinks need not be thread-safe. SIGINT/SIGTERM or `--duration`
set the shared stop event; sources then flush their final records and return.
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Protocol

import msgspec

from eastwest.clock import Clock, SystemClock
from eastwest.drops import Drops
from eastwest.record import FlowRecord

Emit = Callable[[list[FlowRecord]], None]


@dataclass
class CollectorContext:
    """What every stage of one collector process shares."""

    collector_id: str
    # the process's one clock: stages read the time and wait on it (a FakeClock in tests)
    clock: Clock = field(default_factory=SystemClock)
    drops: Drops = field(default_factory=Drops)
    # Record ids: `<collector>:<seq>`, seq from `first_seq`. A live collector starts it at its
    # start time in microseconds since the epoch (`live_first_seq`), so a restarted collector never
    # reuses an id unless it made more than a million records a second; offline runs (pcap
    # files, tests) start at 1 and stay deterministic.
    first_seq: int = 1
    _seq: itertools.count = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._seq = itertools.count(self.first_seq)

    def next_record_id(self) -> str:
        with self._lock:
            return f"{self.collector_id}:{next(self._seq)}"


def live_first_seq() -> int:
    return time.time_ns() // 1000


class Source(Protocol):
    """`ready` is set once the source sees what it watches (probes attached, captures open):
    what `run_pipeline`'s `on_ready` waits for."""

    name: str
    ready: threading.Event

    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Produce records until `stop` is set (or the input ends), flush, return."""


class Sink(Protocol):
    def write(self, records: list[FlowRecord]) -> None: ...
    def close(self) -> None: ...


class JsonLinesSink:
    """Records as JSON lines (the public contract), flushed per batch.

    A batch is encoded by one `encode_lines` call of the same encoder settings as
    `eastwest.codec.to_json` (msgspec's defaults): the same bytes as one `to_json(r) + b"\\n"`
    per record, without a Python call per record."""

    _encoder = msgspec.json.Encoder()

    def __init__(self, out: IO[bytes] | None = None) -> None:
        self.out = out or sys.stdout.buffer
        self.written = 0

    def write(self, records: list[FlowRecord]) -> None:
        if not records:
            return
        self.out.write(self._encoder.encode_lines(records))
        self.out.flush()
        self.written += len(records)

    def close(self) -> None:
        self.out.flush()


def run_pipeline(sources: list[Source], sink: Sink, *, duration: float | None = None,
                 stop: threading.Event | None = None, handle_signals: bool = True,
                 on_ready: Callable[[], None] | None = None) -> None:
    """Run every source in its own thread until stop/duration/end of input, then close the sink.
    `on_ready` is called once, from another thread, when every source is `ready` (not when the
    pipeline stops first).

    A source that raises stops the whole pipeline (after the others flushed) and the error is
    re-raised: a collector that silently lost a source would be lying."""
    stop = stop or threading.Event()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def emit(records: list[FlowRecord]) -> None:
        with lock:
            sink.write(records)

    def runner(src: Source) -> None:
        try:
            src.run(emit, stop)
        except BaseException as exc:  # noqa: BLE001 - surfaced after the others stop
            errors.append(exc)
            stop.set()

    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=runner, args=(s,), name=f"source-{s.name}", daemon=True)
               for s in sources]
    for t in threads:
        t.start()
    if on_ready is not None:
        threading.Thread(target=_when_ready, args=(sources, stop, on_ready), name="ready",
                         daemon=True).start()
    if duration is not None:
        stop.wait(duration)
        stop.set()
    for t in threads:
        while t.is_alive():  # short joins keep the main thread responsive to signals
            t.join(0.2)
    sink.close()
    if errors:
        raise errors[0]


def _when_ready(sources: list[Source], stop: threading.Event, on_ready: Callable[[], None]) -> None:
    for src in sources:
        while not src.ready.wait(0.2):
            if stop.is_set():
                return
    if not stop.is_set():
        on_ready()
