"""Suggest: the Kubernetes NetworkPolicies that allow exactly the traffic observed in a window.

In:  `ObservedEdge`s (eastwest/policy/observed.py), the window they come from, a `Scope`
     (namespace and/or workload whose policies are written; default every pod workload).
Out: one NetworkPolicy per pod workload in scope, selecting its pods by their labels, isolated
     for Ingress and Egress, with
     - ingress from each observed client (a pod: `podSelector` of its labels, plus a
       `namespaceSelector` on `kubernetes.io/metadata.name` when in another namespace; an
       address outside the cluster: `ipBlock` /32 or /128) on the observed ports;
     - egress to each observed server likewise (DNS to the resolver is an edge like any other);
     rules merged where they share ports (one rule, several peers) and ports merged into
     `endPort` ranges; each rule justified by its connections and the window (an annotation,
     and a YAML comment in `to_yaml`).
`check(suggest(edges), edges)` denies nothing (tests/unit/test_policy_suggest.py, a property
over generated graphs); a pod-to-pod connection that was not observed is denied when both
workloads are in scope and their labels tell them apart.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from eastwest.policy.observed import End, ObservedEdge
from eastwest.policy.semantics import NS_NAME_LABEL

# labels the Kubernetes controllers set per pod or per rollout: a selector on them would miss
# the workload's other pods, or its pods after the next rollout
PER_POD_LABELS = frozenset({"pod-template-hash", "controller-revision-hash",
                            "pod-template-generation", "statefulset.kubernetes.io/pod-name",
                            "apps.kubernetes.io/pod-index", "batch.kubernetes.io/controller-uid",
                            "batch.kubernetes.io/job-completion-index", "controller-uid"})
ANNOTATION = "eastwest.io/justification"
WINDOW_ANNOTATION = "eastwest.io/window"
Ports = tuple[tuple[str, int, int], ...]  # (protocol, port, end port)


@dataclass(frozen=True)
class Scope:
    namespace: str | None = None
    workload: str | None = None  # `namespace/name` or a bare name

    def covers(self, end: End) -> bool:
        if not end.is_pod:
            return False
        if self.namespace is not None and end.namespace != self.namespace:
            return False
        return self.workload is None or self.workload in (end.id, end.name)


@dataclass
class Suggestion:
    """One NetworkPolicy object, and per rule (`ingress`/`egress`, index) its justification."""

    obj: dict[str, Any]
    comments: dict[tuple[str, int], str]


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip("-.")
    return (name or "workload")[:240]


def _peer(other: End, own_namespace: str) -> dict[str, Any]:
    if not other.is_pod:
        ip = ipaddress.ip_address(str(other.ip))
        return {"ipBlock": {"cidr": f"{ip}/{ip.max_prefixlen}"}}
    peer: dict[str, Any] = {}
    if other.namespace != own_namespace:
        peer["namespaceSelector"] = {"matchLabels": {NS_NAME_LABEL: other.namespace}}
    peer["podSelector"] = selector(other)
    return peer


def selector(end: End) -> dict[str, Any]:
    """A workload's pods: its labels, but those Kubernetes sets per pod or per rollout."""
    return {"matchLabels": {k: v for k, v in sorted(end.labels.items()) if k not in PER_POD_LABELS}}


def _ranges(ports: Iterable[tuple[str, int]]) -> Ports:
    """(protocol, port) pairs as sorted ranges: 8080, 8081, 8082 -> 8080..8082."""
    out: list[list[Any]] = []
    for proto, p in sorted(set(ports)):
        if out and out[-1][0] == proto and out[-1][2] == p - 1:
            out[-1][2] = p
        else:
            out.append([proto, p, p])
    return tuple((a, b, c) for a, b, c in out)


def _port_json(r: tuple[str, int, int]) -> dict[str, Any]:
    proto, lo, hi = r
    out: dict[str, Any] = {"protocol": proto, "port": lo}
    if hi != lo:
        out["endPort"] = hi
    return out


