"""The lab's pods as containers: each pod's processes in a cgroup v2 group laid out the way a
container runtime lays out its containers' groups, so the collector's container ids can be
checked against the lab's.

Each pod gets a container id (64 hex digits, from the lab's and the pod's names: the same on
every `lab up`) and one of the runtime layouts of eastwest/cgroups.py, in turn (containerd,
CRI-O and Docker; kubelet's systemd and cgroupfs drivers), under one group of the lab's own,
`<cgroup2 mount>/eastwest-lab-<name>/`, so that `lab down` removes them all. A pod's processes
are put in their group between fork and exec (`joining`), before they run at all. A mesh
lab's sidecar is a container of its own in its pod's group (`sibling`), as Istio's
`istio-proxy` container is.

Without a cgroup2 mount (a cgroup v1-only host) pods have no group: the inventory says
`container_id: null` and the lab runs as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from eastwest.cgroups import cgroup2_mount
from eastwest.errors import LabError

LAYOUTS = ("containerd-systemd", "containerd-cgroupfs", "crio-systemd", "crio-cgroupfs",
           "docker-systemd", "docker-cgroupfs")


def lab_group(lab: str) -> str:
    """The lab's own group, relative to the cgroup2 mount."""
    return f"/eastwest-lab-{lab}"


def container_of(lab: str, pod: str, index: int) -> tuple[str, str]:
    """(container id, cgroup path relative to the cgroup2 mount) of pod number `index`."""
    cid = hashlib.sha256(f"eastwest-lab/{lab}/{pod}".encode()).hexdigest()
    uid = uuid.UUID(cid[:32])
    qos = ("besteffort", "burstable", "")[index % 3]
    layout = LAYOUTS[index % len(LAYOUTS)]
    runtime, driver = layout.split("-")
    if runtime == "docker":
        rel = f"/system.slice/docker-{cid}.scope" if driver == "systemd" else f"/docker/{cid}"
    elif driver == "systemd":
        pod_slice = f"kubepods-{qos + '-' if qos else ''}pod{str(uid).replace('-', '_')}.slice"
        qos_slice = f"/kubepods-{qos}.slice" if qos else ""
        prefix = "cri-containerd" if runtime == "containerd" else "crio"
        rel = f"/kubepods.slice{qos_slice}/{pod_slice}/{prefix}-{cid}.scope"
    else:
        name = cid if runtime == "containerd" else f"crio-{cid}"
        rel = f"/kubepods{'/' + qos if qos else ''}/pod{uid}/{name}"
    return cid, lab_group(lab) + rel


def sibling(lab: str, pod: str, container: str, app: tuple[str, str]) -> tuple[str, str]:
    """(container id, cgroup path) of another container of pod `pod` (a mesh sidecar), beside
    the pod's app container `app` (its id and path): the same pod group and layout, its own id,
    as a pod's containers are laid out by their runtime."""
    cid = hashlib.sha256(f"eastwest-lab/{lab}/{pod}/{container}".encode()).hexdigest()
    parent, last = app[1].rsplit("/", 1)
    return cid, f"{parent}/{last.replace(app[0], cid)}"


def create(lab: str, paths: list[str]) -> Path | None:
    """Make every pod's group; the cgroup2 mount, or None when the host has none."""
    root = cgroup2_mount()
    if root is None:
        return None
    for rel in paths:
        try:
            (root / rel.lstrip("/")).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LabError(f"cannot make the pod's cgroup {root}{rel}: {exc}") from exc
    return root


def joining(rel: str | None) -> Callable[[], None] | None:
    """A `preexec_fn` that moves the child into a pod's group between fork and exec, so the
    pod's process and everything it starts run in it from their first instruction (the pod's
    process cannot do it itself: `ip netns exec` gives it a /sys without the cgroup mount)."""
    root = cgroup2_mount()
    if rel is None or root is None:
        return None
    procs = os.fsencode(root / rel.lstrip("/") / "cgroup.procs")

    def join() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    return join


def remove(lab: str, wait_s: float = 5.0) -> None:
    """Remove the lab's groups, deepest first, once their processes are gone (a group with
    processes cannot be removed: retried for up to `wait_s`)."""
    root = cgroup2_mount()
    if root is None:
        return
    top = root / lab_group(lab).lstrip("/")
    deadline = time.monotonic() + wait_s
    while top.exists():
        for dirpath, dirs, _files in os.walk(top, topdown=False):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(dirpath, d))
        with contextlib.suppress(OSError):
            os.rmdir(top)
        if not top.exists():
            return
        if time.monotonic() > deadline:
            raise LabError(f"cannot remove the lab's cgroups under {top}: processes still in "
                           f"them ({', '.join(_members(top)) or 'unknown'})")
        time.sleep(0.1)


def _members(top: Path) -> list[str]:
    pids: list[str] = []
    for procs in top.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += procs.read_text().split()
    return pids
