"""The one filter language of eastwest: parsed once, compiled for the store and for memory.

In: (dimension, value, negated) triples, from CLI flags (`--port 80 --not --to-workload db`) or
API query parameters (`port=80&not_to_workload=db`).  Out: a `Filter` that
- `matches(view)` a flow in memory (a `FlowRecord`, via `view_of_record`, or any mapping with
  the view keys below): the CLI's `--input-file`, the SSE stream;
- is compiled by each store in its own SQL dialect (aggregator/store/sql.py): no SQL here.

Semantics (as `hubble observe`): values of the same flag are OR-ed; different flags are AND-ed;
`--not` negates the one flag after it, so `--port 80 --port 443 --not --protocol udp` means
(port 80 or 443) and not udp. A bad value raises ConfigError naming the flag and the value, when
the filter is built, never while matching.

View keys: client_ip, server_ip, client_port, server_port, protocol, outcome, observers (set),
vni, client_workload, server_workload, client_namespace, server_namespace, service_ip (the
address the client dialled before NAT, None when none: a record's `dialled`, a connection's
`service_ip`).

Link-local and multicast traffic is hidden unless the filter asks for it (`Filter.link_local`,
the `--link-local` flag, the API's `link_local=true`): a flow with either address in
`LINK_LOCAL_NETS` (IPv6 link-local and multicast, IPv4 multicast and the limited broadcast, the
unspecified addresses). That is neighbour discovery, MLD, router solicitations, mDNS, DHCP and
the like: the links' own chatter, not service-to-service traffic. It is stored like any other
flow; only the default views leave it out (docs/cli.md, "Link-local and multicast").
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from eastwest.errors import ConfigError
from eastwest.record import PROTOCOLS, FlowRecord

OUTCOMES = ("ok", "refused", "reset", "timeout", "dropped")
OBSERVERS = ("client", "server", "path", "drops")


def outcome_of(connect: str | None, resets: int, dropped: bool = False) -> str:
    """One word for how a connection went: refused/timeout (never established), dropped (never
    established and the kernel dropped its packets: `dropped` is what `dropped_outcome` says),
    reset (RST seen on an established connection, or a reset connect), else ok."""
    if connect == "refused":
        return connect
    if dropped:
        return "dropped"
    if connect == "timeout":
        return connect
    if resets > 0 or connect == "reset":
        return "reset"
    return "ok"


def dropped_outcome(connect: str | None, has_drops: bool, drops_only: bool) -> bool:
    """Whether a connection's outcome is `dropped`: the kernel dropped some of its packets, and
    its connect timed out or nothing but a drop source saw it (a SYN dropped by policy). Drops
    on an established connection (old duplicates, a closed socket's stragglers) leave it ok."""
    return has_drops and (connect == "timeout" or drops_only)


# -- values -----------------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_hex(ip: str) -> str:
    """A fixed-width, sortable text form of an address (IPv4 mapped into IPv6), so that CIDR
    filters compile to a plain string range in any SQL engine."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        a = ipaddress.IPv6Address(f"::ffff:{a}")
    return f"{int(a):032x}"


def net_range(net: Network) -> tuple[str, str]:
    """The `ip_hex` texts of a network's first and last address: a CIDR is a string range."""
    if net.version == 4:
        lo = ipaddress.IPv6Address(f"::ffff:{net.network_address}")
        hi = ipaddress.IPv6Address(f"::ffff:{net.broadcast_address}")
        return f"{int(lo):032x}", f"{int(hi):032x}"
    return f"{int(net.network_address):032x}", f"{int(net.broadcast_address):032x}"


def _parse_net(flag: str, v: str) -> Network:
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ConfigError(flag, v, "not an IP address or CIDR (e.g. 10.0.0.5 or 10.244.0.0/16)") from None


@dataclass(frozen=True, order=True)
class ServiceRef:
    """A Service by name (`--to-service web/api`, `namespace/name`; `name` alone for a Service
    without a namespace): the aggregator turns it into the Service's addresses before a filter
    is compiled or matched (aggregator/service_view.py `resolve_filter`)."""

    namespace: str | None
    name: str

    def __str__(self) -> str:
        return self.name if self.namespace is None else f"{self.namespace}/{self.name}"


_SERVICE_NAME = re.compile(r"^(?:([A-Za-z0-9][A-Za-z0-9._-]*)/)?([A-Za-z0-9][A-Za-z0-9._-]*)$")


def _parse_service(flag: str, v: str) -> Network | ServiceRef:
    """A ClusterIP or CIDR, or a Service name: `namespace/name` (or `name`)."""
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        pass
    m = _SERVICE_NAME.match(v)
    if m is None or ":" in v or re.fullmatch(r"[0-9./]+", v):
        raise ConfigError(flag, v, "not an IP address, CIDR or Service name (e.g. 10.96.0.10, "
                          "10.96.0.0/16 or demo/web, as namespace/name)")
    return ServiceRef(m.group(1), m.group(2))


def _parse_port(flag: str, v: str) -> int:
    if not v.isdigit() or not 0 <= int(v) <= 65535:
        raise ConfigError(flag, v, "not a port (0..65535)")
    return int(v)


def _parse_choice(choices: Iterable[str]) -> Callable[[str, str], str]:
    allowed = tuple(choices)

    def parse(flag: str, v: str) -> str:
        if v.lower() not in allowed:
            raise ConfigError(flag, v, f"must be one of {', '.join(allowed)}")
        return v.lower()

    return parse


def _parse_vni(flag: str, v: str) -> int:
    if not v.isdigit() or int(v) > 0xFFFFFF:
        raise ConfigError(flag, v, "not a VNI (0..16777215)")
    return int(v)


def _parse_text(flag: str, v: str) -> str:
    if not v:
        raise ConfigError(flag, v, "must not be empty")
    return v


# -- link-local and multicast ------------------------------------------------------------------
# RFC 4291 section 2.4 (fe80::/10 link-local unicast, ff00::/8 multicast, :: unspecified);
# RFC 5771 (224.0.0.0/4 IPv4 multicast); RFC 919 / RFC 1122 3.2.1.3 (255.255.255.255 limited
# broadcast, 0.0.0.0 "this host", the source of DHCP discovery). A subnet's directed broadcast
# (10.244.1.255) needs the prefix length, which a flow does not carry: it is not in the list.
LINK_LOCAL_NETS: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "fe80::/10", "ff00::/8", "::/128", "224.0.0.0/4", "255.255.255.255/32", "0.0.0.0/32"))
LINK_LOCAL_PARAM = "link_local"
_LINK_LOCAL_CACHE: dict[str, bool] = {}


