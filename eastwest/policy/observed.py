"""The observed traffic of a window as policy sees it: edges client -> server port/protocol with
a connection count, each end a pod (a workload with namespace and labels) or an address
outside the cluster.

In:  the aggregator's `GET /api/v1/policy/observed` document (docs/api.md), or edges built in
     tests. Out: `ObservedEdge`s, and each one's `Conn` for eastwest/policy/semantics.py.
An end with a namespace is a pod of that workload (its IP is not kept: pods come and go, so an
`ipBlock` is judged only for ends outside the cluster); an end without one is its address.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eastwest.errors import TransportError
from eastwest.policy.semantics import PROTOCOLS, Conn, Endpoint


@dataclass(frozen=True)
class End:
    id: str
    namespace: str | None = None
    name: str | None = None
    kind: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str | None = None  # ends outside the cluster only
    ports: Mapping[str, tuple[int, str]] | None = None  # named container ports, when known

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None

    def endpoint(self) -> Endpoint:
        return Endpoint(self.namespace, dict(self.labels), self.ip, None, self.ports)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "namespace": self.namespace, "name": self.name, "kind": self.kind,
                "labels": dict(self.labels), "ip": self.ip,
                "ports": None if self.ports is None else {k: list(v) for k, v in self.ports.items()}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> End:
        ports = obj.get("ports")
        return cls(str(obj["id"]), obj.get("namespace"), obj.get("name"), obj.get("kind"),
                   {str(k): str(v) for k, v in (obj.get("labels") or {}).items()}, obj.get("ip"),
                   None if ports is None else {str(k): (int(v[0]), str(v[1])) for k, v in ports.items()})


@dataclass(frozen=True)
class ObservedEdge:
    client: End
    server: End
    port: int
    protocol: str  # TCP, UDP or SCTP
    connections: int

    def conn(self) -> Conn:
        return Conn(self.client.endpoint(), self.server.endpoint(), self.port, self.protocol)

    @property
    def label(self) -> str:
        return f"{self.client.id} -> {self.server.id}:{self.port}/{self.protocol}"

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client.to_json(), "server": self.server.to_json(),
                "port": self.port, "protocol": self.protocol, "connections": self.connections}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ObservedEdge:
        proto = str(obj["protocol"]).upper()
        if proto not in PROTOCOLS:
            raise ValueError(f"protocol {proto!r}")
        return cls(End.from_json(obj["client"]), End.from_json(obj["server"]), int(obj["port"]),
                   proto, int(obj["connections"]))


def edges_of(doc: Any, where: str) -> list[ObservedEdge]:
    """The edges of an observed document; a body of another shape is the server's fault."""
    try:
        return [ObservedEdge.from_json(e) for e in doc["edges"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TransportError(f"{where} answered with edges of an unexpected shape ({exc!r})") from None
