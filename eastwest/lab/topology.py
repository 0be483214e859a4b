"""Builds and removes the lab's network: namespaces, veths, bridges, the VXLAN overlay.

In: a `LabPlan`.  Out: the namespaces of the plan, wired; or nothing left of them.

Every link is created directly inside a lab namespace (`ip link add ... netns`), so the root
namespace never holds a lab interface and traffic cannot leave the lab: the fabric bridge lives
in its own namespace and has no uplink.

Forwarding across the overlay uses static FDB entries (`bridge fdb append`): one all-zeros
entry per remote host for broadcast/unknown traffic (head-end replication, as flannel and
Linux's own docs do it) and one entry per remote pod MAC, so a unicast frame is carried to
exactly its destination host. That keeps the (outer_src, outer_dst) VTEP pair of every
captured packet equal to the two hosts of its pods: ground truth for the VXLAN decoder.
Kernel docs: Documentation/networking/vxlan.rst.

IPv6 (`ipv6` and `dual` labs): every lab namespace gets `accept_dad=0` before its links exist
and every address is added `nodad`, so addresses are usable at once (duplicate address
detection would hold them "tentative" for a second or more). In an `ipv6` lab the underlay is
IPv6 only: VXLAN `local`, the fdb `dst` entries and so the VTEPs are IPv6, and the pods' MTU
leaves room for the 70 bytes of an IPv6 outer header (1430 instead of 1450).

Network patterns (eastwest/lab/patterns.py): `macvlan` makes no bridge, VXLAN or forwarding
entries; each pod's eth0 is a MACVLAN child (bridge mode) of its host's eth0, created straight
into the pod's namespace. `host-network` makes no namespace for a host-network pod: the host's
br0 gets its address and MAC (and the other hosts' forwarding entries point that MAC at it).
`ipsec` lowers the pods' MTU; eastwest/lab/ipsec.py adds the security associations.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence

from eastwest.errors import LabError
from eastwest.lab.patterns import MACVLAN_MTU, MACVLAN_UNDERLAY_PREFIX, POD_MTU_IPSEC
from eastwest.lab.plan import POD_PREFIX4, POD_PREFIX6, UNDERLAY_PREFIX6, LabPlan

POD_MTU = 1450  # 1500 underlay - 50 bytes of VXLAN encapsulation (outer IPv4)
POD_MTU_V6_UNDERLAY = 1430  # 1500 - 70 bytes (outer IPv6 header, 40 instead of 20)
NO_DAD = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

Progress = Callable[[str], None]


def sh(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command; a failure raises LabError naming the command and its stderr."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise LabError(f"{args[0]} is not installed (make setup installs iproute2)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out: {' '.join(args)}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip(netns: str, *args: str) -> None:
    sh(["ip", "-n", netns, *args])


def existing_netns() -> set[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def add_netns(netns: str, ipv6: bool) -> None:
    """A new namespace with loopback up; with `ipv6`, no duplicate address detection in it."""
    sh(["ip", "netns", "add", netns])
    if ipv6:
        sh(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *NO_DAD])
    ip(netns, "link", "set", "lo", "up")


def lab_netns(name: str) -> list[str]:
    """The namespaces that belong to lab `name` by its naming scheme (and nothing else)."""
    pat = re.compile(rf"^{re.escape(name)}-(fab|h\d+|h\d+-p\d+)$")
    return sorted(n for n in existing_netns() if pat.match(n))


def build(plan: LabPlan, progress: Progress = lambda _m: None) -> None:
    taken = set(lab_netns(plan.name))
    if taken:
        raise LabError(f"lab {plan.name!r} already has namespaces ({', '.join(sorted(taken))}); "
                       f"run `eastwest lab down --name {plan.name}` first")
    fab = plan.fabric_netns
    v6 = plan.ip_family != "ipv4"
    dad = ["nodad"] if v6 else []
    mtu = str(POD_MTU_IPSEC if "ipsec" in plan.patterns else
              POD_MTU_V6_UNDERLAY if plan.underlay_family == 6 else POD_MTU)
    progress(f"fabric namespace {fab}")
    add_netns(fab, v6)
    ip(fab, "link", "add", "name", "fab0", "type", "bridge")
    ip(fab, "link", "set", "fab0", "up")

    for h in plan.hosts:
        progress(f"host {h.name} ({h.netns}, underlay {h.underlay_ip})")
        add_netns(h.netns, v6)
        ip(fab, "link", "add", h.name, "type", "veth", "peer", "name", h.underlay_if, "netns", h.netns)
        ip(fab, "link", "set", h.name, "master", "fab0", "up")
        ip(h.netns, "addr", "add", f"{h.underlay_ip}/{h.underlay_prefix}", "dev", h.underlay_if,
           *(dad if h.underlay_prefix == UNDERLAY_PREFIX6 else []))
        ip(h.netns, "link", "set", h.underlay_if, "up")
        if not plan.overlay:  # macvlan: the pods hang off eth0 itself; no bridge, no VXLAN
            continue
        ip(h.netns, "link", "add", "name", "br0", "type", "bridge")
        ip(h.netns, "link", "set", "br0", "up")
        ip(h.netns, "link", "add", "vx0", "type", "vxlan", "id", str(plan.vni), "dstport",
           str(plan.vxlan_port), "local", h.underlay_ip, "dev", h.underlay_if, "nolearning")
        ip(h.netns, "link", "set", "vx0", "master", "br0", "up")

    for p in plan.pods:
        host = next(h for h in plan.hosts if h.name == p.host)
        progress(f"pod {p.name} on {p.host} ({p.netns}, {', '.join(p.ips)})")
        if p.attach == "host":  # host-network: the host's br0 gets the pod's address and MAC
            ip(host.netns, "link", "set", "br0", "address", p.mac)
            ip(host.netns, "addr", "add", f"{p.ip}/{POD_PREFIX4}", "dev", "br0")
            continue
        add_netns(p.netns, v6)
        if p.attach == "macvlan":
            # made in the host's namespace on its underlay link, created straight into the pod's
            ip(host.netns, "link", "add", "link", host.underlay_if, "name", "eth0", "netns",
               p.netns, "address", p.mac, "mtu", str(MACVLAN_MTU), "type", "macvlan", "mode",
               "bridge")
        else:
            ip(host.netns, "link", "add", str(p.host_if), "type", "veth", "peer", "name", "eth0",
               "netns", p.netns)
            ip(host.netns, "link", "set", str(p.host_if), "mtu", mtu, "master", "br0", "up")
            ip(p.netns, "link", "set", "eth0", "address", p.mac, "mtu", mtu)
        if p.ip4:
            prefix = MACVLAN_UNDERLAY_PREFIX if p.attach == "macvlan" else POD_PREFIX4
            ip(p.netns, "addr", "add", f"{p.ip4}/{prefix}", "dev", "eth0")
        if p.ip6:
            ip(p.netns, "addr", "add", f"{p.ip6}/{POD_PREFIX6}", "dev", "eth0", *dad)
        ip(p.netns, "link", "set", "eth0", "up")

    if not plan.overlay:
        return
    progress("overlay forwarding entries")
    for h in plan.hosts:
        for other in plan.hosts:
            if other is h:
                continue
            sh(["bridge", "-n", h.netns, "fdb", "append", "00:00:00:00:00:00", "dev", "vx0",
                "dst", other.underlay_ip])
            for p in plan.pods:
                if p.host == other.name:
                    sh(["bridge", "-n", h.netns, "fdb", "append", p.mac, "dev", "vx0", "dst",
                        other.underlay_ip])


def kill_netns_processes(netns: str) -> list[int]:
    """SIGKILL every process still inside `netns` (the last resort of teardown)."""
    out = sh(["ip", "netns", "pids", netns], check=False).stdout
    pids = [int(x) for x in out.split() if x.isdigit()]
    for pid in pids:
        sh(["kill", "-9", str(pid)], check=False)
    return pids


REMOVE_PASSES = 5


def remove(name: str, progress: Progress = lambda _m: None) -> list[str]:
    """Delete every namespace of lab `name` (pods first); return what was removed. A namespace
    that appears meanwhile is removed by the next pass: an interrupted `lab up` leaves its last
    `ip netns add` killed but not waited for (Python's subprocess on Ctrl-C), and it may still
    create its namespace after the first pass listed them."""
    gone: list[str] = []
    for attempt in range(REMOVE_PASSES):
        names = lab_netns(name)
        if not names:
            return gone
        if attempt:
            time.sleep(0.2 * attempt)
            progress(f"again: {', '.join(names)}")
        # pods, then hosts, then the fabric: links die with their namespace
        order = sorted(names, key=lambda n: (0 if re.search(r"-p\d+$", n) else
                                             2 if n.endswith("-fab") else 1, n))
        for ns in order:
            kill_netns_processes(ns)
            r = sh(["ip", "netns", "delete", ns], check=False)
            if r.returncode == 0:
                gone.append(ns)
                progress(f"removed {ns}")
            else:
                progress(f"could not remove {ns}: {r.stderr.strip()}")
    left = lab_netns(name)
    if left:
        raise LabError(f"could not remove namespaces {', '.join(left)}")
    return gone
