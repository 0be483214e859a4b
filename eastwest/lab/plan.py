"""The lab's plan: which hosts, pods, addresses and services, as data, before anything is built.

In: the user's choices (name, hosts, pods per host, VXLAN port, IP family).  Out: a `LabPlan` whose
`inventory()` is the JSON the rest of eastwest reads (collectors scope themselves with its netns
names, the aggregator reads its workload map, tests read it to compare against ground truth).

Addresses are lab-only: underlay 10.213.0.N/24 on a bridge in the fabric namespace, pods
10.244.N.(10+M)/16 bridged across hosts over VXLAN (the flannel "vxlan" backend's shape, but
layer-2 with static forwarding entries so every packet takes exactly the host pair it should).

IP families (`--ip-family`): `ipv4` (the default, the addresses above), `ipv6` (pods
fd00:ee::N:(10+M)/64 and an IPv6 underlay fd00:ed::N/64 that carries the VXLAN: VTEPs are IPv6),
`dual` (pods have both addresses, the underlay stays IPv4). Unique local addresses (RFC 4193):
fd00:ee::/48 for pods, fd00:ed::/64 for the underlay; the pod address spells the IPv4 one
(10.244.1.10 <-> fd00:ee::1:10), so either names the same pod at a glance.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from eastwest.errors import ConfigError
from eastwest.lab import patterns as labpatterns

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
VNI = 42
IP_FAMILIES = ("ipv4", "ipv6", "dual")
POD_PREFIX4, POD_PREFIX6 = 16, 64  # pods of every host share one layer-2 segment
UNDERLAY_PREFIX4, UNDERLAY_PREFIX6 = 24, 64


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
UDP_DEAD_PORT = 5434  # a UDP port where nobody listens (ICMP port unreachable: refused)
SERVICE_BY_NAME = {s.name: s for s in (*SERVICES, LOADGEN)}


@dataclass(frozen=True)
class HostPlan:
    index: int
    name: str
    netns: str
    underlay_ip: str  # the VTEP address: IPv6 in an `ipv6` lab, IPv4 otherwise
    underlay_if: str = "eth0"
    underlay_prefix4: int = UNDERLAY_PREFIX4  # a /16 in a `macvlan` lab (its pods are on it)

    @property
    def underlay_prefix(self) -> int:
        return UNDERLAY_PREFIX6 if ":" in self.underlay_ip else self.underlay_prefix4


@dataclass(frozen=True)
class PodPlan:
    name: str  # <service>-<replica>
    service: str
    host: str
    slot: int  # 0 = loadgen, 1.. = application pods
    netns: str
    ip: str  # the pod's primary address: IPv4 in `ipv4` and `dual` labs, IPv6 in `ipv6` ones
    mac: str
    host_if: str | None  # the pod veth's name inside the host namespace (None: macvlan pods)
    ip6: str | None = None  # its IPv6 address (`ipv6` and `dual` labs)
    attach: str = "veth"  # veth (on the host's bridge) | macvlan | host (host-network)

    @property
    def ip4(self) -> str | None:
        return None if ":" in self.ip else self.ip

    @property
    def ips(self) -> list[str]:
        """Every address of the pod, IPv4 first."""
        return [a for a in (self.ip4, self.ip6) if a]


@dataclass
class LabPlan:
    name: str
    hosts: list[HostPlan]
    pods: list[PodPlan]
    vxlan_port: int
    vni: int = VNI
    ip_family: str = "ipv4"
    state_dir: str = ""
    services: bool = False  # Kubernetes-style Services (eastwest/lab/services.py)
    extra: dict[str, object] = field(default_factory=dict)
    patterns: tuple[str, ...] = ()  # `--pattern` (eastwest/lab/patterns.py), sorted

    @property
    def overlay(self) -> bool:
        """Whether the hosts' pods meet over the VXLAN overlay (not in a `macvlan` lab)."""
        return "macvlan" not in self.patterns

    @property
    def fabric_netns(self) -> str:
        return f"{self.name}-fab"

    @property
    def underlay_family(self) -> int:
        """4 or 6: the family of the VXLAN packets on the underlay (outer headers)."""
        return 6 if self.ip_family == "ipv6" else 4

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
            "ip_family": self.ip_family,
            "underlay_family": self.underlay_family,
            "fabric_netns": self.fabric_netns,
            "state_dir": self.state_dir,
            "hosts": [
                {"name": h.name, "netns": h.netns, "underlay_if": h.underlay_if,
                 "underlay_ip": h.underlay_ip,
                 "pod_netns": [p.netns for p in self.pods
                               if p.host == h.name and p.netns != h.netns]}
                for h in self.hosts
            ],
            "pods": [
                {"name": p.name, "netns": p.netns, "ip": p.ip, "ip4": p.ip4, "ip6": p.ip6,
                 "ips": p.ips, "mac": p.mac, "host": p.host, "host_if": p.host_if,
                 **({"attach": p.attach} if self.patterns else {}),
                 "service": p.service, "namespace": SERVICE_BY_NAME[p.service].namespace,
                 "comm": f"ew-{p.service}",
                 "ports": [SERVICE_BY_NAME[p.service].port] if p.service != "loadgen" else [],
                 "protocol": SERVICE_BY_NAME[p.service].protocol}
                for p in self.pods
            ],
            "services": {s.name: {"port": s.port, "protocol": s.protocol, "namespace": s.namespace,
                                  "kind": s.kind} for s in SERVICES},
            "dead_port": DEAD_PORT,
            "udp_dead_port": UDP_DEAD_PORT,
            "workload_map": f"{self.state_dir}/workloads.yaml" if self.state_dir else None,
            **({"cluster_services": cluster_services(self)} if self.services else {}),
            **({"patterns": list(self.patterns)} if self.patterns else {}),
            **self.extra,
        }