def is_link_local(ip: str) -> bool:
    """Whether an address is link-local, multicast, broadcast or unspecified (`LINK_LOCAL_NETS`)."""
    hit = _LINK_LOCAL_CACHE.get(ip)
    if hit is None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        hit = any(addr.version == n.version and addr in n for n in LINK_LOCAL_NETS)
        if len(_LINK_LOCAL_CACHE) > 65536:
            _LINK_LOCAL_CACHE.clear()
        _LINK_LOCAL_CACHE[ip] = hit
    return hit


def parse_bool(flag: str, v: str) -> bool:
    t = v.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(flag, v, "must be true or false")


@dataclass(frozen=True)
class Dimension:
    name: str  # canonical, also the API parameter and the CLI flag (with dashes)
    parse: Callable[[str, str], Any]
    fields: tuple[str, ...]  # view keys; more than one = either side matches
    kind: str  # eq | net | member
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


DIMENSIONS: dict[str, Dimension] = {d.name: d for d in (
    Dimension("from_workload", _parse_text, ("client_workload",), "eq", "client workload name"),
    Dimension("to_workload", _parse_text, ("server_workload",), "eq", "server workload name"),
    Dimension("workload", _parse_text, ("client_workload", "server_workload"), "eq", "either side's workload"),
    Dimension("namespace", _parse_text, ("client_namespace", "server_namespace"), "eq", "either side's namespace"),
    Dimension("from_ip", _parse_net, ("client_ip",), "net", "client address or CIDR"),
    Dimension("to_ip", _parse_net, ("server_ip",), "net", "server address or CIDR"),
    Dimension("ip", _parse_net, ("client_ip", "server_ip"), "net", "either address or CIDR"),
    Dimension("port", _parse_port, ("client_port", "server_port"), "eq", "either side's port"),
    Dimension("to_port", _parse_port, ("server_port",), "eq", "server port"),
    Dimension("protocol", _parse_choice(sorted(PROTOCOLS)), ("protocol",), "eq", "tcp, udp, ..."),
    Dimension("outcome", _parse_choice(OUTCOMES), ("outcome",), "eq", "ok, refused, reset, timeout, dropped"),
    Dimension("observer", _parse_choice(OBSERVERS), ("observers",), "member", "client, server, path or drops saw it"),
    Dimension("vni", _parse_vni, ("vni",), "eq", "VXLAN network identifier"),
    Dimension("to_service", _parse_service, ("service_ip",), "net",
              "the address the client dialled before NAT (a Service's ClusterIP), or CIDR, "
              "or the Service's name (namespace/name) where the aggregator knows it"),
)}


@dataclass(frozen=True)
class Clause:
    dim: str
    values: tuple[Any, ...]
    negate: bool = False

    def matches(self, view: Mapping[str, Any]) -> bool:
        d = DIMENSIONS[self.dim]
        hit = any(_value_matches(d, view.get(f), v) for f in d.fields for v in self.values)
        return hit != self.negate


def _value_matches(d: Dimension, actual: Any, wanted: Any) -> bool:
    if actual is None:
        return False
    if isinstance(wanted, ServiceRef):  # callers resolve names first (`Filter.service_refs`)
        raise ConfigError(d.flag, str(wanted), "a Service name is known to the aggregator only "
                          "(or to --workload-map with a `services` section)")
    if d.kind == "net":
        try:
            return ipaddress.ip_address(actual) in wanted
        except ValueError:
            return False
    if d.kind == "member":
        return wanted in actual
    return bool(actual == wanted)


