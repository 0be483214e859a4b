"""Container network patterns of the lab (`eastwest lab up --pattern NAME[,NAME...]`).

In: the `--pattern` values (repeatable, each a comma-separated list) and the rest of the lab's
choices.  Out: the patterns, checked (`parse`, `check`), as a sorted tuple the plan keeps; and
what each pattern changes, as data the plan and topology read (`MACVLAN_POD_NET`, ...).

Patterns (docs/lab.md, "Network patterns", has a picture of each):
- `macvlan`: pods hang off their host's underlay link by MACVLAN (bridge mode), with addresses
  on the underlay subnet; no bridge, no overlay: the wire carries the pods' packets plainly.
- `host-network`: some demo services (HOST_NETWORK_SERVICES) run in their host's namespace, as
  hostNetwork pods do: they listen on, and call from, the host's own address on the pod network.
- `ipsec`: the overlay between hosts is encrypted by xfrm (ESP in transport mode between the
  hosts' underlay addresses, keys made per lab): the wire sees only ESP between hosts.
- `mesh`: every pod gets a sidecar (eastwest/lab/sidecar.py, `ew-sidecar`) and Istio's iptables
  (eastwest/lab/mesh.py): each app-to-app TCP call becomes app -> own sidecar -> the server's
  sidecar -> app, with framing between the sidecars. Combines with `--services`.

Every pattern may stand alone; `INCOMPATIBLE` says which pairs cannot be one lab and why,
`NO_SERVICES` which patterns cannot have `--services` (all but `mesh`), `NEEDS_IPV4` that every
pattern is IPv4 only. A pattern this lab does not build,
or a combination it refuses, is a ConfigError naming `--pattern` (exit status 2).
"""

from __future__ import annotations

from collections.abc import Iterable

from eastwest.errors import ConfigError

PATTERNS = ("macvlan", "host-network", "ipsec", "mesh")
# named but not built yet: refused with their reason instead of "unknown"
PLANNED: dict[str, str] = {}

# pairs that cannot be one lab, and why (a frozenset of two patterns -> the reason)
INCOMPATIBLE = {
    frozenset({"macvlan", "host-network"}):
        "a MACVLAN pod in bridge mode cannot reach its own host's address (the parent link "
        "never hands a MACVLAN child's frames to the host), so host-network services would be "
        "unreachable from the pods of their host",
    frozenset({"macvlan", "ipsec"}):
        "MACVLAN pods have no overlay between hosts to encrypt (their packets are on the "
        "underlay as they are)",
    frozenset({"mesh", "macvlan"}):
        "mesh with macvlan is not built (the sidecars are built and tested on the bridged "
        "overlay, with or without --services)",
    frozenset({"mesh", "host-network"}):
        "a host-network service has no pod namespace for a sidecar and its iptables, and mesh "
        "with host-network is not built",
    frozenset({"mesh", "ipsec"}):
        "mesh with ipsec is not built (the sidecars are built and tested on the plain overlay, "
        "with or without --services)",
}
# what a pattern needs of the rest of the lab
NEEDS_IPV4 = "the network patterns are built for IPv4 labs (--ip-family ipv4)"
NO_SERVICES = {
    "macvlan": "MACVLAN pods bypass their host's iptables, so kube-proxy-style Services (DNAT "
               "in the host namespace) never see their packets",
    "host-network": "host-network services with --services are not built (the ClusterIP rules "
                    "would have to DNAT to a host's address)",
    "ipsec": "ipsec with --services is not built (NodePort calls cross the underlay outside the "
             "overlay the lab encrypts)",
}

# macvlan: the pods' addresses on the underlay subnet, which is a /16 in a macvlan lab (hosts
# keep 10.213.0.N): pod M of host N is 10.213.N.(10+M), as 10.244.N.(10+M) in the default lab
MACVLAN_UNDERLAY_PREFIX = 16
MACVLAN_POD_NET = "10.213"
MACVLAN_MTU = 1500  # no encapsulation
# ipsec: the pods' MTU: 1500 - 50 (VXLAN) - up to 70 (ESP header, IV, padding, trailer, ICV)
POD_MTU_IPSEC = 1380

# host-network: these demo services run in their host's namespace (called by pods: frontend ->
# api; calling pods: api -> db, cache, auth; the resolver is called by api)
HOST_NETWORK_SERVICES = ("api",)


def host_address(host_index: int) -> str:
    """A host's own address on the pod network (on its `br0`, as flannel's `cni0` has one):
    where its host-network services listen and what their calls to pods come from."""
    return f"10.244.{host_index}.1"


def host_mac(host_index: int) -> str:
    """The MAC of a host's `br0` in a host-network lab (pod slots stop at 50, 0x32)."""
    return f"02:ee:00:00:{host_index:02x}:fe"


def parse(values: Iterable[str] | None) -> tuple[str, ...]:
    """`--pattern` values (each may be `a,b`) -> the patterns, sorted and without repeats."""
    found: set[str] = set()
    for value in values or ():
        for name in (x.strip() for x in str(value).split(",")):
            if not name:
                raise ConfigError("--pattern", value, "an empty pattern name")
            if name in PLANNED:
                raise ConfigError("--pattern", name, PLANNED[name])
            if name not in PATTERNS:
                raise ConfigError("--pattern", name, f"unknown pattern; one of {', '.join(PATTERNS)}")
            found.add(name)
    for pair, why in INCOMPATIBLE.items():
        if pair <= found:
            raise ConfigError("--pattern", ",".join(sorted(pair)), f"cannot be combined: {why}")
    return tuple(sorted(found))


def check(patterns: tuple[str, ...], ip_family: str, services: bool) -> None:
    """The patterns against the lab's other choices (`--ip-family`, `--services`)."""
    if patterns and ip_family != "ipv4":
        raise ConfigError("--pattern", ",".join(patterns), f"{NEEDS_IPV4}, not {ip_family}")
    refused = [p for p in patterns if p in NO_SERVICES]
    if services and refused:
        p = refused[0]
        raise ConfigError("--pattern", p, f"cannot be combined with --services: {NO_SERVICES[p]}")

