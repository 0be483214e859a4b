"""Enforces Kubernetes NetworkPolicies in a lab with iptables, the way iptables-based policy
engines (kube-router, Calico's iptables dataplane) do it, so a suggested policy can be tried.

In:  a lab (its inventory and workload map: each pod's namespace, labels, addresses and its
     veth on its host's bridge) and `Policy` objects (eastwest/policy/load.py).
Out: in each host namespace, chains of the filter table (IPv4 and, where pods have IPv6
     addresses, IPv6) that drop what the policies deny; `remove` takes them out again.

Which pod may reach which pod on which ports is decided by eastwest/policy/semantics.py
`evaluate`, the same function `eastwest policy check` uses: nothing here reads a selector. The
port space of each protocol is cut at every boundary any rule names (port, endPort + 1), each
piece is evaluated once at its first port, and every allowed piece becomes one `--dport` range.

Where the rules sit: pod traffic is bridged (br0 in the host, VXLAN enslaved to it), so with
br_netfilter (`net.bridge.bridge-nf-call-iptables=1`, set per host namespace) every pod packet
crosses the host's FORWARD chain, where `-m physdev` tells which pod veth it came in on or goes
out of. FORWARD jumps to EW-POLICY, which
  1. accepts packets of connections conntrack already knows (ESTABLISHED, RELATED): replies and
     the rest of an allowed connection are never judged again, as in every such engine; and
     IPv6 neighbour discovery (IPv6's ARP, which iptables never sees for IPv4);
  2. sends a packet that entered from a pod isolated for egress to its EW-E<n> chain (on the
     client's host), and a packet leaving to a pod isolated for ingress to its EW-I<n> chain (on
     the server's host); each chain RETURNs on an allowed destination/source, port and
     protocol, and ends in DROP (the kernel then frees the packet with reason NETFILTER_DROP).
A dropped TCP connection attempt is a SYN the client retransmits until its connect times out.

Limits (the lab's, said so in docs/policy.md): peers are the lab's pods only (an `ipBlock` is
judged against pod addresses; the lab has no other addresses), pods have no named container
ports (a rule with a named port matches nothing), and protocols other than TCP, UDP and SCTP
(ICMP) are dropped to and from isolated pods, as Calico does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eastwest.errors import LabError
from eastwest.policy.semantics import PROTOCOLS, Conn, Endpoint, Policy, evaluate, selecting

CHAIN = "EW-POLICY"
PREFIX = "EW-"
SYSCTLS = ("net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")


@dataclass(frozen=True)
class LabPod:
    name: str
    host: str
    host_if: str
    endpoint: Endpoint
    ips: tuple[str, ...]


@dataclass(frozen=True)
class Allow:
    """`client` may open connections to `server` on `protocol` ports `lo`..`hi`."""

    client: str
    server: str
    protocol: str
    lo: int
    hi: int

    @property
    def ports(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass
class Plan:
    """What `apply` installs: per pod whether it is isolated each way, the allowed pairs, and the
    iptables-restore text per host namespace and family."""

    ingress_isolated: list[str]
    egress_isolated: list[str]
    allows: list[Allow]
    rules: dict[tuple[str, int], str] = field(default_factory=dict)  # (host netns, 4|6) -> text


def pods_of(inventory: Mapping[str, Any]) -> list[LabPod]:
    """Every pod of the lab as policy sees it: namespace and labels from the lab's workload map
    (the identity the aggregator gives it, so a suggestion's selectors match it)."""
    wl_path = inventory.get("workload_map")
    if not wl_path or not Path(wl_path).exists():
        raise LabError(f"lab {inventory.get('name')!r} has no workload map ({wl_path})")
    labels: dict[str, dict[str, str]] = {}
    for e in yaml.safe_load(Path(wl_path).read_text())["workloads"]:
        labels[e["match"].split("/")[0]] = {str(k): str(v) for k, v in (e.get("labels") or {}).items()}
    odd = sorted(set(inventory.get("patterns") or ()) & {"macvlan", "host-network"})
    if odd:  # the rules match the pods' bridge ports (physdev): MACVLAN and host pods have none
        raise LabError(f"lab policy enforcement needs every pod on its host's bridge; lab "
                       f"{inventory.get('name')!r} has --pattern {','.join(odd)}")
    host_netns = {h["name"]: h["netns"] for h in inventory["hosts"]}
    out = []
    for p in inventory["pods"]:
        ips = tuple(p.get("ips") or [p["ip"]])
        out.append(LabPod(p["name"], host_netns[p["host"]], p["host_if"],
                          Endpoint(p["namespace"], labels.get(ips[0], {}), ips[0], None, {}), ips))
    return out


def _cuts(policies: Sequence[Policy], protocol: str) -> list[int]:
    """The first ports of the pieces of 1..65535 inside which no rule of `protocol` changes."""
    cuts = {1}
    for pol in policies:
        for rule in (*pol.ingress, *pol.egress):
            for pr in rule.ports or ():
                if pr.protocol == protocol and isinstance(pr.port, int):
                    cuts.add(pr.port)
                    end = (pr.end_port if pr.end_port is not None else pr.port) + 1
                    if end <= 65535:
                        cuts.add(end)
    return sorted(cuts)


def plan(inventory: Mapping[str, Any], policies: Sequence[Policy]) -> Plan:
    pods = pods_of(inventory)
    ing = [p.name for p in pods if selecting(policies, p.endpoint, "Ingress")]
    egr = [p.name for p in pods if selecting(policies, p.endpoint, "Egress")]
    allows: list[Allow] = []
    for proto in PROTOCOLS:
        cuts = _cuts(policies, proto)
        for c in pods:
            for s in pods:
                if s is c or (c.name not in egr and s.name not in ing):
                    continue  # neither side isolated: nothing to write
                for i, lo in enumerate(cuts):
                    hi = cuts[i + 1] - 1 if i + 1 < len(cuts) else 65535
                    v = evaluate(policies, Conn(c.endpoint, s.endpoint, lo, proto))
                    if v.allowed is True:
                        last = allows[-1] if allows else None
                        if (last is not None and (last.client, last.server, last.protocol)
                                == (c.name, s.name, proto) and last.hi == lo - 1):
                            allows[-1] = Allow(c.name, s.name, proto, last.lo, hi)
                        else:
                            allows.append(Allow(c.name, s.name, proto, lo, hi))
    out = Plan(ing, egr, allows)
    _render(out, pods, inventory)
    return out


def _render(p: Plan, pods: list[LabPod], inventory: Mapping[str, Any]) -> None:
    by_name = {x.name: x for x in pods}
    families = sorted({6 if ":" in ip else 4 for x in pods for ip in x.ips})
    for h in inventory["hosts"]:
        netns = h["netns"]
        local = [x for x in pods if x.host == netns]
        for fam in families:
            chains = [CHAIN]
            lines = [f"-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
            if fam == 6:  # neighbour discovery is IPv6's ARP: never judged (ARP never is)
                lines += [f"-A {CHAIN} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT"
                          for t in ("neighbour-solicitation", "neighbour-advertisement")]
            body: list[str] = []
            for n, pod in enumerate(local):
                for way, isolated, flag in (("E", p.egress_isolated, "--physdev-in"),
                                            ("I", p.ingress_isolated, "--physdev-out")):
                    if pod.name not in isolated:
                        continue
                    ch = f"{PREFIX}{way}{n}-{pod.name}"[:28]
                    chains.append(ch)
                    lines.append(f"-A {CHAIN} -m physdev {flag} {pod.host_if} --physdev-is-bridged "
                                 f"-j {ch}")
                    for a in p.allows:
                        if (a.client if way == "E" else a.server) != pod.name:
                            continue
                        other = by_name[a.server if way == "E" else a.client]
                        match = "-d" if way == "E" else "-s"
                        for ip in other.ips:
                            if (6 if ":" in ip else 4) != fam:
                                continue
                            body.append(f"-A {ch} {match} {ip}/{128 if fam == 6 else 32} "
                                        f"-p {a.protocol.lower()} -m {a.protocol.lower()} "
                                        f"--dport {a.ports.replace('-', ':')} -j RETURN")
                    body.append(f"-A {ch} -j DROP")
            text = ["*filter", *(f":{c} - [0:0]" for c in chains), *lines, *body, "COMMIT", ""]
            p.rules[(netns, fam)] = "\n".join(text)


def _run(netns: str, args: Sequence[str], stdin: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", netns, *args]
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise LabError("iptables is not installed (make setup installs it)") from exc
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _tool(fam: int) -> str:
    return "ip6tables" if fam == 6 else "iptables"


def remove(inventory: Mapping[str, Any]) -> int:
    """Take every eastwest chain out of every host of the lab; return how many were removed."""
    n = 0
    for h in inventory["hosts"]:
        for fam in (4, 6):
            tool = _tool(fam)
            while _run(h["netns"], [tool, "-w", "-D", "FORWARD", "-j", CHAIN], check=False).returncode == 0:
                pass
            listing = _run(h["netns"], [tool, "-w", "-S"], check=False).stdout
            ours = [ln.split()[1] for ln in listing.splitlines()
                    if ln.startswith("-N ") and ln.split()[1].startswith(PREFIX)]
            for ch in ours:
                _run(h["netns"], [tool, "-w", "-F", ch])
            for ch in ours:
                _run(h["netns"], [tool, "-w", "-X", ch])
            n += len(ours)
    return n


def apply(inventory: Mapping[str, Any], policies: Sequence[Policy]) -> Plan:
    """Replace whatever policy the lab enforces by `policies`."""
    p = plan(inventory, policies)
    remove(inventory)
    for h in inventory["hosts"]:
        _run(h["netns"], ["sysctl", "-q", "-w", *SYSCTLS])
    for (netns, fam), text in p.rules.items():
        _run(netns, [f"{_tool(fam)}-restore", "-w", "--noflush"], stdin=text)
        _run(netns, [_tool(fam), "-w", "-I", "FORWARD", "1", "-j", CHAIN])
    return p
