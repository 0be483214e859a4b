"""Kubernetes NetworkPolicy semantics (networking.k8s.io/v1), as a pure function of a policy set
and one connection.

In:  `Policy` objects (built from validated documents by `parse_policy`) and a `Conn`: both
     ends (`Endpoint`: namespace and labels of a pod, or an address outside the cluster), the
     server port and the protocol.
Out: a `Verdict`: whether each side isolates the connection's pod, which policies select it,
     and whether the set allows it (True), denies it (False) or cannot say (None: a named port
     whose container port names are unknown).

The rules are the API reference's (kubernetes/api networking/v1 types.go, "NetworkPolicySpec"):
- a pod is isolated for ingress (egress) when some policy of its namespace selects it and has
  that type; `policyTypes` defaults to Ingress, plus Egress when `egress` is present;
- allow rules are additive across every policy that selects the pod; a pod not isolated for a
  direction allows everything in it;
- a connection needs the client's egress and the server's ingress;
- a rule with no `from`/`to` matches every peer, with no `ports` every port; a rule's peers are
  OR'ed, `podSelector` and `namespaceSelector` in one peer are AND'ed; `podSelector` alone means
  the policy's namespace; an empty selector matches everything;
- a port is a number or the name of a container port of the destination pod (resolved on the
  server, for ingress and egress alike), protocol TCP by default, `endPort` a range.
Nothing here does I/O; the e2e reachability cases (tests/unit/test_policy_upstream.py) run in
milliseconds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eastwest.errors import ConfigError

NS_NAME_LABEL = "kubernetes.io/metadata.name"
PROTOCOLS = ("TCP", "UDP", "SCTP")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# a named port (apimachinery validation IsValidPortName, RFC 6335 service name)
_PORT_NAME = re.compile(r"(?=.{1,15}$)(?=.*[a-z])(?!-)(?!.*--)[a-z0-9-]*[a-z0-9]")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ConfigError):
    """A policy document that is not a valid NetworkPolicy (bad input: exit 2); `where` names
    the document and field (`p.yaml: document 2 (deny-all): spec.ingress[0].ports[0].protocol`)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(where, None, problem)
        self.args = (f"{where}: {problem}",)
        self.where, self.problem = where, problem


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":  # a missing key is "not in" (apimachinery labels.Selector)
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True)
class Selector:
    """A metav1.LabelSelector: matchLabels and matchExpressions, all AND'ed; empty = all."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels)
                and all(r.matches(labels) for r in self.expressions))

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.expressions


@dataclass(frozen=True)
class IpBlock:
    cidr: Net
    excepts: tuple[Net, ...] = ()

    def matches(self, ip: str | None) -> bool:
        if ip is None:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return (addr.version == self.cidr.version and addr in self.cidr
                and not any(addr.version == e.version and addr in e for e in self.excepts))


@dataclass(frozen=True)
class Peer:
    pod_selector: Selector | None = None
    namespace_selector: Selector | None = None
    ip_block: IpBlock | None = None


@dataclass(frozen=True)
class PortRule:
    protocol: str = "TCP"
    port: int | str | None = None   # None: every port of the protocol
    end_port: int | None = None


@dataclass(frozen=True)
class Rule:
    peers: tuple[Peer, ...] | None = None     # None: every peer (no from/to)
    ports: tuple[PortRule, ...] | None = None  # None: every port


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    pod_selector: Selector
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    types: frozenset[str] = frozenset({"Ingress"})

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace set) or an address outside the cluster.

    `ports`: the pod's named container ports, name -> (port, protocol); None when unknown (a
    named port in a rule then cannot be evaluated for this pod)."""

    namespace: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str | None = None
    namespace_labels: Mapping[str, str] | None = None
    ports: Mapping[str, tuple[int, str]] | None = None

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None

    def ns_labels(self) -> Mapping[str, str]:
        if self.namespace_labels is not None:
            return self.namespace_labels
        return {NS_NAME_LABEL: self.namespace} if self.namespace is not None else {}


@dataclass(frozen=True)
class Conn:
    client: Endpoint
    server: Endpoint
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class Side:
    """One direction's answer: the policies that isolate the pod (empty: not isolated) and
    whether their rules allow the connection (None: a named port could not be resolved)."""

    policies: tuple[str, ...]
    allowed: bool | None

    @property
    def isolated(self) -> bool:
        return bool(self.policies)


