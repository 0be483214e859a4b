"""The flow record: one typed, frozen model from the probe to the store (schema version 1).

Every stage hands the next a `FlowRecord`, never a bare dict. The JSON field names are a public
contract, documented field by field in docs/flow-record.md; the compact binary form lives in
`eastwest.codec`.

Semantics fixed here (and in the doc):
- One record describes one connection (TCP) or one flow (UDP/ICMP 5-tuple) over an interval,
  as one observer saw it. `final=False` for interim records of a live connection, `True` at the
  end.
- Counters are CUMULATIVE since the connection's `start`: each record carries the totals so far,
  so the latest record of a connection supersedes earlier ones and a lost interim record loses
  nothing.
- Orientation is the connection's (who initiated), never the packet's.

Validation: values are type-checked when decoded (JSON, msgpack, dicts via `from_builtins`);
`__post_init__` checks ranges and meaning (addresses canonical and of `family`, ports, UTC times,
`end >= start`) on every construction. Errors are `RecordError`s naming the field and the value.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal

import msgspec

from eastwest.errors import RecordError

SCHEMA_VERSION = 1

# No "sockdiag": UDP sockets are seen by the eBPF socket probes (source "socket"); a value no
# collector produced was dropped from the contract (docs/flow-record.md, "source")
Source = Literal["socket", "vxlan", "wire", "pcap", "drops"]
Observer = Literal["client", "server", "path"]
Connect = Literal["ok", "refused", "timeout", "reset"]
PROTOCOLS = frozenset({"tcp", "udp", "icmp", "icmpv6", "sctp", "gre", "esp", "other"})
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
COUNT_MAX = 2**63 - 1  # counters fit a signed 64-bit column in every store
Count = Annotated[int, msgspec.Meta(ge=0, le=COUNT_MAX)]
Vni = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFF)]


@lru_cache(maxsize=65536)
def ip_family(text: str) -> int:
    """4 or 6 for a canonical IP address string; RecordError otherwise. Cached: addresses repeat."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise RecordError("ip", text, "not an IP address") from exc
    if str(addr) != text:
        raise RecordError("ip", text, f"not in canonical form, expected {str(addr)!r}")
    return addr.version


# Addresses already proven canonical, with their family: a dict lookup is the fast path of
# every record's two address checks (ip_family's lru_cache costs a call more). Bounded.
_KNOWN_IPS: dict[str, int] = {}
_KNOWN_IPS_MAX = 65536
_ZERO = timedelta(0)


def _check_ip(field: str, text: str, family: int | None = None) -> None:
    fam = _KNOWN_IPS.get(text)
    if fam is None:
        try:
            fam = ip_family(text)
        except RecordError as exc:
            raise RecordError(field, text, exc.reason) from None
        if len(_KNOWN_IPS) >= _KNOWN_IPS_MAX:
            _KNOWN_IPS.clear()
        _KNOWN_IPS[text] = fam
    if family is not None and fam != family:
        raise RecordError(field, text, f"is IPv{fam} but family is {family}")


def _check_utc(field: str, value: datetime) -> None:
    if value.tzinfo is UTC:  # the common case, no utcoffset() call
        return
    if value.tzinfo is None or value.utcoffset() != _ZERO:
        raise RecordError(field, value.isoformat(), "must be a UTC timestamp")


class Endpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ip: str
    port: Port

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise RecordError("port", self.port, "must be 0..65535")


