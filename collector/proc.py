"""Process, cgroup and container attribution, cached.

Stage: record building of the socket probes (and their start-up).
In: a pid and comm, or a cgroup v2 id, as the BPF program recorded them.
Out: the process's command line, the cgroup's path, the container id parsed from that path;
and, at start, the owners of listening TCP sockets that existed before the probes.

Sources: proc(5) (/proc/PID/cmdline, /proc/PID/cgroup, /proc/PID/fd, /proc/PID/net/tcp{,6});
a cgroup v2 id is the inode number of its directory in the cgroup2 mount
(Documentation/admin-guide/cgroup-v2.rst, bpf_get_current_cgroup_id). Container ids: the
runtimes' layouts of eastwest/cgroups.py (containerd, CRI-O, Docker, Podman; systemd and
cgroupfs drivers).

In a container (the DaemonSet), the collector's own /sys/fs/cgroup is its container's subtree
and /proc/PID/cgroup paths are relative to its cgroup namespace (`/../../kubepods/...`): the
host's tree is mounted read-only and given as `--cgroup-root` (ids are inode numbers, the same
in every view), and a namespaced path is resolved against the host path of the collector's own
namespace root (found by its inode in the host tree).

Nothing here is read per event: command lines (and the `Process` objects built from them) are
cached per (pid, comm), the cgroup index is rebuilt at most once per `rescan_s` when an unknown
id shows up.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path

from eastwest.cgroups import cgroup2_mount, container_id
from eastwest.record import Process

__all__ = ["ProcessCache", "cgroup2_mount", "container_id", "listening_owners"]

PROC = Path("/proc")


class ProcessCache:
    """pid -> command line and cgroup id -> path, bounded, refreshed only on a miss."""

    def __init__(self, proc: Path = PROC, cgroup_root: Path | None = None,
                 max_entries: int = 8192, rescan_s: float = 5.0) -> None:
        self.proc = proc
        self.cgroup_root = cgroup_root if cgroup_root is not None else cgroup2_mount()
        self.max_entries = max_entries
        self.rescan_s = rescan_s
        self._cmdlines: OrderedDict[tuple[int, str], str | None] = OrderedDict()
        self._cgroups: dict[int, str] = {}
        self._processes: dict[tuple[int, str], Process] = {}
        self._last_scan = -1e9
        self._ns_base: str | None = None  # host path of this process's cgroup namespace root

    def process(self, pid: int, comm: str) -> Process:
        """The `Process` of (pid, comm), its command line read once (see `cmdline`). Records
        share the frozen object: one per process, not one per record."""
        key = (pid, comm)
        p = self._processes.get(key)
        if p is None:
            p = Process(pid=pid, comm=comm, cmdline=self.cmdline(pid, comm))
            if len(self._processes) >= self.max_entries:
                del self._processes[next(iter(self._processes))]  # the oldest
            self._processes[key] = p
        return p

    def cmdline(self, pid: int, comm: str) -> str | None:
        """The command line of `pid`, if it still runs as `comm`'s process; cached."""
        key = (pid, comm)
        if key in self._cmdlines:
            self._cmdlines.move_to_end(key)
            return self._cmdlines[key]
        value: str | None = None
        try:
            raw = (self.proc / str(pid) / "cmdline").read_bytes()
            value = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace") or None
        except OSError:
            value = None  # the process is gone: comm from the kernel still names it
        self._cmdlines[key] = value
        if len(self._cmdlines) > self.max_entries:
            self._cmdlines.popitem(last=False)
        return value

    def cgroup_path(self, cgroup_id: int) -> str | None:
        """Path (relative to the cgroup2 root, starting with /) of a cgroup v2 id."""
        if not cgroup_id or self.cgroup_root is None:
            return None
        if cgroup_id not in self._cgroups and time.monotonic() - self._last_scan >= self.rescan_s:
            self._scan()
        return self._cgroups.get(cgroup_id)

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        root = self.cgroup_root
        assert root is not None
        found: dict[int, str] = {}
        for dirpath, _dirs, _files in os.walk(root):
            try:
                ino = os.stat(dirpath).st_ino
            except OSError:
                continue
            rel = "/" + os.path.relpath(dirpath, root)
            found[ino] = "/" if rel == "/." else rel
        self._cgroups = found

    def cgroup_id_of(self, pid: int) -> int:
        """The cgroup v2 id of a running process (0 when unknown)."""
        if self.cgroup_root is None:
            return 0
        try:
            for line in (self.proc / str(pid) / "cgroup").read_text().splitlines():
                if line.startswith("0::"):
                    path = self.host_path(line[3:].strip())
                    return 0 if path is None else os.stat(str(self.cgroup_root) + path).st_ino
        except OSError:
            return 0
        return 0

    def host_path(self, path: str) -> str | None:
        """A path of /proc/PID/cgroup in the host's tree. The kernel writes it relative to the
        reader's cgroup namespace root: the host's root on a host (the path as it is); a
        collector's own group in a container with a private namespace (`/`, `/../../<other
        pod>`): resolved against that root's host path. None when it cannot be placed."""
        base = self._ns_root()
        if base is None:  # this namespace's root is not in the tree given
            return None if path.startswith("/..") else path.rstrip("/") or "/"
        joined = base.rstrip("/") + path.rstrip("/")
        return os.path.normpath(joined) if joined else "/"

    def _ns_root(self) -> str | None:
        """The host path of this process's cgroup namespace root: the cgroup2 mount it sees
        is that root (a container's runtime mounts its own group there); its inode names it
        in the host tree. Found once."""
        if self._ns_base is None:
            own = cgroup2_mount(self.proc / "self/mountinfo")
            try:
                ino = os.stat(own).st_ino if own is not None else 0
            except OSError:
                ino = 0
            if ino and ino not in self._cgroups:
                self._scan()
            self._ns_base = self._cgroups.get(ino, "")
        return self._ns_base or None


def listening_owners(scope: tuple[int, ...] = (), proc: Path = PROC,
                     cache: ProcessCache | None = None) -> list[tuple[int, int, int, str, int]]:
    """(netns inode, port, pid, comm, cgroup id) of every TCP listener that exists now.

    One /proc/PID/net/tcp{,6} read per network namespace (through any process inside it),
    socket inodes matched to the processes holding them through /proc/PID/fd."""
    sock_owner: dict[int, int] = {}
    netns_reader: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            ns = os.stat(entry / "ns/net").st_ino
            if scope and ns not in scope:
                continue
            netns_reader.setdefault(ns, pid)
            for fd in os.listdir(entry / "fd"):
                link = os.readlink(entry / "fd" / fd)
                if link.startswith("socket:["):
                    sock_owner.setdefault(int(link[8:-1]), pid)
        except OSError:
            continue
    out: list[tuple[int, int, int, str, int]] = []
    for ns, reader in netns_reader.items():
        for table in ("tcp", "tcp6"):
            try:
                lines = (proc / str(reader) / "net" / table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) < 10 or f[3] != "0A":  # 0A: TCP_LISTEN
                    continue
                port, inode = int(f[1].rsplit(":", 1)[1], 16), int(f[9])
                owner = sock_owner.get(inode)
                if owner is None:
                    continue
                try:
                    comm = (proc / str(owner) / "comm").read_text().strip()
                except OSError:
                    continue
                cg = cache.cgroup_id_of(owner) if cache else 0
                out.append((ns, port, owner, comm, cg))
    return out
