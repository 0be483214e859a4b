"""What-if: the observed edges of a window against a policy set.

In:  `Policy` objects (eastwest/policy/load.py) and `ObservedEdge`s (eastwest/policy/observed.py).
Out: one `Finding` per edge the set would not allow: denied (by the server's ingress, the
client's egress, or both, with the policies that select that side) or unknown (a named port
whose container port names are not known), largest connection count first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from eastwest.policy.observed import ObservedEdge
from eastwest.policy.semantics import Policy, Verdict, evaluate


@dataclass(frozen=True)
class Finding:
    edge: ObservedEdge
    verdict: Verdict

    @property
    def denied(self) -> bool:
        return self.verdict.allowed is False

    @property
    def side(self) -> str:
        """`ingress`, `egress`, `both`, or `unknown` (cannot be evaluated)."""
        return self.verdict.denied_by or "unknown"

    @property
    def policies(self) -> tuple[str, ...]:
        v = self.verdict
        if self.side == "ingress":
            return v.ingress.policies
        if self.side == "egress":
            return v.egress.policies
        return tuple(dict.fromkeys((*v.ingress.policies, *v.egress.policies)))

    @property
    def reason(self) -> str:
        if self.denied:
            return {"ingress": "the server's ingress", "egress": "the client's egress",
                    "both": "the server's ingress and the client's egress"}[self.side]
        return "a named port and the server's container port names are unknown"

    def to_json(self) -> dict[str, Any]:
        e = self.edge
        return {"client": e.client.id, "server": e.server.id, "port": e.port, "protocol": e.protocol,
                "connections": e.connections, "verdict": "denied" if self.denied else "unknown",
                "denied_by": self.verdict.denied_by,
                "ingress_policies": list(self.verdict.ingress.policies),
                "egress_policies": list(self.verdict.egress.policies)}


def check(policies: Sequence[Policy], edges: Iterable[ObservedEdge]) -> list[Finding]:
    out = []
    for e in edges:
        v = evaluate(policies, e.conn())
        if v.allowed is not True:
            out.append(Finding(e, v))
    out.sort(key=lambda f: (not f.denied, -f.edge.connections, f.edge.label))
    return out