class Rtt(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Smoothed round-trip time in microseconds, over the samples of the interval."""

    min: Count
    avg: Count
    max: Count

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.avg <= self.max:
            raise RecordError("rtt_us", (self.min, self.avg, self.max), "needs 0 <= min <= avg <= max")


class Process(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pid: Count
    comm: str
    cmdline: str | None = None


class Cgroup(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: Count
    path: str | None = None


TunnelType = Literal["vxlan", "geneve", "vxlan-gpe"]


class Tunnel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One encapsulation the flow's packets were carried in: its type, its virtual network
    (VXLAN/VXLAN-GPE VNI, Geneve VNI, all 24 bits), the two tunnel endpoints (outer addresses of
    the first packet client->server) and the outer UDP destination port."""

    type: TunnelType
    vni: Vni
    outer_src: str
    outer_dst: str
    outer_dport: Port

    def __post_init__(self) -> None:
        if not 0 <= self.vni <= 0xFFFFFF:
            raise RecordError("tunnel.vni", self.vni, "must be 0..16777215 (24 bits)")
        _check_ip("tunnel.outer_src", self.outer_src)
        _check_ip("tunnel.outer_dst", self.outer_dst)


class Drop(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Packets of the flow the kernel freed with one drop reason (`enum skb_drop_reason`, by its
    name without the SKB_DROP_REASON_ prefix: `NETFILTER_DROP`, `NO_SOCKET`, ...)."""

    reason: str
    packets: Count

    def __post_init__(self) -> None:
        if not self.reason or not self.reason.replace("_", "").isalnum() or not self.reason.isupper():
            raise RecordError("drops.reason", self.reason,
                              "must be a kernel drop reason name (upper case, e.g. NETFILTER_DROP)")


NatType = Literal["dnat", "snat", "redirect"]


class Nat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One address translation a connection went through, as a conntrack table held it
    (docs/flow-record.md, "nat"). `dnat`/`redirect`: the server's address, `original` the one
    dialled (a Service's ClusterIP and port), `translated` the one that answered (the backend;
    `redirect` when that is a loopback address: a sidecar's or a local proxy's port). `snat`:
    the client's address, `original` the client's own, `translated` the one the server saw (a
    node's, under masquerade). `netns`: the inode of the namespace whose conntrack held it."""

    type: NatType
    original: Endpoint
    translated: Endpoint
    netns: Count | None = None

    def __post_init__(self) -> None:
        _check_ip("nat.original.ip", self.original.ip)
        _check_ip("nat.translated.ip", self.translated.ip, _KNOWN_IPS[self.original.ip])


MeshHopKind = Literal["app-proxy", "proxy-proxy", "proxy-app"]


class MeshHop(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One socket-level hop of a service-mesh call (docs/flow-record.md, "mesh"), as the
    collector whose host holds it saw it: `app-proxy` the application's connection to its own
    sidecar (REDIRECTed in the client's pod), `proxy-proxy` the client's sidecar to the server's
    (what crossed the network, with the proxies' framing), `proxy-app` the server's sidecar
    handing the call to the application (from 127.0.0.6 in Istio). `client`/`server` are the
    hop socket's own ends (an inbound REDIRECT's target port for `proxy-proxy` seen by the
    server side); bytes are that socket's payload bytes each way; `process` the proxy's name
    and `pid` its process id, where this collector saw it."""

    hop: MeshHopKind
    client: Endpoint
    server: Endpoint
    bytes_c2s: Count = 0
    bytes_s2c: Count = 0
    process: str | None = None
    pid: Count | None = None

    def __post_init__(self) -> None:
        _check_ip("mesh.hops.client.ip", self.client.ip)
        _check_ip("mesh.hops.server.ip", self.server.ip)


class Mesh(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A record folded from a service-mesh call's sockets (collector/mesh.py): the record's ends
    and counters are the application's, its key is the proxy-to-proxy hop's (what every observer,
    the wire included, shares), and `hops` are the sockets it was folded from on this
    collector's host (docs/flow-record.md, "mesh"). `proxy`: the sidecar's process name."""

    proxy: str
    hops: list[MeshHop] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.proxy:
            raise RecordError("mesh.proxy", self.proxy, "must not be empty")


class Workload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    namespace: str | None = None
    kind: str | None = None
    host: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class DnsLatency(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Microseconds from a query to its answer, over the answered queries of the flow."""

    min: Count
    avg: Count
    max: Count

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.avg <= self.max:
            raise RecordError("dns.latency_us", (self.min, self.avg, self.max),
                              "needs 0 <= min <= avg <= max")


class DnsName(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One name the client asked, of one query type: how often, and the response codes got."""

    name: str
    type: str
    count: Count
    rcodes: dict[str, Count] = msgspec.field(default_factory=dict)
    timeouts: Count = 0


class DnsAnswer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a name resolved to for this client: an address (A/AAAA) or a CNAME target."""

    name: str  # the name the client asked
    type: str  # A, AAAA or CNAME
    value: str  # the address (canonical) or the CNAME target
    ttl: Count
    at: datetime  # when the answer arrived (the TTL runs from here)

    def __post_init__(self) -> None:
        if self.type in ("A", "AAAA"):
            _check_ip("dns.answers.value", self.value, 4 if self.type == "A" else 6)
        elif self.type != "CNAME":
            raise RecordError("dns.answers.type", self.type, "must be A, AAAA or CNAME")
        _check_utc("dns.answers.at", self.at)


class DnsSummary(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The DNS a flow to a resolver carried (docs/flow-record.md, "dns"). Cumulative since the
    flow's start, like every counter of a record."""

    queries: Count
    responses: Count
    timeouts: Count = 0  # queries that got no answer within the collector's DNS timeout
    rcodes: dict[str, Count] = msgspec.field(default_factory=dict)
    latency_us: DnsLatency | None = None
    names: list[DnsName] = msgspec.field(default_factory=list)  # the top N by count
    other_names: Count = 0  # queries for names beyond the top N
    answers: list[DnsAnswer] = msgspec.field(default_factory=list)  # of the top names, bounded

    def __post_init__(self) -> None:
        if self.timeouts > self.queries:
            raise RecordError("dns.timeouts", self.timeouts, "more than the queries")


# gc=False: collectors build tens of thousands of records per second and the cyclic garbage
# collector need not scan them: a record cannot be part of a reference cycle (its containers
# hold strings only). Nothing else changes (fields, validation, encoding, equality).
class FlowRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True, gc=False):
    schema: int = SCHEMA_VERSION
    record_id: str
    collector: str
    source: Source
    start: datetime
    end: datetime
    final: bool
    protocol: str
    family: Literal[4, 6]
    client: Endpoint
    server: Endpoint
    observer: Observer
    bytes_c2s: Count = 0
    bytes_s2c: Count = 0
    packets_c2s: Count | None = None
    packets_s2c: Count | None = None
    l3_bytes_c2s: Count | None = None
    l3_bytes_s2c: Count | None = None
    connect: Connect | None = None
    retransmits: Count = 0
    resets: Count = 0
    rtt_us: Rtt | None = None
    process: Process | None = None
    netns: Count | None = None
    cgroup: Cgroup | None = None
    container: str | None = None
    tunnel: Tunnel | None = None  # the innermost tunnel: the flow's own overlay
    # nested encapsulation (VXLAN in VXLAN, Geneve in VXLAN): the tunnels around `tunnel`,
    # outermost first; the whole chain is tunnel_outer + [tunnel]. None: not nested.
    tunnel_outer: list[Tunnel] | None = None
    client_workload: Workload | None = None
    server_workload: Workload | None = None
    # beyond the minimum; documented in docs/flow-record.md
    tcp_flags: list[str] | None = None
    loopback: bool = False
    incomplete: list[str] = msgspec.field(default_factory=list)
    dns: DnsSummary | None = None  # a flow to or from port 53 that carried DNS
    # packets of this flow the kernel dropped, by reason (source `drops`); None: not measured
    drops: list[Drop] | None = None
    # the address translations between the client and the server (conntrack: a Service's DNAT,
    # a node's masquerade, a sidecar's REDIRECT), in the order they were applied from the
    # client towards the server; `client`/`server` are then the real ends (the original client,
    # the backend). None: none known (docs/flow-record.md, "nat")
    nat: list[Nat] | None = None
    # a service-mesh call folded from its sidecars' sockets (collector/mesh.py): the record is
    # the application's view, keyed by the proxy-to-proxy hop; None: not a folded mesh call
    # (docs/flow-record.md, "mesh")
    mesh: Mesh | None = None

    def __post_init__(self) -> None:
        if self.schema != SCHEMA_VERSION:
            raise RecordError("schema", self.schema, f"unsupported, this build reads {SCHEMA_VERSION}")
        if not self.collector:
            raise RecordError("collector", self.collector, "must not be empty")
        if not self.record_id.startswith(self.collector + ":"):
            raise RecordError("record_id", self.record_id, f"must be '{self.collector}:<seq>'")
        if self.protocol not in PROTOCOLS:
            raise RecordError("protocol", self.protocol, f"must be one of {sorted(PROTOCOLS)}")
        # every check below runs on every construction; the branches are ordered so that a
        # valid record takes the cheapest path (identity checks and dict lookups, no calls)
        start, end = self.start, self.end
        if start.tzinfo is not UTC:
            _check_utc("start", start)
        if end.tzinfo is not UTC:
            _check_utc("end", end)
        if end < start:
            raise RecordError("end", end.isoformat(), f"is before start {start.isoformat()}")
        family = self.family
        if _KNOWN_IPS.get(self.client.ip) != family:
            _check_ip("client.ip", self.client.ip, family)
        if _KNOWN_IPS.get(self.server.ip) != family:
            _check_ip("server.ip", self.server.ip, family)
        if self.bytes_c2s < 0 or self.bytes_s2c < 0 or self.retransmits < 0 or self.resets < 0:
            for name in ("bytes_c2s", "bytes_s2c", "retransmits", "resets"):
                if getattr(self, name) < 0:
                    raise RecordError(name, getattr(self, name), "must be >= 0")
        if self.source == "drops" or self.drops is not None:
            _check_drops(self.source, self.drops)
        if self.tcp_flags is not None:
            for flag in self.tcp_flags:
                if flag not in TCP_FLAG_NAMES:
                    raise RecordError("tcp_flags", flag, f"must be one of {list(TCP_FLAG_NAMES)}")

    # -- conveniences ---------------------------------------------------------------------
    @property
    def key(self) -> tuple[str, str, int, str, int]:
        """The connection's identity as observers agree on it: protocol, client, server."""
        return (self.protocol, self.client.ip, self.client.port, self.server.ip, self.server.port)

    @property
    def dialled(self) -> Endpoint | None:
        """The server address the client dialled when a DNAT (or REDIRECT) took it elsewhere:
        the first one's `original` (a Service's ClusterIP and port); None without one."""
        return dialled_of(self.nat)

    def replace(self, **changes: Any) -> FlowRecord:
        return msgspec.structs.replace(self, **changes)

    def to_builtins(self) -> dict[str, Any]:
        """The JSON form as Python builtins (times as RFC 3339 strings)."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_builtins(cls, data: Any) -> FlowRecord:
        """Build and validate a record from JSON-like builtins; RecordError names the field."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise record_error_from(exc, data) from None


def dialled_of(nat: list[Nat] | None) -> Endpoint | None:
    """`FlowRecord.dialled` of a `nat` chain: the first DNAT's (or REDIRECT's) `original`."""
    for n in nat or ():
        if n.type != "snat":
            return n.original
    return None


def _check_drops(source: str, drops: list[Drop] | None) -> None:
    """A record of source `drops` carries its drops, one entry per reason; no other does."""
    if source != "drops":
        raise RecordError("drops", "...", f"only records of source 'drops' carry drops, not {source!r}")
    if not drops:
        raise RecordError("drops", drops, "a record of source 'drops' needs at least one reason")
    if len({d.reason for d in drops}) != len(drops):
        raise RecordError("drops", [d.reason for d in drops], "names a reason twice")


def flags_from_bits(bits: int) -> list[str]:
    """TCP flag names, in header bit order, for the flag byte of a TCP header (RFC 9293)."""
    return [name for i, name in enumerate(TCP_FLAG_NAMES) if bits & (1 << i)]


def record_error_from(exc: msgspec.ValidationError, data: Any = None) -> RecordError:
    """Translate msgspec's message ("Expected `int`, got `str` - at `$.client.port`") into a
    RecordError naming the field and, when the input is at hand, the value."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, RecordError):
        return cause
    message, _, path = text.partition(" - at `$")
    path = path.rstrip("`").lstrip(".")
    named = _field_named_in(message)
    if named and message.startswith("Object contains unknown field"):
        # msgspec's path is the object holding it: name the field itself, with its value
        field = f"{path}.{named}" if path else named
        return RecordError(field.replace("[", ".").replace("]", ""), _value_at(data, field),
                           message)
    if not path:
        # a missing field: msgspec names it in the message
        return RecordError(named or "record", None, message)
    value = _value_at(data, path)
    return RecordError(path.replace("[", ".").replace("]", ""), value, message)


def _field_named_in(message: str) -> str | None:
    if "`" in message:
        parts = message.split("`")
        return parts[1] if len(parts) > 1 else None
    return None


def _value_at(data: Any, path: str) -> Any:
    cur = data
    for part in path.replace("]", "").replace("[", ".").split("."):
        if not part:
            continue
        try:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return cur
