"""Where the Kubernetes API server is and how to talk to it: URL, TLS trust, credentials.

Stage: start-up (aggregator/settings.py checks it, aggregator/pipeline.py builds the watcher).
In:  the `--k8s-*` / `--kubeconfig` flags and the environment.  Out: a `ClusterConfig`, an
`ssl.SSLContext` built from it and a `TokenSource` that re-reads a token file when it changes.

Three ways in (`--k8s-api`):
- `in-cluster`: `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, the service account's
  token and cluster CA mounted at /var/run/secrets/kubernetes.io/serviceaccount/ (client-go's
  `rest.InClusterConfig`). Projected tokens rotate (hourly by default): the file is read again
  when it changes, and at once after a 401.
- `kubeconfig` (also implied by `--kubeconfig FILE`): FILE, else the first file of $KUBECONFIG,
  else ~/.kube/config; its current context (or `--k8s-context`): the cluster's `server`,
  `certificate-authority[-data]`, `insecure-skip-tls-verify`; the user's `token`, `tokenFile`,
  `client-certificate[-data]` + `client-key[-data]`. `exec` and `auth-provider` users are refused
  with a message (not supported).
- a URL: that server; trust from `--k8s-ca FILE`, a token from `--k8s-token-file FILE` or
  $KUBERNETES_TOKEN.
`--k8s-ca` and `--k8s-token-file` override what in-cluster or a kubeconfig gives. Every error is a
`ConfigError` naming the flag (or the kubeconfig key) and the value.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from eastwest.errors import ConfigError

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_ENV = "KUBERNETES_TOKEN"
TOKEN_REREAD_S = 60.0  # client-go re-reads a token file at most this often, and on change


@dataclass(frozen=True)
class ClusterConfig:
    server: str                     # https://host:port (or http:// for `kubectl proxy`)
    origin: str                     # "in-cluster", "kubeconfig FILE (context X)", "--k8s-api"
    ca_file: Path | None = None
    ca_data: str | None = None      # PEM
    insecure: bool = False          # kubeconfig's insecure-skip-tls-verify
    token: str | None = None
    token_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    cert_data: bytes | None = None  # PEM
    key_data: bytes | None = None   # PEM
    ca_flag: str = "--k8s-ca"       # where the CA came from, named in TLS errors

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS trust and client identity; a bad file is a ConfigError naming its flag."""
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            if self.ca_file is not None:
                ctx.load_verify_locations(cafile=str(self.ca_file))
            if self.ca_data is not None:
                ctx.load_verify_locations(cadata=self.ca_data)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(self.ca_flag, str(self.ca_file or "<certificate-authority-data>"),
                              f"not a PEM CA certificate: {exc}") from None
        if self.cert_file is not None or self.cert_data is not None:
            _load_client_cert(ctx, self)
        return ctx

    def describe(self) -> dict[str, Any]:
        """What the status route shows (never a secret)."""
        auth = ("token file " + str(self.token_file) if self.token_file else
                "token" if self.token else
                "client certificate" if (self.cert_file or self.cert_data) else "none")
        ca = (str(self.ca_file) if self.ca_file else "inline CA data" if self.ca_data else
              "not verified (insecure-skip-tls-verify)" if self.insecure else "system CAs")
        return {"server": self.server, "config": self.origin, "auth": auth, "ca": ca}


def _load_client_cert(ctx: ssl.SSLContext, cfg: ClusterConfig) -> None:
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("client-certificate", str(cfg.cert_file),
                              f"cannot load it with its key {cfg.key_file}: {exc}") from None
        return
    # inline PEM: `load_cert_chain` wants files; written to a private directory, loaded, removed
    with tempfile.TemporaryDirectory(prefix="eastwest-k8s-") as tmp:
        cert = Path(tmp) / "cert.pem"
        key = Path(tmp) / "key.pem"
        cert.write_bytes(cfg.cert_data or (cfg.cert_file.read_bytes() if cfg.cert_file else b""))
        key.write_bytes(cfg.key_data or (cfg.key_file.read_bytes() if cfg.key_file else b""))
        os.chmod(key, 0o600)
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("client-certificate-data", "<inline>",
                              f"cannot load it with its key: {exc}") from None


