"""A fake Kubernetes API server over HTTPS with its own CA, for the identity layer's tests.

No API server binary can be installed here (docs/deploy.md says so), so this TEST DOUBLE speaks
the part of the API the aggregator uses, as the API concepts page describes it:
- list `GET /api/v1/{pods,services,nodes}`, `/apis/discovery.k8s.io/v1/endpointslices`, with
  `limit`/`continue` pages and the list's `metadata.resourceVersion`;
- watch (`?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T`): the events
  after RV, one JSON object per line, then new ones as the test makes them; BOOKMARK events on
  `bookmark()`; a version older than the last `compact()` gets an ERROR event with a 410 Status;
- bearer tokens checked (`tokens`: 401 Status otherwise); every request recorded (`requests`).
`Certs` makes a CA and a server certificate for 127.0.0.1 with `cryptography`.
`objects_from_inventory` turns a lab inventory into namespaces' pods (labels, owner references),
Services with VIPs, EndpointSlices and Nodes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PATHS = {"/api/v1/pods": "pods", "/api/v1/services": "services",
         "/apis/discovery.k8s.io/v1/endpointslices": "endpointslices", "/api/v1/nodes": "nodes"}
LIST_KIND = {"pods": ("PodList", "v1"), "services": ("ServiceList", "v1"),
             "endpointslices": ("EndpointSliceList", "discovery.k8s.io/v1"),
             "nodes": ("NodeList", "v1")}
OBJ_KIND = {"pods": "Pod", "services": "Service", "endpointslices": "EndpointSlice",
            "nodes": "Node"}


# -- certificates -------------------------------------------------------------------------------
class Certs:
    """A CA and a server certificate it signed (SAN 127.0.0.1, ::1, localhost unless `san`
    says otherwise), as PEM files."""

    def __init__(self, directory: Path, name: str = "fake-cluster",
                 san: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}-ca")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(days=1))
              .not_valid_after(now + dt.timedelta(days=2))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                           False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName([_san(x) for x in san]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_file = directory / "ca.crt"
        self.cert_file = directory / "apiserver.crt"
        self.key_file = directory / "apiserver.key"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        # the chain: server certificate then the CA (as kube-apiserver serves it)
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                                   + ca.public_bytes(serialization.Encoding.PEM))
        self.key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def _san(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        return x509.DNSName(text)


# -- the server ---------------------------------------------------------------------------------
class FakeApiServer:
    """The cluster's state, its event log, and an HTTPS server over it. Use as a context manager
    (`with FakeApiServer(certs, tokens={"t"}) as api: api.url`)."""

    def __init__(self, certs: Certs, tokens: Iterable[str] = ("test-token-0123456789",)) -> None:
        self.certs = certs
        self.tokens = set(tokens)
        self.rv = 100
        self.objects: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in LIST_KIND}
        self.log: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, object)
        self.compacted = 0       # watches from an older version get 410
        self.requests: list[tuple[str, str, dict[str, str], str | None]] = []  # method, res, q, auth
        self.cond = threading.Condition()
        self.closed = False
        self.watch_cap_s: float | None = None  # end every watch after this long (a proxy)
        self._uid = 0
        self.srv: ThreadingHTTPServer | None = None

    # -- state changes (the test's, or the inventory's) --------------------------------------
    def _next_uid(self) -> str:
        self._uid += 1
        return f"uid-{self._uid:06d}"

    def put(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update (ADDED or MODIFIED): returns the stored object."""
        with self.cond:
            meta = obj.setdefault("metadata", {})
            key = f"{meta.get('namespace') or ''}/{meta['name']}"
            old = self.objects[kind].get(key)
            meta.setdefault("uid", old["metadata"]["uid"] if old else self._next_uid())
            meta.setdefault("creationTimestamp",
                            old["metadata"]["creationTimestamp"] if old else _now())
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            obj.setdefault("kind", OBJ_KIND[kind])
            obj.setdefault("apiVersion", LIST_KIND[kind][1])
            self.objects[kind][key] = obj
            self.log.append((self.rv, kind, "MODIFIED" if old else "ADDED", obj))
            self.cond.notify_all()
            return obj

    def delete(self, kind: str, name: str, namespace: str | None = None) -> None:
        with self.cond:
            obj = self.objects[kind].pop(f"{namespace or ''}/{name}")
            self.rv += 1
            gone = json.loads(json.dumps(obj))
            gone["metadata"]["resourceVersion"] = str(self.rv)
            gone["metadata"]["deletionTimestamp"] = _now()
            self.log.append((self.rv, kind, "DELETED", gone))
            self.cond.notify_all()

    def bookmark(self) -> int:
        """A BOOKMARK on every open watch: the version advances with no object changed."""
        with self.cond:
            self.rv += 1
            for kind in LIST_KIND:
                self.log.append((self.rv, kind, "BOOKMARK", {
                    "kind": OBJ_KIND[kind], "apiVersion": LIST_KIND[kind][1],
                    "metadata": {"resourceVersion": str(self.rv)}}))
            self.cond.notify_all()
            return self.rv

    def compact(self) -> None:
        """Forget the event log: a watch from any older version gets 410 Gone (and open
        watches are ended, as an API server restart would)."""
        with self.cond:
            self.rv += 1
            self.compacted = self.rv
            self.log.clear()
            self.cond.notify_all()

    def load(self, objects: dict[str, list[dict[str, Any]]]) -> None:
        for kind, items in objects.items():
            for obj in items:
                self.put(kind, obj)

    def calls(self, kind: str, watch: bool | None = None) -> list[dict[str, str]]:
        return [q for m, k, q, _ in self.requests if k == kind
                and (watch is None or (q.get("watch") == "1") == watch)]

    # -- HTTPS ---------------------------------------------------------------------------------
    def __enter__(self) -> FakeApiServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                fake._serve(self)

            def log_message(self, *a: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.certs.cert_file), str(self.certs.key_file))
        self.srv.socket = ctx.wrap_socket(self.srv.socket, server_side=True)
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"https://127.0.0.1:{self.srv.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        assert self.srv is not None
        self.srv.shutdown()
        self.srv.server_close()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        kind = PATHS.get(parts.path)
        auth = h.headers.get("Authorization")
        self.requests.append(("GET", kind or parts.path, q, auth))
        if not auth or not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return _json(h, 401, _status(401, "Unauthorized", "Unauthorized"))
        if kind is None:
            return _json(h, 404, _status(404, "NotFound", f"the server could not find {parts.path}"))
        if q.get("watch") in ("1", "true"):
            return self._watch(h, kind, q)
        with self.cond:
            items = sorted(self.objects[kind].values(),
                           key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
            rv = self.rv
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0) or len(items) or 1
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        list_kind, api = LIST_KIND[kind]
        _json(h, 200, {"kind": list_kind, "apiVersion": api, "metadata": meta, "items": page})

    def _watch(self, h: BaseHTTPRequestHandler, kind: str, q: dict[str, str]) -> None:
        since = int(q.get("resourceVersion") or 0)
        timeout = float(q.get("timeoutSeconds") or 60)
        if self.watch_cap_s is not None:
            timeout = min(timeout, self.watch_cap_s)
        bookmarks = q.get("allowWatchBookmarks") == "true"
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(ev: dict[str, Any]) -> None:
            data = json.dumps(ev).encode() + b"\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        import time

        deadline = time.monotonic() + timeout
        try:
            with self.cond:
                if since < self.compacted:
                    send({"type": "ERROR", "object": _status(
                        410, "Expired", f"too old resource version: {since} ({self.compacted})")})
                    h.wfile.write(b"0\r\n\r\n")
                    return
                compacted = self.compacted
                while not self.closed and time.monotonic() < deadline:
                    if self.compacted != compacted:
                        break  # compacted while watching: end the watch (it resumes, then 410)
                    for rv, k, typ, obj in self.log:
                        if k == kind and rv > since and (typ != "BOOKMARK" or bookmarks):
                            send({"type": typ, "object": obj})
                            since = rv
                    self.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass
        h.close_connection = True


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _json(h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


# -- objects ------------------------------------------------------------------------------------
def pod(name: str, namespace: str, ip: str | list[str], node: str, *, owner: tuple[str, str] | None = None,
        labels: dict[str, str] | None = None, host_network: bool = False,
        created: str | None = None, phase: str = "Running") -> dict[str, Any]:
    """A pod; `owner` = (kind, name) of its controller (a ReplicaSet's name ends in
    `-<pod-template-hash>`, the label is set from it)."""
    ips = [ip] if isinstance(ip, str) else ip
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if owner is not None:
        kind, oname = owner
        meta["ownerReferences"] = [{"apiVersion": "apps/v1" if kind != "Job" else "batch/v1",
                                    "kind": kind, "name": oname, "uid": f"owner-{oname}",
                                    "controller": True, "blockOwnerDeletion": True}]
        if kind == "ReplicaSet":
            meta["labels"]["pod-template-hash"] = oname.rsplit("-", 1)[1]
    if created:
        meta["creationTimestamp"] = created
    return {"metadata": meta,
            "spec": {"nodeName": node, "hostNetwork": host_network,
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": phase, "podIP": ips[0], "podIPs": [{"ip": a} for a in ips]}}


def service(name: str, namespace: str, vips: list[str], labels: dict[str, str] | None = None,
            port: int = 80) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
            "spec": {"clusterIP": vips[0] if vips else "None", "clusterIPs": vips or ["None"],
                     "ports": [{"port": port, "protocol": "TCP"}]}}


def endpoint_slice(service_name: str, namespace: str,
                   endpoints: list[tuple[str, dict[str, str] | None]],
                   port: int = 80) -> dict[str, Any]:
    """`endpoints`: (address, targetRef or None for an address without a pod)."""
    return {"metadata": {"name": f"{service_name}-{hashlib.sha1(service_name.encode()).hexdigest()[:5]}",
                         "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name,
                                    "endpointslice.kubernetes.io/managed-by": "fake"}},
            "addressType": "IPv6" if endpoints and ":" in endpoints[0][0] else "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": True},
                           **({"targetRef": ref} if ref else {})} for a, ref in endpoints],
            "ports": [{"port": port, "protocol": "TCP"}]}


