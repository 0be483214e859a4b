"""The in-memory index the Kubernetes identity layer answers from: address -> owner, by time.

Stage: written by the watcher's threads (aggregator/k8s/watch.py), read by correlation (lookups
never wait on the API server). In: pods, services, EndpointSlices and nodes as JSON mappings.
Out: `lookup(ip, at)`: the `Identity` that owned `ip` at time `at`, or None.

Pod IPs are reused (a pod is deleted, a new one gets its address), so an address has OWNERS
OVER TIME: each owner holds it over a span [start, end). A span starts at the object's
creationTimestamp (what the list or watch says; the API server's clock), or when the watcher
first saw the address on it if that is later than the previous owner's end; it ends when the
watcher sees the object deleted, its address gone, or (pods) its phase Succeeded/Failed (the
kubelet releases the address). A new owner of an address whose previous owner has no end yet
(a delete we missed) ends the previous span where the new one starts. Ended spans are kept for
`keep_deleted` so that a late record of a connection of the old pod is named after it.

A lookup takes the span that contains `at`; else, within `skew` (clock skew between the
collectors and the API server), the nearest span; else None (the layer below names the end).

Which object names an address (docs/aggregator.md):
- a pod (not host-network: its address is the node's) names its controller: a ReplicaSet owner
  becomes its Deployment (the name without the `-<pod-template-hash>` suffix); StatefulSet,
  DaemonSet, Job, ... as they are; a bare pod is kind Pod; host = spec.nodeName; the pod's labels;
- a Service's ClusterIPs name the Service (what a client that dialled the VIP reached);
- an EndpointSlice endpoint without a pod behind it (a selector-less service) names its Service;
- a node's InternalIP addresses name the node (kind Node).
An address owned by several kinds at once is named by the first of pod, service, endpoint, node.

`pod_network_node(ip, at)` answers apart (the resolver asks it below the process layer,
aggregator/identity.py): the node whose pod CIDR (`spec.podCIDRs`, else `spec.podCIDR`, as the
node has them now) holds an address that no pod held at `at`: the node's own address on the pod
network (flannel's `cni0`/`flannel.1`, a CNI's gateway), the source a node masquerades a
NodePort call to a pod on another node with (docs/aggregator.md, "NodePort calls with
masquerade").
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from aggregator.connection import Identity

INF = math.inf
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
KINDS = ("pods", "services", "endpointslices", "nodes")  # lookup order, most specific first


@dataclass(frozen=True)
class Span:
    start: float  # unix seconds
    end: float    # INF while the owner holds the address
    owner: str    # the owning object's uid (or namespace/name)
    ident: Identity


def ts(text: Any) -> float | None:
    """An RFC 3339 timestamp of the API (`2026-12-07T07:30:00Z`) -> unix seconds."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def controller(meta: Mapping[str, Any]) -> tuple[str, str]:
    """(name, kind) of the workload a pod belongs to."""
    for ref in meta.get("ownerReferences") or []:
        if not ref.get("controller"):
            continue
        name, kind = str(ref.get("name") or ""), str(ref.get("kind") or "")
        if kind == "ReplicaSet":
            h = (meta.get("labels") or {}).get("pod-template-hash")
            if h and name.endswith("-" + h):
                return name[: -len(h) - 1], "Deployment"
        return name, kind
    return str(meta.get("name") or ""), "Pod"


def _key(meta: Mapping[str, Any]) -> str:
    return str(meta.get("uid") or f"{meta.get('namespace') or ''}/{meta.get('name') or ''}")


def _canonical(ips: Iterable[Any]) -> list[str]:
    """Addresses as the collectors write them (RFC 5952 for IPv6: `fd00::1`, not
    `fd00:0:0::1`), each once; what is not an address is left out."""
    out: dict[str, None] = {}
    for ip in ips:
        try:
            out[ipaddress.ip_address(str(ip)).compressed] = None
        except ValueError:
            continue
    return list(out)


def addresses(kind: str, obj: Mapping[str, Any]) -> tuple[list[str], Identity | None]:
    """The addresses `obj` owns now and the identity they name (none: it owns nothing)."""
    ips, ident = _addresses(kind, obj)
    return _canonical(ips), ident