class TokenSource:
    """The bearer token: fixed, or a file read again when it changes (projected service-account
    tokens rotate) and at most every `reread_s` anyway; `invalidate()` after a 401."""

    def __init__(self, token: str | None = None, path: Path | None = None,
                 reread_s: float = TOKEN_REREAD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.reread_s, self.clock = path, reread_s, clock
        self._token = token
        self._stamp: tuple[int, int, int] | None = None
        self._read_at = -1e18
        self._lock = threading.Lock()
        self.reads = 0

    def get(self) -> str | None:
        if self.path is None:
            return self._token
        with self._lock:
            now = self.clock()
            stamp = self._stat()
            if stamp != self._stamp or now - self._read_at >= self.reread_s:
                try:
                    self._token = self.path.read_text().strip() or None
                except OSError:
                    pass  # rotating right now: keep the last one, read again next time
                else:
                    self._stamp, self._read_at = stamp, now
                    self.reads += 1
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._stamp, self._read_at = None, -1e18

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()  # follows the ..data symlink the kubelet swaps atomically
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_cluster(api: str | None, *, ca: str | None = None, token_file: str | None = None,
                 kubeconfig: str | None = None, context: str | None = None,
                 env: Mapping[str, str] | None = None, sa_dir: Path = SA_DIR,
                 home: Path | None = None) -> ClusterConfig | None:
    """The cluster to watch from the flags, or None when Kubernetes is off (neither `--k8s-api`
    nor `--kubeconfig`). Checks that every file named exists and that the CA parses."""
    env = os.environ if env is None else env
    if api is None and kubeconfig is None:
        for flag, value in (("--k8s-ca", ca), ("--k8s-token-file", token_file),
                            ("--k8s-context", context)):
            if value is not None:
                raise ConfigError(flag, value, "needs --k8s-api (in-cluster, kubeconfig or a "
                                  "URL) or --kubeconfig")
        return None
    mode = "kubeconfig" if api is None else api
    if kubeconfig is not None and mode != "kubeconfig":
        raise ConfigError("--kubeconfig", kubeconfig,
                          f"give either --kubeconfig or --k8s-api {api}, not both")
    if context is not None and mode != "kubeconfig":
        raise ConfigError("--k8s-context", context, "only with --kubeconfig / --k8s-api kubeconfig")
    if mode == "in-cluster":
        cfg = _in_cluster(env, sa_dir)
    elif mode == "kubeconfig":
        cfg = _from_kubeconfig(kubeconfig, context, env, home or Path.home())
    else:
        cfg = _from_url(mode, env)
    if ca is not None:
        path = _file("--k8s-ca", ca)
        cfg = _replace(cfg, ca_file=path, ca_data=None, insecure=False, ca_flag="--k8s-ca")
    if token_file is not None:
        cfg = _replace(cfg, token_file=_file("--k8s-token-file", token_file), token=None)
    cfg.ssl_context()  # a CA or client certificate that does not load: refused now
    return cfg


def _replace(cfg: ClusterConfig, **kw: Any) -> ClusterConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


def _file(flag: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(flag, value, "no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(flag, value, "not readable by this user")
    return path


def _from_url(url: str, env: Mapping[str, str]) -> ClusterConfig:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError("--k8s-api", url, "expected in-cluster, kubeconfig or a URL such as "
                          "https://10.0.0.1:6443 (http:// only for `kubectl proxy`)")
    token = (env.get(TOKEN_ENV) or "").strip() or None
    return ClusterConfig(server=url.rstrip("/"), origin="--k8s-api", token=token)


def _in_cluster(env: Mapping[str, str], sa_dir: Path) -> ClusterConfig:
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("--k8s-api", "in-cluster", "KUBERNETES_SERVICE_HOST and "
                          "KUBERNETES_SERVICE_PORT are not set: not running in a pod (outside a "
                          "cluster use --kubeconfig FILE or --k8s-api URL)")
    token, ca = sa_dir / "token", sa_dir / "ca.crt"
    for path in (token, ca):
        if not path.is_file():
            raise ConfigError("--k8s-api", "in-cluster", f"{path} is missing: is the service "
                              "account token mounted (automountServiceAccountToken, or a "
                              "projected volume)?")
    h = f"[{host}]" if ":" in host else host
    return ClusterConfig(server=f"https://{h}:{port}", origin="in-cluster", ca_file=ca,
                         token_file=token, ca_flag=f"in-cluster CA {ca}")


def _from_kubeconfig(path_text: str | None, context: str | None, env: Mapping[str, str],
                     home: Path) -> ClusterConfig:
    if path_text is not None:
        flag, path = "--kubeconfig", Path(path_text).expanduser()
    elif env.get("KUBECONFIG"):
        flag, path = "KUBECONFIG", Path(env["KUBECONFIG"].split(os.pathsep)[0]).expanduser()
    else:
        flag, path = "--kubeconfig", home / ".kube" / "config"
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(flag, str(path), f"cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(flag, str(path), f"not YAML: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(flag, str(path), "not a kubeconfig (expected a mapping)")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(flag, str(path), "no current-context: name one with --k8s-context")
    ctx = _named(doc, "contexts", "context", name, flag, path, "--k8s-context")
    cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), flag, path)
    user = _named(doc, "users", "user", ctx.get("user"), flag, path) if ctx.get("user") else {}
    base = path.parent

    def rel(key: str, section: Mapping[str, Any]) -> Path | None:
        v = section.get(key)
        if not v:
            return None
        p = Path(v).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise ConfigError(f"{path}: {key}", str(v), "no such file")
        return p

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise ConfigError(f"{path}: clusters[{ctx.get('cluster')}].server", server,
                          "expected an https:// URL")
    for key in ("exec", "auth-provider"):
        if user.get(key):
            raise ConfigError(f"{path}: users[{ctx.get('user')}].{key}", "...",
                              "credential plugins are not supported: give a token "
                              "(--k8s-token-file) or a client certificate")
    ca_data = _b64(cluster, "certificate-authority-data", path)
    return ClusterConfig(
        server=server.rstrip("/"), origin=f"kubeconfig {path} (context {name})",
        ca_file=rel("certificate-authority", cluster),
        ca_data=ca_data.decode() if ca_data else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=(user.get("token") or None), token_file=rel("tokenFile", user),
        cert_file=rel("client-certificate", user), key_file=rel("client-key", user),
        cert_data=_b64(user, "client-certificate-data", path),
        key_data=_b64(user, "client-key-data", path),
        ca_flag=f"the kubeconfig's certificate-authority ({path}) or --k8s-ca")


def _named(doc: Mapping[str, Any], section: str, inner: str, name: Any, flag: str, path: Path,
           which: str | None = None) -> Mapping[str, Any]:
    for item in doc.get(section) or []:
        if isinstance(item, Mapping) and item.get("name") == name:
            body = item.get(inner)
            if isinstance(body, Mapping):
                return body
    raise ConfigError(which or f"{path}: {section}", name, f"not in {section} of {path}")


def _b64(section: Mapping[str, Any], key: str, path: Path) -> bytes | None:
    v = section.get(key)
    if not v:
        return None
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{path}: {key}", "...", "not base64") from None
