"""Container ids from cgroup paths (every runtime layout of eastwest/cgroups.py), and cgroup ids
of processes seen from a collector in a container (its own cgroup namespace, the host's tree
mounted elsewhere: `--cgroup-root`). The trees are plain folders: a cgroup id is the inode of
its directory, which any folder has."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from collector.probes import cgroup_root
from collector.proc import ProcessCache
from eastwest.cgroups import cgroup2_mount, container_id
from eastwest.errors import ConfigError

A, B = "a" * 60 + "0123", "b" * 60 + "4567"
POD = "kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice"


@pytest.mark.parametrize("path, cid", [
    # containerd, systemd driver (best-effort / guaranteed pods) and cgroupfs driver
    (f"/kubepods.slice/kubepods-besteffort.slice/{POD}/cri-containerd-{A}.scope", A),
    (f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{A}.scope", A),
    (f"/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{A}", A),
    (f"/kubepods/pod1/{A}", A),
    # the slice:prefix:id form some containerd set-ups leave in the path
    (f"/system.slice/containerd.service/kubepods-pod1.slice:cri-containerd:{A}", A),
    # CRI-O, both drivers; its monitor is not the container
    (f"/kubepods.slice/kubepods-burstable.slice/{POD}/crio-{B}.scope", B),
    (f"/kubepods/besteffort/pod1/crio-{B}", B),
    (f"/kubepods.slice/kubepods-burstable.slice/{POD}/crio-conmon-{B}.scope", None),
    # Docker and Podman, both drivers
    (f"/system.slice/docker-{A}.scope", A),
    (f"/docker/{A}", A),
    (f"/machine.slice/libpod-{B}.scope", B),
    (f"/libpod_parent/libpod-{B}", B),
    (f"/machine.slice/libpod-conmon-{B}.scope", None),
    # a sub-group the container made for itself; a container inside a container: the deepest
    (f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{A}.scope/init", A),
    (f"/system.slice/docker-{A}.scope/kubepods/pod1/{B}", B),
    # not containers
    ("/user.slice/user-0.slice/session-1.scope", None),
    ("/system.slice/sshd.service", None),
    (f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{A[:63]}.scope", None),  # 63 hex
    (f"/x/{A.upper()}", None),
    ("/", None), ("", None), (None, None),
])
def test_container_id_of_every_runtime_layout(path: str | None, cid: str | None) -> None:
    assert container_id(path) == cid


def fake_host(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A host cgroup tree with a pod container and the collector's own container, and a /proc
    as the collector sees it from inside its container (private cgroup namespace)."""
    host = tmp_path / "host-cgroup"
    app = host / "kubepods/besteffort/pod1" / A
    own = host / "kubepods/burstable/pod9" / B
    for d in (app, own):
        d.mkdir(parents=True)
    (host / "cgroup.controllers").write_text("cpu memory\n")
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self/mountinfo").write_text(
        f"30 25 0:26 / {own} ro,nosuid - cgroup2 cgroup2 rw\n")  # its /sys/fs/cgroup: its own group
    return host, proc, app


def test_a_collector_in_a_container_resolves_namespaced_paths_in_the_host_tree(tmp_path) -> None:
    host, proc, app = fake_host(tmp_path)
    (proc / "41").mkdir()
    (proc / "41/cgroup").write_text(f"0::/../../../besteffort/pod1/{A}\n")  # from pod9/B, up 3
    (proc / "42").mkdir()
    (proc / "42/cgroup").write_text("0::/\n")  # the collector's own group
    (proc / "43").mkdir()
    (proc / "43/cgroup").write_text("0::/../../../../gone\n")
    cache = ProcessCache(proc=proc, cgroup_root=host)
    assert cache.cgroup_id_of(41) == os.stat(app).st_ino
    assert cache.cgroup_path(os.stat(app).st_ino) == f"/kubepods/besteffort/pod1/{A}"
    assert container_id(cache.cgroup_path(cache.cgroup_id_of(41))) == A
    assert cache.cgroup_id_of(42) == os.stat(host / "kubepods/burstable/pod9" / B).st_ino
    assert cache.cgroup_id_of(43) == 0  # outside the tree: unknown, not a wrong group
    assert cache.cgroup_id_of(44) == 0  # no such process


def test_on_the_host_paths_are_taken_as_they_are(tmp_path) -> None:
    host, proc, app = fake_host(tmp_path)
    (proc / "self/mountinfo").write_text(f"30 25 0:26 / {host} rw - cgroup2 cgroup2 rw\n")
    (proc / "7").mkdir()
    (proc / "7/cgroup").write_text(f"12:memory:/x\n0::/kubepods/besteffort/pod1/{A}\n")
    assert ProcessCache(proc=proc, cgroup_root=host).cgroup_id_of(7) == os.stat(app).st_ino


def test_cgroup_root_flag_names_a_folder_that_is_no_cgroup_tree(tmp_path) -> None:
    host, _, _ = fake_host(tmp_path)
    assert cgroup_root(argparse.Namespace(cgroup_root=str(host))) == host
    assert cgroup_root(argparse.Namespace(cgroup_root=None)) is None
    with pytest.raises(ConfigError, match="--cgroup-root.*not a cgroup v2 tree"):
        cgroup_root(argparse.Namespace(cgroup_root=str(tmp_path)))
    hybrid = tmp_path / "hybrid"  # a hybrid node's /sys/fs/cgroup: a tmpfs, cgroup2 in unified/
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified/cgroup.controllers").write_text("")
    assert cgroup_root(argparse.Namespace(cgroup_root=str(hybrid))) == hybrid / "unified"


def test_cgroup2_mount_of_a_hybrid_and_a_unified_host(tmp_path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("24 30 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"
                    "25 24 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
                    "26 24 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    assert cgroup2_mount(info) == Path("/sys/fs/cgroup/unified")
    info.write_text("25 24 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert cgroup2_mount(info) == Path("/sys/fs/cgroup")
    info.write_text("26 24 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    assert cgroup2_mount(info) is None
    assert cgroup2_mount(tmp_path / "none") is None


def test_the_labs_pods_take_every_layout_and_their_paths_name_their_containers() -> None:
    from eastwest.lab.containers import LAYOUTS, container_of, lab_group

    made = [container_of("ewlab", f"pod-{i}", i) for i in range(2 * len(LAYOUTS))]
    assert all(container_id(path) == cid for cid, path in made)
    assert all(path.startswith(lab_group("ewlab") + "/") for _, path in made)
    assert len({cid for cid, _ in made}) == len(made)
    assert container_of("ewlab", "pod-0", 0) == made[0]  # the same on every `lab up`
    styles = {path.split("/")[2] + ("-scope" if path.endswith(".scope") else "")
              for _, path in made}
    assert styles == {"kubepods.slice-scope", "kubepods", "system.slice-scope", "docker"}
    assert {p.rsplit("/", 1)[1].split("-")[0] for _, p in made} >= {"cri", "crio", "docker"}
