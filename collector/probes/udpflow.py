"""The kernel's view of one UDP flow, as plain Python, and the interface to read and end flows.

Stage: between the `udp_flows` BPF map (collector/probes/udp.bpf.c, read by
collector/probes/kernel.py) and the UDP flow tracker (collector/probes/udptrack.py).
In: the bytes of the map's keys and values (`struct udp_key_t`, `struct udp_flow_t`).
Out: `UdpState`, one flow's identity and counters; `UdpKernelSide`, the protocol the loader
implements and the unit tests fake.
"""

from __future__ import annotations

import ctypes as ct
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np

FIRST_SENT, FIRST_RECV = 1, 2  # udp.bpf.c: who moved the flow's first datagram


class UdpState(NamedTuple):
    """One entry of `udp_flows`. `key` is the raw map key, to end the flow with."""

    key: bytes
    sk: int
    ino: int  # the socket's inode number
    family: int  # of the peer address (AF_INET / AF_INET6)
    raddr: bytes  # peer address, network order (4 bytes used of 16 for AF_INET)
    rport: int
    start_ns: int
    last_ns: int
    bytes_sent: int
    bytes_recv: int
    dgrams_sent: int
    dgrams_recv: int
    cgroup_id: int
    pid: int
    netns: int
    lport: int
    lfamily: int  # of the socket
    laddr: bytes  # the socket's bound address (zeros: wildcard)
    first: int
    refused: bool
    connected: bool
    comm: str


class UdpStates(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[UdpState]: ...


class UdpKernelSide(Protocol):
    """What the UDP tracker needs from the kernel; `kernel.BccKernel` or a test fake."""

    def udp_flows(self) -> UdpStates:
        """A batch read of every entry of the UDP flow map: sized, and iterable more than once
        (it may decode the entries anew at each pass instead of keeping them all)."""

    def udp_end(self, states: list[UdpState]) -> list[UdpState]:
        """Take these flows out of the map (atomically: lookup and delete), with their counters
        as they were at that moment; flows already gone are left out."""


def decode(key_type: type[ct.Structure], leaf_type: type[ct.Structure], key: bytes,
           value: bytes) -> UdpState:
    """One map entry from its raw bytes, through the ctypes layouts bcc built from udp.bpf.c."""
    k: Any = key_type.from_buffer_copy(key)
    v: Any = leaf_type.from_buffer_copy(value)
    comm = bytes(v.comm).split(b"\0", 1)[0].decode("utf-8", "replace")
    return UdpState(
        key=bytes(key), sk=k.sk, ino=k.ino, family=k.family, raddr=bytes(k.raddr),
        rport=k.rport, start_ns=v.start_ns, last_ns=v.last_ns, bytes_sent=v.bytes_sent,
        bytes_recv=v.bytes_recv, dgrams_sent=v.dgrams_sent, dgrams_recv=v.dgrams_recv,
        cgroup_id=v.cgroup_id, pid=v.pid, netns=v.netns, lport=v.lport, lfamily=v.lfamily,
        laddr=bytes(v.laddr), first=v.first, refused=bool(v.refused),
        connected=bool(v.connected), comm=comm)


_KEY_FIELDS = ("sk", "ino", "family", "raddr", "rport")


def _dtype(ctype: Any, names: tuple[str, ...]) -> np.dtype:
    """A structured dtype of `names` at their ctypes offsets (u8[] as raw bytes, char[] as S)."""
    types = {f[0]: f[1] for f in ctype._fields_}
    formats = []
    for name in names:
        t = types[name]
        if issubclass(t, ct.Array):
            formats.append(f"S{ct.sizeof(t)}" if t._type_ is ct.c_char else f"V{ct.sizeof(t)}")
        else:
            formats.append(np.dtype(t).str)
    return np.dtype({"names": list(names), "formats": formats,
                     "offsets": [getattr(ctype, n).offset for n in names],
                     "itemsize": ct.sizeof(ctype)})


def decode_many(key_type: Any, leaf_type: Any, keys: bytes, values: bytes, first: int,
                last: int) -> list[UdpState]:
    """Entries first..last-1 of a batch read, decoded column by column with numpy (the same
    states as `decode` one by one, about twice as fast)."""
    ks = ct.sizeof(key_type)
    leaf_names = tuple(f for f in UdpState._fields if f not in _KEY_FIELDS and f != "key")
    kv = np.frombuffer(keys, dtype=_dtype(key_type, _KEY_FIELDS), count=last - first,
                       offset=first * ks)
    vv = np.frombuffer(values, dtype=_dtype(leaf_type, leaf_names), count=last - first,
                       offset=first * ct.sizeof(leaf_type))
    cols: dict[str, list[Any]] = {n: kv[n].tolist() for n in _KEY_FIELDS}
    cols.update({n: vv[n].tolist() for n in leaf_names})
    cols["key"] = [keys[i * ks:(i + 1) * ks] for i in range(first, last)]
    cols["refused"] = [bool(x) for x in cols["refused"]]
    cols["connected"] = [bool(x) for x in cols["connected"]]
    cols["comm"] = [c.split(b"\0", 1)[0].decode("utf-8", "replace") for c in cols["comm"]]
    return [UdpState(*row) for row in zip(*(cols[f] for f in UdpState._fields), strict=True)]