@dataclass
class Filter:
    clauses: list[Clause] = field(default_factory=list)
    # include link-local and multicast flows (hidden by default: the module docstring)
    link_local: bool = False

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, items: Iterable[tuple[str, str, bool]], *, link_local: bool = False) -> Filter:
        """From (dimension, raw value, negated) triples; same (dimension, negated) -> OR."""
        grouped: dict[tuple[str, bool], list[Any]] = {}
        for dim, raw, neg in items:
            if dim not in DIMENSIONS:
                raise ConfigError(dim, raw, f"unknown filter; known: {', '.join(DIMENSIONS)}")
            d = DIMENSIONS[dim]
            value = d.parse(("--not " if neg else "") + d.flag, str(raw).strip())
            vals = grouped.setdefault((dim, neg), [])
            if value not in vals:
                vals.append(value)
        return cls([Clause(dim, tuple(vals), neg) for (dim, neg), vals in grouped.items()],
                   link_local)

    @classmethod
    def from_query(cls, params: Iterable[tuple[str, str]]) -> Filter:
        """From API query parameters: `port=80`, `not_port=443` (repeatable), `link_local=true`.
        Parameters that are not filter dimensions are ignored here (the API validates its own)."""
        items = []
        link_local = False
        for key, value in params:
            if key == LINK_LOCAL_PARAM:
                link_local = parse_bool(LINK_LOCAL_PARAM, value)
                continue
            neg = key.startswith("not_")
            dim = key[4:] if neg else key
            if dim in DIMENSIONS:
                items.append((dim, value, neg))
        return cls.build(items, link_local=link_local)

    def query_params(self) -> list[tuple[str, str]]:
        """The API parameters that give this filter back (`from_query`)."""
        out = [(("not_" if c.negate else "") + c.dim, str(v)) for c in self.clauses
               for v in c.values]
        if self.link_local:
            out.append((LINK_LOCAL_PARAM, "true"))
        return out

    def service_refs(self) -> list[ServiceRef]:
        """The Service names among the values (to be resolved into addresses)."""
        return [v for c in self.clauses for v in c.values if isinstance(v, ServiceRef)]

    @property
    def empty(self) -> bool:
        """No clause (link-local and multicast flows are still hidden unless `link_local`)."""
        return not self.clauses

    # -- matching ---------------------------------------------------------------------------
    def matches(self, view: Mapping[str, Any]) -> bool:
        if not self.link_local and (is_link_local(view.get("client_ip") or "")
                                    or is_link_local(view.get("server_ip") or "")):
            return False
        return all(c.matches(view) for c in self.clauses)

    def matches_record(self, rec: FlowRecord) -> bool:
        return self.matches(view_of_record(rec))

    # -- display ----------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        return [{"dimension": c.dim, "values": [str(v) for v in c.values], "negate": c.negate}
                for c in self.clauses]

    def __str__(self) -> str:
        """The clauses in words; `link_local` is said only when it widens the default view."""
        text = self._clauses_text()
        return f"{text} [link-local included]" if self.link_local else text

    def _clauses_text(self) -> str:
        if not self.clauses:
            return "(everything)"
        out = []
        for c in self.clauses:
            s = " OR ".join(f"{c.dim}={v}" for v in c.values)
            s = f"({s})" if len(c.values) > 1 else s
            out.append(f"NOT {s}" if c.negate else s)
        return " AND ".join(out)


def view_of_record(rec: FlowRecord) -> dict[str, Any]:
    cw, sw = rec.client_workload, rec.server_workload
    return {
        "client_ip": rec.client.ip, "server_ip": rec.server.ip,
        "client_port": rec.client.port, "server_port": rec.server.port,
        "protocol": rec.protocol,
        "outcome": outcome_of(rec.connect, rec.resets, rec.source == "drops"),
        "observers": {"drops" if rec.source == "drops" else rec.observer}, "vni": rec.tunnel.vni if rec.tunnel else None,
        "client_workload": cw.name if cw else None, "server_workload": sw.name if sw else None,
        "client_namespace": cw.namespace if cw else None,
        "server_namespace": sw.namespace if sw else None,
        "service_ip": d.ip if (d := rec.dialled) is not None else None,
    }


# -- time -------------------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(flag: str, text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise ConfigError(flag, text, "not a duration (e.g. 30s, 5m, 2h, 7d)")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def parse_time(flag: str, text: str, now: datetime | None = None) -> datetime:
    """`now`, a duration ago (`5m` = five minutes ago), or an RFC 3339 time (UTC if no zone)."""
    now = now or datetime.now(UTC)
    t = text.strip()
    if t == "now":
        return now
    if _DURATION.match(t):
        return now - parse_duration(flag, t)
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(flag, text, "not a time: use now, a duration ago (5m, 1h) or RFC 3339") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
