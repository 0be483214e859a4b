"""Kubernetes-style Services in the lab (`eastwest lab up --services`): ClusterIPs, NodePort, and
every host programmed the way kube-proxy's iptables mode programs a node.

In: a `LabPlan` with `services=True`.  Out: `cluster_services(plan)`, the Services as data (the
inventory's `cluster_services`), `ruleset(plan, host)`, the `iptables-restore` text of one host's
`nat` table, and `program(plan)`, which applies them to the lab's host namespaces.

The rules follow kube-proxy's iptables proxier (pkg/proxy/iptables/proxier.go): `PREROUTING` and
`OUTPUT` jump to `KUBE-SERVICES`, which matches each ClusterIP and port and jumps to one
`KUBE-SVC-*` chain per Service; that chain picks an endpoint chain `KUBE-SEP-*` with
`-m statistic --mode random --probability 1/(n-i)` (so each of n endpoints is equally likely),
and the endpoint chain DNATs to the pod's address and targetPort. `KUBE-SERVICES` ends with
`-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`; a NodePort marks the packet (`KUBE-MARK-MASQ`,
0x4000) and `KUBE-POSTROUTING` masquerades marked packets: the backend then sees the node's
address as its client (externalTrafficPolicy: Cluster).

The lab's one NodePort (frontend, 30080) is programmed on one "middle" host only (the first
host after h1 with a frontend pod on a host that is neither h1 nor itself: h2 in the default
`--services` lab) and leads only to those frontend pods, so every NodePort call crosses three
hosts: client on h1 (the load generator), NAT on the middle host, server on a third (a lab
choice; kube-proxy would program it on every node, towards every endpoint).

Routing: each host's `br0` gets the pod gateway address 10.244.N.1/16 (flannel's `cni0`), pods
route the Service range and the underlay via it, the hosts forward (`ip_forward=1`) without
sending redirects or reverse-path filtering (a NodePort request arrives on the underlay from a
pod address that the host's own routes place behind br0).
A NodePort's reply reaches the NAT host over the overlay from the backend; conntrack undoes the
masquerade before routing, so it is a packet from a remote pod to a remote pod, which the shared
pod /16 would bridge straight to the client pod's MAC, back out the VXLAN port it came in on (a
bridge never does that, and the reply would be lost). A rule `iif br0 from <other host's pods>
lookup 100` sends it back to the client's host over the underlay instead, the way the request
came; a host's own pods' packets (ClusterIP calls) keep the main table and the overlay.
`net.bridge.bridge-nf-call-iptables=1` in every host
namespace (br_netfilter) puts bridged pod-to-pod frames through the host's iptables and
conntrack, as on real nodes: the reply of a backend on the same host, or arriving over VXLAN,
is bridged straight to the client pod, and only conntrack seeing it undoes the DNAT (its source
becomes the ClusterIP again).
"""

from __future__ import annotations

import subprocess
from typing import Any

from eastwest.errors import LabError
from eastwest.lab.plan import SERVICE_CIDR, LabPlan, cluster_services
from eastwest.lab.topology import Progress, sh

MASQ_MARK = "0x4000/0x4000"
NODE_REPLY_TABLE = 100  # routing table (and rule preference) of replies sent from a node's address  # kube-proxy's masquerade mark
HOST_SYSCTLS = ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1",
                "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0",
                "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")


def gateway(host_index: int) -> str:
    return f"10.244.{host_index}.1"


def bridge_mac(host_index: int) -> str:
    return f"02:ee:00:00:{host_index:02x}:fe"  # pod slots stop at 50 (0x32)


def _chain(prefix: str, *parts: str) -> str:
    return "-".join([prefix, *parts]).upper()[:28]  # iptables chain names: at most 28 characters


def _balance(lines: list[str], chain: str, proto: str, backends: list[dict[str, Any]],
             sep_prefix: str) -> list[str]:
    """`chain` picks one of `backends` uniformly: the i-th of n with probability 1/(n-i)."""
    seps = []
    n = len(backends)
    for i, b in enumerate(backends):
        sep = _chain(sep_prefix, b["pod"])
        seps.append(sep)
        stat = ([] if i == n - 1 else
                ["-m", "statistic", "--mode", "random", "--probability", f"{1 / (n - i):.11f}"])
        lines.append(" ".join(["-A", chain, *stat, "-j", sep]))
    for sep, b in zip(seps, backends, strict=True):
        lines.append(f"-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {b['ip']}:{b['port']}")
    return seps


