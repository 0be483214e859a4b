"""NAT from conntrack: which backend a ClusterIP call reached, which client a masqueraded one came
from. The first half of issue 16 section 2 (the `nat` record field and correlation come next).

Stage: enrichment input, beside the socket probes. In: ctnetlink events (`NFNL_SUBSYS_CTNETLINK`
messages `IPCTNL_MSG_CT_NEW` / `IPCTNL_MSG_CT_DELETE` on the multicast groups
`NFNLGRP_CONNTRACK_NEW` and `NFNLGRP_CONNTRACK_DESTROY`) of one network namespace.  Out:
`Translation`s, the translated connections (status `IPS_SRC_NAT` or `IPS_DST_NAT`) kept in a
bounded `NatTable` that answers, for a client's record (client -> dialled address), the backend
(the reply tuple's source) and, for a server's record under SNAT (seen client -> server), the
original client (the original tuple's source).

Sources: include/uapi/linux/netfilter/nfnetlink_conntrack.h (message types, CTA_* attributes,
big-endian ports and status), include/uapi/linux/netfilter/nf_conntrack_common.h (IPS_* bits),
include/uapi/linux/netfilter/nfnetlink.h (nfgenmsg, groups).

Events, not lookups: measured in a `lab up --services` lab (3 hosts, ~270 ClusterIP calls per
4 s from one host), pyroute2's per-tuple `get` took ~0.6-0.7 ms a lookup and a full dump ~0.3 ms
an entry, while this event reader parsed ~9 us an event (every NEW and DESTROY of the namespace)
and saw exactly one NAT NEW event per ClusterIP call. A translation is known before the
connection's first record is built, and nothing is asked of the kernel per record. Once, at
start (after subscribing), one dump of the namespace's table (`dump`) adds the translations of
connections already open: a collector started, or restarted, on a busy node folds them too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from collector.rcvbuf import set_receive_buffer
from eastwest.errors import ConfigError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS = 1, 2, 3
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SRC_NAT, IPS_DST_NAT = 0x10, 0x20
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
NLMSG_HDR = struct.Struct("=IHHII")
NLA_HDR = struct.Struct("=HH")
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
CLONE_NEWNET = 0x40000000

Tuple = tuple[str, int, str, int]  # src ip, src port, dst ip, dst port


@dataclass(frozen=True)
class Translation:
    """One translated connection as conntrack holds it: `original` is what the client sent
    (client -> dialled), `reply` what the server answers (server -> the client it saw)."""

    protocol: str
    original: Tuple
    reply: Tuple

    @property
    def dnat(self) -> bool:
        return (self.original[2], self.original[3]) != (self.reply[0], self.reply[1])

    @property
    def snat(self) -> bool:
        return (self.original[0], self.original[1]) != (self.reply[2], self.reply[3])

    @property
    def backend(self) -> tuple[str, int]:
        return self.reply[0], self.reply[1]

    @property
    def seen_client(self) -> tuple[str, int]:
        """The client as the server saw it (the middle host's address under SNAT)."""
        return self.reply[2], self.reply[3]


def _attrs(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """type -> (payload offset, payload end) of the netlink attributes in buf[start:end]."""
    out: dict[int, tuple[int, int]] = {}
    p = start
    while p + 4 <= end:
        length, typ = NLA_HDR.unpack_from(buf, p)
        if length < 4 or p + length > end:
            break
        out[typ & NLA_TYPE_MASK] = (p + 4, p + length)
        p += (length + 3) & ~3
    return out


def _tuple(buf: bytes, start: int, end: int) -> tuple[int, Tuple] | None:
    a = _attrs(buf, start, end)
    if CTA_TUPLE_IP not in a or CTA_TUPLE_PROTO not in a:
        return None
    ip, pr = _attrs(buf, *a[CTA_TUPLE_IP]), _attrs(buf, *a[CTA_TUPLE_PROTO])
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip:
        fam = socket.AF_INET
        src, dst = ip[CTA_IP_V4_SRC], ip[CTA_IP_V4_DST]
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip:
        fam = socket.AF_INET6
        src, dst = ip[CTA_IP_V6_SRC], ip[CTA_IP_V6_DST]
    else:
        return None
    if CTA_PROTO_NUM not in pr or CTA_PROTO_SRC_PORT not in pr or CTA_PROTO_DST_PORT not in pr:
        return None  # ICMP and other portless protocols: nothing to resolve for flows
    proto = buf[pr[CTA_PROTO_NUM][0]]
    sport = struct.unpack_from(">H", buf, pr[CTA_PROTO_SRC_PORT][0])[0]
    dport = struct.unpack_from(">H", buf, pr[CTA_PROTO_DST_PORT][0])[0]
    return proto, (socket.inet_ntop(fam, buf[src[0]:src[1]]), sport,
                   socket.inet_ntop(fam, buf[dst[0]:dst[1]]), dport)


def _messages(buf: bytes) -> Iterator[tuple[int, int, int]]:
    """(offset, length, type) of each whole netlink message in a datagram; a truncated one
    ends it."""
    off = 0
    while off + NLMSG_HDR.size <= len(buf):
        length, typ, _flags, _seq, _pid = NLMSG_HDR.unpack_from(buf, off)
        if length < NLMSG_HDR.size or off + length > len(buf):
            return
        yield off, length, typ
        off += (length + 3) & ~3


def parse(buf: bytes) -> Iterator[tuple[str, Translation]]:
    """("new" | "destroy", Translation) for each translated connection in a netlink datagram;
    untranslated connections, other messages and truncated ones are passed over."""
    for off, length, typ in _messages(buf):
        subsys, msg = typ >> 8, typ & 0xFF
        if subsys == NFNL_SUBSYS_CTNETLINK and msg in (IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE):
            a = _attrs(buf, off + NLMSG_HDR.size + 4, off + length)  # after the nfgenmsg
            status = (struct.unpack_from(">I", buf, a[CTA_STATUS][0])[0]
                      if CTA_STATUS in a else 0)
            if status & (IPS_SRC_NAT | IPS_DST_NAT) and CTA_TUPLE_ORIG in a and CTA_TUPLE_REPLY in a:
                orig, reply = _tuple(buf, *a[CTA_TUPLE_ORIG]), _tuple(buf, *a[CTA_TUPLE_REPLY])
                if orig and reply and orig[0] in PROTOCOLS:
                    yield ("new" if msg == IPCTNL_MSG_CT_NEW else "destroy",
                           Translation(PROTOCOLS[orig[0]], orig[1], reply[1]))


class NatTable:
    """The translations of one namespace, by original and by reply tuple, at most `capacity`
    (the oldest go first, counted in `evicted`). A destroyed connection stays: its records
    are built after it ended; it goes when capacity needs its place."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self.evicted = 0
        self._by_orig: OrderedDict[tuple[str, Tuple], Translation] = OrderedDict()
        self._by_reply: dict[tuple[str, Tuple], Translation] = {}

    def __len__(self) -> int:
        return len(self._by_orig)

    def add(self, t: Translation) -> None:
        key = (t.protocol, t.original)
        old = self._by_orig.pop(key, None)
        if old is not None:
            self._by_reply.pop((old.protocol, old.reply), None)
        self._by_orig[key] = t
        self._by_reply[(t.protocol, t.reply)] = t
        while len(self._by_orig) > self.capacity:
            _, gone = self._by_orig.popitem(last=False)
            if self._by_reply.get((gone.protocol, gone.reply)) is gone:
                del self._by_reply[(gone.protocol, gone.reply)]
            self.evicted += 1

    def for_client(self, protocol: str, client: tuple[str, int],
                   dialled: tuple[str, int]) -> Translation | None:
        """The translation of a connection its client made to `dialled` (a ClusterIP, a NodePort)."""
        return self._by_orig.get((protocol, (*client, *dialled)))

    def for_server(self, protocol: str, server: tuple[str, int],
                   seen_client: tuple[str, int]) -> Translation | None:
        """The translation of a connection its server accepted from `seen_client`."""
        return self._by_reply.get((protocol, (*server, *seen_client)))


_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(netns: str | None, make: Callable[[], socket.socket] | None = None) -> socket.socket:
    """A ctnetlink socket made by `make` (default: subscribed to NEW and DESTROY), opened in
    `netns` (a name under /run/netns; None: this one). It stays in that namespace after this
    thread returns."""
    make = make or _subscribe
    if netns is None:
        return make()
    try:
        target = os.open(Path("/run/netns") / netns, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError("--netns", netns, f"cannot open /run/netns/{netns}: {exc.strerror}") from exc
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            return make()
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # never leave this thread elsewhere
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


def _request() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


def dump(netns: str | None = None) -> list[Translation]:
    """The translated connections conntrack holds now in `netns` (one IPCTNL_MSG_CT_GET dump of
    every family): what a collector started on a busy node needs for the connections that were
    open before it subscribed to events."""
    s = _in_netns(netns, _request)
    try:
        s.settimeout(10)
        s.send(NLMSG_HDR.pack(NLMSG_HDR.size + 4, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                              NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
               + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))
        out: list[Translation] = []
        while True:
            data = s.recv(1 << 20)
            out += [t for kind, t in parse(data) if kind == "new"]
            if _dump_done(data):
                return out
    finally:
        s.close()


def _dump_done(buf: bytes) -> bool:
    """True when a dump's datagram holds its end (NLMSG_DONE); an NLMSG_ERROR ends it with the
    error (an OSError naming it)."""
    for off, _length, typ in _messages(buf):
        if typ == NLMSG_DONE:
            return True
        if typ == NLMSG_ERROR:
            code = struct.unpack_from("=i", buf, off + NLMSG_HDR.size)[0]
            if code:
                raise OSError(-code, f"conntrack dump: {os.strerror(-code)}")
            return True
    return False


def _subscribe() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        set_receive_buffer(s, 8 << 20)
        s.bind((0, (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))))
    except OSError:
        s.close()
        raise
    return s


class ConntrackEvents:
    """Reads one namespace's conntrack events into a `NatTable`. `lost` counts overruns
    (ENOBUFS: the kernel dropped events for us; translations of those connections are
    unknown, and their records must say `incomplete: nat`)."""

    def __init__(self, netns: str | None = None, table: NatTable | None = None) -> None:
        self.netns = netns
        self.table = table if table is not None else NatTable()
        self.lost = 0
        self.events = 0
        self._sock = _in_netns(netns)
        self._sock.setblocking(False)
        # subscribed first, then the table as it is: a connection opened before the collector
        # started (or in between) is known either way; one seen twice is added twice, harmless
        for t in dump(netns):
            self.table.add(t)
        self.dumped = len(self.table)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> int:
        """Read every event waiting; returns how many translated connections were new."""
        added = 0
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return added
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise
            for kind, t in parse(data):
                self.events += 1
                if kind == "new":
                    self.table.add(t)
                    added += 1

    def close(self) -> None:
        self._sock.close()


def check(netns: str | None = None) -> str | None:
    """None when this process can read `netns`'s conntrack events, else why not (for --check)."""
    try:
        _in_netns(netns).close()
    except ConfigError as exc:
        return str(exc)
    except OSError as exc:
        return (f"cannot subscribe to conntrack events (NETLINK_NETFILTER): {exc.strerror or exc}"
                " (needs CAP_NET_ADMIN and nf_conntrack_netlink); NAT is not resolved: records "
                "say incomplete: nat")
    return None