# Kubernetes-style Services (`lab up --services`; eastwest/lab/services.py programs them)
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_IP_BASE = 10  # frontend 10.96.0.10, api 10.96.0.11, ... in SERVICES order
SERVICE_PORT = {"frontend": 80}  # port -> targetPort differs here (80 -> 8080); else the same
NODE_PORT = {"frontend": 30080}


def check(plan: LabPlan) -> None:
    """A plan that cannot hold the Services the lab promises is refused, naming the flag."""
    if plan.ip_family != "ipv4":
        raise ConfigError("--ip-family", plan.ip_family, "--services needs ipv4 (ClusterIPs are "
                          f"IPv4, from {SERVICE_CIDR})")
    if len(plan.hosts) < 3:
        raise ConfigError("--hosts", len(plan.hosts), "--services needs at least 3 hosts (a "
                          "NodePort call crosses client host, NAT host and server host)")
    multi = [s.name for s in SERVICES if len({p.host for p in plan.pods if p.service == s.name}) > 1]
    if len(multi) < 2:
        raise ConfigError("--pods-per-host", (len(plan.pods) - 1) // len(plan.hosts),
                          "--services needs at least 2 services with backends on 2 hosts: "
                          f"hosts x pods-per-host >= {len(SERVICES) + 2}")
    if not any(s["node_port"] for s in cluster_services(plan)):
        raise ConfigError("--pods-per-host", (len(plan.pods) - 1) // len(plan.hosts),
                          "--services needs a frontend pod on neither h1 nor a middle host, "
                          "for the NodePort: add pods per host")


def cluster_services(plan: LabPlan) -> list[dict[str, Any]]:
    """The lab's Services: name, ClusterIP, port, targetPort, protocol, backends, NodePort."""
    client_host = plan.pods[0].host  # the load generator's
    out = []
    for i, s in enumerate(SERVICES):
        backends = [{"pod": p.name, "ip": p.ip, "port": s.port, "host": p.host}
                    for p in plan.pods if p.service == s.name]
        svc: dict[str, Any] = {
            "name": s.name, "namespace": s.namespace, "protocol": s.protocol,
            "cluster_ip": f"10.96.0.{CLUSTER_IP_BASE + i}", "port": SERVICE_PORT.get(s.name, s.port),
            "target_port": s.port, "backends": backends, "node_port": None,
        }
        for middle in (h for h in plan.hosts if h.name != client_host and s.name in NODE_PORT):
            far = [b for b in backends if b["host"] not in (middle.name, client_host)]
            if far:
                svc["node_port"] = {"port": NODE_PORT[s.name], "host": middle.name,
                                    "ip": middle.underlay_ip, "backends": far}
                break
        out.append(svc)
    return out




