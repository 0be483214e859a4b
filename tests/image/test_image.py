"""The container image: scripts/build-image.sh builds deploy/image/Containerfile with podman, and
the image does what deploy/kubernetes expects of it.

The build is the real one (mmdebstrap base from Debian, wheels from PyPI, podman build with
--network none), cached where the script caches (podman's storage for the base, build/image for
the rest): the first run takes minutes, a second one seconds. Containers run with runc (crun
refuses hybrid-cgroup hosts), --network none and the ulimits podman needs here.

Root, podman, mmdebstrap and runc are required: without them these tests FAIL, never skip
(scripts/setup-system.sh installs the tools; CI runs as root), like the lab tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from eastwest import __version__
from tests.conftest import ARTIFACTS, REPO, require_root
from tests.image import build as imagebuild

pytestmark = [pytest.mark.image, pytest.mark.timeout(1800)]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/eastwest/eastwest:{VERSION}"
DEV = "localhost/eastwest:dev"
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none",
       "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
LOGS = ARTIFACTS / "image"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def image() -> str:
    require_root()
    missing = imagebuild.missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `bash scripts/setup-system.sh` as root")
    took, _, early = imagebuild.result()
    (LOGS / "timings.txt").write_text(f"first build in this run: {took:.1f} s"
                                      f"{' (started at collection)' if early else ''}\n")
    return IMAGE


def podman_run(image: str, *args: str, opts: tuple[str, ...] = (), timeout: float = 300
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUN, *opts, image, *args], capture_output=True, text=True,
                          timeout=timeout)


def inspect(ref: str, fmt: str) -> str:
    return subprocess.run(["podman", "image", "inspect", "--format", fmt, ref],
                          capture_output=True, text=True, check=True).stdout.strip()


def daemonset_options(spool: Path) -> tuple[str, ...]:
    """podman options that give a container what deploy/kubernetes/collector.yaml gives the
    collector: its user, host PID namespace, only the listed capabilities, read-only root,
    its seccomp/AppArmor profiles and its mounts (the spool in `spool` instead of the node's).
    The host network is left out: the tests' workload runs in the container's own namespace."""
    ds = yaml.safe_load((REPO / "deploy/kubernetes/collector.yaml").read_text())
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    sc = c["securityContext"]
    opts = ["--user", str(sc["runAsUser"]), "--cap-drop", "ALL"]
    opts += [f"--cap-add={cap}" for cap in sc["capabilities"]["add"]]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["privileged"] is False
    if spec.get("hostPID"):
        opts += ["--pid", "host"]
    if sc.get("readOnlyRootFilesystem"):
        opts.append("--read-only")
    for key, opt in (("seccompProfile", "seccomp"), ("appArmorProfile", "apparmor")):
        if sc.get(key, {}).get("type") == "Unconfined":
            opts += ["--security-opt", f"{opt}=unconfined"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        if "emptyDir" in v:
            opts += ["--tmpfs", m["mountPath"]]
            continue
        host = Path(v["hostPath"]["path"])
        if m["mountPath"] == "/var/lib/eastwest/spool":
            host = spool
            host.mkdir(parents=True, exist_ok=True)
        elif v["hostPath"].get("type") == "DirectoryOrCreate":
            host.mkdir(parents=True, exist_ok=True)
        mode = "ro" if m.get("readOnly") else "rw"
        if m.get("mountPropagation") == "HostToContainer":
            mode += ",rslave"
        opts += ["-v", f"{host}:{m['mountPath']}:{mode}"]
    return tuple(opts)


def daemonset_flags(*names: str) -> list[str]:
    """The collector's flags in deploy/kubernetes/collector.yaml with these names."""
    ds = yaml.safe_load((REPO / "deploy/kubernetes/collector.yaml").read_text())
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    got = [a for a in c["args"] if a.split("=", 1)[0] in names]
    assert len(got) == len(names), (names, c["args"])
    return got


def test_the_image_runs_eastwest_of_the_package_version_under_both_tags(image):
    r = podman_run(image, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"eastwest {__version__}" == f"eastwest {VERSION}"
    assert inspect(IMAGE, "{{.Id}}") == inspect(DEV, "{{.Id}}")
    assert inspect(IMAGE, "{{index .Labels \"org.opencontainers.image.version\"}}") == VERSION


def test_the_aggregator_runs_as_the_non_root_user_of_the_manifest(image):
    assert inspect(image, "{{.Config.User}}") == "10470:10470"
    r = podman_run(image, "-c", "import os; print(os.getuid(), os.getgid())",
                   opts=("--entrypoint", "python3"))
    assert r.stdout.split() == ["10470", "10470"], r.stderr
    r = podman_run(image, "aggregator", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: eastwest aggregator") and "--clickhouse URL" in r.stdout


def test_the_aggregator_serves_the_api_and_the_dashboard_as_deployed(image, tmp_path):
    """As aggregator.yaml runs it: uid 10470, no capabilities, read-only root, a writable data
    folder; the dashboard built on the host is served at / from the image."""
    script = """
import json, os, subprocess, time, httpx
p = subprocess.Popen(["eastwest", "aggregator", "--listen", "127.0.0.1:8470", "--data",
                      "/var/lib/eastwest/data", "--insecure-open"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
out = {"uid": os.getuid()}
deadline = time.monotonic() + 120
while True:
    try:
        out["readyz"] = httpx.get("http://127.0.0.1:8470/readyz").status_code
        break
    except httpx.HTTPError:
        if time.monotonic() > deadline or p.poll() is not None:
            p.kill()
            raise SystemExit(p.stdout.read())
        time.sleep(0.2)
page = httpx.get("http://127.0.0.1:8470/")
out["page"] = [page.status_code, page.text[:200]]
out["api"] = httpx.get("http://127.0.0.1:8470/api/v1/graph").status_code
p.terminate()
out["exit"] = p.wait(30)
out["log"] = p.stdout.read()[-2000:]
print(json.dumps(out))
"""
    # the data volume as Kubernetes makes an emptyDir: a fresh folder with mode 0777
    tmp_path.chmod(0o777)
    r = podman_run(image, "-c", script, opts=(
        "--entrypoint", "python3", "--cap-drop", "ALL", "--read-only", "--tmpfs", "/tmp",
        "-v", f"{tmp_path}:/var/lib/eastwest:rw"))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["uid"] == 10470 and got["readyz"] == 200, got
    status, page = got["page"]
    assert status == 200 and page.lower().startswith("<!doctype html>"), got
    assert got["api"] == 200 and got["exit"] == 0, got


def test_the_c_helpers_load_in_the_image(image):
    """Compiled on the build host, each is refused at load unless its compiled-in digest matches
    the sources installed in the image: loading proves both got in and agree."""
    script = ("from collector.vxlan import native; from aggregator.store import wire_columns; "
              "from aggregator import correlate_native; "
              "print(native.load() is not None, native.why_not()); "
              "print(*wire_columns.native_available()); "
              "lib, _, why = correlate_native.load(); print(lib is not None, why)")
    r = podman_run(image, "-c", script, opts=("--entrypoint", "python3"))
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["True"] * 3, r.stdout


def test_collector_check_without_privileges_reports_what_is_missing_and_exits_1(image):
    """A plain container: no tracefs, no headers, not root. `--check` prints its whole report
    and exits 1 (collector/capabilities.py: 1 = something needed is missing)."""
    r = podman_run(image, "collector", "--check")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "hook" in out and "present" in out and "sock:inet_sock_set_state" in out
    for line in ("tracefs:                     MISSING",
                 "permissions:                 MISSING  euid 10470, CapEff 0x0",
                 "kernel headers:              MISSING",
                 "bcc:                         ok  importable"):
        assert line in out, line
    assert "result: the socket probes CANNOT run" in out
    assert "Traceback" not in r.stderr


def test_collector_check_passes_with_exactly_what_the_daemonset_gives(image, tmp_path):
    """The DaemonSet's user, capabilities (ALL dropped, four added), profiles and mounts are
    enough: every hook present, bcc and headers found, exit 0."""
    r = podman_run(image, "collector", "--check", opts=daemonset_options(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "permissions:                 ok  euid 0, CapEff 0xc000003000" in r.stdout
    assert "result: everything the socket probes need is present" in r.stdout, r.stdout
    assert "NO:" not in r.stdout


@pytest.mark.bpf
def test_collector_in_the_image_loads_its_probes_and_records_each_connect(image, tmp_path):
    """With the DaemonSet's privileges the collector compiles and attaches its probes inside the
    container and records each of 7 refused connects from the container's own namespace, once,
    with the process that made them (hostPID: the node's /proc) and the container they came
    from (its id in the cgroup path, read through the node's cgroup tree the DaemonSet mounts)."""
    cidfile = tmp_path / "cid"
    opts = daemonset_options(tmp_path / "spool") + (
        "-v", f"{HERE}:/probe:ro", "--entrypoint", "python3", "--cidfile", str(cidfile))
    r = podman_run(image, "/probe/collector_driver.py", "7", "47001", "47123",
                   *daemonset_flags("--cgroup-root"), opts=opts)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["attached"], got["stderr"]
    assert got["exit"] == 0, got["stderr"]
    recs = [x for x in got["records"] if x["final"]]
    assert len(recs) == 7, got["records"]
    assert {x["connect"] for x in recs} == {"refused"}
    assert len({x["client"]["port"] for x in recs}) == 7
    assert all(x["process"]["cmdline"].startswith("python3 /probe/collector_driver.py")
               for x in recs)
    assert {x["container"] for x in recs} == {cidfile.read_text().strip()}


def stop_as_the_kubelet_does(name: str, ready: list[str], seen: str) -> tuple[float, str]:
    """Waits until `podman exec NAME *ready` makes `seen` appear in the container's output, then
    sends SIGTERM (podman stop, as the kubelet does; the process is PID 1, which ignores any
    signal it did not ask for). Its seconds to stop and exit status."""
    deadline = time.monotonic() + 180
    while True:
        subprocess.run(["podman", "exec", name, *ready], capture_output=True, timeout=60)
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
        if seen in logs.stdout + logs.stderr:
            break
        assert time.monotonic() < deadline, f"{name} never became ready:\n{logs.stderr[-3000:]}"
        time.sleep(1)
    t0 = time.monotonic()
    subprocess.run(["podman", "stop", "--time", "30", name], capture_output=True, check=True)
    took = time.monotonic() - t0
    return took, inspect_container(name, "{{.State.ExitCode}}")


def inspect_container(name: str, fmt: str) -> str:
    return subprocess.run(["podman", "container", "inspect", "--format", fmt, name],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("role", [pytest.param("collector", marks=pytest.mark.bpf), "aggregator"])
def test_each_role_stops_on_sigterm_as_pid_1_well_inside_the_grace_period(image, tmp_path, role):
    """The image's entrypoint is the process itself (no init): on SIGTERM each role stops
    cleanly (exit 0) in seconds, not at the kill after terminationGracePeriodSeconds (30)."""
    name = f"eastwest-test-{role}-{os.getpid()}"
    if role == "collector":
        opts = daemonset_options(tmp_path / "spool")
        args = ["collector", "--no-vxlan", "--stdout", "--interval", "1", "--spool-dir",
                "/tmp/spool"]
        # a refused connect in the container's namespace shows up once the probes are attached
        ready = ["python3", "-c", "import socket; socket.socket().connect_ex(('127.0.0.1', 47002))"]
        seen = '"port":47002'
    else:
        opts = ("--cap-drop", "ALL", "--read-only", "--tmpfs", "/tmp")
        args = ["aggregator", "--listen", "127.0.0.1:8470", "--data", "/tmp/data",
                "--insecure-open"]
        ready = ["python3", "-c", "import httpx; print(httpx.get('http://127.0.0.1:8470/readyz'))"]
        seen = "serving http://127.0.0.1:8470"
    detached = [a for a in RUN if a != "--rm"]
    subprocess.run(["podman", "rm", "--force", name], capture_output=True)
    try:
        subprocess.run([*detached, "--detach", "--name", name, *opts, image, *args],
                       capture_output=True, check=True)
        took, status = stop_as_the_kubelet_does(name, ready, seen)
        assert status == "0", subprocess.run(["podman", "logs", name], capture_output=True,
                                             text=True).stderr[-3000:]
        assert took < 15, f"{role} took {took:.0f} s to stop on SIGTERM"
    finally:
        subprocess.run(["podman", "rm", "--force", name], capture_output=True)


@pytest.mark.heavy  # ~15 s of a second build: the suite's budget (make test-heavy runs it)
def test_a_second_build_reuses_everything_and_saves_an_archive_of_the_image(image, tmp_path):
    """Nothing changed: the base, the wheels and every layer are reused (same image id), in
    seconds. --save writes an OCI archive that names the image with its full reference (what
    `ctr images import` and `kind load image-archive` tag it with) and holds this image."""
    before = inspect(image, "{{.Id}}")
    archive = tmp_path / "eastwest.tar"
    took, out = imagebuild.build("--save", str(archive))
    with open(LOGS / "timings.txt", "a") as f:
        f.write(f"second build (with --save): {took:.1f} s\n")
    assert "base localhost/eastwest-base:" in out and "present" in out
    assert "wheels up to date" in out
    assert inspect(image, "{{.Id}}") == before
    assert took < 180, f"a build with nothing changed took {took:.0f} s"
    with tarfile.open(archive) as tar:

        def member(name: str) -> dict:
            f = tar.extractfile(name)
            assert f is not None, f"{name} is not a file in the archive"
            return json.load(f)

        (entry,) = member("index.json")["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == IMAGE
        manifest = member("blobs/" + entry["digest"].replace(":", "/"))
    assert manifest["config"]["digest"] == f"sha256:{before}"
