"""Who owns a spool folder: an exclusive `flock(2)` on `<spool-dir>/lock`, held for the life of
the process that uses the spool, so two collectors never share a spool (nor, through its `seq`
file, a batch sequence) by accident.

Stage: collector start-up; `Spool` (collector/spool.py) takes the lock before it reads the folder
and releases it in `close()`.
In:  the spool folder; how long to wait for another holder (`--spool-lock-wait`); the clock the
     wait is measured and slept on (a `FakeClock` in tests).
Out: a held `SpoolLock`, or `BusyError` naming the folder and the other holder (its pid, command
     line and since when, from the note it wrote into the lock file).

Why a lock that waits: two collector processes overlap on one folder in a DaemonSet's rolling
update (the old pod still drains its spool on the hostPath while the new pod starts) and when
several collectors of one machine are given the same id. The newcomer waits, bounded, for the
holder to finish and then takes the folder over (its batches included); past the wait it refuses
to start, naming the holder.

Why `flock` (and not a pid file or POSIX `fcntl` locks):
- The kernel holds it. When the holder ends, however it ends (exit, crash, kill -9, OOM kill),
  the kernel closes its files and the lock is free: it never goes stale, and no pid is guessed
  alive or dead. A pid file alone outlives a kill -9 and its pid can be reused.
- It belongs to the open file description, so it is released only by closing that description:
  not, as a POSIX lock is, by any `close()` of the same file elsewhere in the process; and two
  `Spool`s of one process exclude each other as two processes do.
- Opened `O_CLOEXEC`: a program the collector executes does not inherit the lock (and cannot keep
  it after the collector is gone).
The lock file is never deleted: if a leaving holder unlinked it, a newcomer could lock a fresh
file of the same name while another process waits on the unlinked one, and both would run. Its
content (`pid=`, `cmdline=`, `since=`, `pidns=` lines, mode 0600, URL credentials redacted) is
only a note for the waiting process's messages; every new holder rewrites it.

NFS: Linux carries `flock` on NFS as a whole-file POSIX lock held by the server (NLM, or NFSv4
state), so collectors on two clients still exclude each other, but then the POSIX rules apply
within one process, a mount with `nolock` or `local_lock=flock` locks only locally, and the lock
of a client that died is freed only when the server's lease runs out (about 90 s with NFSv4).
A spool belongs on a disk local to its node.

`flock` has no timeout: the wait retries a non-blocking `flock` every `poll` seconds.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from eastwest.clock import Clock, SystemClock
from eastwest.errors import BusyError, ConfigError

LOCK_NAME = "lock"
DEFAULT_WAIT = 60.0  # > a DaemonSet's 30 s terminationGracePeriodSeconds: the old pod is gone by then
POLL = 0.2
log = logging.getLogger("eastwest.spool")
_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")  # user:password@ in a URL (--nats nats://u:p@host)


@dataclass(frozen=True)
class Holder:
    """What the lock file says about the process that holds (or last held) the lock."""

    pid: int | None
    cmdline: str = ""
    since: str = ""
    pidns: int | None = None

    @classmethod
    def parse(cls, text: str) -> Holder:
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, eq, value = line.partition("=")
            if eq and key not in fields:  # first wins: a shorter note may leave an old tail
                fields[key] = value.strip()
        pid, pidns = fields.get("pid", ""), fields.get("pidns", "")
        return cls(int(pid) if pid.isdigit() else None, fields.get("cmdline", ""),
                   fields.get("since", ""), int(pidns) if pidns.isdigit() else None)

    def describe(self) -> str:
        """`pid 4242 (eastwest collector ...) since 2025-...Z`, for logs and errors."""
        if self.pid is None:
            return "a process that has not written its pid yet"
        out = f"pid {self.pid}"
        if self.pidns is not None and self.pidns != _own_pidns():
            out += " of another PID namespace (a container?)"
        if self.cmdline:
            out += f" ({self.cmdline})"
        if self.since:
            out += f" since {self.since}"
        return out


class SpoolLock:
    """An exclusive flock on `<directory>/lock`; `acquire()` takes it, `close()` releases it."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory, self.path, self._fd = directory, directory / LOCK_NAME, fd

    @classmethod
    def acquire(cls, directory: str | Path, wait: float = 0.0, *, clock: Clock | None = None,
                poll: float = POLL) -> SpoolLock:
        """Take the lock, waiting up to `wait` seconds for another holder to let go."""
        directory = Path(directory)
        if wait < 0:
            raise ConfigError("--spool-lock-wait", wait, "must be 0 or more seconds")
        path = directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError("--spool-dir", str(directory),
                              f"cannot open its lock file {path}: {exc.strerror}") from None
        clock = clock or SystemClock()
        try:
            waited = _wait_for(fd, directory, wait, clock, poll)
            _write_note(fd, clock)
        except BaseException:
            os.close(fd)
            raise
        if waited is not None:
            log.warning("spool %s: free after %.1f s; this collector (pid %d) takes it over",
                        directory, waited, os.getpid())
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def close(self) -> None:
        """Release the lock (closing the file releases the flock). Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def holder(directory: str | Path) -> Holder | None:
    """Who holds the folder's lock now (None: nobody, or no lock file yet). Takes no lock that
    outlives the call, creates nothing: for `--check`."""
    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_note(fd)
        except OSError:
            return None
        return None  # closing the file below drops the shared lock just taken
    finally:
        os.close(fd)


# -- helpers -----------------------------------------------------------------------------------
def _wait_for(fd: int, directory: Path, wait: float, clock: Clock, poll: float) -> float | None:
    """Take the flock; None when it was free, else the seconds waited. BusyError past `wait`."""
    started = clock.monotonic()
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return clock.monotonic() - started if told else None
        except BlockingIOError:
            pass
        except OSError as exc:  # ENOLCK: NFS without a lock service
            raise ConfigError("--spool-dir", str(directory),
                              f"cannot be locked ({exc.strerror}): use a local disk") from None
        elapsed = clock.monotonic() - started
        if elapsed >= wait:
            other = _read_note(fd)
            raise BusyError(
                f"--spool-dir={str(directory)!r}: in use by another collector, "
                f"{other.describe()}; waited {wait:g} s (--spool-lock-wait). Two collectors "
                "must not share a spool folder: give each its own --collector-id or "
                "--spool-dir, or stop the other one")
        if not told:
            log.warning("spool %s is in use by %s: waiting up to %g s (--spool-lock-wait) for it "
                        "to finish", directory, _read_note(fd).describe(), wait)
            told = True
        clock.sleep(min(poll, wait - elapsed))


def _read_note(fd: int) -> Holder:
    try:
        return Holder.parse(os.pread(fd, 8192, 0).decode("utf-8", "replace"))
    except OSError:
        return Holder(None)


def _write_note(fd: int, clock: Clock) -> None:
    """Our pid, command line and start into the lock file, for a waiting process's messages.
    Written over the old note, then cut to length (a reader never sees an empty file)."""
    since = clock.now().astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    note = (f"pid={os.getpid()}\ncmdline={_own_cmdline()}\nsince={since}\n"
            f"pidns={_own_pidns() or ''}\n").encode()
    os.pwrite(fd, note, 0)
    os.ftruncate(fd, len(note))


def _own_cmdline(limit: int = 400) -> str:
    try:
        raw = Path("/proc/self/cmdline").read_bytes()
    except OSError:
        return ""
    text = " ".join(a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0"))
    text = _CREDENTIALS.sub(r"\1***@", " ".join(text.split()))  # one line, no passwords
    return text if len(text) <= limit else text[:limit] + "..."


def _own_pidns() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
