"""cgroup v2: where it is mounted, and which container a cgroup path belongs to.

Shared by the collector (attributing sockets to containers, collector/proc.py) and the lab
(which puts each pod's processes in a group laid out the way a container runtime does).

Container runtimes name a container's cgroup after its 64-hex id, in one of these layouts
(kubelet's systemd and cgroupfs drivers, and the runtimes' own defaults):

| runtime | systemd driver | cgroupfs driver |
|---|---|---|
| containerd (CRI) | `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope` | `/kubepods/<qos>/pod<uid>/<id>` |
| CRI-O | `.../kubepods-<qos>-pod<uid>.slice/crio-<id>.scope` | `/kubepods/<qos>/pod<uid>/crio-<id>` |
| Docker | `/system.slice/docker-<id>.scope` | `/docker/<id>` |
| Podman | `/machine.slice/libpod-<id>.scope` | `/libpod_parent/libpod-<id>` |

(Guaranteed pods have no `<qos>` level.) The container is the deepest component of the path that
is such a name, so a process in a sub-group the container made for itself (`.../<id>.scope/init`,
a nested runtime) still belongs to it. The runtimes' monitor processes (`crio-conmon-<id>.scope`,
`libpod-conmon-<id>.scope`) are not the container and are not attributed to it.
"""

from __future__ import annotations

import re
from pathlib import Path

_ID = r"[0-9a-f]{64}"
# one path component that names a container: `<prefix>-<id>[.scope]`, a bare id, or the
# `<slice>:<prefix>:<id>` form some containerd set-ups leave in the path
_COMPONENT = re.compile(rf"^(?:(?:cri-containerd|crio|docker|libpod)-|.*:[a-z-]+:)?({_ID})(?:\.scope)?$")
_MONITOR = re.compile(r"^(?:crio|libpod)-conmon-")


def container_id(cgroup_path: str | None) -> str | None:
    """The container id a cgroup path belongs to (see the table above), else None."""
    if not cgroup_path:
        return None
    for part in reversed(cgroup_path.strip("/").split("/")):
        if _MONITOR.match(part):
            return None
        m = _COMPONENT.match(part)
        if m:
            return m.group(1)
    return None


def cgroup2_mount(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    try:
        for line in mountinfo.read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    except OSError:
        return None
    return None
