"""The two calls the identity layer makes to a Kubernetes API server: list and watch.

Stage: inside the Kubernetes watcher's threads (aggregator/k8s/watch.py), never on the data path.
In:  a `ClusterConfig` (aggregator/k8s/config.py).  Out: objects as JSON mappings, events.

- list: `GET {path}?limit=500[&continue=...]`, pages followed; answers the items and the list's
  `metadata.resourceVersion` (API concepts, "Efficient detection of changes").
- watch: `GET {path}?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T`, a
  stream of one JSON event per line: ADDED / MODIFIED / DELETED with the object, BOOKMARK with
  only a newer resourceVersion, ERROR with a Status (410: the version is too old: `Gone`).

Errors are translated here into one family (`KubeError`, with `retryable`): TLS failures name
their cause and the flag that fixes them, 401/403 what to check, 410 is `Gone` (re-list).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from aggregator.k8s.config import ClusterConfig, TokenSource

# resource -> (list/watch path, what RBAC must allow)
RESOURCES: dict[str, str] = {
    "pods": "/api/v1/pods",
    "services": "/api/v1/services",
    "endpointslices": "/apis/discovery.k8s.io/v1/endpointslices",
    "nodes": "/api/v1/nodes",
}
PAGE = 500


class KubeError(Exception):
    """A failed call; `retryable` when trying again later may help (everything but a 4xx that
    the server will give again)."""

    def __init__(self, message: str, *, retryable: bool = True, code: int | None = None) -> None:
        super().__init__(message)
        self.retryable, self.code = retryable, code


class Gone(KubeError):
    """410: the resourceVersion is older than the server keeps: list again."""


class KubeApi:
    def __init__(self, cfg: ClusterConfig, tokens: TokenSource | None = None, *,
                 timeout_s: float = 30.0) -> None:
        self.cfg = cfg
        self.tokens = tokens or TokenSource(cfg.token, cfg.token_file)
        verify: ssl.SSLContext | bool = cfg.ssl_context() if cfg.server.startswith("https") else False
        self.timeout_s = timeout_s
        self._streams: set[socket.socket] = set()  # open watches' sockets, shut by close()
        self._lock = threading.Lock()
        self._closed = False
        self.client = httpx.Client(base_url=cfg.server, verify=verify, http2=False,
                                   timeout=httpx.Timeout(timeout_s),
                                   headers={"Accept": "application/json",
                                            "User-Agent": "eastwest-aggregator"})

    def close(self) -> None:
        """Ends open watches at once (their threads see an error and stop) and the client."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for sock in streams:
            # the plain socket's shutdown, not TLS's: wakes the thread blocked reading it
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self.client.close()

    def _headers(self) -> dict[str, str]:
        token = self.tokens.get()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def list(self, resource: str) -> tuple[list[dict[str, Any]], str]:
        """Every object of `resource` (all namespaces) and the list's resourceVersion."""
        path = RESOURCES[resource]
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            params: dict[str, Any] = {"limit": PAGE}
            if cont:
                params["continue"] = cont
            body = self._get_json(resource, path, params)
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                return items, str(meta.get("resourceVersion") or "")

    def watch(self, resource: str, resource_version: str,
              timeout_s: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """The events after `resource_version`, until the server ends the watch (after about
        `timeout_s`). Raises `Gone` on 410, `KubeError` on anything else."""
        params = {"watch": "1", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_s)}
        # the server ends the watch after timeout_s; a stream silent for longer than that plus
        # a margin is dead (bookmarks come about every minute)
        timeout = httpx.Timeout(self.timeout_s, read=timeout_s + 30.0)
        try:
            with self.client.stream("GET", RESOURCES[resource], params=params,
                                    headers=self._headers(), timeout=timeout) as r:
                if r.status_code != 200:
                    r.read()
                    raise self._status_error(resource, r)
                sock = _socket_of(r)
                with self._lock:
                    if self._closed:
                        return
                    if sock is not None:
                        self._streams.add(sock)
                try:
                    yield from self._events(resource, r)
                finally:
                    if sock is not None:
                        with self._lock:
                            self._streams.discard(sock)
        except httpx.HTTPError as exc:
            raise self._transport_error(resource, exc) from exc

    def _events(self, resource: str, r: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
        for line in r.iter_lines():
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                raise KubeError(f"{resource} watch: not a JSON event: {line[:80]!r}") from None
            kind, obj = ev.get("type"), ev.get("object") or {}
            if kind == "ERROR":
                raise _status_of(resource, obj)
            yield str(kind), obj

    # -- errors -------------------------------------------------------------------------------
    def _get_json(self, resource: str, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        try:
            r = self.client.get(path, params=params, headers=self._headers())
        except httpx.HTTPError as exc:
            raise self._transport_error(resource, exc) from exc
        if r.status_code != 200:
            raise self._status_error(resource, r)
        try:
            body = r.json()
        except ValueError:
            raise KubeError(f"{resource} list: the answer is not JSON") from None
        if not isinstance(body, dict):
            raise KubeError(f"{resource} list: the answer is not a JSON object")
        return body

    def _status_error(self, resource: str, r: httpx.Response) -> KubeError:
        try:
            obj = r.json()
        except ValueError:
            obj = {}
        if not isinstance(obj, dict) or obj.get("kind") != "Status":
            obj = {"code": r.status_code, "message": r.text[:200]}
        obj.setdefault("code", r.status_code)
        if r.status_code == 401:
            self.tokens.invalidate()  # a rotated token: read the file again before the retry
        return _status_of(resource, obj)

    def _transport_error(self, resource: str, exc: httpx.HTTPError) -> KubeError:
        verify = _find(exc, ssl.SSLCertVerificationError)
        if verify is not None:
            cause = verify.verify_message or str(verify)
            if "mismatch" in cause:  # trusted, but issued for another name or address
                return KubeError(f"TLS to {self.cfg.server}: certificate verify failed: "
                                 f"{cause}: give --k8s-api a name or address the API server's "
                                 "certificate names")
            return KubeError(f"TLS to {self.cfg.server}: certificate verify failed: {cause}: "
                             f"give the cluster CA with {_ca_hint(self.cfg)}")
        tls = _find(exc, ssl.SSLError)
        if tls is not None:
            return KubeError(f"TLS to {self.cfg.server}: {tls.reason or tls}")
        if isinstance(exc, httpx.TimeoutException):
            return KubeError(f"{resource}: {self.cfg.server} timed out ({type(exc).__name__})")
        if isinstance(exc, httpx.ConnectError):
            return KubeError(f"{resource}: cannot connect to {self.cfg.server}: {exc}")
        return KubeError(f"{resource}: {type(exc).__name__}: {exc}")


def _socket_of(r: httpx.Response) -> socket.socket | None:
    stream = r.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    return sock if isinstance(sock, socket.socket) else None


def _ca_hint(cfg: ClusterConfig) -> str:
    return "--k8s-ca FILE" if cfg.ca_flag == "--k8s-ca" else f"{cfg.ca_flag} (or --k8s-ca FILE)"


def _find(exc: BaseException, kind: type[BaseException]) -> Any:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _status_of(resource: str, obj: Mapping[str, Any]) -> KubeError:
    code = obj.get("code")
    message = str(obj.get("message") or obj.get("reason") or "")
    if code == 410:
        return Gone(f"{resource}: resourceVersion too old (410 Gone): {message}", code=410)
    if code == 401:
        return KubeError(f"{resource}: 401 Unauthorized: the API server refused the token "
                         f"(--k8s-token-file, $KUBERNETES_TOKEN, or the service account's): "
                         f"{message}", code=401)
    if code == 403:
        return KubeError(f"{resource}: 403 Forbidden: the identity may not list/watch "
                         f"{resource} (deploy/kubernetes/rbac.yaml): {message}", code=403)
    retryable = not isinstance(code, int) or code >= 500 or code == 429
    return KubeError(f"{resource}: {code}: {message}", retryable=retryable,
                     code=code if isinstance(code, int) else None)
