"""`eastwest lab`: build a multi-host lab in network namespaces, drive it, record ground truth."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EPILOG = """\
examples:
  eastwest lab up                                  3 hosts x 2 pods, VXLAN VNI 42 on UDP 4789
  eastwest lab up --hosts 4 --vxlan-port 8472      the Linux/flannel VXLAN port
  eastwest lab up --ip-family ipv6                 IPv6 pods over an IPv6 underlay (dual: both)
  eastwest lab up --services                       ClusterIPs, a NodePort, kube-proxy-style DNAT/SNAT
  eastwest lab up --pattern macvlan                MACVLAN pods on the underlay, no overlay
  eastwest lab up --pattern host-network           api runs in its host's namespace
  eastwest lab up --pattern ipsec                  the overlay between hosts encrypted (ESP; the
                                                   kernel needs CONFIG_INET_ESP)
  eastwest lab up --pattern mesh --services        an ew-sidecar in every pod (Istio-style
                                                   iptables REDIRECT to :15001 and :15006)
  eastwest lab traffic --duration 10 --truth t.jsonl
  eastwest lab status
  eastwest lab policy apply shop-policies.yaml    enforce NetworkPolicies with iptables
  eastwest lab policy remove
  eastwest lab down

Hosts are namespaces <name>-hN joined by a bridge in <name>-fab; pods are namespaces
<name>-hN-pM on a per-host bridge, reaching pods on other hosts over VXLAN. The demo
application (loadgen -> frontend -> api -> db, cache, auth, and resolver over UDP) writes one
truth line per connection. Traffic never leaves the lab's namespaces. See docs/lab.md."""


