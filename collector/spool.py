"""The collector's bounded on-disk spool: every sealed batch is written here before it is sent,
and removed when the aggregator has acknowledged it.

In:  encoded batches (eastwest.codec wire form) with their `batch_seq`, kind (`interim` = only
     interim records, `final` = holds final records) and record count.
Out: the same bytes, oldest `batch_seq` first, until acknowledged; drop counts by reason.

Why write first: a batch on disk survives an aggregator outage and a collector restart, and the
bytes sent after a restart are the very bytes (same `batch_seq`) sent before, so ingest applies
them once. What a crash (kill -9) of the collector can lose: only records not yet sealed into a
batch, i.e. at most `batch_size` records or `batch_age` seconds per kind. A power loss can also
lose the last files the page cache had not written (`fsync=True` closes that gap at a cost).

Layout: `<dir>/<batch_seq:020d>-<kind>-<records>.ewb`, written as `.tmp` then renamed (a crash
never leaves a half batch under a real name; stray `.tmp` files are deleted at start), `seq`
holding a reservation of batch numbers so they never repeat across restarts (written as
`seq.<pid>.tmp` then renamed), and `lock`.

One process at a time: the spool takes an exclusive flock on `<dir>/lock` before it reads the
folder and holds it until `close()` or the end of the process (collector/spool_lock.py). A
second spool on the same folder waits up to `lock_wait` seconds for it, then raises `BusyError`
naming the holder. So the files, `seq` and its reservation have one writer: the batch numbers
of two collectors can never interleave or be reserved twice.

When full (`max_bytes`): interim batches are shed before final ones, oldest first (interim
counters are cumulative, so a later record of the same connection supersedes the shed one).
If that is not enough, the incoming batch is shed. Every shed record is counted in `Drops`
with stage `spool` and reason `full_interim`, `full_final` or `batch_too_large`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from collector.spool_lock import SpoolLock
from eastwest.clock import Clock, SystemClock, unix_us
from eastwest.drops import Drops
from eastwest.errors import ConfigError

Kind = Literal["interim", "final"]
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
SEQ_BLOCK = 10_000
_SUFFIX = ".ewb"


@dataclass(frozen=True)
class SpoolEntry:
    seq: int
    kind: Kind
    records: int
    size: int
    path: Path


class Spool:
    def __init__(self, directory: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 drops: Drops | None = None, *, fsync: bool = False, lock_wait: float = 0.0,
                 clock: Clock | None = None) -> None:
        """Open (or create) the spool folder and lock it for this process, waiting up to
        `lock_wait` seconds of `clock` for another holder (`BusyError` after that)."""
        clock = clock or SystemClock()
        if max_bytes < 1:
            raise ConfigError("--spool-max-bytes", max_bytes, "must be positive")
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("--spool-dir", str(self.dir), f"cannot be created: {exc.strerror}") from None
        if not os.access(self.dir, os.W_OK):
            raise ConfigError("--spool-dir", str(self.dir), "is not writable")
        # before anything is read: what another process is writing here is not ours to load
        self.flock = SpoolLock.acquire(self.dir, lock_wait, clock=clock)
        try:
            self._open(max_bytes, drops, fsync, unix_us(clock.now()))
        except BaseException:
            self.flock.close()
            raise

    def _open(self, max_bytes: int, drops: Drops | None, fsync: bool, now_us: int) -> None:
        self.max_bytes = max_bytes
        self.drops = drops or Drops()
        self.fsync = fsync
        self._lock = threading.Lock()
        self._entries: dict[int, SpoolEntry] = {}
        self._in_flight: int | None = None
        self.bytes = 0
        self._load()
        # batch numbers never repeat: past the reservation on disk, past what is spooled, and at
        # least the wall clock in µs (so a wiped spool dir still cannot reuse an old number)
        start = max(self._read_reserved(), max(self._entries, default=0) + 1, now_us)
        self._next = start
        self._reserved = start
        self._reserve(start + SEQ_BLOCK)

    # -- sequence numbers ---------------------------------------------------------------------
    def allocate_seq(self) -> int:
        with self._lock:
            seq = self._next
            self._next += 1
            if self._next > self._reserved:
                self._reserve(self._next + SEQ_BLOCK)
            return seq

    # -- writing ------------------------------------------------------------------------------
    def put(self, seq: int, kind: Kind, records: int, data: bytes) -> bool:
        """Spool one batch; False (and counted) when it had to be shed for lack of room."""
        size = len(data)
        with self._lock:
            if size > self.max_bytes:
                self.drops.count("spool", "batch_too_large", records,
                                 detail=f"batch {seq} of {size} bytes > spool {self.max_bytes}")
                return False
            if self.bytes + size > self.max_bytes:
                self._shed_interim(size)
            if self.bytes + size > self.max_bytes:
                reason = "full_interim" if kind == "interim" else "full_final"
                self.drops.count("spool", reason, records,
                                 detail=f"spool {self.dir} full ({self.bytes} bytes)")
                return False
            path = self.dir / f"{seq:020d}-{kind}-{records}{_SUFFIX}"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            self._entries[seq] = SpoolEntry(seq, kind, records, size, path)
            self.bytes += size
            return True

    def _shed_interim(self, need: int) -> None:
        for seq in sorted(self._entries):
            if self.bytes + need <= self.max_bytes:
                return
            e = self._entries[seq]
            if e.kind != "interim" or seq == self._in_flight:
                continue
            self._unlink(e)
            self.drops.count("spool", "full_interim", e.records,
                             detail=f"spool {self.dir} full: shed interim batch {seq}")

    # -- draining -----------------------------------------------------------------------------
    def oldest(self) -> SpoolEntry | None:
        """The oldest spooled batch, marked in flight (never shed while being sent)."""
        with self._lock:
            if not self._entries:
                self._in_flight = None
                return None
            seq = min(self._entries)
            self._in_flight = seq
            return self._entries[seq]

    def read(self, entry: SpoolEntry) -> bytes:
        return entry.path.read_bytes()

    def remove(self, entry: SpoolEntry) -> None:
        with self._lock:
            if self._in_flight == entry.seq:
                self._in_flight = None
            if entry.seq in self._entries:
                self._unlink(self._entries[entry.seq])

    def release(self) -> None:
        """Nothing is in flight any more (the send was abandoned for now)."""
        with self._lock:
            self._in_flight = None

    def close(self) -> None:
        """Release the folder to the next process (the files stay). Idempotent."""
        self.flock.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[SpoolEntry]:
        with self._lock:
            return [self._entries[s] for s in sorted(self._entries)]

    def records(self) -> int:
        with self._lock:
            return sum(e.records for e in self._entries.values())

    # -- helpers ------------------------------------------------------------------------------
    def _unlink(self, e: SpoolEntry) -> None:
        del self._entries[e.seq]
        self.bytes -= e.size
        try:
            e.path.unlink()
        except FileNotFoundError:
            pass

    def _load(self) -> None:
        for p in self.dir.iterdir():
            if p.suffix == ".tmp":
                p.unlink(missing_ok=True)  # a write cut by a crash: never acknowledged as spooled
                continue
            if p.suffix != _SUFFIX:
                continue
            try:
                seq_s, kind, n = p.stem.split("-")
                if kind not in ("interim", "final"):
                    raise ValueError(kind)
                entry = SpoolEntry(int(seq_s), kind, int(n), p.stat().st_size, p)  # type: ignore[arg-type]
            except (ValueError, OSError):
                self.drops.count("spool", "unreadable_file", 1, detail=f"{p}: not a spool file")
                continue
            self._entries[entry.seq] = entry
            self.bytes += entry.size

    def _read_reserved(self) -> int:
        try:
            return int((self.dir / "seq").read_text().strip())
        except (OSError, ValueError):
            return 0

    def _reserve(self, upto: int) -> None:
        # the lock makes this process the only writer; a name of its own all the same, so a
        # stray writer (a spool opened by hand, an older collector) cannot rename ours away
        tmp = self.dir / f"seq.{os.getpid()}.tmp"
        tmp.write_text(f"{upto}\n")
        os.replace(tmp, self.dir / "seq")
        self._reserved = upto
