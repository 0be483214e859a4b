"""UDP workload for the socket probe lab tests, run inside lab namespaces (`ip netns exec`).

  serve --ip4 A --ip6 B    comm `ewu-srv`: echo servers on A and B, one port per syscall pair:
                           9101 recvfrom/sendto, 9102 recvmsg/sendmsg, 9103 recvmmsg/sendmmsg,
                           40001 recvfrom/sendto (a server on an ephemeral-range port);
                           each reply is the request plus 7 bytes; prints `ready`
  client --ip4 A --ip6 B   comm `ewu-cli`: for each family, each pair and connected or not, one
                           socket sends SIZES (one datagram each) with the pair's send call and
                           receives the replies with its receive call; two to a dead port (9109):
                           one connected (ECONNREFUSED), one unconnected (sendto, then no answer:
                           the kernel tells an unconnected socket nothing of the ICMP error);
                           one from port 5353 to 40001. One JSON truth line per socket, with
                           what the application really sent and received.

sendmmsg/recvmmsg go through libc with ctypes (Python has no binding for them).
"""

from __future__ import annotations

import ctypes as ct
import json
import select
import signal
import socket
import struct
import sys

SIZES = (0, 1, 57, 512, 1400)
EXTRA = 7  # reply = request + 7 bytes
PORTS = {"sendto": 9101, "sendmsg": 9102, "sendmmsg": 9103}
HIGH_SERVER_PORT, LOW_CLIENT_PORT, DEAD_PORT = 40001, 5353, 9109
MSG_DONTWAIT, MSG_WAITFORONE = 0x40, 0x10000
libc = ct.CDLL(None, use_errno=True)


class Iovec(ct.Structure):
    _fields_ = [("iov_base", ct.c_void_p), ("iov_len", ct.c_size_t)]


class Msghdr(ct.Structure):
    _fields_ = [("msg_name", ct.c_void_p), ("msg_namelen", ct.c_uint32),
                ("msg_iov", ct.POINTER(Iovec)), ("msg_iovlen", ct.c_size_t),
                ("msg_control", ct.c_void_p), ("msg_controllen", ct.c_size_t),
                ("msg_flags", ct.c_int)]


class Mmsghdr(ct.Structure):
    _fields_ = [("msg_hdr", Msghdr), ("msg_len", ct.c_uint)]


def set_comm(name: str) -> None:
    libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME


def sockaddr(family: int, ip: str, port: int) -> bytes:
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack(">H", port) + socket.inet_pton(family, ip) + bytes(8)
    return (struct.pack("=H", family) + struct.pack(">H", port) + bytes(4)
            + socket.inet_pton(family, ip) + bytes(4))


class Batch:
    """N mmsghdrs with their buffers (and name buffers), kept alive together."""

    def __init__(self, payloads: list[bytes], names: list[bytes | None]) -> None:
        n = len(payloads)
        self.bufs = [ct.create_string_buffer(p, max(len(p), 1)) for p in payloads]
        self.names = [ct.create_string_buffer(nm, len(nm)) if nm else None for nm in names]
        self.iovs = (Iovec * n)()
        self.msgs = (Mmsghdr * n)()
        for i in range(n):
            self.iovs[i].iov_base = ct.addressof(self.bufs[i])
            self.iovs[i].iov_len = len(payloads[i])
            h = self.msgs[i].msg_hdr
            h.msg_iov = ct.pointer(self.iovs[i])
            h.msg_iovlen = 1
            if self.names[i] is not None:
                h.msg_name = ct.addressof(self.names[i])
                h.msg_namelen = len(names[i] or b"")

    @classmethod
    def for_receiving(cls, n: int, size: int = 65536) -> Batch:
        return cls([bytes(size)] * n, [bytes(128)] * n)


def sendmmsg(fd: int, batch: Batch, n: int) -> int:
    sent = libc.sendmmsg(fd, batch.msgs, n, 0)
    if sent < 0:
        raise OSError(ct.get_errno(), "sendmmsg")
    return sent


def recvmmsg(fd: int, batch: Batch, first: int, n: int, flags: int) -> int:
    arr = ct.cast(ct.byref(batch.msgs, first * ct.sizeof(Mmsghdr)), ct.POINTER(Mmsghdr))
    got = libc.recvmmsg(fd, arr, n, flags, None)
    if got < 0:
        raise OSError(ct.get_errno(), "recvmmsg")
    return got


def serve(ip4: str, ip6: str) -> None:
    set_comm("ewu-srv")
    socks: dict[int, tuple[socket.socket, str]] = {}
    for fam, ip in ((socket.AF_INET, ip4), (socket.AF_INET6, ip6)):
        for mode, port in (*PORTS.items(), ("sendto", HIGH_SERVER_PORT)):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((ip, port))
            socks[s.fileno()] = (s, mode)
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select(list(socks), [], [])
        for fd in readable:
            s, mode = socks[fd]
            if mode == "sendto":
                data, addr = s.recvfrom(65536)
                s.sendto(data + b"r" * EXTRA, addr)
            elif mode == "sendmsg":
                data, _, _, addr = s.recvmsg(65536)
                s.sendmsg([data + b"r" * EXTRA], [], 0, addr)
            else:
                rx = Batch.for_receiving(16)
                got = recvmmsg(fd, rx, 0, 16, MSG_DONTWAIT)
                replies = [rx.bufs[i].raw[:rx.msgs[i].msg_len] + b"r" * EXTRA for i in range(got)]
                names = [rx.names[i].raw[:rx.msgs[i].msg_hdr.msg_namelen]  # type: ignore[union-attr]
                         for i in range(got)]
                tx = Batch(replies, names)
                done = 0
                while done < got:
                    arr = ct.cast(ct.byref(tx.msgs, done * ct.sizeof(Mmsghdr)), ct.POINTER(Mmsghdr))
                    n = libc.sendmmsg(fd, arr, got - done, 0)
                    if n <= 0:
                        raise OSError(ct.get_errno(), "sendmmsg")
                    done += n