def ruleset(plan: LabPlan, host: str) -> str:
    """The `nat` table of one host, as `iptables-restore` reads it."""
    chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"]
    rules = ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES",
             "-A POSTROUTING -j KUBE-POSTROUTING",
             f"-A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}",
             f"-A KUBE-POSTROUTING -m mark --mark {MASQ_MARK} -j MASQUERADE"]
    nodeport_rules: list[str] = []
    for svc in cluster_services(plan):
        svc_chain = _chain("KUBE-SVC", svc["name"])
        chains.append(svc_chain)
        p = svc["protocol"]
        rules.append(f"-A KUBE-SERVICES -d {svc['cluster_ip']}/32 -p {p} -m {p} --dport {svc['port']} "
                     f"-j {svc_chain}")
        chains += _balance(rules, svc_chain, p, svc["backends"], "KUBE-SEP")
        np = svc["node_port"]
        if np and np["host"] == host:
            ext = _chain("KUBE-EXT", svc["name"])
            chains.append(ext)
            nodeport_rules.append(f"-A KUBE-NODEPORTS -p {p} -m {p} --dport {np['port']} -j {ext}")
            nodeport_rules.append(f"-A {ext} -j KUBE-MARK-MASQ")
            chains += _balance(nodeport_rules, ext, p, np["backends"], "KUBE-NPSEP")
    rules.append("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    return "\n".join(["*nat", *(f":{c} - [0:0]" for c in chains), *rules, *nodeport_rules,
                      "COMMIT", ""])


def _run(args: list[str], stdin: str | None = None) -> None:
    """topology.sh, with standard input (iptables-restore reads its rules there)."""
    if stdin is None:
        sh(args)
        return
    try:
        proc = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise LabError(f"{args[0]} is not installed (make setup installs iptables)") from exc
    if proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")


def program(plan: LabPlan, progress: Progress = lambda _m: None) -> None:
    """Gateways, routes, sysctls and kube-proxy's rules in the lab's namespaces (never elsewhere)."""
    for h in plan.hosts:
        ns = ["ip", "netns", "exec", h.netns]
        _run([*ns, "sysctl", "-q", "-w", *HOST_SYSCTLS,
              f"net.ipv4.conf.{h.underlay_if}.rp_filter=0", "net.ipv4.conf.br0.rp_filter=0",
              "net.ipv4.conf.br0.send_redirects=0"])
        _run(["ip", "-n", h.netns, "link", "set", "br0", "address", bridge_mac(h.index)])
        _run(["ip", "-n", h.netns, "addr", "add", f"{gateway(h.index)}/16", "dev", "br0"])
        for other in plan.hosts:
            if other is h:
                continue
            # the other gateways' MACs, so no frame to them is flooded
            _run(["bridge", "-n", h.netns, "fdb", "append", bridge_mac(other.index), "dev",
                  "vx0", "dst", other.underlay_ip])
            # a remote pod's packet this host routes (a NodePort's reply, once conntrack undid
            # the masquerade) goes to another host's pod over the underlay, as the request came
            _run(["ip", "-n", h.netns, "rule", "add", "iif", "br0", "from",
                  f"10.244.{other.index}.0/24", "lookup", str(NODE_REPLY_TABLE), "pref",
                  str(NODE_REPLY_TABLE)])
            _run(["ip", "-n", h.netns, "route", "add", f"10.244.{other.index}.0/24", "via",
                  other.underlay_ip, "dev", h.underlay_if, "table", str(NODE_REPLY_TABLE)])
        _run([*ns, "iptables-restore", "--noflush"], ruleset(plan, h.name))
        progress(f"host {h.name}: kube-proxy-style rules, gateway {gateway(h.index)}")
    host_index = {h.name: h.index for h in plan.hosts}
    underlay = f"{plan.hosts[0].underlay_ip.rsplit('.', 1)[0]}.0/24"
    for p in plan.pods:
        gw = gateway(host_index[p.host])
        for dst in (SERVICE_CIDR, underlay):
            _run(["ip", "-n", p.netns, "route", "add", dst, "via", gw, "dev", "eth0"])

