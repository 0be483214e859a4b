"""Every NetworkPolicy e2e reachability case of Kubernetes, re-expressed as a table over our pure
semantics (eastwest/policy/semantics.py).

Facts from kubernetes/kubernetes `test/e2e/network/netpol/network_policy.go` at commit
9db638c0807a720aa050ebcef69c32e4d4cce280 (and its world, `model.go`): namespaces x, y, z
labelled `ns: <name>` and `kubernetes.io/metadata.name: <name>`; pods a, b, c in each labelled
`pod: <name>`, each serving the case's ports and protocols on container ports named
`serve-<port>-<protocol>`; the 9 x 9 reachability matrix on one port and protocol, every pair
allowed unless the case says otherwise; loopback (a pod to itself) is not judged upstream
(`ignoreLoopback`), nor here. A case with several steps (a policy updated, a label added, a
policy deleted) is one row per step. 48 upstream cases (42 TCP, 3 UDP, 3 SCTP), 65 steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from eastwest.policy.load import validate_document
from eastwest.policy.semantics import NS_NAME_LABEL, Conn, Endpoint, evaluate, parse_policy

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL = [f"{n}/{p}" for n in NAMESPACES for p in PODS]


def ip_of(pod: str) -> str:
    ns, name = pod.split("/")
    return f"10.0.{NAMESPACES.index(ns)}.{PODS.index(name) + 1}"


# -- policies, in the shape the upstream helpers build them ------------------------------------

def netpol(name: str, ns: str, pod: dict[str, Any] | None = None, *,
           ingress: list[dict[str, Any]] | None = None, egress: list[dict[str, Any]] | None = None,
           types: list[str] | None = None) -> dict[str, Any]:
    """`pod`: the podSelector (None: {}); ingress/egress None: absent; [] : present and empty.
    Upstream's SetSpecIngressRules/SetSpecEgressRules also set policyTypes."""
    spec: dict[str, Any] = {"podSelector": pod or {}}
    if types is None:
        types = [*(["Ingress"] if ingress is not None else []),
                 *(["Egress"] if egress is not None else [])]
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    spec["policyTypes"] = types
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def labels(**kv: str) -> dict[str, Any]:
    return {"matchLabels": dict(kv)}


def ns_is(name: str) -> dict[str, Any]:
    return {"matchLabels": {NS_NAME_LABEL: name}}


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": op, "values": list(values)}]}