def exchange(s: socket.socket, mode: str, connected: bool, fam: int, ip: str, port: int) -> dict:
    """Send SIZES with `mode`'s send call, receive the replies with its receive call."""
    dest = (ip, port)
    sent = recv = 0
    got_sizes: list[int] = []
    if mode == "sendto":
        for n in SIZES:
            sent += s.send(b"q" * n) if connected else s.sendto(b"q" * n, dest)
            data = s.recv(65536) if connected else s.recvfrom(65536)[0]
            got_sizes.append(len(data))
    elif mode == "sendmsg":
        for n in SIZES:
            sent += s.sendmsg([b"q" * n]) if connected else s.sendmsg([b"q" * n], [], 0, dest)
            got_sizes.append(len(s.recvmsg(65536)[0]))
    else:
        name = None if connected else sockaddr(fam, ip, port)
        tx = Batch([b"q" * n for n in SIZES], [name] * len(SIZES))
        done = 0
        while done < len(SIZES):
            arr = ct.cast(ct.byref(tx.msgs, done * ct.sizeof(Mmsghdr)), ct.POINTER(Mmsghdr))
            k = libc.sendmmsg(s.fileno(), arr, len(SIZES) - done, 0)
            if k <= 0:
                raise OSError(ct.get_errno(), "sendmmsg")
            done += k
        sent = sum(tx.msgs[i].msg_len for i in range(len(SIZES)))
        rx = Batch.for_receiving(len(SIZES))
        have = 0
        while have < len(SIZES):
            have += recvmmsg(s.fileno(), rx, have, len(SIZES) - have, MSG_WAITFORONE)
        got_sizes = [rx.msgs[i].msg_len for i in range(len(SIZES))]
    recv = sum(got_sizes)
    if sorted(got_sizes) != sorted(n + EXTRA for n in SIZES):
        raise SystemExit(f"{mode}: replies of {got_sizes}, expected each request + {EXTRA}")
    return {"dgrams_sent": len(SIZES), "bytes_sent": sent, "dgrams_recv": len(got_sizes),
            "bytes_recv": recv}


def client(ip4: str, ip6: str) -> None:
    set_comm("ewu-cli")
    signal.alarm(60)  # a lost datagram must fail the run, not hang it
    for fam, ip in ((socket.AF_INET, ip4), (socket.AF_INET6, ip6)):
        v = 4 if fam == socket.AF_INET else 6
        for mode, port in PORTS.items():
            for connected in (False, True):
                with socket.socket(fam, socket.SOCK_DGRAM) as s:
                    if connected:
                        s.connect((ip, port))
                    else:
                        s.bind(("0.0.0.0" if v == 4 else "::", 0))
                    truth = exchange(s, mode, connected, fam, ip, port)
                    truth.update(family=v, mode=mode, connected=connected,
                                 client_port=s.getsockname()[1], server_port=port,
                                 outcome="ok")
                print(json.dumps(truth), flush=True)
        with socket.socket(fam, socket.SOCK_DGRAM) as s:  # a dead port
            s.connect((ip, DEAD_PORT))
            s.send(b"d" * 33)
            try:
                s.recv(100)
                outcome = "answered"
            except ConnectionRefusedError:
                outcome = "refused"
            print(json.dumps({"family": v, "mode": "dead", "connected": True,
                              "client_port": s.getsockname()[1], "server_port": DEAD_PORT,
                              "dgrams_sent": 1, "bytes_sent": 33, "dgrams_recv": 0,
                              "bytes_recv": 0, "outcome": outcome}), flush=True)
        with socket.socket(fam, socket.SOCK_DGRAM) as s:  # a dead port, unconnected
            s.bind(("0.0.0.0" if v == 4 else "::", 0))
            s.sendto(b"u" * 33, (ip, DEAD_PORT))
            answered = bool(select.select([s], [], [], 0.5)[0])
            print(json.dumps({"family": v, "mode": "dead-unconnected", "connected": False,
                              "client_port": s.getsockname()[1], "server_port": DEAD_PORT,
                              "dgrams_sent": 1, "bytes_sent": 33, "dgrams_recv": 0,
                              "bytes_recv": 0,
                              "outcome": "answered" if answered else "refused"}), flush=True)
        with socket.socket(fam, socket.SOCK_DGRAM) as s:  # the client on a low port
            s.bind(("0.0.0.0" if v == 4 else "::", LOW_CLIENT_PORT))
            truth = exchange(s, "sendto", False, fam, ip, HIGH_SERVER_PORT)
            truth.update(family=v, mode="low-client", connected=False,
                         client_port=LOW_CLIENT_PORT, server_port=HIGH_SERVER_PORT,
                         outcome="ok")
            print(json.dumps(truth), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], dict(zip(sys.argv[2::2], sys.argv[3::2], strict=False))
    {"serve": serve, "client": client}[cmd](args["--ip4"], args["--ip6"])
