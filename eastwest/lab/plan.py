"""The lab's plan: which hosts, pods, addresses and services, as data, before anything is built.

In: the user's choices (name, hosts, pods per host, VXLAN port).  Out: a `LabPlan` whose
`inventory()` is the JSON the rest of eastwest reads (collectors scope themselves with its netns
names, the aggregator reads its workload map, tests read it to compare against ground truth).

Addresses are lab-only: underlay 10.213.0.N/24 on a bridge in the fabric namespace, pods
10.244.N.(10+M)/16 bridged across hosts over VXLAN (the flannel "vxlan" backend's shape, but
layer-2 with static forwarding entries so every packet takes exactly the host pair it should).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from eastwest.errors import ConfigError

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
VNI = 42


@dataclass(frozen=True)
class Service:
    name: str
    port: int
    protocol: str  # tcp | udp
    namespace: str
    kind: str = "Deployment"


# The demo application, in placement order: consecutive services land on different hosts so
# most calls cross the overlay. loadgen is not here: it gets its own pod (index 0) on host 1.
SERVICES = (
    Service("frontend", 8080, "tcp", "shop"),
    Service("api", 9090, "tcp", "shop"),
    Service("db", 5432, "tcp", "shop", "StatefulSet"),
    Service("cache", 6379, "tcp", "shop"),
    Service("auth", 7000, "tcp", "shop"),
    Service("resolver", 53, "udp", "platform", "DaemonSet"),
)
LOADGEN = Service("loadgen", 0, "tcp", "load", "Job")
DEAD_PORT = 5433  # db's "replica" port: nothing listens, so connects are refused (ground truth)
SERVICE_BY_NAME = {s.name: s for s in (*SERVICES, LOADGEN)}


@dataclass(frozen=True)
class HostPlan:
    index: int
    name: str
    netns: str
    underlay_ip: str
    underlay_if: str = "eth0"


@dataclass(frozen=True)
class PodPlan:
    name: str  # <service>-<replica>
    service: str
    host: str
    slot: int  # 0 = loadgen, 1.. = application pods
    netns: str
    ip: str
    mac: str
    host_if: str  # the pod veth's name inside the host namespace


@dataclass
class LabPlan:
    name: str
    hosts: list[HostPlan]
    pods: list[PodPlan]
    vxlan_port: int
    vni: int = VNI
    state_dir: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def fabric_netns(self) -> str:
        return f"{self.name}-fab"

    def pod(self, name: str) -> PodPlan:
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def inventory(self) -> dict[str, object]:
        return {
            "name": self.name,
            "vni": self.vni,
            "vxlan_port": self.vxlan_port,
            "fabric_netns": self.fabric_netns,
            "state_dir": self.state_dir,
            "hosts": [
                {"name": h.name, "netns": h.netns, "underlay_if": h.underlay_if,
                 "underlay_ip": h.underlay_ip,
                 "pod_netns": [p.netns for p in self.pods if p.host == h.name]}
                for h in self.hosts
            ],
            "pods": [
                {"name": p.name, "netns": p.netns, "ip": p.ip, "mac": p.mac, "host": p.host,
                 "service": p.service, "namespace": SERVICE_BY_NAME[p.service].namespace,
                 "comm": f"ew-{p.service}",
                 "ports": [SERVICE_BY_NAME[p.service].port] if p.service != "loadgen" else [],
                 "protocol": SERVICE_BY_NAME[p.service].protocol}
                for p in self.pods
            ],
            "services": {s.name: {"port": s.port, "protocol": s.protocol, "namespace": s.namespace,
                                  "kind": s.kind} for s in SERVICES},
            "dead_port": DEAD_PORT,
            "workload_map": f"{self.state_dir}/workloads.yaml" if self.state_dir else None,
            **self.extra,
        }


def make_plan(name: str, hosts: int, pods_per_host: int, vxlan_port: int) -> LabPlan:
    if not NAME_RE.match(name):
        raise ConfigError("--name", name, "must be 1-10 lowercase letters/digits, starting with a letter")
    if not 2 <= hosts <= 20:
        raise ConfigError("--hosts", hosts, "must be 2..20 (VXLAN needs two hosts to mean anything)")
    if not 1 <= pods_per_host <= 50:
        raise ConfigError("--pods-per-host", pods_per_host, "must be 1..50")
    if hosts * pods_per_host < len(SERVICES):
        raise ConfigError("--pods-per-host", pods_per_host,
                          f"hosts x pods-per-host must be at least {len(SERVICES)} "
                          f"(one pod per demo service: {', '.join(s.name for s in SERVICES)})")
    if not 1 <= vxlan_port <= 65535:
        raise ConfigError("--vxlan-port", vxlan_port, "must be a UDP port (4789 IANA, 8472 Linux/flannel)")
    host_plans = [HostPlan(i, f"h{i}", f"{name}-h{i}", f"10.213.0.{i}") for i in range(1, hosts + 1)]
    pods: list[PodPlan] = [_pod(name, "loadgen", 1, host_plans[0], 0)]
    replicas: dict[str, int] = {}
    k = 0
    for slot in range(1, pods_per_host + 1):
        for h in host_plans:
            svc = SERVICES[k % len(SERVICES)].name
            replicas[svc] = replicas.get(svc, 0) + 1
            pods.append(_pod(name, svc, replicas[svc], h, slot))
            k += 1
    return LabPlan(name=name, hosts=host_plans, pods=pods, vxlan_port=vxlan_port)


def _pod(lab: str, service: str, replica: int, host: HostPlan, slot: int) -> PodPlan:
    return PodPlan(
        name=f"{service}-{replica}", service=service, host=host.name,
        slot=slot, netns=f"{lab}-{host.name}-p{slot}", ip=f"10.244.{host.index}.{10 + slot}",
        mac=f"02:ee:00:00:{host.index:02x}:{slot:02x}", host_if=f"vp{slot}",
    )
