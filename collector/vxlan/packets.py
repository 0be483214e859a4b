"""Decoded packets: the columns every wire decoder produces, and the decoding policy they share.

Stage: between the decoders (`bulk.py`, natively or vectorized with numpy; `reference.py`,
scapy per packet) and the flow table (`flows.py`). In: nothing (definitions). Out: `Decoded`,
one numpy column per field, one row per packet, plus `status` (0 = decoded, else the drop
reason's code), and `Policy` (which UDP ports carry which tunnel, and whether untunnelled
packets are flows). numpy is imported only when a `Decoded` is made: the native file path
(`scan.py`) never makes one.

The policy, applied in this order by every decoder (the differential tests hold them to it):

1. the link layer: Ethernet (LINKTYPE 1) with any 802.1Q / 802.1ad tags (4 bytes each); Linux
   cooked SLL (113: the protocol at byte 14 of a 16-byte header) and SLL2 (276: at byte 0 of a
   20-byte header), each followed by tags if the protocol is one; raw IP (101, and 12 / 14
   where libpcap writes DLT_RAW; 228 IPv4, 229 IPv6), the version nibble giving the family.
   Any other link type: `unsupported_linktype`.
2. IPv4 or IPv6 (RFC 791 / RFC 8200; IPv6 Hop-by-Hop, Routing and Destination Options headers
   are skipped, a Fragment header or an IPv4 fragment is a `fragment`); not IP: `non_ip`.
3. UDP (RFC 768) to a tunnel port decapsulates (never a flow of its own):
   - VXLAN (RFC 7348; default ports 4789, 8472): the I flag (0x08) must be set (`vxlan_no_vni`),
     reserved bits are ignored (section 5); the inner packet is Ethernet.
   - Geneve (RFC 8926; default 6081): version 0 (`tunnel_version` otherwise), options skipped
     (opt_len * 4 bytes, any length); the O (control) and C (critical options) bits do not
     change decoding: section 4.3 lets a transit device observe a packet whose options it does
     not understand, and forbids it to drop it for them. Protocol type 0x6558 is Ethernet,
     0x0800 / 0x86DD IPv4 / IPv6 without Ethernet, any other `inner_non_ip`.
   - VXLAN-GPE (draft-ietf-nvo3-vxlan-gpe; default 4790): the I flag must be set
     (`vxlan_no_vni`), version bits 0 (`tunnel_version`); with the P bit, next protocol 1 IPv4,
     2 IPv6, 3 Ethernet, any other (NSH, MPLS...) `inner_non_ip`; without it, Ethernet (as
     VXLAN).
   Then the inner link layer (Ethernet and tags, or none) and IPv4 / IPv6; not IP:
   `inner_non_ip`. An inner packet that is itself UDP to a tunnel port is decapsulated again
   (nested tunnels: VXLAN in VXLAN, VXLAN in Geneve...), the same policy at each level, up to
   `MAX_TUNNELS` tunnels; a deeper one is `tunnel_depth`. The flow's tunnel is the innermost
   (`ttype`, `vni`, `o*`: the VTEPs that carried it); the ones around it are `x1*` (the next
   outer) and `x2*` (the one around that).
4. A packet that is not UDP to a tunnel port is its own flow when the policy takes plain
   traffic (capture files, `--wire-interface`), else `not_tunnel` (the VXLAN underlay).
5. the flow's transport: TCP (RFC 9293), UDP, ICMP / ICMPv6 (8-byte header); other IP
   protocols keep ports 0. ICMPv6 Neighbor Discovery and MLD messages (`ICMP6_LINK_CONTROL`)
   are `link_control`: link housekeeping, not flows.

`truncated`: a header the policy needs is cut by the capture length. `malformed`: a header
holds an impossible value (IPv4 IHL < 5, a version nibble that contradicts the EtherType, an IP
length shorter than the headers it must contain, TCP data offset < 5). Payload bytes and L3
bytes come from the flow's IP length fields, so snap-length-cut captures still count right.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEFAULT_PORTS = (4789, 8472)
GENEVE_PORT = 6081
VXLAN_GPE_PORT = 4790

# tunnel types (the `ttype` column; 0 = no tunnel) and their names in the record
NO_TUNNEL, TT_VXLAN, TT_GENEVE, TT_GPE = 0, 1, 2, 3
TUNNEL_NAMES = {TT_VXLAN: "vxlan", TT_GENEVE: "geneve", TT_GPE: "vxlan-gpe"}
# tunnels one packet may be wrapped in (the flow's own and two around it): the public captures
# go to three (zeek's vxlan-triple-v2.pcap); a fourth is counted as `tunnel_depth`
MAX_TUNNELS = 3

# status codes; 0 = decoded. FALLBACK is internal to the bulk decoder (never leaves it).
OK = 0
REASONS = ("truncated", "malformed", "non_ip", "not_tunnel", "tunnel_version", "vxlan_no_vni",
           "inner_non_ip", "fragment", "unsupported_linktype", "tunnel_depth", "link_control")
CODE = {name: i + 1 for i, name in enumerate(REASONS)}
FALLBACK = 255

# link types (tcpdump.org/linktypes.html) and how their frames start
LINKTYPE_ETHERNET, LINKTYPE_SLL, LINKTYPE_SLL2 = 1, 113, 276
LINKTYPES_RAW = (101, 12, 14, 228, 229)
LINKTYPES = (LINKTYPE_ETHERNET, LINKTYPE_SLL, LINKTYPE_SLL2, *LINKTYPES_RAW)
ETH_TEB = 0x6558  # Transparent Ethernet Bridging: Geneve's inner Ethernet


@dataclass(frozen=True)
class Policy:
    """Which UDP destination ports carry which tunnel, and whether a packet outside any tunnel
    is a flow (`plain`: files and `--wire-interface`) or a `not_tunnel` drop (the underlay)."""

    vxlan: tuple[int, ...] = DEFAULT_PORTS
    geneve: tuple[int, ...] = (GENEVE_PORT,)
    gpe: tuple[int, ...] = (VXLAN_GPE_PORT,)
    plain: bool = True

    def kinds(self) -> dict[int, int]:
        """port -> tunnel type"""
        out: dict[int, int] = {}
        for kind, ports in ((TT_VXLAN, self.vxlan), (TT_GENEVE, self.geneve), (TT_GPE, self.gpe)):
            out.update(dict.fromkeys(ports, kind))
        return out

    def table(self) -> bytes:
        """65,536 bytes: the tunnel type of each UDP port (what the native decoder reads)."""
        table = bytearray(65536)
        for port, kind in self.kinds().items():
            table[port] = kind
        return bytes(table)

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(sorted(self.kinds()))


def as_policy(ports: Policy | Iterable[int]) -> Policy:
    """A `Policy`, or VXLAN ports (Geneve and GPE on their IANA ports, plain traffic taken)."""
    return ports if isinstance(ports, Policy) else Policy(vxlan=tuple(ports))

ETH_VLAN = (0x8100, 0x88A8)
ETH_IP4, ETH_IP6 = 0x0800, 0x86DD
IP6_FRAGMENT = 44
IP6_EXTENSIONS = (0, 43, 44, 60, 51, 135, 139, 140)  # the bulk path hands these to scapy

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp", 47: "gre", 50: "esp"}
# ICMPv6 link-scope control (RFC 4861 Neighbor Discovery: router solicitation/advertisement,
# neighbor solicitation/advertisement, redirect; RFC 2710 / RFC 3810 MLD): IPv6's ARP, never
# routed (hop limit 255 / link-local). Not a conversation: counted as `link_control`, as ARP is
# counted as `non_ip`, so an advertisement answering a solicitation is no reversed edge.
ICMP6_LINK_CONTROL = (130, 131, 132, 133, 134, 135, 136, 137, 143)
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}


def proto_name(family: int, proto: int) -> str:
    if proto == ICMP and family == 4:
        return "icmp"
    if proto == ICMP6 and family == 6:
        return "icmpv6"
    return PROTO_NAMES.get(proto, "other")


def is_icmp(family: int, proto: int) -> bool:
    return (family == 4 and proto == ICMP) or (family == 6 and proto == ICMP6)


@dataclass
class Decoded:
    """One row per packet. Addresses are 128-bit split in hi/lo uint64 (IPv4: hi 0, lo the
    32-bit address). `icmp_type` is -1 for non-ICMP rows. Rows whose `status` is not 0 carry
    zeros in every other column (both decoders guarantee it, so rows compare exactly)."""

    status: np.ndarray      # uint8
    ts_us: np.ndarray       # int64, packet time in µs since the epoch
    ttype: np.ndarray       # uint8, tunnel type (0: none; then vni and the outer columns are 0)
    vni: np.ndarray         # uint32
    ofam: np.ndarray        # uint8, 4 or 6
    osrc_hi: np.ndarray     # uint64
    osrc_lo: np.ndarray
    odst_hi: np.ndarray
    odst_lo: np.ndarray
    odport: np.ndarray      # uint16
    fam: np.ndarray         # uint8
    src_hi: np.ndarray
    src_lo: np.ndarray
    dst_hi: np.ndarray
    dst_lo: np.ndarray
    proto: np.ndarray       # uint8
    sport: np.ndarray       # uint16
    dport: np.ndarray
    flags: np.ndarray       # uint8, TCP flag byte
    icmp_type: np.ndarray   # int16
    payload: np.ndarray     # int64, transport payload bytes
    l3len: np.ndarray       # int64, inner IP bytes with headers
    # nested tunnels (all 0 when the flow is in one tunnel or none): x1 the tunnel around the
    # flow's tunnel (its type, VNI, VTEPs, UDP port), x2 the one around x1
    x1type: np.ndarray      # uint8
    x1vni: np.ndarray       # uint32
    x1fam: np.ndarray       # uint8
    x1src_hi: np.ndarray    # uint64
    x1src_lo: np.ndarray
    x1dst_hi: np.ndarray
    x1dst_lo: np.ndarray
    x1dport: np.ndarray     # uint16
    x2type: np.ndarray
    x2vni: np.ndarray
    x2fam: np.ndarray
    x2src_hi: np.ndarray
    x2src_lo: np.ndarray
    x2dst_hi: np.ndarray
    x2dst_lo: np.ndarray
    x2dport: np.ndarray

    DTYPES = {"status": "u1", "ts_us": "i8", "ttype": "u1", "vni": "u4", "ofam": "u1", "osrc_hi": "u8",
              "osrc_lo": "u8", "odst_hi": "u8", "odst_lo": "u8", "odport": "u2", "fam": "u1",
              "src_hi": "u8", "src_lo": "u8", "dst_hi": "u8", "dst_lo": "u8", "proto": "u1",
              "sport": "u2", "dport": "u2", "flags": "u1", "icmp_type": "i2", "payload": "i8",
              "l3len": "i8",
              **{f"x{k}{name}": dtype for k in (1, 2) for name, dtype in (
                  ("type", "u1"), ("vni", "u4"), ("fam", "u1"), ("src_hi", "u8"),
                  ("src_lo", "u8"), ("dst_hi", "u8"), ("dst_lo", "u8"), ("dport", "u2"))}}

    @classmethod
    def empty(cls, n: int) -> Decoded:
        import numpy as np

        cols = {f.name: np.zeros(n, dtype=cls.DTYPES[f.name]) for f in fields(cls)}
        cols["icmp_type"][:] = -1
        return cls(**cols)

    @classmethod
    def native_columns(cls) -> str:
        """The columns the native decoder writes, as ewvxlan.h's EW_COLUMNS names them."""
        return ",".join(f"{f.name}:{cls.DTYPES[f.name]}" for f in fields(cls) if f.name != "ts_us")

    def __len__(self) -> int:
        return len(self.status)

    def columns(self) -> list[str]:
        return [f.name for f in fields(self)]

    def set_row(self, i: int, row: dict[str, int]) -> None:
        for name, value in row.items():
            getattr(self, name)[i] = value

    def clear_failed(self) -> None:
        """Zero every column of rows that did not decode (keeps `status` and `ts_us`)."""
        bad = self.status != OK
        if not bad.any():
            return
        for name in self.columns():
            if name in ("status", "ts_us"):
                continue
            getattr(self, name)[bad] = -1 if name == "icmp_type" else 0

    def take(self, idx: np.ndarray) -> Decoded:
        return Decoded(**{name: getattr(self, name)[idx] for name in self.columns()})


def outer_key(t1: int, v1: int, t2: int, v2: int) -> int:
    """The nested tunnels around a flow's own as one exact key (type and VNI of each):
    the flow table keeps flows in different outer tunnels apart (`xkey`, uint64)."""
    return (t1 << 24 | v1) | (t2 << 24 | v2) << 26


def split128(value: int) -> tuple[int, int]:
    return value >> 64, value & 0xFFFFFFFFFFFFFFFF


def join128(hi: int, lo: int) -> int:
    return (hi << 64) | lo
