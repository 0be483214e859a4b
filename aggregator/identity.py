"""Workload identity: an address (and what its observer knew) -> the workload it belongs to.

Stage: inside correlation, once per side of a new connection (aggregator/correlate.py).
In:  ip, port, and the side's collector-reported facts (workload, process, container, host).
Out: an `Identity` (name, namespace, kind, host, labels, and which layer resolved it).

Layers, most specific first (docs/aggregator.md; why the process layer sits after Kubernetes:
docs/architecture.md):
1. static map (YAML `workloads: [{match: CIDR | ip:port, name, namespace, kind, host, labels,
   ports}]` (`ports`: the containers' named ports, for NetworkPolicy named ports),
   the lab writes one): `ip:port` beats a CIDR, a longer prefix beats a shorter one;
2. the workload the collector reported with the record (`client_workload`/`server_workload`);
3. Kubernetes (a pluggable `IdentitySource`, aggregator/k8s/): pods by IP, services by VIP,
   nodes; asked for the owner of the address AT THE CONNECTION'S START (pod IPs are reused);
4. the collector-reported process/container: `process:<comm>` / `container:<id12>` on its host;
5. DNS: the answers the client got (applied when reading, not here: aggregator/dns_names.py,
   docs/aggregator.md "Identity from DNS answers"), else optional reverse DNS (PTR, RFC 1035
   section 3.5), cached, also negative answers;
6. a node's pod network (`PodNetworkSource`: Kubernetes, the node whose pod CIDR holds an
   address no pod held then: the node's own address there, what it masquerades NodePort calls
   with; source `cidr`), a configured CIDR group (`--cidr-group NAME=CIDR`), else
   `external:<ip>`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import yaml

from aggregator.connection import Identity
from eastwest.errors import ConfigError
from eastwest.record import Workload

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


# the layers, most specific first (an Identity's `source`); an end is named by the best layer
# that any observer of its connection knows (aggregator/correlate.py)
LAYERS = ("static", "collector", "kubernetes", "process", "dns", "cidr", "external")
_RANK = {name: i for i, name in enumerate(LAYERS)}


def better(a: Identity, b: Identity) -> bool:
    """Whether `a` names an end better than `b`: a more specific layer; within one layer (two
    observers that report different workloads) the smaller (wid, host), so that the answer
    never depends on which observer reported first."""
    ra, rb = _RANK.get(a.source, len(LAYERS)), _RANK.get(b.source, len(LAYERS))
    if ra != rb:
        return ra < rb
    return (a.wid, a.host or "") < (b.wid, b.host or "")


class IdentitySource(Protocol):
    """A pluggable resolver layer (Kubernetes, a CMDB, ...): what owned `ip` (`port`) at time
    `at` (the connection's start: addresses are reused); None when it does not know."""

    def lookup(self, ip: str, port: int, at: datetime) -> Identity | None: ...


@runtime_checkable
class PodNetworkSource(Protocol):
    """What names a node's own addresses on the pod network (aggregator/k8s/index.py
    `pod_network_node`): the node whose pod CIDR holds `ip`, when no pod held it at `at`."""

    def pod_network_node(self, ip: str, at: datetime) -> Identity | None: ...


class Facts(NamedTuple):
    """What the observer of one side reported about it (all optional). A named tuple: two are
    built per new connection on the ingest path, a frozen dataclass cost several times more."""

    workload: Workload | None = None
    comm: str | None = None
    container: str | None = None
    collector: str | None = None


class StaticMap:
    """The static workload map: CIDR or ip[:port] -> identity; most specific match wins."""

    def __init__(self, entries: Iterable[Mapping[str, Any]], origin: str = "<map>",
                 services: Iterable[Mapping[str, Any]] = ()) -> None:
        # the `services` section: a dialled (ip, port) or ip -> (namespace, name)
        self.services: dict[tuple[str, int | None], tuple[str | None, str]] = {}
        for i, e in enumerate(services):
            where = f"{origin}: services[{i}]"
            if not isinstance(e, Mapping) or not e.get("match") or not e.get("name"):
                raise ConfigError(where, e, "needs `match` (a ClusterIP or ip:port) and `name`")
            text = str(e["match"]).strip()
            ip_port = _split_ip_port(text)
            if ip_port is None:
                try:
                    ip_port = (str(ipaddress.ip_address(text)), None)  # type: ignore[assignment]
                except ValueError:
                    raise ConfigError(f"{where}.match", text, "not an IP or ip:port") from None
            assert ip_port is not None
            self.services[ip_port] = (_opt(e.get("namespace")), str(e["name"]))
        self.by_ip_port: dict[tuple[str, int], Identity] = {}
        self.nets: list[tuple[Net, Identity]] = []
        # workload id -> its containers' named ports, name -> (port, protocol): what a
        # NetworkPolicy's named port resolves to (eastwest/policy/semantics.py)
        self.named_ports: dict[str, dict[str, tuple[int, str]]] = {}
        for i, e in enumerate(entries):
            where = f"{origin}: workloads[{i}]"
            if not isinstance(e, Mapping) or not e.get("match") or not e.get("name"):
                raise ConfigError(where, e, "needs `match` (CIDR or ip:port) and `name`")
            labels = e.get("labels") or {}
            if not isinstance(labels, Mapping):
                raise ConfigError(f"{where}.labels", labels, "must be a mapping")
            ident = Identity(name=str(e["name"]), namespace=_opt(e.get("namespace")),
                             kind=_opt(e.get("kind")), host=_opt(e.get("host")),
                             labels={str(k): str(v) for k, v in labels.items()}, source="static")
            if e.get("ports") is not None:
                self.named_ports.setdefault(ident.wid, {}).update(
                    _named_ports(e["ports"], f"{where}.ports"))
            match = str(e["match"]).strip()
            ip_port = _split_ip_port(match)
            if ip_port is not None:
                self.by_ip_port[ip_port] = ident
                continue
            try:
                self.nets.append((ipaddress.ip_network(match, strict=False), ident))
            except ValueError:
                raise ConfigError(f"{where}.match", match, "not a CIDR, an IP or ip:port") from None
        self.nets.sort(key=lambda x: -x[0].prefixlen)  # longest prefix first
        # longest-prefix match as one dict probe per distinct prefix length (not a scan)
        self._by_len: dict[tuple[int, int], dict[int, Identity]] = {}
        for net, ident in reversed(self.nets):  # the first entry of a network wins
            table = self._by_len.setdefault((net.version, net.prefixlen), {})
            table[int(net.network_address) >> (net.max_prefixlen - net.prefixlen)] = ident
        self._lengths = sorted(self._by_len, key=lambda x: -x[1])
        self._cache: dict[str, Identity | None] = {}

    @classmethod
    def load(cls, path: str | Path) -> StaticMap:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("--workload-map", str(path), f"cannot be read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError("--workload-map", str(path), f"not YAML: {exc}") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("workloads"), list):
            raise ConfigError("--workload-map", str(path), "expected a mapping with a `workloads` list")
        services = data.get("services") or []
        if not isinstance(services, list):
            raise ConfigError("--workload-map", str(path), "`services` must be a list")
        return cls(data["workloads"], str(path), services)

    def service_at(self, ip: str, port: int) -> tuple[str | None, str] | None:
        """The Service (namespace, name) whose address a client dialled: `ip:port` beats `ip`."""
        return self.services.get((ip, port)) or self.services.get((ip, None))

    def workload_labels(self) -> dict[str, dict[str, str]]:
        """Per workload id, the labels every entry of it carries (a label that tells one pod
        from another, such as the lab's `pod`, is no label of the workload)."""
        out: dict[str, dict[str, str]] = {}
        for ident in [*self.by_ip_port.values(), *(i for _, i in self.nets)]:
            have = out.get(ident.wid)
            out[ident.wid] = dict(ident.labels) if have is None else {
                k: v for k, v in have.items() if ident.labels.get(k) == v}
        return out

    def lookup(self, ip: str, port: int) -> Identity | None:
        hit = self.by_ip_port.get((ip, port))
        if hit is not None:
            return hit
        if ip in self._cache:
            return self._cache[ip]
        addr = ipaddress.ip_address(ip)
        value, bits = int(addr), addr.max_prefixlen
        found = None
        for version, plen in self._lengths:
            if version == addr.version:
                found = self._by_len[(version, plen)].get(value >> (bits - plen))
                if found is not None:
                    break
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[ip] = found
        return found


def _named_ports(items: Any, where: str) -> dict[str, tuple[int, str]]:
    """`[{name: http, containerPort: 8080, protocol: TCP}]` (a container's `ports`, `port` also
    taken) as name -> (port, protocol)."""
    if not isinstance(items, list):
        raise ConfigError(where, items, "must be a list of {name, containerPort, protocol}")
    out = {}
    for j, p in enumerate(items):
        w = f"{where}[{j}]"
        if not isinstance(p, Mapping) or not p.get("name"):
            raise ConfigError(w, p, "needs `name` and `containerPort`")
        port = p.get("containerPort", p.get("port"))
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"{w}.containerPort", port, "must be a port number 1..65535")
        proto = str(p.get("protocol") or "TCP").upper()
        if proto not in ("TCP", "UDP", "SCTP"):
            raise ConfigError(f"{w}.protocol", p.get("protocol"), "must be TCP, UDP or SCTP")
        out[str(p["name"])] = (port, proto)
    return out


def _opt(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _split_ip_port(text: str) -> tuple[str, int] | None:
    """`10.0.0.5:80` or `[fd00::5]:80` -> (ip, port); None for a CIDR or a bare IP."""
    if "/" in text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None  # a bare IPv6 address has colons too


def parse_cidr_groups(items: Iterable[str]) -> list[tuple[Net, str]]:
    """`NAME=CIDR` strings (the `--cidr-group` flag) -> [(network, name)], longest prefix first."""
    out = []
    for item in items:
        name, eq, cidr = item.partition("=")
        if not eq or not name.strip():
            raise ConfigError("--cidr-group", item, "expected NAME=CIDR, e.g. corp=10.0.0.0/8")
        try:
            out.append((ipaddress.ip_network(cidr.strip(), strict=False), name.strip()))
        except ValueError:
            raise ConfigError("--cidr-group", item, f"{cidr!r} is not a CIDR") from None
    return sorted(out, key=lambda x: -x[0].prefixlen)


def system_reverse_dns(ip: str) -> str | None:
    try:
        return socket.gethostbyaddr(ip)[0]
    except (OSError, UnicodeError):
        return None


class IdentityResolver:
    """The layered resolver. Cheap per call: static lookups are dict/prefix scans, the other
    layers are cached by address."""

    def __init__(self, static: StaticMap | None = None, sources: Iterable[IdentitySource] = (),
                 cidr_groups: Iterable[tuple[Net, str]] = (),
                 reverse_dns: Callable[[str], str | None] | None = None,
                 pod_networks: Iterable[PodNetworkSource] = ()) -> None:
        self.static = static
        self.sources = list(sources)
        self.pod_networks = list(pod_networks)
        self.cidr_groups = list(cidr_groups)
        self.reverse_dns = reverse_dns
        self._dns_cache: dict[str, str | None] = {}
        self._proc_cache: dict[tuple[str | None, str | None, str | None], Identity] = {}

    def resolve(self, ip: str, port: int, facts: Facts | None = None,
                at: datetime | None = None) -> Identity:
        """`at`: when the connection started (the pluggable sources answer for that time);
        None: now."""
        facts = facts or Facts()
        if self.static is not None:
            hit = self.static.lookup(ip, port)
            if hit is not None:
                return hit
        if facts.workload is not None and facts.workload.name:
            w = facts.workload
            return Identity(name=w.name, namespace=w.namespace, kind=w.kind,
                            host=w.host or facts.collector, labels=dict(w.labels), source="collector")
        if self.sources:
            when = at or datetime.now(UTC)
            for src in self.sources:
                hit = src.lookup(ip, port, when)
                if hit is not None:
                    return hit
        if facts.container or facts.comm:  # the same few per host: built once, shared (frozen)
            pkey = (facts.container[:12] if facts.container else None, facts.comm, facts.collector)
            hit = self._proc_cache.get(pkey)
            if hit is None:
                if len(self._proc_cache) > 100_000:
                    self._proc_cache.clear()
                hit = self._proc_cache[pkey] = (
                    Identity(name=f"container:{pkey[0]}", kind="Container", host=facts.collector,
                             source="process") if facts.container else
                    Identity(name=f"process:{facts.comm}", kind="Process", host=facts.collector,
                             source="process"))
            return hit
        if self.reverse_dns is not None:
            if ip not in self._dns_cache:
                self._dns_cache[ip] = self.reverse_dns(ip)
            name = self._dns_cache[ip]
            if name:
                return Identity(name=name, kind="DNS", source="dns")
        for pn in self.pod_networks:
            hit = pn.pod_network_node(ip, at or datetime.now(UTC))
            if hit is not None:
                return hit
        if self.cidr_groups:
            addr = ipaddress.ip_address(ip)
            for net, name in self.cidr_groups:
                if addr.version == net.version and addr in net:
                    return Identity(name=name, kind="CIDR", source="cidr")
        return Identity(name=f"external:{ip}", kind="External", source="external")

    def host_of(self, ip: str) -> str | None:
        """A VTEP's host name (underlay addresses are in the static map as nodes)."""
        if self.static is not None:
            hit = self.static.lookup(ip, 0)
            if hit is not None:
                return hit.host or hit.name
        return None