def port(p: int | str | None = None, proto: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if p is not None:
        out["port"] = p
    if proto is not None:
        out["protocol"] = proto
    return out


# -- the expected matrix, built the way the upstream cases describe it -------------------------

class Reach:
    """All allowed, then edits: `peer(from, to, ok)` where an end is "" (every pod), "x" (a
    namespace) or "x/a" (a pod)."""

    def __init__(self) -> None:
        self.m = {(f, t): True for f in ALL for t in ALL}

    @staticmethod
    def _pods(sel: str) -> list[str]:
        if not sel:
            return ALL
        return [sel] if "/" in sel else [p for p in ALL if p.startswith(sel + "/")]

    def peer(self, frm: str, to: str, ok: bool) -> Reach:
        for f in self._pods(frm):
            for t in self._pods(to):
                self.m[f, t] = ok
        return self

    def all_ingress(self, pod: str, ok: bool) -> Reach:
        return self.peer("", pod, ok)

    def all_egress(self, pod: str, ok: bool) -> Reach:
        return self.peer(pod, "", ok)


@dataclass
class Step:
    case: str
    policies: list[dict[str, Any]]
    port: int
    protocol: str
    expect: Reach
    served: tuple[int, ...] = (80, 81)
    protocols: tuple[str, ...] = ("TCP",)
    pod_labels: dict[str, dict[str, str]] = field(default_factory=dict)  # extra labels
    ns_labels: dict[str, dict[str, str]] = field(default_factory=dict)


STEPS: list[Step] = []


def case(name: str, *steps: tuple[list[dict[str, Any]], int, str, Reach], served: Iterable[int],
         protocols: Iterable[str] = ("TCP",), pod_labels: list[dict[str, dict[str, str]]] | None = None,
         ns_labels: list[dict[str, dict[str, str]]] | None = None) -> None:
    for i, (pols, p, proto, reach) in enumerate(steps):
        STEPS.append(Step(f"{name} [{i + 1}/{len(steps)} {proto}/{p}]" if len(steps) > 1
                          else f"{name} [{proto}/{p}]", pols, p, proto, reach, tuple(served),
                          tuple(protocols), (pod_labels or [{}] * len(steps))[i],
                          (ns_labels or [{}] * len(steps))[i]))


R = Reach
DENY_IN = netpol("deny-ingress", "x", ingress=[])
TCP = "TCP"

# ---------------------------------------------------------------- "NetworkPolicy between server and client"
case("should support a 'default-deny-ingress' policy",
     ([DENY_IN], 80, TCP, R().peer("", "x", False)), served=[80])
case("should support a 'default-deny-all' policy",
     ([netpol("deny-all", "x", ingress=[], egress=[])], 80, TCP,
      R().peer("", "x", False).peer("x", "", False)), served=[80])
case("should enforce policy to allow traffic from pods within server namespace based on PodSelector",
     ([netpol("x-a-allows-x-b", "x", labels(pod="a"), ingress=[{"from": [{"podSelector": labels(pod="b")}]}])],
      80, TCP, R().all_ingress("x/a", False).peer("x/b", "x/a", True)), served=[80])
case("should enforce policy to allow ingress traffic for a target",
     ([netpol("deny-all", "x", ingress=[]),
       netpol("allow-all-to-a", "x", labels(pod="a"),
              ingress=[{"from": [{"podSelector": {}, "namespaceSelector": {}}]}])],
      80, TCP, R().all_ingress("x/a", True).all_ingress("x/b", False).all_ingress("x/c", False)),
     served=[80])
case("should enforce policy to allow ingress traffic from pods in all namespaces",
     ([netpol("allow-from-another-ns", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": {"matchLabels": {}}}]}])], 80, TCP, R()),
     served=[80])
case("should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
     ([netpol("allow-client-a-via-ns-selector", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": ns_is("y")}]}])], 80, TCP,
      R().peer("x", "x/a", False).peer("z", "x/a", False)), served=[80])
case("should enforce policy based on PodSelector with MatchExpressions",
     ([netpol("x-a-allows-x-b", "x", labels(pod="a"),
              ingress=[{"from": [{"podSelector": expr("pod", "In", "b")}]}])], 80, TCP,
      R().all_ingress("x/a", False).peer("x/b", "x/a", True)), served=[80])
case("should enforce policy based on NamespaceSelector with MatchExpressions",
     ([netpol("allow-ns-y-match-selector", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": expr(NS_NAME_LABEL, "In", "y")}]}])], 80, TCP,
      R().peer("x", "x/a", False).peer("z", "x/a", False)), served=[80])
case("should enforce policy based on PodSelector or NamespaceSelector",
     ([netpol("allow-ns-y-match-selector", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": expr(NS_NAME_LABEL, "NotIn", "x")},
                                 {"podSelector": labels(pod="b")}]}])], 80, TCP,
      R().peer("x/a", "x/a", False).peer("x/c", "x/a", False)), served=[80])
case("should enforce policy based on PodSelector and NamespaceSelector",
     ([netpol("allow-ns-y-podselector-and-nsselector", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": expr(NS_NAME_LABEL, "NotIn", "x"),
                                  "podSelector": labels(pod="b")}]}])], 80, TCP,
      R().all_ingress("x/a", False).peer("y/b", "x/a", True).peer("z/b", "x/a", True)), served=[80])
case("should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
     ([netpol("allow-ns-y-z-pod-b-c", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": expr(NS_NAME_LABEL, "NotIn", "x"),
                                  "podSelector": expr("pod", "In", "b", "c")}]}])], 80, TCP,
      R().peer("x", "x/a", False).peer("y/a", "x/a", False).peer("z/a", "x/a", False)), served=[80])