def make_plan(name: str, hosts: int, pods_per_host: int, vxlan_port: int,
              ip_family: str = "ipv4", services: bool = False,
              patterns: tuple[str, ...] = ()) -> LabPlan:
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
    if ip_family not in IP_FAMILIES:
        raise ConfigError("--ip-family", ip_family, f"must be one of {', '.join(IP_FAMILIES)}")
    patterns = labpatterns.parse(patterns)
    labpatterns.check(patterns, ip_family, services)
    prefix4 = (labpatterns.MACVLAN_UNDERLAY_PREFIX if "macvlan" in patterns else UNDERLAY_PREFIX4)
    host_plans = [HostPlan(i, f"h{i}", f"{name}-h{i}",
                           _v6(f"fd00:ed::{i}") if ip_family == "ipv6" else f"10.213.0.{i}",
                           underlay_prefix4=prefix4)
                  for i in range(1, hosts + 1)]
    pods: list[PodPlan] = [_pod(name, "loadgen", 1, host_plans[0], 0, ip_family, patterns)]
    replicas: dict[str, int] = {}
    slots: dict[str, int] = {}
    for k in range(hosts * pods_per_host):
        # Without Services: slot by slot, host by host (as ever). With them, each further round
        # of replicas shifts back one host, so a service's replicas land on different hosts
        # (with 3 hosts, 6 services repeat on the same hosts otherwise).
        n = len(SERVICES)
        h = host_plans[((k - k // n) if services else k) % hosts]
        svc = SERVICES[k % n].name
        replicas[svc] = replicas.get(svc, 0) + 1
        slots[h.name] = slots.get(h.name, 0) + 1
        pods.append(_pod(name, svc, replicas[svc], h, slots[h.name], ip_family, patterns))
    if not services:  # the order of old: slot by slot
        pods = pods[:1] + sorted(pods[1:], key=lambda p: (p.slot, int(p.host[1:])))
    if "host-network" in patterns:
        pods = _host_network(pods, host_plans)
    plan = LabPlan(name=name, hosts=host_plans, pods=pods, vxlan_port=vxlan_port,
                   ip_family=ip_family, services=services, patterns=patterns)
    if services:
        check(plan)
    return plan


def _host_network(pods: list[PodPlan], hosts: list[HostPlan]) -> list[PodPlan]:
    """The pods of the host-network services moved into their host's namespace, at the host's
    own pod-network address; one such pod per host (they would share its address and port)."""
    index = {h.name: h for h in hosts}
    out: list[PodPlan] = []
    taken: dict[str, str] = {}
    for p in pods:
        if p.service not in labpatterns.HOST_NETWORK_SERVICES:
            out.append(p)
            continue
        if p.host in taken:
            raise ConfigError("--pods-per-host", (len(pods) - 1) // len(hosts),
                              f"--pattern host-network puts {p.name} and {taken[p.host]} in "
                              f"host {p.host}'s namespace, on one address and port: choose "
                              "sizes that give each host at most one of them")
        taken[p.host] = p.name
        h = index[p.host]
        out.append(PodPlan(name=p.name, service=p.service, host=p.host, slot=p.slot,
                           netns=h.netns, ip=labpatterns.host_address(h.index),
                           mac=labpatterns.host_mac(h.index), host_if=None, attach="host"))
    return out


def _v6(text: str) -> str:
    """RFC 5952 text, as the probes, the wire decoder and Python's sockets write it."""
    return str(ipaddress.IPv6Address(text))


def _pod(lab: str, service: str, replica: int, host: HostPlan, slot: int,
         ip_family: str = "ipv4", patterns: tuple[str, ...] = ()) -> PodPlan:
    if "macvlan" in patterns:  # on the underlay subnet, no host-side veth
        return PodPlan(
            name=f"{service}-{replica}", service=service, host=host.name, slot=slot,
            netns=f"{lab}-{host.name}-p{slot}",
            ip=f"{labpatterns.MACVLAN_POD_NET}.{host.index}.{10 + slot}",
            mac=f"02:ee:00:00:{host.index:02x}:{slot:02x}", host_if=None, attach="macvlan")
    ip4 = f"10.244.{host.index}.{10 + slot}"
    ip6 = _v6(f"fd00:ee::{host.index}:{10 + slot}") if ip_family in ("ipv6", "dual") else None
    return PodPlan(
        name=f"{service}-{replica}", service=service, host=host.name,
        slot=slot, netns=f"{lab}-{host.name}-p{slot}",
        ip=ip6 if ip_family == "ipv6" and ip6 else ip4,
        mac=f"02:ee:00:00:{host.index:02x}:{slot:02x}", host_if=f"vp{slot}", ip6=ip6,
    )