def _addresses(kind: str, obj: Mapping[str, Any]) -> tuple[list[str], Identity | None]:
    meta = obj.get("metadata") or {}
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    if kind == "pods":
        if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed"):
            return [], None
        ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
        ips = ips or ([status["podIP"]] if status.get("podIP") else [])
        name, wkind = controller(meta)
        return ips, Identity(name=name, namespace=meta.get("namespace"), kind=wkind,
                             host=spec.get("nodeName"), labels=labels, source="kubernetes")
    if kind == "services":
        ips = [ip for ip in [spec.get("clusterIP"), *(spec.get("clusterIPs") or [])]
               if ip and ip != "None"]
        return list(dict.fromkeys(ips)), Identity(
            name=str(meta.get("name") or ""), namespace=meta.get("namespace"), kind="Service",
            labels=labels, source="kubernetes")
    if kind == "endpointslices":
        svc = labels.get("kubernetes.io/service-name")
        if not svc:
            return [], None
        ips = [a for ep in obj.get("endpoints") or []
               if (ep.get("targetRef") or {}).get("kind") != "Pod"
               for a in ep.get("addresses") or []]
        return list(dict.fromkeys(ips)), Identity(name=svc, namespace=meta.get("namespace"),
                                                  kind="Service", source="kubernetes")
    if kind == "nodes":
        ips = [a.get("address") for a in status.get("addresses") or []
               if a.get("type") == "InternalIP" and a.get("address")]
        name = str(meta.get("name") or "")
        return ips, Identity(name=name, kind="Node", host=name, labels=labels, source="kubernetes")
    raise ValueError(kind)


def pod_cidrs(obj: Mapping[str, Any]) -> tuple[Net, ...]:
    """A node's pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`); what is not a CIDR is left out."""
    spec = obj.get("spec") or {}
    out: list[Net] = []
    for text in spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []):
        try:
            out.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError:
            continue
    return tuple(out)


