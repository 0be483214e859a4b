"""The `ipsec` lab pattern: the overlay between hosts encrypted by xfrm (IPsec ESP).

In: a `LabPlan` with "ipsec" in its patterns, built by eastwest/lab/topology.py.  Out: in every
host's namespace, one ESP security association per direction per pair of hosts (transport mode
between their underlay addresses, keys made here at random for this lab) and the policies that
require them for every packet between the two addresses; `inventory(plan)`, what the inventory
says of them (SPIs, mode, algorithms; never the keys).

The VXLAN packets of the overlay run between the hosts' underlay addresses, so all of them are
encrypted (as Calico's and flannel's IPsec modes encrypt the traffic between nodes): the wire
sees only ESP between hosts (and ARP), the pods and their sockets see nothing different. The
pods' MTU leaves room for ESP (patterns.POD_MTU_IPSEC): an ESP packet never needs fragmenting.

Transport mode, not tunnel mode: the kernel hands a tunnel-mode packet, once decrypted, back to
its device's receive path, where a capture on that device sees it a second time in clear; in
transport mode a capture on the underlay sees only the ESP packets (checked by the lab test).
Algorithms: AES-CBC with HMAC-SHA256 (truncated to 128 bits, RFC 4868), which kernels without
AES-GCM (CONFIG_CRYPTO_GCM) have too.

The kernel must have ESP itself (CONFIG_INET_ESP): xfrm without it refuses every `proto esp`
state ("Requested type not found"). The machines this project was built on lack it, so
`check_kernel` refuses the pattern before anything is built, naming the options missing
(read from /proc/config.gz).
"""

from __future__ import annotations

import gzip
import secrets
from pathlib import Path
from typing import Any

from eastwest.errors import LabError
from eastwest.lab.plan import HostPlan, LabPlan
from eastwest.lab.topology import Progress, ip

KERNEL_CONFIG = Path("/proc/config.gz")
NEEDS = ("CONFIG_INET_ESP", "CONFIG_CRYPTO_CBC", "CONFIG_CRYPTO_AES", "CONFIG_CRYPTO_HMAC",
         "CONFIG_CRYPTO_SHA256")

MODE = "transport"
ENC, ENC_KEY_BYTES = "cbc(aes)", 16
AUTH, AUTH_KEY_BYTES, AUTH_TRUNC_BITS = "hmac(sha256)", 32, 128


def missing_kernel_support(config: Path = KERNEL_CONFIG) -> list[str]:
    """The kernel options the pattern needs that this kernel's configuration leaves out (empty
    when it has them all, or when it does not publish its configuration: then `program` finds
    out). Without CONFIG_INET_ESP, `ip xfrm state add ... proto esp` says "Requested type not
    found": xfrm itself is there, its ESP transform is not."""
    try:
        text = gzip.decompress(config.read_bytes()).decode(errors="replace")
    except OSError:
        return []
    have = {line.split("=", 1)[0] for line in text.splitlines()
            if line.endswith(("=y", "=m"))}
    return [n for n in NEEDS if n not in have]


def check_kernel() -> None:
    """LabError naming the kernel options the `ipsec` pattern needs and this kernel lacks."""
    missing = missing_kernel_support()
    if missing:
        raise LabError(f"--pattern ipsec needs IPsec ESP in the kernel: this kernel is built "
                       f"without {', '.join(missing)} (/proc/config.gz), so `ip xfrm state add "
                       "... proto esp` is refused")


def spi(src: HostPlan, dst: HostPlan) -> int:
    """The SPI of the association from `src` to `dst`: 0xe000SSDD (hosts stop at 20)."""
    return 0xE0000000 | (src.index << 8) | dst.index


def inventory(plan: LabPlan) -> dict[str, Any]:
    return {"mode": MODE, "encryption": ENC, "authentication": AUTH,
            "associations": [{"src": a.name, "dst": b.name, "src_ip": a.underlay_ip,
                              "dst_ip": b.underlay_ip, "spi": f"0x{spi(a, b):08x}"}
                             for a in plan.hosts for b in plan.hosts if a is not b]}


def program(plan: LabPlan, progress: Progress = lambda _m: None) -> None:
    """States and policies in every host's namespace (never elsewhere)."""
    keys = {(a.name, b.name): (secrets.token_hex(ENC_KEY_BYTES), secrets.token_hex(AUTH_KEY_BYTES))
            for a in plan.hosts for b in plan.hosts if a is not b}
    for h in plan.hosts:
        for other in plan.hosts:
            if other is h:
                continue
            for a, b in ((h, other), (other, h)):  # both directions' associations, in h
                enc, auth = keys[(a.name, b.name)]
                ip(h.netns, "xfrm", "state", "add", "src", a.underlay_ip, "dst", b.underlay_ip,
                   "proto", "esp", "spi", f"0x{spi(a, b):08x}", "reqid", str(spi(a, b)),
                   "mode", MODE, "auth-trunc", AUTH, f"0x{auth}", str(AUTH_TRUNC_BITS),
                   "enc", ENC, f"0x{enc}")
            for a, b, way in ((h, other, "out"), (other, h, "in")):
                ip(h.netns, "xfrm", "policy", "add", "src", f"{a.underlay_ip}/32", "dst",
                   f"{b.underlay_ip}/32", "dir", way, "tmpl", "src", a.underlay_ip, "dst",
                   b.underlay_ip, "proto", "esp", "reqid", str(spi(a, b)), "mode", MODE)
        progress(f"host {h.name}: ESP ({MODE} mode) to and from {len(plan.hosts) - 1} hosts")
