"""The ingest journal: accepted batches, durable on disk before they are acknowledged.

Stage: intake -> JOURNAL (acknowledged) -> store + correlation behind it (aggregator/worker.py).
In:  one accepted batch: `(collector, batch_seq)`, its record count, the indices of the records
     ingest rejected, and its wire bytes (`EWB1` + zstd(msgpack), eastwest/codec.py; ~15-30
     bytes a record).
Out: `append` returns once the entry is on disk (`fdatasync`): the 200 the collector gets means
     "survives kill -9". `release` forgets entries the store has applied durably; a segment
     whose entries are all released is deleted (the one being appended to once it is large, or
     at `close`). `replay` gives back, at the next start, every entry of the segments left:
     those not released, and released ones that share a segment with them (releases are not
     written down: the caller tells them apart by the store's batch marks).

Why: the store's own commit (DuckDB: the WAL, the row layout, index checks) costs ~20 ms a batch
of 5,000 and competes with correlation for the same database and cores; appending the batch's
compressed bytes to a file and syncing it costs ~0.4 ms. The store writes the raw rows, the
correlated connections and the batch's mark in ONE transaction behind the ack
(docs/transport.md, "What an acknowledgement means").

Layout: DIR/NNNNNNNNNNNNNNNN.ewj segments, appended in order, a new one past `segment_bytes`.
Each entry is a frame: 4 bytes magic `EWJ1`, 4 bytes length and 4 bytes CRC-32 of the payload
(big-endian), then the payload: msgpack `[collector, batch_seq, records, [rejected...], body]`.
A crash can leave one torn frame at the end of the newest segment, never acknowledged (the ack
waits for the sync): `replay` cuts it off. A bad frame anywhere else (disk damage) is counted,
logged and the rest of that segment skipped: it cannot be resynchronised safely.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from aggregator.store.base import StoreError

log = logging.getLogger("eastwest.aggregator")
MAGIC = b"EWJ1"
_HEAD = struct.Struct(">4sII")
SEGMENT_BYTES = 64 * 1024 * 1024
SUFFIX = ".ewj"
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(tuple[str, int, int, list[int], bytes])


@dataclass(eq=False)
class Entry:
    """One journaled batch. `segment` is where it lives (for `release`)."""

    collector: str
    batch_seq: int
    records: int
    rejected: Sequence[int]
    body: bytes
    segment: int = field(default=0, repr=False)


class Journal:
    """Append-only, synced, segmented. Thread-safe: `append` calls are serialised."""

    def __init__(self, directory: str | Path, *, segment_bytes: int = SEGMENT_BYTES,
                 sync: bool = True) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.sync = sync
        self.corrupt = 0        # frames found damaged by `replay` (not the torn tail)
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}   # segment -> entries not released
        self._sizes: dict[int, int] = {}  # segment -> bytes
        self._fd: int | None = None
        self._current = 0
        self._roll = False      # the next append starts a new segment
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"journal directory {str(self.dir)!r} cannot be created: {exc}") from exc

    # -- start --------------------------------------------------------------------------------
    def segments(self) -> list[int]:
        out = []
        for p in self.dir.glob("*" + SUFFIX):
            try:
                out.append(int(p.stem))
            except ValueError:
                continue  # not ours
        return sorted(out)

    def replay(self) -> Iterator[Entry]:
        """Every entry on disk, oldest first (call once, before `append`). Each yielded entry
        counts as live until `release`d; a torn tail is cut off the newest segment."""
        segs = self.segments()
        for k, seg in enumerate(segs):
            path = self._path(seg)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StoreError(f"journal segment {str(path)!r} cannot be read: {exc}") from exc
            pos = 0
            self._live.setdefault(seg, 0)
            while pos < len(data):
                entry, nxt = self._frame(data, pos, seg)
                if entry is None:
                    if k == len(segs) - 1 and self._torn(data, pos):
                        log.warning("journal: %s ends in a torn entry (%d bytes, never "
                                    "acknowledged): cut off", path, len(data) - pos)
                        self._truncate(path, pos)
                    else:
                        self.corrupt += 1
                        self._roll = True  # never append behind damage
                        log.error("journal: %s is damaged at byte %d: the rest of the segment "
                                  "(%d bytes) is skipped", path, pos, len(data) - pos)
                    data = data[:pos]
                    break
                pos = nxt
                self._live[seg] += 1
                yield entry
            self._sizes[seg] = len(data)
        self._current = segs[-1] if segs else 0

    def _frame(self, data: bytes, pos: int, seg: int) -> tuple[Entry | None, int]:
        if pos + _HEAD.size > len(data):
            return None, pos
        magic, length, crc = _HEAD.unpack_from(data, pos)
        start, end = pos + _HEAD.size, pos + _HEAD.size + length
        if magic != MAGIC or end > len(data):
            return None, pos
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            return None, pos
        try:
            coll, seq, n, rejected, body = _dec.decode(payload)
        except msgspec.DecodeError:
            return None, pos
        return Entry(coll, seq, n, rejected, body, seg), end

    @staticmethod
    def _torn(data: bytes, pos: int) -> bool:
        """A frame cut short by a crash: its header or payload runs past the end of the file
        (a damaged frame with all its bytes present is corruption, not a torn write)."""
        if pos + _HEAD.size > len(data):
            return True
        magic, length, _ = _HEAD.unpack_from(data, pos)
        return magic == MAGIC and pos + _HEAD.size + length > len(data)

    @staticmethod
    def _truncate(path: Path, size: int) -> None:
        try:
            with open(path, "r+b") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        except OSError as exc:
            raise StoreError(f"journal segment {str(path)!r} cannot be repaired: {exc}") from exc

    # -- the ack path -------------------------------------------------------------------------
    def append(self, collector: str, batch_seq: int, records: int, rejected: Sequence[int],
               body: bytes) -> Entry:
        """Write one entry and sync it: durable when this returns. StoreError when the disk
        refuses (full, read-only): nothing is acknowledged then."""
        payload = _enc.encode((collector, batch_seq, records, list(rejected), body))
        frame = _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            try:
                fd = self._open_for(len(frame))
                written = 0
                while written < len(frame):
                    written += os.write(fd, frame[written:])
                if self.sync:
                    os.fdatasync(fd)
            except OSError as exc:
                self._abandon()
                raise StoreError(f"journal {str(self.dir)!r}: batch ({collector!r}, {batch_seq})"
                                 f" not written: {exc}") from exc
            seg = self._current
            self._sizes[seg] = self._sizes.get(seg, 0) + len(frame)
            self._live[seg] = self._live.get(seg, 0) + 1
        return Entry(collector, batch_seq, records, rejected, body, seg)

    def _open_for(self, size: int) -> int:
        if self._fd is not None and not self._roll and \
                self._sizes.get(self._current, 0) + size <= self.segment_bytes:
            return self._fd
        self._close_fd()
        # the newest segment after a restart is appended to when it has room and is sound
        new = self._roll or not self._current or \
            self._sizes.get(self._current, 0) + size > self.segment_bytes
        seg = self._current + 1 if new else self._current
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if new:
            self._sync_dir()  # the new file's name is durable too
        self._fd, self._current, self._roll = fd, seg, False
        self._sizes.setdefault(seg, 0)
        self._live.setdefault(seg, 0)
        self._forget_released()
        return fd

    def _abandon(self) -> None:
        """After a failed write a partial frame may be on disk: the next entry goes to a new
        segment (replay skips the partial frame as damage in a segment that is not the last)."""
        self._close_fd()
        self._roll = True

    # -- behind the ack -----------------------------------------------------------------------
    def release(self, entries: Sequence[Entry]) -> None:
        """These entries are applied durably by the store: forget them; delete every segment
        left with no live entry (never the one being appended to)."""
        with self._lock:
            for e in entries:
                if e.segment in self._live:
                    self._live[e.segment] -= 1
            self._forget_released()

    def _forget_released(self, *, current_too: bool = False) -> None:
        cur = self._current
        if self._live.get(cur, 1) <= 0 and (
                current_too or self._sizes.get(cur, 0) >= self.segment_bytes // 16):
            # the segment appended to holds only applied entries and is already large (or the
            # journal closes): start the next entry in a new one, so that this one can go and
            # a restart does not read it again
            self._close_fd()
            self._roll = True
        for seg in [s for s, n in self._live.items()
                    if n <= 0 and (s != self._current or self._roll)]:
            try:
                self._path(seg).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("journal: segment %s not deleted: %s", self._path(seg), exc)
                continue
            del self._live[seg]
            self._sizes.pop(seg, None)

    def bytes(self) -> int:
        """Bytes of the segments holding entries not released (what a restart would read)."""
        with self._lock:
            return sum(self._sizes.get(s, 0) for s, n in self._live.items() if n > 0)

    def close(self) -> None:
        with self._lock:
            self._forget_released(current_too=True)
            self._close_fd()

    # -- helpers ------------------------------------------------------------------------------
    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:016d}{SUFFIX}"

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _sync_dir(self) -> None:
        if not self.sync:
            return
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
