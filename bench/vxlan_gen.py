"""Synthetic wire capture generator for bench/bench_vxlan.py (and its truth).

`generate(path, packets, flows, vteps, kind=...)` writes a pcap of `packets` packets carrying
`flows` inner flows (Ethernet/IPv4 or IPv6/TCP or UDP, one in five IPv6) spread over `vteps`
VTEPs and 4 VNIs, 10 µs apart, and returns the truth per flow: client, server, tunnel type, VNI,
VTEPs, packets and payload bytes per direction. `kind` is how the flows are carried:
- "vxlan" (default): outer Ethernet/IPv4/UDP 4789/VXLAN (RFC 7348) around the inner frame;
- "geneve": outer Ethernet/IPv4/UDP 6081/Geneve (RFC 8926, protocol 0x6558 = Ethernet) with one
  8-byte option (class 0x0102 type 0x80, 4 bytes of data: the metadata option OVN puts on every
  packet), so the decoder's option skipping is on the measured path;
- "plain": the inner frame itself, untunnelled (the truth's VNI, VTEPs and type are None).
The same seed gives the same flows, sizes and packet order for every kind: the three captures
differ only in the encapsulation. Frames are built once per flow and direction with struct (no
scapy per packet), so a million packets take a few seconds.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass

KINDS = ("vxlan", "geneve", "plain")
VXLAN_PORT, GENEVE_PORT = 4789, 6081


def _csum(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


def _ip4(src: int, dst: int, proto: int, payload_len: int) -> bytes:
    h = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto, 0, src, dst)
    return h[:10] + struct.pack("!H", _csum(h)) + h[12:]


@dataclass
class Flow:
    proto: str
    client: tuple[str, int]
    server: tuple[str, int]
    vni: int | None
    vteps: tuple[str, str] | None
    sizes: tuple[int, int]
    packets: list[int]
    payload: list[int]
    kind: str = "vxlan"  # "vxlan", "geneve" or "plain" (then vni and vteps are None)


def _addr6(i: int) -> bytes:
    return bytes.fromhex("fd000000000000000000000000") + i.to_bytes(3, "big")


def _frame(flow: Flow, c2s: bool, fam6: bool, cip: bytes, sip: bytes) -> bytes:
    (_, cport), (_, sport) = flow.client, flow.server
    src, dst, sp, dp = (cip, sip, cport, sport) if c2s else (sip, cip, sport, cport)
    size = flow.sizes[0 if c2s else 1]
    body = b"\x00" * size
    if flow.proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sp, dp, 1, 1, 0x50, 0x18, 65535, 0, 0) + body
        proto = 6
    else:
        l4 = struct.pack("!HHHH", sp, dp, 8 + size, 0) + body
        proto = 17
    if fam6:
        ip = struct.pack("!IHBB", 0x60000000, len(l4), proto, 64) + src + dst + l4
        et = 0x86DD
    else:
        ip = _ip4(int.from_bytes(src, "big"), int.from_bytes(dst, "big"), proto, len(l4)) + l4
        et = 0x0800
    inner = b"\x0a" * 6 + b"\x0b" * 6 + struct.pack("!H", et) + ip
    if flow.kind == "plain":
        return inner
    assert flow.vteps is not None and flow.vni is not None
    vs, vd = flow.vteps if c2s else flow.vteps[::-1]
    if flow.kind == "geneve":
        # version 0, option length 2 words; O=C=0; protocol Ethernet; VNI; one option
        option = struct.pack("!HBB", 0x0102, 0x80, 1) + struct.pack("!I", flow.vni)
        tun = struct.pack("!BBHI", 2, 0, 0x6558, flow.vni << 8) + option + inner
        port = GENEVE_PORT
    else:
        tun = struct.pack("!II", 0x08000000, flow.vni << 8) + inner
        port = VXLAN_PORT
    udp = struct.pack("!HHHH", 49152 + (cport % 16000), port, 8 + len(tun), 0) + tun
    ipo = _ip4(_v4(vs), _v4(vd), 17, len(udp)) + udp
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ipo


def _v4(text: str) -> int:
    return int.from_bytes(bytes(int(x) for x in text.split(".")), "big")


def generate(path: str, packets: int = 1_000_000, flows: int = 2000, vteps: int = 8,
             seed: int = 7, kind: str = "vxlan") -> list[Flow]:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    rnd = random.Random(seed)
    hosts = [f"10.213.0.{i + 1}" for i in range(vteps)]
    table: list[tuple[Flow, bytes, bytes]] = []
    for i in range(flows):
        fam6 = i % 5 == 0
        a, b = rnd.sample(range(vteps), 2)
        cport, sport = 32768 + i, rnd.choice([80, 443, 5432, 6379, 8080, 9000])
        if fam6:
            cip, sip = _addr6(2 * i), _addr6(2 * i + 1)
            ctext, stext = str(ipaddress.IPv6Address(cip)), str(ipaddress.IPv6Address(sip))
        else:
            cip, sip = bytes([10, 244, a, i % 250 + 1]), bytes([10, 245, b, (i // 250) + 1])
            ctext, stext = ".".join(map(str, cip)), ".".join(map(str, sip))
        proto = "tcp" if i % 3 else "udp"
        plain = kind == "plain"
        flow = Flow(proto, (ctext, cport), (stext, sport), None if plain else 100 + i % 4,
                    None if plain else (hosts[a], hosts[b]),
                    (rnd.randint(0, 200), rnd.randint(0, 1200)), [0, 0], [0, 0], kind)
        table.append((flow, _frame(flow, True, fam6, cip, sip), _frame(flow, False, fam6, cip, sip)))
    rec = struct.Struct("<IIII")
    t0 = 1_700_000_000 * 1_000_000
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        chunk: list[bytes] = []
        for n in range(packets):
            flow, c2s_frame, s2c_frame = table[rnd.randrange(flows)]
            d = 0 if rnd.random() < 0.5 else 1
            frame = c2s_frame if d == 0 else s2c_frame
            flow.packets[d] += 1
            flow.payload[d] += flow.sizes[d]
            t = t0 + n * 10
            chunk.append(rec.pack(t // 1_000_000, t % 1_000_000, len(frame), len(frame)) + frame)
            if len(chunk) >= 65536:
                out.write(b"".join(chunk))
                chunk = []
        out.write(b"".join(chunk))
    return [f for f, _, _ in table if f.packets[0] + f.packets[1]]
