"""The collector's capture sockets get the receive buffer they ask for, past the host's
`net.core.rmem_max` (SO_RCVBUFFORCE: the collector runs as root / CAP_NET_ADMIN), so a busy
collector's backlog of packets is queued, not dropped by the kernel. Real sockets; root."""

from __future__ import annotations

import socket
from pathlib import Path

from collector.rcvbuf import set_receive_buffer
from tests.conftest import require_root


def test_a_buffer_past_rmem_max_is_granted_to_root():
    require_root()
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    want = 4 * rmem_max
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
        assert plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * rmem_max  # capped
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert set_receive_buffer(s, want) == 2 * want  # the kernel doubles it: socket(7)
