"""A capture socket's receive buffer, as large as asked even past the host's limit.

The collector's packet and netlink sockets queue what arrives while the collector is busy (a
neighbour taking the CPU, a burst): a full queue is a packet the kernel drops. `SO_RCVBUF` is
capped at `net.core.rmem_max` (212,992 bytes on a stock kernel: ~200 small packets once each
one's kernel overhead is counted); `SO_RCVBUFFORCE` (CAP_NET_ADMIN, which the collector runs
with) is not. socket(7).
"""

from __future__ import annotations

import socket

SO_RCVBUFFORCE = 33  # asm-generic/socket.h


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for `size` bytes (forced where allowed, else within rmem_max); what the kernel
    granted (it doubles the request for its own overhead: socket(7))."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
