"""Kernel struct offsets and raw tracepoint prototypes, read from the running kernel's BTF.

Stage: start-up of the socket probes (and `eastwest collector --check`).
In: the BTF blob of the running kernel (`/sys/kernel/btf/vmlinux`).
Out: byte offsets of the few struct fields the BPF program reads (`KernelOffsets`), passed to
the compiler as constants, and the parameter types of raw tracepoints (to prove that `args[0]`
really is the `struct sock *` before the program relies on it).

Why our own reader: the kernel headers on these machines are the nearest Debian version, not
the running kernel's, so their struct layouts are wrong. BTF describes the running kernel.
Format: Documentation/bpf/btf.rst (struct btf_header, struct btf_type and the per-kind data
that follows each type); include/uapi/linux/btf.h for the kind numbers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from eastwest.errors import CapabilityError

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19
_MODIFIERS = {_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG}
# bytes of kind-specific data after the 12-byte btf_type, per kind: (fixed, per vlen item)
_EXTRA = {_INT: (4, 0), _ARRAY: (12, 0), _STRUCT: (0, 12), _UNION: (0, 12), _ENUM: (0, 8),
          _FUNC_PROTO: (0, 8), _VAR: (4, 0), _DATASEC: (0, 12), _DECL_TAG: (4, 0),
          _ENUM64: (0, 12)}


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    kind_flag: bool
    members: tuple[tuple[str, int, int], ...]  # (name, type id, bit offset) for struct/union,
    # (name, type id, 0) for func_proto params


class Btf:
    """A BTF blob indexed for the few queries the probes make: struct member offsets and
    function prototypes.

    Start-up cost matters (the collector reads vmlinux's ~130,000 types every start): the
    index (where each type starts, the names of structs, unions and typedefs) is built by one
    forward scan that goes only as far as the queries need, and a type's members are decoded
    only when a query reaches it. On 6.18 everything the probes ask for is in the first ~40,000
    types. A malformed type section is reported when the scan reaches the bad spot."""

    _FIXED = [_EXTRA.get(k, (0, 0))[0] for k in range(32)]  # bytes after the 12-byte header:
    _PER = [_EXTRA.get(k, (0, 0))[1] for k in range(32)]  # fixed + per item * vlen, per kind

    def __init__(self, blob: bytes, source: str = "btf") -> None:
        self.source = source
        if len(blob) < 24:
            raise CapabilityError(f"{source}: too short to be BTF ({len(blob)} bytes)")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != 0xEB9F:
            raise CapabilityError(f"{source}: bad BTF magic {magic:#x} (expected 0xeb9f)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._strings = blob[hdr_len + str_off: hdr_len + str_off + str_len]
        self._data = blob[hdr_len + type_off: hdr_len + type_off + type_len]
        self._starts: list[int] = [-1]  # type id -> offset in _data; id 0 is void
        self._scanned = 0  # bytes of _data indexed so far
        self._parsed: dict[int, _Type] = {}
        self._by_name: dict[tuple[int, str], int] = {}

    @classmethod
    def from_file(cls, path: Path = VMLINUX) -> Btf:
        try:
            return cls(path.read_bytes(), str(path))
        except OSError as exc:
            raise CapabilityError(f"cannot read kernel BTF {path}: {exc.strerror}") from exc

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode()

    def _scan(self, until_id: int = 1 << 62, until_key: tuple[int, str] | None = None) -> None:
        """Index further, until type `until_id` is indexed, `until_key` is named, or the end."""
        data, starts, by_name = self._data, self._starts, self._by_name
        pos, n = self._scanned, len(data)
        unpack, fixed, per = struct.unpack_from, self._FIXED, self._PER
        named = (_STRUCT, _UNION, _TYPEDEF)
        while pos + 12 <= n and len(starts) <= until_id:
            name_off, info = unpack("<II", data, pos)
            kind = (info >> 24) & 0x1F
            starts.append(pos)
            pos += 12 + fixed[kind] + per[kind] * (info & 0xFFFF)
            if name_off and kind in named:
                key = (kind, self._str(name_off))
                if key not in by_name:
                    by_name[key] = len(starts) - 1
                    if key == until_key:
                        break
        self._scanned = pos
        if pos + 12 > n and pos != n:
            raise CapabilityError(f"{self.source}: type section ends inside a type "
                                  f"(at byte {pos} of {n})")

    def _named(self, kind: int, name: str) -> int | None:
        """The id of the first type of `kind` named `name` (scanning as far as needed)."""
        key = (kind, name)
        if key not in self._by_name and self._scanned < len(self._data):
            self._scan(until_key=key)
        return self._by_name.get(key)

    def _type(self, tid: int) -> _Type | None:
        """The type with id `tid`, decoded on first use (None for void)."""
        if tid == 0:
            return None
        t = self._parsed.get(tid)
        if t is not None:
            return t
        if tid >= len(self._starts):
            self._scan(until_id=tid)
        if not 0 < tid < len(self._starts):
            raise CapabilityError(f"{self.source}: type id {tid} out of range")
        data, pos = self._data, self._starts[tid]
        name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
        pos += 12
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
        members: tuple[tuple[str, int, int], ...] = ()
        if kind in (_STRUCT, _UNION):
            members = tuple(
                (self._str(m_name), m_type, m_off)
                for m_name, m_type, m_off in struct.iter_unpack("<III", data[pos:pos + 12 * vlen]))
        elif kind == _FUNC_PROTO:
            members = tuple((self._str(p_name), p_type, 0)
                            for p_name, p_type in struct.iter_unpack("<II", data[pos:pos + 8 * vlen]))
        t = _Type(kind, self._str(name_off) if name_off else "", size_or_type, kflag, members)
        self._parsed[tid] = t
        return t

    # -- queries ------------------------------------------------------------------------------
    def struct_id(self, name: str) -> int:
        tid = self._named(_STRUCT, name) or self._named(_UNION, name)
        if tid is None:
            tid = self._named(_TYPEDEF, name)
            if tid is not None:
                tid = self._strip(tid)
        if tid is None:
            raise CapabilityError(f"{self.source}: no struct {name!r} in the kernel's BTF")
        return tid

    def struct_size(self, name: str) -> int:
        """sizeof(struct name) in bytes."""
        t = self._type(self.struct_id(name))
        if t is None or t.kind not in (_STRUCT, _UNION):
            raise CapabilityError(f"{self.source}: {name!r} is not a struct")
        return t.size_or_type

    def _strip(self, tid: int) -> int:
        t = self._type(tid)
        while t is not None and t.kind in _MODIFIERS:
            tid = t.size_or_type
            t = self._type(tid)
        return tid

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path, e.g. `("sock", "__sk_common.skc_net.net")`.
        Members of anonymous structs and unions are found as if they were direct members."""
        tid, total_bits = self.struct_id(struct_name), 0
        for part in path.split("."):
            found = self._find_member(tid, part)
            if found is None:
                raise CapabilityError(f"{self.source}: struct {struct_name!r} has no member "
                                      f"{path!r} (stopped at {part!r})")
            tid, bits = found
            total_bits += bits
            tid = self._strip(tid)
        if total_bits % 8:
            raise CapabilityError(f"{self.source}: {struct_name}.{path} is a bitfield")
        return total_bits // 8

    def _find_member(self, tid: int, name: str) -> tuple[int, int] | None:
        t = self._type(self._strip(tid))
        if t is None or t.kind not in (_STRUCT, _UNION):
            return None
        for m_name, m_type, m_off in t.members:
            bits = m_off & 0xFFFFFF if t.kind_flag else m_off
            if m_name == name:
                return m_type, bits
            if not m_name:  # anonymous struct/union: search inside
                inner = self._find_member(m_type, name)
                if inner is not None:
                    return inner[0], bits + inner[1]
        return None

    def type_name(self, tid: int) -> str:
        """C-ish spelling of a type, enough to compare: `struct sock *`, `int`."""
        t = self._type(tid)
        if t is None:
            return "void"
        if t.kind == _PTR:
            return self.type_name(t.size_or_type) + " *"
        if t.kind in (_CONST, _VOLATILE, _RESTRICT, _TYPE_TAG):
            return self.type_name(t.size_or_type)
        prefix = {_STRUCT: "struct ", _UNION: "union ", _ENUM: "enum ", _ENUM64: "enum "}
        return prefix.get(t.kind, "") + t.name

    def raw_tracepoint_params(self, tracepoint: str) -> list[str] | None:
        """Parameter types of a raw tracepoint (`btf_trace_<name>`, minus the leading `void *`
        context), or None when the kernel has no such tracepoint."""
        tid = self._named(_TYPEDEF, f"btf_trace_{tracepoint}")
        if tid is None:
            return None
        ptr = self._type(tid)
        proto = self._type(ptr.size_or_type) if ptr else None  # typedef -> ptr
        proto = self._type(proto.size_or_type) if proto and proto.kind == _PTR else None
        if proto is None or proto.kind != _FUNC_PROTO:
            return None
        return [self.type_name(p_type) for _, p_type, _ in proto.members[1:]]


@dataclass(frozen=True)
class KernelOffsets:
    """Byte offsets the BPF program needs; all read from BTF, never from headers."""

    sk_net: int  # struct sock -> possible_net_t skc_net -> struct net *
    net_ns_inum: int  # struct net -> ns_common ns -> unsigned int inum
    sk_err: int  # struct sock -> int sk_err
    tcp_srtt_us: int  # struct tcp_sock -> u32 srtt_us (smoothed RTT << 3)

    def cflags(self) -> list[str]:
        return [f"-DOFF_SK_NET={self.sk_net}", f"-DOFF_NET_NS_INUM={self.net_ns_inum}",
                f"-DOFF_SK_ERR={self.sk_err}", f"-DOFF_TCP_SRTT_US={self.tcp_srtt_us}"]


def kernel_offsets(btf: Btf) -> KernelOffsets:
    return KernelOffsets(
        sk_net=btf.member_offset("sock", "__sk_common.skc_net.net"),
        net_ns_inum=btf.member_offset("net", "ns.inum"),
        sk_err=btf.member_offset("sock", "sk_err"),
        tcp_srtt_us=btf.member_offset("tcp_sock", "srtt_us"),
    )


@dataclass(frozen=True)
class UdpOffsets:
    """What the UDP half of the probes reads (collector/probes/udp.bpf.c), all from BTF: the
    socket's family, protocol, state, ports and addresses, its inode number (the flow key's
    guard against a freed and reused `struct sock`), and the user-space message headers of
    sendmsg/recvmsg/sendmmsg/recvmmsg (uapi layouts, read from BTF all the same)."""

    sk_family: int  # sock_common.skc_family (u16)
    sk_protocol: int  # sock.sk_protocol (u16)
    sk_state: int  # sock_common.skc_state (u8; TCP_ESTABLISHED = a connected UDP socket)
    sk_num: int  # sock_common.skc_num (u16, host order: the local port)
    sk_dport: int  # sock_common.skc_dport (be16)
    sk_daddr: int  # sock_common.skc_daddr (be32)
    sk_rcv_saddr: int  # sock_common.skc_rcv_saddr (be32)
    sk_v6_daddr: int  # sock_common.skc_v6_daddr (16 bytes)
    sk_v6_rcv_saddr: int  # sock_common.skc_v6_rcv_saddr (16 bytes)
    sk_socket: int  # sock.sk_socket (struct socket *)
    socket_inode: int  # from a struct socket to its inode's i_ino: socket_alloc layout
    msg_name: int  # user_msghdr.msg_name (void __user *)
    msg_namelen: int  # user_msghdr.msg_namelen (int)
    mmsg_hdr: int  # mmsghdr.msg_hdr (struct user_msghdr)
    mmsg_len: int  # mmsghdr.msg_len (unsigned int)
    mmsg_size: int  # sizeof(struct mmsghdr)

    def defines(self) -> dict[str, int]:
        return {f"OFF_{k.upper()}": v for k, v in self.__dict__.items()}


def udp_offsets(btf: Btf) -> UdpOffsets:
    common = "__sk_common."
    socket_inode = (btf.member_offset("socket_alloc", "vfs_inode")
                    - btf.member_offset("socket_alloc", "socket")
                    + btf.member_offset("inode", "i_ino"))
    return UdpOffsets(
        sk_family=btf.member_offset("sock", common + "skc_family"),
        sk_protocol=btf.member_offset("sock", "sk_protocol"),
        sk_state=btf.member_offset("sock", common + "skc_state"),
        sk_num=btf.member_offset("sock", common + "skc_num"),
        sk_dport=btf.member_offset("sock", common + "skc_dport"),
        sk_daddr=btf.member_offset("sock", common + "skc_daddr"),
        sk_rcv_saddr=btf.member_offset("sock", common + "skc_rcv_saddr"),
        sk_v6_daddr=btf.member_offset("sock", common + "skc_v6_daddr"),
        sk_v6_rcv_saddr=btf.member_offset("sock", common + "skc_v6_rcv_saddr"),
        sk_socket=btf.member_offset("sock", "sk_socket"),
        socket_inode=socket_inode,
        msg_name=btf.member_offset("user_msghdr", "msg_name"),
        msg_namelen=btf.member_offset("user_msghdr", "msg_namelen"),
        mmsg_hdr=btf.member_offset("mmsghdr", "msg_hdr"),
        mmsg_len=btf.member_offset("mmsghdr", "msg_len"),
        mmsg_size=btf.struct_size("mmsghdr"),
    )
