"""The kernel side's view of one connection, as plain Python, and the interface to fetch it.

Stage: between the BPF maps / ring buffer (collector/probes/kernel.py) and record building
(collector/probes/records.py).
In: nothing (definitions).  Out: `ConnState`, one socket's counters and identity as the BPF
program keeps them (`struct conn_t` in socket.bpf.c), and `KernelSide`, the protocol the
loader implements and the unit tests fake.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol

ROLE_CLIENT, ROLE_SERVER = 1, 2
PHASE_CONNECTING, PHASE_ESTABLISHED = 1, 2
OWNER_NONE, OWNER_LISTENER, OWNER_CONTEXT = 0, 1, 2
TCP_SYN_SENT = 2  # include/net/tcp_states.h
AF_INET, AF_INET6 = 2, 10
ECONNREFUSED = 111

# indexes of the `stats` per-CPU array in socket.bpf.c
STAT_NAMES = ("close_deferred", "conn_map_full", "listen_map_full", "deferred_lost", "opened",
              "closed", "close_overflowed", "udp_no_peer", "udp_bad_addr", "udp_map_full",
              "udp_mmsg_over", "udp_opened")


class ConnState(NamedTuple):
    """One socket's entry of the `conns` map (or the copy a close event carries).

    A named tuple: thousands are built per second by the bulk decoder
    (collector/probes/decode.py) straight from the unpacked bytes, and record building
    unpacks them into locals instead of reading 28 attributes one by one. `comm` is last so
    the decoder can add it after the numeric fields."""

    sk: int
    start_ns: int
    role: int
    phase: int
    family: int
    saddr: bytes  # network order as the tracepoint stored them: 4 or 16 bytes for AF_INET
    daddr: bytes  # (the first 4 count), 16 for AF_INET6
    sport: int  # host order
    dport: int
    netns: int
    end_ns: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    rtt_sum_us: int = 0
    rtt_count: int = 0
    rtt_min_us: int = 0
    rtt_max_us: int = 0
    retransmits: int = 0
    resets_sent: int = 0
    resets_recv: int = 0
    pid: int = 0
    cgroup_id: int = 0
    owner: int = OWNER_NONE
    sk_err: int = 0
    close_oldstate: int = 0
    tcp_closed: bool = False
    deferred: bool = False
    comm: str = ""


class KernelSide(Protocol):
    """What the probe source needs from the kernel; `kernel.BccKernel` or a test fake."""

    def poll(self, timeout_s: float) -> list[ConnState]:
        """Close events that arrived within `timeout_s` (final counters), in arrival order, and
        the final states the kernel had to park elsewhere because the ring buffer was full."""

    def live(self) -> Iterable[ConnState]:
        """A batch read of every entry of the connection map (may be decoded lazily, as it is
        iterated, so that 100,000 states are not all in memory at once)."""

    def forget(self, states: list[ConnState]) -> None:
        """Delete these (deferred) entries from the connection map after their final record."""

    def stats(self) -> dict[str, int]:
        """Cumulative counters of the `stats` array, by name (STAT_NAMES)."""

    def close(self) -> None: ...