@dataclass(frozen=True)
class Verdict:
    ingress: Side  # the server's
    egress: Side   # the client's

    @property
    def allowed(self) -> bool | None:
        if self.ingress.allowed is False or self.egress.allowed is False:
            return False
        if self.ingress.allowed is None or self.egress.allowed is None:
            return None
        return True

    @property
    def denied_by(self) -> str | None:
        """`ingress`, `egress` or `both` when denied, else None."""
        i, e = self.ingress.allowed is False, self.egress.allowed is False
        return "both" if i and e else "ingress" if i else "egress" if e else None


def _any3(values: Iterable[bool | None]) -> bool | None:
    """OR with an unknown: True if any is True, else None if any is None, else False."""
    unknown = False
    for v in values:
        if v is True:
            return True
        unknown = unknown or v is None
    return None if unknown else False


def _peer_matches(peer: Peer, policy_ns: str, other: Endpoint) -> bool:
    if peer.ip_block is not None:
        return peer.ip_block.matches(other.ip)
    if not other.is_pod:
        return False
    if peer.namespace_selector is None:
        in_ns = other.namespace == policy_ns
    else:
        in_ns = peer.namespace_selector.matches(other.ns_labels())
    if not in_ns:
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(other.labels)


def _port_matches(rule: PortRule, conn: Conn) -> bool | None:
    if rule.protocol != conn.protocol:
        return False
    if rule.port is None:
        return True
    if isinstance(rule.port, int):
        hi = rule.end_port if rule.end_port is not None else rule.port
        return rule.port <= conn.port <= hi
    server = conn.server
    if not server.is_pod:
        return False  # an address outside the cluster has no container port names
    if server.ports is None:
        return None
    named = server.ports.get(rule.port)
    return named is not None and named == (conn.port, conn.protocol)


def _rule_matches(rule: Rule, policy_ns: str, other: Endpoint, conn: Conn) -> bool | None:
    if rule.peers is not None and not any(_peer_matches(p, policy_ns, other) for p in rule.peers):
        return False
    if rule.ports is None:
        return True
    return _any3(_port_matches(p, conn) for p in rule.ports)


def selecting(policies: Sequence[Policy], pod: Endpoint, kind: str) -> list[Policy]:
    """The policies that isolate `pod` for `kind` (Ingress or Egress)."""
    if not pod.is_pod:
        return []
    return [p for p in policies if p.namespace == pod.namespace and kind in p.types
            and p.pod_selector.matches(pod.labels)]


def _side(policies: Sequence[Policy], pod: Endpoint, other: Endpoint, conn: Conn,
          kind: str) -> Side:
    sel = selecting(policies, pod, kind)
    if not sel:
        return Side((), True)
    allowed = _any3(_rule_matches(r, p.namespace, other, conn) for p in sel
                    for r in (p.ingress if kind == "Ingress" else p.egress))
    return Side(tuple(sorted(p.ref for p in sel)), allowed)


def evaluate(policies: Sequence[Policy], conn: Conn) -> Verdict:
    return Verdict(ingress=_side(policies, conn.server, conn.client, conn, "Ingress"),
                   egress=_side(policies, conn.client, conn.server, conn, "Egress"))


# -- from a (schema-valid) document ------------------------------------------------------------