class Table:
    """One kind's spans by address, and what each object owns now. Writers hold the index's
    lock; readers take an address's tuple of spans without it (replaced, never changed)."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[Span, ...]] = {}
        self.owned: dict[str, tuple[set[str], Identity | None]] = {}  # uid -> (addresses, ident)

    def set(self, owner: str, ips: Iterable[str], ident: Identity | None, created: float | None,
            now: float) -> None:
        old_ips, old_ident = self.owned.get(owner, (set(), None))
        new_ips = set(ips) if ident is not None else set()
        for ip in old_ips - new_ips:
            self._end(ip, owner, now)
        for ip in new_ips:
            if ip in old_ips and ident == old_ident:
                continue
            if ip in old_ips:  # same owner, a new name (labels, controller): a new span from now
                self._end(ip, owner, now)
                self._open(ip, owner, ident, now, now)
            else:
                self._open(ip, owner, ident, created if created is not None else now, now)
        if new_ips:
            self.owned[owner] = (new_ips, ident)
        else:
            self.owned.pop(owner, None)

    def delete(self, owner: str, now: float) -> None:
        ips, _ = self.owned.pop(owner, (set(), None))
        for ip in ips:
            self._end(ip, owner, now)

    def _open(self, ip: str, owner: str, ident: Identity | None, start: float, now: float) -> None:
        assert ident is not None
        spans = list(self.spans.get(ip, ()))
        if spans:
            last = spans[-1]
            if last.end == INF and last.owner != owner:  # its delete was missed: ends here
                start = max(start, last.start)
                spans[-1] = Span(last.start, max(min(start, now), last.start), last.owner,
                                 last.ident)
                last = spans[-1]
            start = max(start, last.end)  # spans of one address never overlap
        spans.append(Span(start, INF, owner, ident))
        self.spans[ip] = tuple(spans)

    def _end(self, ip: str, owner: str, now: float) -> None:
        spans = list(self.spans.get(ip, ()))
        for i in range(len(spans) - 1, -1, -1):
            s = spans[i]
            if s.owner == owner and s.end == INF:
                spans[i] = Span(s.start, max(now, s.start), s.owner, s.ident)
                self.spans[ip] = tuple(spans)
                return

    def prune(self, before: float) -> int:
        """Forget spans that ended before `before`."""
        gone = 0
        for ip, spans in list(self.spans.items()):
            keep = tuple(s for s in spans if s.end >= before)
            if len(keep) != len(spans):
                gone += len(spans) - len(keep)
                if keep:
                    self.spans[ip] = keep
                else:
                    del self.spans[ip]
        return gone

    def lookup(self, ip: str, at: float, skew: float) -> Identity | None:
        spans = self.spans.get(ip)
        if not spans:
            return None
        i = bisect.bisect_right([s.start for s in spans], at) - 1
        if i >= 0 and at < spans[i].end:
            return spans[i].ident
        # between spans, before the first or after the last: the nearest within `skew`
        best: tuple[float, Span] | None = None
        for s in spans[max(i, 0):i + 2]:
            dist = s.start - at if at < s.start else at - s.end
            if dist <= skew and (best is None or dist < best[0]):
                best = (dist, s)
        return best[1].ident if best else None


class Index:
    """The four kinds' tables. `apply` and `replace` are the watcher's; `lookup` correlation's."""

    def __init__(self, keep_deleted_s: float = 3600.0, skew_s: float = 30.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.keep_deleted_s, self.skew_s = keep_deleted_s, skew_s
        self.clock = clock or time.time
        self.tables = {k: Table() for k in KINDS}
        self._next_prune = 0.0
        self.objects: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._uids: dict[str, set[str]] = {k: set() for k in KINDS}
        # node uid -> its pod CIDRs and identity, as the node has them now (pod_network_node)
        self.node_cidrs: dict[str, tuple[tuple[Net, ...], Identity]] = {}
        self._lock = threading.Lock()

    def apply(self, kind: str, event: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        meta = obj.get("metadata") or {}
        owner = _key(meta)
        with self._lock:
            now = self.clock()
            table, uids = self.tables[kind], self._uids[kind]
            if event == "DELETED":
                table.delete(owner, now)
                uids.discard(owner)
                if kind == "nodes":
                    self.node_cidrs.pop(owner, None)
            else:
                ips, ident = addresses(kind, obj)
                table.set(owner, ips, ident, ts(meta.get("creationTimestamp")), now)
                uids.add(owner)
                if kind == "nodes":
                    self._set_cidrs(owner, obj, ident)
            self.objects[kind] = len(uids)
            if now >= self._next_prune:  # ended owners past keep_deleted, once a minute
                self._next_prune = now + 60.0
                for t in self.tables.values():
                    t.prune(now - self.keep_deleted_s)

    def replace(self, kind: str, items: Iterable[Mapping[str, Any]]) -> None:
        """A full list: objects not in it were deleted meanwhile; the others as events."""
        items = list(items)
        seen = {_key(o.get("metadata") or {}) for o in items}
        with self._lock:
            now = self.clock()
            table, uids = self.tables[kind], self._uids[kind]
            # the listed first: an object deleted meanwhile whose address went to a listed one
            # ends where that one started, not now
            if kind == "nodes":
                self.node_cidrs.clear()
            for obj in items:
                meta = obj.get("metadata") or {}
                ips, ident = addresses(kind, obj)
                table.set(_key(meta), ips, ident, ts(meta.get("creationTimestamp")), now)
                if kind == "nodes":
                    self._set_cidrs(_key(meta), obj, ident)
            for owner in list(uids - seen):
                table.delete(owner, now)
            uids.clear()
            uids.update(seen)
            self.objects[kind] = len(uids)
            for t in self.tables.values():
                t.prune(now - self.keep_deleted_s)

    def prune(self) -> int:
        with self._lock:
            before = self.clock() - self.keep_deleted_s
            return sum(t.prune(before) for t in self.tables.values())

    def service_addresses(self, namespace: str | None, name: str) -> list[str]:
        """The addresses a Service holds now (its ClusterIPs; selector-less endpoints too): what
        a `to_service` filter by name matches (aggregator/service_view.py)."""
        out = []
        with self._lock:
            for kind in ("services", "endpointslices"):
                for ip, spans in self.tables[kind].spans.items():
                    if any(s.end == INF and s.ident.name == name and s.ident.namespace == namespace
                           for s in spans):
                        out.append(ip)
        return sorted(set(out))

    def _set_cidrs(self, owner: str, obj: Mapping[str, Any], ident: Identity | None) -> None:
        nets = pod_cidrs(obj)
        if nets and ident is not None:  # a layer of its own, below the process layer
            self.node_cidrs[owner] = (nets, msgspec.structs.replace(ident, source="cidr"))
        else:
            self.node_cidrs.pop(owner, None)

    def pod_network_node(self, ip: str, at: float) -> Identity | None:
        """The node whose pod CIDR holds `ip` when no pod held it at `at` (within `skew`):
        the node's own address on the pod network (the module docstring)."""
        if not self.node_cidrs or self.tables["pods"].lookup(ip, at, self.skew_s) is not None:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for nets, ident in list(self.node_cidrs.values()):
            if any(addr.version == n.version and addr in n for n in nets):
                return ident
        return None

    def lookup(self, ip: str, at: float) -> Identity | None:
        """`ip` as the collectors write it (canonical: see `_canonical`)."""
        for kind in KINDS:
            hit = self.tables[kind].lookup(ip, at, self.skew_s)
            if hit is not None:
                return hit
        return None
