"""Decoded packets: the columns both VXLAN decoders produce, and the decoding policy they share.

Stage: between the decoders (`bulk.py`, vectorized numpy; `reference.py`, scapy per packet) and
the flow table (`flows.py`). In: nothing (definitions). Out: `Decoded`, one numpy column per
field, one row per packet, plus `status` (0 = decoded, else the drop reason's code). numpy is
imported only when a `Decoded` is made: the native file path (`scan.py`) never makes one.

The policy, applied in this order by both decoders (the differential test holds them to it):

1. outer Ethernet (14 bytes), 802.1Q / 802.1ad tags (4 bytes each), then IPv4 or IPv6
   (RFC 791 / RFC 8200; IPv6 Hop-by-Hop, Routing and Destination Options headers are skipped,
   a Fragment header is a `fragment`); anything else: `not_vxlan`.
2. UDP (RFC 768) to a VXLAN port (default 4789 and 8472): VXLAN (RFC 7348). UDP to 6081
   (Geneve, RFC 8926) or 4790 (VXLAN-GPE) is counted `unsupported_geneve` /
   `unsupported_vxlan_gpe`, never parsed. Other UDP or other protocols: `not_vxlan`.
3. VXLAN: the I flag (0x08) must be set (`vxlan_no_vni` otherwise); reserved bits are ignored
   as RFC 7348 section 5 says.
4. inner Ethernet, tags, IPv4 / IPv6; a non-IP inner frame (ARP...) is `inner_non_ip`.
5. TCP (RFC 9293), UDP, ICMP / ICMPv6 (8-byte header); other IP protocols keep ports 0.

Only Ethernet link types are decoded (`unsupported_linktype` otherwise).
`truncated`: a header the policy needs is cut by the capture length. `malformed`: a header
holds an impossible value (IPv4 IHL < 5, a version nibble that contradicts the EtherType, an IP
length shorter than the headers it must contain, TCP data offset < 5). Payload bytes and L3
bytes come from the inner IP length fields, so snap-length-cut captures still count right.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEFAULT_PORTS = (4789, 8472)
GENEVE_PORT = 6081
VXLAN_GPE_PORT = 4790

# status codes; 0 = decoded. FALLBACK is internal to the bulk decoder (never leaves it).
OK = 0
REASONS = ("truncated", "malformed", "not_vxlan", "unsupported_geneve", "unsupported_vxlan_gpe",
           "vxlan_no_vni", "inner_non_ip", "fragment", "unsupported_linktype")
CODE = {name: i + 1 for i, name in enumerate(REASONS)}
FALLBACK = 255

ETH_VLAN = (0x8100, 0x88A8)
ETH_IP4, ETH_IP6 = 0x0800, 0x86DD
IP6_FRAGMENT = 44
IP6_EXTENSIONS = (0, 43, 44, 60, 51, 135, 139, 140)  # the bulk path hands these to scapy

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp", 47: "gre", 50: "esp"}
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

    DTYPES = {"status": "u1", "ts_us": "i8", "vni": "u4", "ofam": "u1", "osrc_hi": "u8",
              "osrc_lo": "u8", "odst_hi": "u8", "odst_lo": "u8", "odport": "u2", "fam": "u1",
              "src_hi": "u8", "src_lo": "u8", "dst_hi": "u8", "dst_lo": "u8", "proto": "u1",
              "sport": "u2", "dport": "u2", "flags": "u1", "icmp_type": "i2", "payload": "i8",
              "l3len": "i8"}

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


def split128(value: int) -> tuple[int, int]:
    return value >> 64, value & 0xFFFFFFFFFFFFFFFF


def join128(hi: int, lo: int) -> int:
    return (hi << 64) | lo