def node(name: str, internal_ips: list[str], pod_cidrs: list[str] | None = None) -> dict[str, Any]:
    """A Node; `pod_cidrs`: its `spec.podCIDRs` (the first also as `spec.podCIDR`)."""
    obj: dict[str, Any] = {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in internal_ips]
                   + [{"type": "Hostname", "address": name}]}}
    if pod_cidrs:
        obj["spec"] = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
    return obj


def objects_from_inventory(inv: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A lab inventory (eastwest/lab) as a cluster: each pod owned as its service's kind says
    (a Deployment's pods through a ReplicaSet `<service>-<hash>`), labels app/pod/lab; one
    Service per application service with a VIP in 10.96.0.0/16 (fd00:96::/64 too in IPv6 and
    dual labs) and its EndpointSlice; one Node per host with its underlay address."""
    pods, services, slices = [], [], []
    by_service: dict[str, list[dict[str, Any]]] = {}
    for p in inv["pods"]:
        by_service.setdefault(p["service"], []).append(p)
    kinds = {**{k: v["kind"] for k, v in inv["services"].items()}, "loadgen": "Job"}
    for svc, members in sorted(by_service.items()):
        kind = kinds[svc]
        owner_name = (f"{svc}-{hashlib.sha1(svc.encode()).hexdigest()[:10]}"
                      if kind == "Deployment" else svc)
        owner = ("ReplicaSet" if kind == "Deployment" else kind, owner_name)
        for p in members:
            pods.append(pod(p["name"], p["namespace"], p.get("ips") or [p["ip"]], p["host"],
                            owner=owner, labels={"app": svc, "pod": p["name"], "lab": inv["name"]},
                            created="2026-01-01T00:00:00Z"))
    for i, (svc, spec) in enumerate(sorted(inv["services"].items()), start=1):
        vips = [f"10.96.0.{10 + i}"]
        if inv.get("ip_family") in ("ipv6", "dual"):
            vips.append(f"fd00:96::{10 + i:x}")
        services.append(service(svc, spec["namespace"], vips, {"app": svc}, spec["port"]))
        slices.append(endpoint_slice(svc, spec["namespace"], [
            (p["ip"], {"kind": "Pod", "name": p["name"], "namespace": p["namespace"]})
            for p in by_service.get(svc, [])], spec["port"]))
    nodes = [node(h["name"], [h["underlay_ip"]]) for h in inv["hosts"]]
    return {"pods": pods, "services": services, "endpointslices": slices, "nodes": nodes}