def _peer_key(peer: dict[str, Any]) -> str:
    return json.dumps(peer, sort_keys=True)


def _rules(own: End, edges: Sequence[ObservedEdge], direction: str,
           window: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rules of one direction: peers grouped by the exact set of ports they used."""
    by_peer: dict[str, tuple[dict[str, Any], set[tuple[str, int]], int, set[str]]] = {}
    for e in edges:
        other = e.client if direction == "ingress" else e.server
        peer = _peer(other, str(own.namespace))
        k = _peer_key(peer)
        _, ports, n, ids = by_peer.setdefault(k, (peer, set(), 0, set()))
        ports.add((e.protocol, e.port))
        ids.add(other.id)
        by_peer[k] = (peer, ports, n + e.connections, ids)
    by_ports: dict[Ports, list[tuple[dict[str, Any], int, set[str]]]] = defaultdict(list)
    for peer, ports, n, ids in by_peer.values():
        by_ports[_ranges(ports)].append((peer, n, ids))
    rules, comments = [], []
    key = "from" if direction == "ingress" else "to"
    for ports_, peers in sorted(by_ports.items()):
        peers.sort(key=lambda t: _peer_key(t[0]))
        rules.append({key: [p for p, _, _ in peers], "ports": [_port_json(r) for r in ports_]})
        total = sum(n for _, n, _ in peers)
        who = ", ".join(f"{'+'.join(sorted(ids))} ({n})" for _, n, ids in peers)
        note = (f"{total} connection{'s' if total != 1 else ''} in {window}: "
                f"{'from' if direction == 'ingress' else 'to'} {who}")
        comments.append("".join(ch if ch.isprintable() else "?" for ch in note))
    return rules, comments


def suggest(edges: Iterable[ObservedEdge], window: str, scope: Scope = Scope()) -> list[Suggestion]:
    edges = list(edges)
    pods: dict[str, End] = {}
    for e in edges:
        for end in (e.client, e.server):
            if scope.covers(end):
                pods.setdefault(end.id, end)
    out = []
    for wid in sorted(pods):
        own = pods[wid]
        ingress, in_notes = _rules(own, [e for e in edges if e.server.id == wid], "ingress", window)
        egress, out_notes = _rules(own, [e for e in edges if e.client.id == wid], "egress", window)
        notes = {("ingress", i): c for i, c in enumerate(in_notes)}
        notes.update({("egress", i): c for i, c in enumerate(out_notes)})
        obj = {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": _dns_name(f"eastwest-{own.name or wid}"), "namespace": own.namespace,
                         "annotations": {WINDOW_ANNOTATION: window,
                                         ANNOTATION: json.dumps({f"{d}[{i}]": c for (d, i), c
                                                                 in notes.items()})}},
            "spec": {"podSelector": selector(own),
                     "policyTypes": ["Ingress", "Egress"], "ingress": ingress, "egress": egress}}
        out.append(Suggestion(obj, notes))
    return out


def to_json_list(suggestions: Sequence[Suggestion]) -> dict[str, Any]:
    """A `List` (what `kubectl apply -f` and `eastwest policy check` read)."""
    return {"apiVersion": "v1", "kind": "List", "items": [s.obj for s in suggestions]}


def to_yaml(suggestions: Sequence[Suggestion]) -> str:
    """`---`-separated documents, a comment above each rule with its justification."""
    docs = []
    for s in suggestions:
        text = yaml.safe_dump(s.obj, sort_keys=False, default_flow_style=False, width=1000)
        lines, section, index = [], None, -1
        for line in text.splitlines():
            if line in ("  ingress:", "  egress:"):
                section, index = line.strip()[:-1], -1
            elif not line.startswith("  ") or (line.startswith("  ") and not line.startswith("   ")
                                                 and not line.startswith("  - ")):
                section = None
            if section and line.startswith("  - "):
                index += 1
                lines.append(f"  # {s.comments[(section, index)]}")
            lines.append(line)
        docs.append("\n".join(lines) + "\n")
    if not docs:
        return ""
    return "---\n".join(docs)
