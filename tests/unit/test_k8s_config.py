"""Where the cluster is and how to trust it (aggregator/k8s/config.py): in-cluster (service
account token and CA, KUBERNETES_SERVICE_HOST/PORT), a kubeconfig (CA data, client certificate,
token; its context), or a URL with --k8s-ca / --k8s-token-file. Bad values are one line naming
the flag, exit 2, before anything is bound; `--help` teaches the three ways in."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

import aggregator.serve
from aggregator.k8s.api import KubeApi
from aggregator.k8s.config import TokenSource, load_cluster
from eastwest.cli import main
from eastwest.errors import ConfigError
from tests.k8s_fake import Certs, FakeApiServer, pod

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


def sa_dir(tmp_path: Path, certs: Certs) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(TOKEN)
    (d / "ca.crt").write_bytes(certs.ca_file.read_bytes())
    (d / "namespace").write_text("eastwest")
    return d


def test_in_cluster_uses_the_service_host_the_token_file_and_the_ca(tmp_path, certs):
    sa = sa_dir(tmp_path, certs)
    cfg = load_cluster("in-cluster", env={"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                          "KUBERNETES_SERVICE_PORT": "443"}, sa_dir=sa)
    assert cfg is not None
    assert (cfg.server, cfg.ca_file, cfg.token_file, cfg.token) == (
        "https://10.96.0.1:443", sa / "ca.crt", sa / "token", None)
    v6 = load_cluster("in-cluster", env={"KUBERNETES_SERVICE_HOST": "fd00::1",
                                         "KUBERNETES_SERVICE_PORT": "443"}, sa_dir=sa)
    assert v6 is not None and v6.server == "https://[fd00::1]:443"
    with pytest.raises(ConfigError, match="--k8s-api='in-cluster': KUBERNETES_SERVICE_HOST"):
        load_cluster("in-cluster", env={}, sa_dir=sa)
    (sa / "token").unlink()
    with pytest.raises(ConfigError, match="token is missing"):
        load_cluster("in-cluster", env={"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                        "KUBERNETES_SERVICE_PORT": "443"}, sa_dir=sa)


def test_in_cluster_reaches_the_fake_cluster_with_the_mounted_token_and_ca(tmp_path, certs):
    sa = sa_dir(tmp_path, certs)
    with FakeApiServer(certs, tokens={TOKEN}) as fake:
        fake.put("nodes", {"metadata": {"name": "n1"}, "status": {"addresses": []}})
        port = fake.url.rsplit(":", 1)[1]
        cfg = load_cluster("in-cluster", env={"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                              "KUBERNETES_SERVICE_PORT": port}, sa_dir=sa)
        assert cfg is not None
        api = KubeApi(cfg)
        try:
            items, _ = api.list("nodes")
        finally:
            api.close()
        assert [n["metadata"]["name"] for n in items] == ["n1"]
        assert fake.requests[-1][3] == f"Bearer {TOKEN}"


def kubeconfig(tmp_path: Path, certs: Certs, server: str, **user: object) -> Path:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "lab",
           "clusters": [{"name": "c1", "cluster": {
               "server": server,
               "certificate-authority-data": base64.b64encode(certs.ca_file.read_bytes()).decode()}}],
           "users": [{"name": "u1", "user": user or {"token": TOKEN}}],
           "contexts": [{"name": "lab", "context": {"cluster": "c1", "user": "u1"}},
                        {"name": "other", "context": {"cluster": "c1", "user": "u1"}}]}
    p = tmp_path / "kubeconfig"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_a_kubeconfig_with_ca_data_and_a_token_reaches_the_fake_cluster(tmp_path, certs):
    with FakeApiServer(certs, tokens={TOKEN}) as fake:
        fake.put("pods", pod("a-1", "shop", "10.42.0.7", "n1"))
        path = kubeconfig(tmp_path, certs, fake.url)
        cfg = load_cluster(None, kubeconfig=str(path), env={})
        assert cfg is not None and cfg.server == fake.url and cfg.origin.endswith("(context lab)")
        api = KubeApi(cfg)
        try:
            items, rv = api.list("pods")
        finally:
            api.close()
        assert [p["metadata"]["name"] for p in items] == ["a-1"] and rv == str(fake.rv)
        # $KUBECONFIG and ~/.kube/config are where it is looked for without --kubeconfig
        assert load_cluster("kubeconfig", env={"KUBECONFIG": f"{path}:/nonexistent"}) == cfg
        home = tmp_path / "home"
        (home / ".kube").mkdir(parents=True)
        (home / ".kube" / "config").write_text(path.read_text())
        assert load_cluster("kubeconfig", env={}, home=home).server == fake.url
        assert load_cluster(None, kubeconfig=str(path), context="other", env={}) is not None


def test_a_kubeconfig_client_certificate_is_loaded(tmp_path, certs):
    # the server's own pair stands in for a client certificate: only loading is checked here
    path = kubeconfig(tmp_path, certs, "https://127.0.0.1:6443",
                      **{"client-certificate-data": base64.b64encode(certs.cert_file.read_bytes()).decode(),
                         "client-key-data": base64.b64encode(certs.key_file.read_bytes()).decode()})
    cfg = load_cluster(None, kubeconfig=str(path), env={})
    assert cfg is not None and cfg.describe()["auth"] == "client certificate"
    bad = kubeconfig(tmp_path, certs, "https://127.0.0.1:6443",
                     **{"client-certificate-data": base64.b64encode(b"nope").decode(),
                        "client-key-data": base64.b64encode(b"nope").decode()})
    with pytest.raises(ConfigError, match="client-certificate-data"):
        load_cluster(None, kubeconfig=str(bad), env={})


@pytest.mark.parametrize("user, message", [
    ({"exec": {"command": "aws"}}, "credential plugins are not supported"),
    ({"auth-provider": {"name": "gcp"}}, "credential plugins are not supported"),
    ({"tokenFile": "missing-token"}, "tokenFile='missing-token': no such file"),
])
def test_kubeconfig_users_that_cannot_work_are_refused_by_name(tmp_path, certs, user, message):
    path = kubeconfig(tmp_path, certs, "https://127.0.0.1:6443", **user)
    with pytest.raises(ConfigError, match=message):
        load_cluster(None, kubeconfig=str(path), env={})


def test_kubeconfig_errors_name_the_flag(tmp_path, certs):
    path = kubeconfig(tmp_path, certs, "https://127.0.0.1:6443")
    with pytest.raises(ConfigError, match="--k8s-context='prod': not in contexts"):
        load_cluster(None, kubeconfig=str(path), context="prod", env={})
    with pytest.raises(ConfigError, match="--kubeconfig='/nonexistent/config': cannot be read"):
        load_cluster(None, kubeconfig="/nonexistent/config", env={})
    with pytest.raises(ConfigError, match="--kubeconfig=.*give either --kubeconfig or --k8s-api"):
        load_cluster("https://1.2.3.4", kubeconfig=str(path), env={})


def test_the_token_source_rereads_a_rotated_file(tmp_path):
    p = tmp_path / "token"
    p.write_text("one-0123456789\n")
    t = [0.0]
    src = TokenSource(path=p, reread_s=60, clock=lambda: t[0])
    assert src.get() == "one-0123456789"
    assert src.get() == "one-0123456789" and src.reads == 1  # unchanged: not read again
    # the kubelet swaps the ..data symlink: a new file, a new inode
    new = tmp_path / "token.new"
    new.write_text("two-0123456789\n")
    new.replace(p)
    assert src.get() == "two-0123456789"
    t[0] = 61.0
    assert src.get() == "two-0123456789" and src.reads == 3  # re-read after a minute anyway
    src.invalidate()  # after a 401
    assert src.get() == "two-0123456789" and src.reads == 4


# -- flags ---------------------------------------------------------------------------------------
@pytest.fixture
def never_serves(monkeypatch, tmp_path):
    monkeypatch.setenv("EASTWEST_INGEST_TOKEN", "i" * 24)
    monkeypatch.setenv("EASTWEST_READ_TOKEN", "r" * 24)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    monkeypatch.setattr(aggregator.serve, "serve", lambda settings, verbose=False: 99)
    return ["aggregator", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")]


BAD = [
    (["--k8s-api", "ftp://x"], "--k8s-api='ftp://x': expected in-cluster, kubeconfig or a URL"),
    (["--k8s-api", "in-cluster"], "--k8s-api='in-cluster': KUBERNETES_SERVICE_HOST and"),
    (["--k8s-api", "https://127.0.0.1:6443", "--k8s-ca", "/nonexistent/ca.crt"],
     "--k8s-ca='/nonexistent/ca.crt': no such file"),
    (["--k8s-api", "https://127.0.0.1:6443", "--k8s-token-file", "/nonexistent/t"],
     "--k8s-token-file='/nonexistent/t': no such file"),
    (["--k8s-ca", "/etc/hostname"], "--k8s-ca='/etc/hostname': needs --k8s-api"),
    (["--kubeconfig", "/nonexistent/kc"], "--kubeconfig='/nonexistent/kc': cannot be read"),
    (["--k8s-api", "kubeconfig"], "--kubeconfig='"),  # ~/.kube/config missing
    (["--k8s-api", "https://127.0.0.1:6443", "--k8s-keep-deleted", "forever"],
     "--k8s-keep-deleted='forever': not a duration"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_a_bad_kubernetes_flag_exits_2_naming_it(never_serves, capsys, flags, message):
    rc = main([*never_serves, *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"eastwest aggregator: {message}") and err.count("\n") == 1, err


def test_a_ca_that_is_not_pem_exits_2_naming_it(never_serves, capsys, tmp_path):
    junk = tmp_path / "ca.crt"
    junk.write_text("not a certificate")
    rc = main([*never_serves, "--k8s-api", "https://127.0.0.1:6443", "--k8s-ca", str(junk)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--k8s-ca='{junk}': not a PEM CA certificate" in err, err


def test_good_kubernetes_flags_reach_serve(never_serves, capsys, certs, tmp_path):
    tok = tmp_path / "tok"
    tok.write_text(TOKEN)
    assert main([*never_serves, "--k8s-api", "https://127.0.0.1:6443", "--k8s-ca",
                 str(certs.ca_file), "--k8s-token-file", str(tok), "--k8s-keep-deleted",
                 "30m"]) == 99, capsys.readouterr().err


def test_help_teaches_the_three_ways_in(capsys):
    with pytest.raises(SystemExit):
        main(["aggregator", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--k8s-api in-cluster|kubeconfig|URL", "--k8s-ca FILE", "--k8s-token-file FILE",
                 "--kubeconfig FILE", "--k8s-context NAME", "--k8s-keep-deleted DURATION",
                 "projected service-account tokens rotate", "certificate verify failed"):
        assert text in out, text