case("should enforce policy based on any PodSelectors",
     ([netpol("allow-ns-x-pod-b-c", "x", labels(pod="a"),
              ingress=[{"from": [{"podSelector": labels(pod="b")}, {"podSelector": labels(pod="c")}]}])],
      80, TCP, R().all_ingress("x/a", False).peer("x/b", "x/a", True).peer("x/c", "x/a", True)),
     served=[80])
_Y_POD_A = netpol("allow-ns-y-pod-a-via-namespace-pod-selector", "x", labels(pod="a"),
                  ingress=[{"from": [{"namespaceSelector": ns_is("y"), "podSelector": labels(pod="a")}]}])
case("should enforce policy to allow traffic only from a pod in a different namespace based on "
     "PodSelector and NamespaceSelector",
     ([_Y_POD_A], 80, TCP, R().all_ingress("x/a", False).peer("y/a", "x/a", True)), served=[80])


def _y_on(p: int, proto: str | None, name: str = "allow-client-a-via-ns-selector") -> dict[str, Any]:
    return netpol(name, "x", labels(pod="a"),
                  ingress=[{"from": [{"namespaceSelector": ns_is("y")}], "ports": [port(p, proto)]}])


_ONLY_Y = R().peer("x", "x/a", False).peer("y", "x/a", True).peer("z", "x/a", False)
case("should enforce policy based on Ports", ([_y_on(81, TCP)], 81, TCP, _ONLY_Y), served=[81])
case("should enforce multiple, stacked policies with overlapping podSelectors",
     ([_y_on(81, TCP)], 81, TCP, _ONLY_Y),
     ([_y_on(81, TCP)], 80, TCP, R().all_ingress("x/a", False)),
     ([_y_on(81, TCP), _y_on(80, TCP, "allow-client-a-via-ns-selector-80")], 80, TCP, _ONLY_Y),
     served=[80, 81])
_ALLOW_ALL_IN = netpol("allow-all", "x", {}, ingress=[{}])
case("should support allow-all policy", ([_ALLOW_ALL_IN], 80, TCP, R()), ([_ALLOW_ALL_IN], 81, TCP, R()),
     served=[80, 81])
_NAMED_81 = netpol("allow-all", "x", {}, ingress=[{"ports": [port("serve-81-tcp")]}])
case("should allow ingress access on one named port",
     ([_NAMED_81], 81, TCP, R()), ([_NAMED_81], 80, TCP, R().peer("", "x", False)), served=[80, 81])
_NS_NAMED_80 = netpol("allow-client-a-via-ns-selector-80", "x", labels(pod="a"),
                      ingress=[{"from": [{"namespaceSelector": ns_is("y")}],
                                "ports": [port("serve-80-tcp", TCP)]}])
case("should allow ingress access from namespace on one named port",
     ([_NS_NAMED_80], 80, TCP, R().peer("x", "x/a", False).peer("z", "x/a", False)),
     ([_NS_NAMED_80], 81, TCP, R().all_ingress("x/a", False)), served=[80, 81])
_EGRESS_NAMED_80 = netpol("allow-egress", "x", {}, egress=[{"ports": [port("serve-80-tcp")]}])
case("should allow egress access on one named port",
     ([_EGRESS_NAMED_80], 80, TCP, R()), ([_EGRESS_NAMED_80], 81, TCP, R().peer("x", "", False)),
     served=[80, 81])
case("should enforce updated policy",
     ([netpol("allow-all-mutate-to-deny-all", "x", {}, ingress=[{}])], 81, TCP, R()),
     ([netpol("allow-all-mutate-to-deny-all", "x", {}, ingress=[])], 81, TCP, R().peer("", "x", False)),
     served=[81])
