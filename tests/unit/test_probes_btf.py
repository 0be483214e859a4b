"""The BTF reader against a hand-built BTF blob (exact bytes, Documentation/bpf/btf.rst):
member offsets through anonymous unions and typedefs, raw tracepoint prototypes, clear errors."""

from __future__ import annotations

import struct

import pytest

from collector.probes.btf import Btf, KernelOffsets, kernel_offsets
from eastwest.errors import CapabilityError


class BlobBuilder:
    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, size_or_type: int, extra: bytes = b"") -> int:
        self.types += struct.pack("<III", self.s(name), (kind << 24) | vlen, size_or_type) + extra
        self.count += 1
        return self.count

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]], union=False) -> int:
        extra = b"".join(struct.pack("<III", self.s(m), t, bits) for m, t, bits in members)
        return self.add(5 if union else 4, name, len(members), size, extra)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types),
                          len(self.strings))
        return hdr + self.types + self.strings


def kernel_like() -> bytes:
    b = BlobBuilder()
    u32 = b.add(1, "unsigned int", 0, 4, struct.pack("<I", 32))
    fwd_net = b.add(7, "net", 0, 0)  # forward declaration, replaced below by the struct
    ptr_net = b.add(2, "", 0, fwd_net)
    possible = b.struct("", 8, [("net", ptr_net, 0)])
    possible_t = b.add(8, "possible_net_t", 0, possible)
    anon = b.struct("", 8, [("skc_hash", u32, 0), ("skc_u16hashes", u32, 0)], union=True)
    common = b.struct("sock_common", 136, [("skc_daddr", u32, 0), ("", anon, 64),
                                           ("skc_net", possible_t, 48 * 8)])
    sock = b.struct("sock", 800, [("__sk_common", common, 0), ("sk_err", u32, 284 * 8)])
    ns_common = b.struct("ns_common", 64, [("ns_type", u32, 0), ("inum", u32, 24 * 8)])
    b.struct("net", 4096, [("passive", u32, 0), ("ns", ns_common, 152 * 8)])
    b.struct("tcp_sock", 2400, [("srtt_us", u32, 1680 * 8)])
    ptr_sock = b.add(2, "", 0, sock)
    void_ptr = b.add(2, "", 0, 0)
    proto = b.add(13, "", 3, 0, struct.pack("<IIIIII", 0, void_ptr, 0, ptr_sock, 0, u32))
    ptr_proto = b.add(2, "", 0, proto)
    b.add(8, "btf_trace_sock_send_length", 0, ptr_proto)
    proto2 = b.add(13, "", 2, 0, struct.pack("<IIII", 0, void_ptr, 0, u32))
    b.add(8, "btf_trace_not_a_sock", 0, b.add(2, "", 0, proto2))
    return b.blob()


def test_offsets_through_anonymous_members_and_typedefs():
    btf = Btf(kernel_like())
    assert btf.member_offset("sock", "__sk_common.skc_net.net") == 48
    assert btf.member_offset("sock_common", "skc_u16hashes") == 8
    assert kernel_offsets(btf) == KernelOffsets(sk_net=48, net_ns_inum=176, sk_err=284,
                                                tcp_srtt_us=1680)
    assert "-DOFF_NET_NS_INUM=176" in kernel_offsets(btf).cflags()


def test_raw_tracepoint_prototypes():
    btf = Btf(kernel_like())
    assert btf.raw_tracepoint_params("sock_send_length") == ["struct sock *", "unsigned int"]
    assert btf.raw_tracepoint_params("not_a_sock") == ["unsigned int"]
    assert btf.raw_tracepoint_params("missing") is None


def test_errors_name_the_struct_and_member():
    btf = Btf(kernel_like())
    with pytest.raises(CapabilityError, match="'sock' has no member 'sk_nope'"):
        btf.member_offset("sock", "sk_nope")
    with pytest.raises(CapabilityError, match="no struct 'inet_sock'"):
        btf.member_offset("inet_sock", "x")
    with pytest.raises(CapabilityError, match="bad BTF magic"):
        Btf(b"\0" * 32)


def test_a_type_section_that_ends_inside_a_type_is_refused_when_the_index_reaches_it():
    blob = kernel_like()
    hdr = list(struct.unpack_from("<HBBIIIII", blob, 0))
    hdr[5] -= 4  # type_len: the section ends 4 bytes before the end of its last type
    btf = Btf(struct.pack("<HBBIIIII", *hdr) + blob[24:])
    assert btf.member_offset("sock", "sk_err") == 284  # indexed before the broken end
    with pytest.raises(CapabilityError, match="ends inside a type"):
        btf.member_offset("inet_sock", "x")  # looked for to the end
