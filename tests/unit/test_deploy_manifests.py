"""deploy/: the Kubernetes manifests validate offline against the Kubernetes API schemas
(`kubernetes-validate`, strict: unknown fields fail) for the oldest and newest versions we
support, and say what docs/deploy.md promises (capabilities, host namespaces, mounts, read-only
RBAC, tokens only from Secrets); the systemd units pass `systemd-analyze verify`.
No cluster runs here: this is a schema check, not a deployment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2] / "deploy"
K8S = ROOT / "kubernetes"
VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())  # appArmorProfile: >= 1.30
MANIFESTS = ["namespace.yaml", "config.yaml", "rbac.yaml", "aggregator.yaml", "collector.yaml"]


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def all_docs() -> list[dict]:
    return [d for name in MANIFESTS for d in docs(name)]


def one(kind: str, name: str) -> dict:
    (d,) = [d for d in all_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_validates_against_the_kubernetes_schemas(name, version):
    for d in docs(name):
        kubernetes_validate.validate(d, version, strict=True)


def test_the_validator_does_fail_on_a_broken_manifest():
    ds = one("DaemonSet", "eastwest-collector")
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert k["resources"] == MANIFESTS


def test_collector_has_host_namespaces_and_only_the_capabilities_it_uses():
    spec = one("DaemonSet", "eastwest-collector")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "NET_RAW"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/sys/fs/bpf", "/lib/modules",
                 "/usr/src", "/sys/kernel/btf"):
        assert path in mounts, path
    hostpaths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert hostpaths["tracefs"] == "/sys/kernel/tracing" and hostpaths["bpffs"] == "/sys/fs/bpf"
    assert hostpaths["debugfs"] == "/sys/kernel/debug"
    # the node's cgroup tree beside the container's own, named by --cgroup-root, and the node's
    # /proc, both read-only
    by_name = {m["name"]: m for m in c["volumeMounts"]}
    assert hostpaths["cgroup"] == "/sys/fs/cgroup" and hostpaths["proc"] == "/proc"
    assert by_name["cgroup"] == {"name": "cgroup", "mountPath": "/host/sys/fs/cgroup",
                                 "readOnly": True}
    assert f"--cgroup-root={by_name['cgroup']['mountPath']}" in c["args"]
    assert by_name["proc"] == {"name": "proc", "mountPath": "/host/proc", "readOnly": True}
    # SYS_ADMIN only in the patch for kernels before 5.8
    patch = yaml.safe_load((K8S / "collector-sys-admin.patch.yaml").read_text())
    (pc,) = patch["spec"]["template"]["spec"]["containers"]
    assert "SYS_ADMIN" in pc["securityContext"]["capabilities"]["add"]
    assert "SYS_ADMIN" not in sc["capabilities"]["add"]


def test_manifests_name_the_image_of_this_version_and_the_aggregator_runs_as_its_user():
    """The tag scripts/build-image.sh gives the image is the one both workloads run; the
    aggregator's uid is the image's USER (deploy/image/Containerfile), the collector's is root."""
    from eastwest import __version__

    for kind, name in (("Deployment", "eastwest-aggregator"), ("DaemonSet", "eastwest-collector")):
        (c,) = one(kind, name)["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"ghcr.io/eastwest/eastwest:{__version__}", name
    containerfile = (ROOT / "image" / "Containerfile").read_text()
    assert "\nUSER 10470:10470\n" in containerfile
    sc = one("Deployment", "eastwest-aggregator")["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == sc["runAsGroup"] == 10470
    (c,) = one("DaemonSet", "eastwest-collector")["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["runAsUser"] == 0


def test_metadata_rbac_is_read_only_and_covers_what_the_watcher_lists():
    from aggregator.k8s.api import RESOURCES

    role = one("ClusterRole", "eastwest-metadata-reader")
    granted = set()
    for rule in role["rules"]:
        assert set(rule["verbs"]) == {"list", "watch"}
        for group in rule["apiGroups"]:
            granted |= {(group, r) for r in rule["resources"]}
    # exactly the resources aggregator/k8s/ lists and watches, each in its API group
    wanted = {("" if p.startswith("/api/") else p.split("/")[2], p.rsplit("/", 1)[1])
              for p in RESOURCES.values()}
    assert granted == wanted == {("", "pods"), ("", "services"), ("", "nodes"),
                                 ("discovery.k8s.io", "endpointslices")}
    binding = one("ClusterRoleBinding", "eastwest-metadata-reader")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "eastwest-aggregator",
                                    "namespace": "eastwest"}]


def test_the_aggregator_uses_its_service_accounts_rotated_token_in_cluster():
    spec = one("Deployment", "eastwest-aggregator")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "eastwest-aggregator"
    assert spec["automountServiceAccountToken"] is True  # projected token + CA, rotated
    (c,) = spec["containers"]
    assert "--k8s-api=in-cluster" in c["args"]
    assert not any(e["name"] == "KUBERNETES_TOKEN" for e in c["env"])  # no long-lived token


def test_tokens_and_passwords_come_only_from_secrets_and_wiring_from_the_configmap():
    for kind, name in (("Deployment", "eastwest-aggregator"), ("DaemonSet", "eastwest-collector")):
        (c,) = one(kind, name)["spec"]["template"]["spec"]["containers"]
        for e in c["env"]:
            if any(w in e["name"] for w in ("TOKEN", "PASSWORD")):
                assert "secretKeyRef" in e["valueFrom"], e
            assert "value" not in e, f"{name}: {e['name']} is a literal"
        args = " ".join(c["args"])
        assert "--nats=$(NATS_URL)" in args
    cm = one("ConfigMap", "eastwest")["data"]
    assert cm["NATS_URL"].startswith("nats://") and cm["CLICKHOUSE_URL"].startswith("clickhouse://")
    svc = one("Service", "eastwest-aggregator")
    dep = one("Deployment", "eastwest-aggregator")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["replicas"] >= 2


def test_aggregator_and_collector_flags_in_the_manifests_exist():
    """Every --flag a manifest or unit passes is one the `eastwest` command accepts."""
    from eastwest.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    known = {name: {o for a in p._actions for o in a.option_strings}
             for name, p in sub.choices.items()}
    for kind, name in (("Deployment", "eastwest-aggregator"), ("DaemonSet", "eastwest-collector")):
        (c,) = one(kind, name)["spec"]["template"]["spec"]["containers"]
        cmd, *flags = c["args"]
        for f in flags:
            assert f.split("=")[0] in known[cmd], f"{name}: {f}"
    for unit in (ROOT / "systemd").glob("*.service"):
        text = unit.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("ExecStart"):
                _, cmd, *flags = line.split("=", 1)[1].split()
                for f in flags:
                    assert f.split("=")[0] in known[cmd], f"{unit.name}: {f}"


CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_DAC_READ_SEARCH"}


def test_systemd_units_verify(tmp_path):
    """`systemd-analyze verify` (systemd is installed here, though not running as init): the
    units parse without a warning. It checks that ExecStart's binary exists, so the units are
    verified with the install path replaced by this checkout's `eastwest`."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd)"
    # the running interpreter's environment holds the `eastwest` script (a worktree has no .venv)
    exe = str(Path(sys.executable).parent / "eastwest")
    assert Path(exe).is_file(), f"{exe} is missing: install the package into this environment"
    units = []
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/eastwest/bin/eastwest", exe)
        (tmp_path / unit.name).write_text(text)
        units.append(str(tmp_path / unit.name))
        # systemd ignores capability names it does not know without a word: check them here
        for line in text.splitlines():
            if line.startswith(("CapabilityBoundingSet=", "AmbientCapabilities=")):
                assert set(line.split("=", 1)[1].split()) <= CAPS, line
    assert len(units) == 2
    r = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