def _selector(obj: Any, where: str) -> Selector:
    if obj is None:
        return Selector()
    if not isinstance(obj, Mapping):
        raise PolicyError(where, "must be a label selector (matchLabels, matchExpressions)")
    ml = obj.get("matchLabels") or {}
    exprs = []
    for i, e in enumerate(obj.get("matchExpressions") or ()):
        w = f"{where}.matchExpressions[{i}]"
        op, values = e.get("operator"), tuple(str(v) for v in e.get("values") or ())
        if op not in OPERATORS:
            raise PolicyError(f"{w}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
        if op in ("In", "NotIn") and not values:
            raise PolicyError(f"{w}.values", f"must be non-empty for {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyError(f"{w}.values", f"must be empty for {op}")
        exprs.append(Requirement(str(e.get("key")), op, frozenset(values)))
    return Selector(tuple(sorted((str(k), str(v)) for k, v in ml.items())), tuple(exprs))


def _net(text: Any, where: str) -> Net:
    try:
        return ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        raise PolicyError(where, f"{text!r} is not a CIDR (10.0.0.0/8, fd00::/8)") from None


def _peer(obj: Mapping[str, Any], where: str) -> Peer:
    if "ipBlock" in obj and obj["ipBlock"] is not None:
        if obj.get("podSelector") is not None or obj.get("namespaceSelector") is not None:
            raise PolicyError(where, "ipBlock cannot be combined with a selector in one peer")
        b = obj["ipBlock"]
        cidr = _net(b.get("cidr"), f"{where}.ipBlock.cidr")
        excepts = tuple(_net(x, f"{where}.ipBlock.except[{i}]")
                        for i, x in enumerate(b.get("except") or ()))
        for i, x in enumerate(excepts):
            if x.version != cidr.version or not x.subnet_of(cidr):  # type: ignore[arg-type]
                raise PolicyError(f"{where}.ipBlock.except[{i}]", f"{x} is not inside {cidr}")
        return Peer(ip_block=IpBlock(cidr, excepts))
    ps, ns = obj.get("podSelector"), obj.get("namespaceSelector")
    if ps is None and ns is None:
        raise PolicyError(where, "a peer needs podSelector, namespaceSelector or ipBlock")
    return Peer(pod_selector=None if ps is None else _selector(ps, f"{where}.podSelector"),
                namespace_selector=None if ns is None else _selector(ns, f"{where}.namespaceSelector"))


def _port(obj: Mapping[str, Any], where: str) -> PortRule:
    proto = obj.get("protocol") or "TCP"
    if proto not in PROTOCOLS:
        raise PolicyError(f"{where}.protocol", f"{proto!r} is not one of {', '.join(PROTOCOLS)}")
    port, end = obj.get("port"), obj.get("endPort")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise PolicyError(f"{where}.port", f"{port} is not in 1..65535")
    if isinstance(port, str) and not _PORT_NAME.fullmatch(port) or port == "":
        raise PolicyError(f"{where}.port", f"{port!r} is not a port name (IANA_SVC_NAME: at "
                          "most 15 of a-z, 0-9 and -, with a letter, no -- and no - at an end)")
    if end is not None:
        if not isinstance(port, int):
            raise PolicyError(f"{where}.endPort", "needs a numeric port")
        if not port <= int(end) <= 65535:
            raise PolicyError(f"{where}.endPort", f"{end} must be in {port}..65535")
        end = int(end)
    return PortRule(proto, port, end)


def _rule(obj: Mapping[str, Any] | None, where: str, peers_key: str) -> Rule:
    obj = obj or {}
    peers = obj.get(peers_key)
    ports = obj.get("ports")
    return Rule(
        None if not peers else tuple(_peer(p or {}, f"{where}.{peers_key}[{i}]")
                                     for i, p in enumerate(peers)),
        None if not ports else tuple(_port(p or {}, f"{where}.ports[{i}]")
                                     for i, p in enumerate(ports)))


def parse_policy(doc: Mapping[str, Any], where: str = "policy",
                 default_namespace: str = "default") -> Policy:
    """A `Policy` from a NetworkPolicy document (already checked against the schema; the
    checks the API server adds on top of it are here, each naming its field)."""
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    types = spec.get("policyTypes")
    if not types:  # absent or empty: defaulted (as the API server's defaulting does)
        types = ["Ingress", *(["Egress"] if spec.get("egress") is not None else [])]
    for i, t in enumerate(types):
        if t not in ("Ingress", "Egress"):
            raise PolicyError(f"{where}: spec.policyTypes[{i}]", f"{t!r} is not Ingress or Egress")
    return Policy(
        name=str(meta.get("name")), namespace=str(meta.get("namespace") or default_namespace),
        pod_selector=_selector(spec.get("podSelector"), f"{where}: spec.podSelector"),
        ingress=tuple(_rule(r, f"{where}: spec.ingress[{i}]", "from")
                      for i, r in enumerate(spec.get("ingress") or ())),
        egress=tuple(_rule(r, f"{where}: spec.egress[{i}]", "to")
                     for i, r in enumerate(spec.get("egress") or ())),
        types=frozenset(types))
