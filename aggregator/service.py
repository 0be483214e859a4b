"""The dialled Service address of a connection (issue 16): which of its observers' to keep.

Stage: correlation (both correlators: aggregator/correlate.py and the C core through
aggregator/correlate_input.py). In: a record's `nat` chain (eastwest.record.dialled_of: the
first DNAT's original, a ClusterIP and port). Out: the connection's `service_ip`,
`service_port`.

Observers that know the dialled address agree on it (the client's host and a server on the same
host read the same conntrack entry; a NodePort's middle host sees what the client dialled). Should
two ever differ, the connection keeps the one of lowest `rank`, a fixed order of (ip, port) pairs
that both correlators compute the same way, so the result never depends on which record arrived
first.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache


@lru_cache(maxsize=65536)  # a cluster has few Services: their addresses repeat in every batch
def rank(ip: str, port: int) -> int:
    """A fixed total order of dialled addresses: 63 bits of BLAKE2b of "ip port"."""
    digest = hashlib.blake2b(f"{ip} {port}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def wins(ip: str, port: int, cur_ip: str | None, cur_port: int | None) -> bool:
    """Whether (ip, port) replaces the connection's current dialled address."""
    return cur_ip is None or rank(ip, port) < rank(cur_ip, cur_port or 0)