def register(sub: Any) -> None:
    p = sub.add_parser("lab", help="a multi-host lab in network namespaces, with ground truth",
                       description="Build, drive and remove a lab of hosts and pods in network "
                       "namespaces joined by a VXLAN overlay (root only).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--name", default="ewlab",
                       help="lab name, the prefix of everything it makes (default ewlab)")
        q.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    up = lsub.add_parser("up", help="build the lab and start the demo application")
    common(up)
    up.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    up.add_argument("--pods-per-host", type=int, default=None,
                    help="application pods per host (default 2; 3 with --services)")
    up.add_argument("--vxlan-port", type=int, default=4789, choices=(4789, 8472),
                    help="VXLAN UDP port: 4789 (IANA) or 8472 (Linux, flannel)")
    up.add_argument("--ip-family", choices=("ipv4", "ipv6", "dual"), default="ipv4",
                    help="pod addresses: ipv4 (default), ipv6 (the VXLAN underlay is IPv6 too) or "
                    "dual (pods have both and the application uses both; the underlay stays IPv4)")
    up.add_argument("--services", action="store_true",
                    help="Kubernetes-style Services: a ClusterIP (10.96.0.0/16) per service, a "
                    "NodePort (h2 by default) that masquerades, every host programmed like kube-proxy's "
                    "iptables mode (DNAT, br_netfilter); the demo calls services by ClusterIP. "
                    "IPv4, 3+ hosts")
    up.add_argument("--pattern", action="append", metavar="NAME[,NAME]", default=None,
                    help="a container network pattern (repeatable, or comma-separated): macvlan "
                    "(pods on the underlay by MACVLAN, no overlay), host-network (api in its "
                    "host's namespace, like a hostNetwork pod), ipsec (the overlay encrypted with "
                    "xfrm ESP between hosts), mesh (a transparent sidecar proxy, ew-sidecar, in "
                    "every pod, as Istio installs Envoy). IPv4 only; macvlan combines with neither "
                    "of the others, mesh with neither of them; only mesh takes --services "
                    "(docs/lab.md, \"Network patterns\")")
    up.add_argument("--inventory", metavar="FILE", help="also write the inventory JSON to FILE")
    up.set_defaults(func=_up)

    tr = lsub.add_parser("traffic", help="drive the demo application and record ground truth")
    common(tr)
    tr.add_argument("--duration", type=float, required=True, metavar="S", help="seconds of traffic")
    tr.add_argument("--truth", metavar="FILE", required=True, help="write one JSON line per connection")
    tr.add_argument("--rate", type=float, default=20.0, help="new loadgen connections per second (default 20)")
    tr.add_argument("--seed", type=int, help="seed of the load generator, for repeatable runs")
    tr.set_defaults(func=_traffic)

    st = lsub.add_parser("status", help="what is up")
    common(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=_status)

    pol = lsub.add_parser("policy", help="enforce NetworkPolicies in the lab hosts with iptables",
                          description="Enforce Kubernetes NetworkPolicies in the lab's hosts with "
                          "iptables (br_netfilter + physdev chains, as iptables-based policy "
                          "engines do), to try a suggested policy. See docs/policy.md.",
                          epilog=POLICY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = pol.add_subparsers(dest="policy_action", metavar="ACTION", required=True)
    pa = psub.add_parser("apply", help="replace what the lab enforces by the policies of FILE...",
                         description="Replace the policy the lab enforces by the NetworkPolicies "
                         "of FILE... (checked like `eastwest policy check` checks them).",
                         epilog=POLICY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(pa)
    pa.add_argument("files", nargs="+", metavar="FILE",
                    help="NetworkPolicy YAML (one or more documents, or a List; - for stdin)")
    pa.add_argument("--show-rules", action="store_true",
                    help="also print the iptables-restore text of every host")
    pa.set_defaults(func=_policy_apply)
    pr = psub.add_parser("remove", help="stop enforcing: remove the lab's policy chains")
    common(pr)
    pr.set_defaults(func=_policy_remove)

    dn = lsub.add_parser("down", help="remove every namespace, link and process of the lab")
    common(dn)
    dn.add_argument("--all", action="store_true", help="remove every eastwest lab on this machine")
    dn.set_defaults(func=_down)


POLICY_EPILOG = """\
examples:
  eastwest policy suggest --namespace shop > shop.yaml && eastwest lab policy apply shop.yaml
  eastwest lab policy apply deny-all.yaml allow-api.yaml     several files are one set
  eastwest lab policy remove

A pod a policy selects is isolated (ingress on its host, egress on its client's host); what the
policies allow (eastwest/policy/semantics.py) becomes RETURN rules, the rest is dropped: a
blocked TCP connect is a SYN retransmitted until its timeout, dropped with the kernel reason
NETFILTER_DROP. Established connections are not judged again. Prints the allowed pod pairs."""


def _policy_apply(args: argparse.Namespace) -> int:
    from eastwest.lab import Lab
    from eastwest.lab import policy as labpolicy
    from eastwest.policy.load import load_files

    policies = load_files(args.files)  # a bad file fails before the lab is touched
    lab = Lab.open(args.name)
    p = labpolicy.apply(lab.inventory, policies)
    print(f"{'CLIENT':14} {'SERVER':14} {'PROTOCOL':8} PORTS")
    for a in p.allows:
        print(f"{a.client:14} {a.server:14} {a.protocol:8} {a.ports}")
    if args.show_rules:
        for (netns, fam), text in sorted(p.rules.items()):
            print(f"# {netns} IPv{fam}\n{text}")
    print(f"lab {args.name}: {len(policies)} policies; {len(p.ingress_isolated)} pods isolated for "
          f"ingress, {len(p.egress_isolated)} for egress; {len(p.allows)} allowed pod pairs and "
          "port ranges", file=sys.stderr)
    return 0


def _policy_remove(args: argparse.Namespace) -> int:
    from eastwest.lab import Lab
    from eastwest.lab import policy as labpolicy

    n = labpolicy.remove(Lab.open(args.name).inventory)
    print(f"lab {args.name}: removed {n} policy chains", file=sys.stderr)
    return 0


def _progress(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.quiet:
        return lambda _m: None
    return lambda m: print(f"lab: {m}", file=sys.stderr, flush=True)


def _up(args: argparse.Namespace) -> int:
    from eastwest.lab import Lab
    from eastwest.lab.patterns import parse

    parse(args.pattern)  # a bad --pattern is a usage error (exit 2), with or without root

    pods = args.pods_per_host if args.pods_per_host is not None else 3 if args.services else 2
    lab = Lab.up(name=args.name, hosts=args.hosts, pods_per_host=pods, vxlan_port=args.vxlan_port,
                 ip_family=args.ip_family, services=args.services, progress=_progress(args),
                 patterns=args.pattern or ())
    if args.inventory:
        with open(args.inventory, "w") as fh:
            json.dump(lab.inventory, fh, indent=2)
    print(f"{lab.state / 'inventory.json'}")
    return 0


def _traffic(args: argparse.Namespace) -> int:
    from eastwest.lab import Lab

    lab = Lab.open(args.name)
    lines = lab.traffic(args.duration, args.truth, seed=args.seed, rate=args.rate,
                        progress=_progress(args))
    print(f"{len(lines)} connections written to {args.truth}", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from eastwest.lab import Lab

    names = Lab.names()
    if args.name not in names:
        print(f"no lab named {args.name!r} is up" + (f" (up: {', '.join(names)})" if names else ""))
        return 1
    st = Lab.open(args.name).status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    family = "" if st["ip_family"] == "ipv4" else f", {st['ip_family']}"
    print(f"lab {st['name']}: VXLAN VNI {st['vni']} on UDP {st['vxlan_port']}{family}, "
          f"state {st['state_dir']}")
    print(f"{'HOST':6} {'NETNS':16} {'UNDERLAY':14} UP")
    for h in st["hosts"]:
        print(f"{h['name']:6} {h['netns']:16} {h['underlay_ip']:14} {'yes' if h['up'] else 'NO'}")
    ips = {p["name"]: ",".join(p["ips"]) for p in st["pods"]}
    w = max([13, *map(len, ips.values())])
    cars = any("sidecar" in p for p in st["pods"])
    print(f"{'POD':12} {'HOST':5} {'IP':{w}} {'SERVICE':9} {'NETNS':16} "
          + (f"{'PROCESS':8} SIDECAR" if cars else "PROCESS"))
    for p in st["pods"]:
        print(f"{p['name']:12} {p['host']:5} {ips[p['name']]:{w}} {p['service']:9} {p['netns']:16} "
              + (f"{p['process']:8} {p.get('sidecar', '-')}" if cars else p["process"]))
    return 0


def _down(args: argparse.Namespace) -> int:
    from eastwest.lab import Lab

    names = Lab.names() if args.all else [args.name]
    for name in names:
        gone = Lab.down_by_name(name, _progress(args))
        print(f"lab {name}: removed {len(gone)} namespaces", file=sys.stderr)
    return 0