_NS2 = netpol("allow-client-a-via-ns-selector", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": labels(ns2="updated")}]}])
case("should allow ingress access from updated namespace",
     ([_NS2], 80, TCP, R().all_ingress("x/a", False)),
     ([_NS2], 80, TCP, R().all_ingress("x/a", False).peer("y", "", True)),
     served=[80], ns_labels=[{}, {"y": {"ns2": "updated"}}])
_POD2 = netpol("allow-client-a-via-pod-selector", "x", labels(pod="a"),
               ingress=[{"from": [{"podSelector": labels(pod="b", pod2="updated")}]}])
case("should allow ingress access from updated pod",
     ([_POD2], 80, TCP, R().all_ingress("x/a", False)),
     ([_POD2], 80, TCP, R().all_ingress("x/a", False).peer("x/b", "x/a", True)),
     served=[80], pod_labels=[{}, {"x/b": {"pod2": "updated"}}])
case("should deny ingress from pods on other namespaces",
     ([netpol("deny-empty-policy", "x", {}, ingress=[{"from": [{"podSelector": {"matchLabels": {}}}]}])],
      80, TCP, R().peer("y", "x", False).peer("z", "x", False)), served=[80])
_ISOLATED = netpol("deny-ingress-via-label-selector", "x", labels(target="isolated"), ingress=[])
case("should deny ingress access to updated pod",
     ([_ISOLATED], 80, TCP, R()), ([_ISOLATED], 80, TCP, R().all_ingress("x/a", False)),
     served=[80], pod_labels=[{}, {"x/a": {"target": "isolated"}}])
case("should deny egress from pods based on PodSelector",
     ([netpol("deny-egress-pod-a", "x", labels(pod="a"), egress=[])], 80, TCP,
      R().all_egress("x/a", False)), served=[80])
case("should deny egress from all pods in a namespace",
     ([netpol("deny-egress-ns-x", "x", {}, egress=[])], 80, TCP, R().peer("x", "", False)), served=[80])
_IN_EG = netpol("allow-client-a-via-pod-selector", "x", labels(pod="a"),
                ingress=[{"from": [{"podSelector": labels(pod="b")}]}],
                egress=[{"ports": [port(80)]}], types=["Egress", "Ingress"])
case("should work with Ingress, Egress specified together",
     ([_IN_EG], 80, TCP, R().all_ingress("x/a", False).peer("x/b", "x/a", True)),
     ([_IN_EG], 81, TCP, R().all_ingress("x/a", False).all_egress("x/a", False).peer("x/b", "x/a", True)),
     served=[80, 81])
_XA = {"from": [{"namespaceSelector": ns_is("x"), "podSelector": labels(pod="a")}]}
case("should support denying of egress traffic on the client side (even if the server explicitly "
     "allows this traffic)",
     ([netpol("allow-to-ns-y-pod-a", "x", labels(pod="a"),
              egress=[{"to": [{"namespaceSelector": ns_is("y"), "podSelector": labels(pod="a")}]}]),
       netpol("allow-from-xa-on-ya-match-selector", "y", labels(pod="a"), ingress=[_XA]),
       netpol("allow-from-xa-on-yb-match-selector", "y", labels(pod="b"), ingress=[_XA])],
      80, TCP, R().peer("x/a", "", False).peer("", "y/a", False).peer("x/a", "y/a", True)
      .peer("", "y/b", False)), served=[80])
case("should enforce egress policy allowing traffic to a server in a different namespace based on "
     "PodSelector and NamespaceSelector",
     ([netpol("allow-to-ns-y-pod-a", "x", labels(pod="a"),
              egress=[{"to": [{"namespaceSelector": ns_is("y"), "podSelector": labels(pod="a")}]}])],
      80, TCP, R().all_egress("x/a", False).peer("x/a", "y/a", True)), served=[80])
_BY_PROTO = netpol("allow-ingress-by-proto", "x", labels(pod="a"), ingress=[{"ports": [port(None, TCP)]}])
case("should enforce ingress policy allowing any port traffic to a server on a specific protocol",
     ([_BY_PROTO], 80, TCP, R()), ([_BY_PROTO], 80, "UDP", R().peer("", "x/a", False)),
     served=[80], protocols=[TCP, "UDP"])
_IN_80 = netpol("allow-ingress-port-80", "x", {}, ingress=[{"ports": [port(80)]}])
case("should enforce multiple ingress policies with ingress allow-all policy taking precedence",
     ([_IN_80], 81, TCP, R().peer("", "x", False)),
     ([_IN_80, netpol("allow-ingress", "x", {}, ingress=[{}])], 81, TCP, R()), served=[81])
_EG_80 = netpol("allow-egress-port-80", "x", {}, egress=[{"ports": [port(80)]}])
case("should enforce multiple egress policies with egress allow-all policy taking precedence",
     ([_EG_80], 81, TCP, R().peer("x", "", False)),
     ([_EG_80, netpol("allow-egress", "x", {}, egress=[{}])], 81, TCP, R()), served=[81])
case("should stop enforcing policies after they are deleted",
     ([netpol("deny-all", "x", ingress=[], egress=[])], 80, TCP,
      R().peer("x", "", False).peer("", "x", False)),
     ([], 80, TCP, R()), served=[80])


def _cidr_egress(cidr: str, *excepts: str) -> dict[str, Any]:
    block: dict[str, Any] = {"cidr": cidr}
    if excepts:
        block["except"] = list(excepts)
    return netpol("allow-client-a-via-cidr-egress-rule", "x", labels(pod="a"),
                  egress=[{"to": [{"ipBlock": block}]}])


case("should allow egress access to server in CIDR block",
     ([_cidr_egress(ip_of("y/b") + "/32")], 80, TCP, R().all_egress("x/a", False).peer("x/a", "y/b", True)),
     served=[80])
case("should enforce except clause while egress access to server in CIDR block",
     ([_cidr_egress(ip_of("x/a") + "/4", ip_of("x/b") + "/32")], 80, TCP, R().peer("x/a", "x/b", False)),
     served=[80])
case("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
     ([_cidr_egress(ip_of("x/a") + "/4", ip_of("x/b") + "/32")], 80, TCP, R().peer("x/a", "x/b", False)),
     # UpdatePolicy: the policy of the same name is replaced
     ([_cidr_egress(ip_of("x/b") + "/32")], 80, TCP, R().all_egress("x/a", False).peer("x/a", "x/b", True)),
     served=[80])
_EG_ALL_A = netpol("allow-egress-for-target", "x", labels(pod="a"), egress=[{}])
case("should enforce policies to check ingress and egress policies can be controlled independently "
     "based on PodSelector",
     ([_EG_ALL_A], 80, TCP, R()),
     ([_EG_ALL_A, netpol("deny-ingress-via-label-selector", "x", labels(pod="a"), ingress=[])], 80, TCP,
      R().all_ingress("x/a", False)), served=[80])
case("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't "
     "support SCTP",
     ([DENY_IN, netpol("allow-only-sctp-ingress-on-port-81", "x", labels(pod="a"),
                       ingress=[{"ports": [port(81, "SCTP")]}])], 81, TCP, R().peer("", "x", False)),
     served=[81])
case("should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin "
     "doesn't support SCTP",
     ([netpol("allow-only-sctp-ingress-on-port-80", "x", labels(pod="a"),
              ingress=[{"ports": [port(80, "SCTP")]}])], 81, TCP, R().all_ingress("x/a", False)),
     served=[81])
case("should not allow access by TCP when a policy specifies only UDP",
     ([netpol("allow-only-udp-ingress-on-port-81", "x", labels(pod="a"),
              ingress=[{"ports": [port(81, "UDP")]}])], 81, TCP, R().all_ingress("x/a", False)),
     served=[81])
case("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using "
     "default ns label",
     ([netpol("allow-client-a-via-ns-selector-for-immutable-ns-label", "x", labels(pod="a"),
              ingress=[{"from": [{"namespaceSelector": ns_is("y")}]}])], 80, TCP,
      R().peer("x", "x/a", False).peer("z", "x/a", False)), served=[80])
case("should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
     ([netpol("allow-ns-y-match-selector-for-immutable-ns-label", "x", labels(pod="a"),
              egress=[{"to": [{"namespaceSelector": expr(NS_NAME_LABEL, "NotIn", "y")}]}])], 80, TCP,
      R().peer("x/a", "y", False)), served=[80])

# ---------------------------------------------------------------- UDP and SCTP contexts
for _proto in ("UDP", "SCTP"):
    case(f"{_proto}: should support a 'default-deny-ingress' policy",
         ([netpol("deny-all", "x", ingress=[])], 80, _proto, R().peer("", "x", False)),
         served=[80], protocols=[_proto])
    case(f"{_proto}: should enforce policy based on Ports",
         ([_y_on(81, _proto, "allow-ingress-on-port-81-ns-x")], 81, _proto,
          R().peer("x", "x/a", False).peer("z", "x/a", False)), served=[81], protocols=[_proto])
    case(f"{_proto}: should enforce policy to allow traffic only from a pod in a different "
         "namespace based on PodSelector and NamespaceSelector",
         ([_Y_POD_A], 80, _proto, R().all_ingress("x/a", False).peer("y/a", "x/a", True)),
         served=[80], protocols=[_proto])


# ---------------------------------------------------------------- the tests

def world(step: Step) -> dict[str, Endpoint]:
    ports = {f"serve-{p}-{proto.lower()}": (p, proto) for p in step.served for proto in step.protocols}
    out = {}
    for pod in ALL:
        ns, name = pod.split("/")
        out[pod] = Endpoint(ns, {"pod": name, **step.pod_labels.get(pod, {})}, ip_of(pod),
                            {"ns": ns, NS_NAME_LABEL: ns, **step.ns_labels.get(ns, {})}, ports)
    return out


def matrix(step: Step) -> dict[tuple[str, str], bool | None]:
    pols = [parse_policy(d, d["metadata"]["name"]) for d in step.policies]
    pods = world(step)
    return {(f, t): evaluate(pols, Conn(pods[f], pods[t], step.port, step.protocol)).allowed
            for f in ALL for t in ALL if f != t}


def show(m: Callable[[str, str], object]) -> str:
    rows = ["-\t" + "\t".join(ALL)]
    rows += [f + "\t" + "\t".join("." if f == t else ("X" if m(f, t) is False else
                                                        "?" if m(f, t) is None else ".")
                                  for t in ALL) for f in ALL]
    return "\n".join(rows)


def test_every_upstream_case_is_here():
    names = {s.case.split(" [")[0] for s in STEPS}
    assert len(names) == 48  # 42 TCP cases (their context's), 3 UDP, 3 SCTP
    assert len(STEPS) == 65  # 16 cases have 2 or 3 steps


@pytest.mark.parametrize("step", STEPS, ids=[s.case for s in STEPS])
def test_upstream_reachability(step):
    got = matrix(step)
    want = {k: v for k, v in step.expect.m.items() if k[0] != k[1]}
    if got != want:
        pytest.fail(f"expected:\n{show(lambda f, t: want[f, t])}\n"
                    f"got:\n{show(lambda f, t: got[f, t])}")


@pytest.mark.parametrize("doc", [d for s in STEPS for d in s.policies],
                         ids=lambda d: d["metadata"]["name"])
def test_upstream_policies_are_valid_networkpolicies(doc):
    validate_document(doc, "upstream")
