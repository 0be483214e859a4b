"""Which sidecar proxies the mesh fold recognises (collector/mesh.py), from the collector's flags.

Stage: configuration, read once at start-up (collector/main.py). In: `--mesh-proxy
NAME:OUTBOUND:INBOUND[:HANDOFF]` (repeatable, added to the defaults), `--mesh-hold S`,
`--no-mesh`, `--no-nat`, `--pcap`. Out: `MeshSettings` (None: no fold), or a ConfigError naming
the flag and the bad value (the command exits 2); `check_line` for `--check`.

Defaults, from the projects' documentation:
- ew-sidecar (the lab's, eastwest/lab/sidecar.py): outbound 15001, inbound 15006, hands inbound
  calls to the app from 127.0.0.6;
- Istio's Envoy (`envoy`): the same ports (istio-iptables `-p 15001 -z 15006`), and its
  InboundPassthroughCluster binds the upstream source address 127.0.0.6;
- Consul's Envoy (`envoy`): transparent proxy's outbound listener 15001, the public listener
  20000 for inbound, and the local app reached at `local_service_address` (127.0.0.1);
- linkerd2-proxy: outbound 4140, inbound 4143, forwarding to the app on the original
  destination (the pod's own address: `self`).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from eastwest.errors import ConfigError

log = logging.getLogger("eastwest.collector.mesh")
MARGIN_S = 2.0  # beyond one interval: a connection still connecting at a drain comes next time
SELF = "self"  # a handoff from the pod's own address (the loopback flag: both ends equal)
DISTINCT_HANDOFF = "127.0.0.6"  # only a mesh hands calls over from here
IPV6_HANDOFF = {"127.0.0.6": "::6"}  # Istio's InboundPassthroughClusterIpv6 binds ::6


@dataclass(frozen=True)
class Proxy:
    """A sidecar proxy: its process name, the ports the pod's REDIRECTs send outbound and inbound
    calls to, and where it hands inbound calls to the app from (an address, or `self`)."""

    name: str
    outbound: int
    inbound: int
    handoff: str = DISTINCT_HANDOFF

    def spec(self) -> str:
        return f"{self.name}:{self.outbound}:{self.inbound}:{self.handoff}"


DEFAULT_PROXIES = (
    Proxy("ew-sidecar", 15001, 15006, "127.0.0.6"),  # the lab's (eastwest/lab/sidecar.py)
    Proxy("envoy", 15001, 15006, "127.0.0.6"),  # Istio: InboundPassthroughCluster binds 127.0.0.6
    Proxy("envoy", 15001, 20000, "127.0.0.1"),  # Consul: public listener 20000, local_app 127.0.0.1
    Proxy("linkerd2-proxy", 4140, 4143, SELF),  # Linkerd: to the original destination
)


def parse_proxy(text: str) -> Proxy:
    """`NAME:OUTBOUND:INBOUND[:HANDOFF]` -> Proxy; ConfigError naming `--mesh-proxy`."""
    parts = text.split(":")
    if len(parts) < 3:
        raise ConfigError("--mesh-proxy", text, "expected NAME:OUTBOUND:INBOUND[:HANDOFF], e.g. "
                          "envoy:15001:15006")
    name, out, inb, handoff = parts[0], parts[1], parts[2], ":".join(parts[3:]) or DISTINCT_HANDOFF
    if not name or "/" in name or any(ch.isspace() for ch in name):
        raise ConfigError("--mesh-proxy", text, "NAME must be a process name (no path, no spaces)")
    ports = []
    for what, p in (("OUTBOUND", out), ("INBOUND", inb)):
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise ConfigError("--mesh-proxy", text, f"{what} port {p!r} is not 1..65535")
        ports.append(int(p))
    if ports[0] == ports[1]:
        raise ConfigError("--mesh-proxy", text, "OUTBOUND and INBOUND must differ")
    if handoff != SELF:
        try:
            addr = ipaddress.ip_address(handoff)
        except ValueError:
            raise ConfigError("--mesh-proxy", text, f"HANDOFF {handoff!r} is neither an IP "
                              "address nor 'self'") from None
        if not addr.is_loopback:
            raise ConfigError("--mesh-proxy", text, f"HANDOFF {handoff!r} must be a loopback "
                              "address (or 'self'): the proxy hands calls over inside the pod")
        handoff = str(addr)
    return Proxy(name, ports[0], ports[1], handoff)


@dataclass(frozen=True)
class MeshSettings:
    proxies: tuple[Proxy, ...]
    hold_s: float

    def describe(self) -> str:
        return ", ".join(p.spec() for p in self.proxies)


def settings_from(args: object) -> MeshSettings | None:
    """The mesh fold the collector's flags ask for; None with `--no-mesh` or a capture file
    (and when NAT folding is off: r1 is recognised by its REDIRECT). ConfigError on a bad value."""
    extra = [parse_proxy(t) for t in getattr(args, "mesh_proxy", None) or []]
    hold = getattr(args, "mesh_hold", None)
    if hold is None:
        hold = float(getattr(args, "interval", 5.0)) + MARGIN_S
    elif not hold > 0:
        raise ConfigError("--mesh-hold", hold, "must be > 0 seconds")
    if getattr(args, "no_mesh", False) or getattr(args, "pcap", None):
        return None
    if getattr(args, "no_nat", False):
        log.warning("--no-nat: service-mesh calls are not folded (an app's socket is recognised "
                    "by its REDIRECT conntrack entry); --no-mesh silences this")
        return None
    return MeshSettings(tuple(dict.fromkeys([*DEFAULT_PROXIES, *extra])), float(hold))


def check_line(args: object) -> str:
    """`--check`'s line about the mesh fold."""
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        return f"{'mesh fold:':<28} BAD FLAG  {exc}"
    if settings is None:
        why = "--no-mesh" if getattr(args, "no_mesh", False) else (
            "--no-nat (needs the REDIRECT conntrack entries)" if getattr(args, "no_nat", False)
            else "a capture file")
        return f"{'mesh fold:':<28} off  ({why})"
    return (f"{'mesh fold:':<28} on  hold {settings.hold_s:g} s; proxies "
            f"(NAME:OUTBOUND:INBOUND:HANDOFF) {settings.describe()}")
