"""Who is the client of a flow when no handshake says so: the port rule every observer shares.

Stage: used by the wire view (collector/vxlan/flows.py, for UDP and for TCP seen mid-way) and by
the socket probes' UDP flows (collector/probes/udprecords.py) when the observer cannot know who
sent the first datagram. One rule, so every observer orients a flow alike (docs/vxlan.md,
"Orientation rule", rules 4 to 6).
In: the two ends' ports. Out: which end is the client, or None when the ports cannot tell.
"""

from __future__ import annotations

EPHEMERAL = (32768, 60999)  # Linux's default net.ipv4.ip_local_port_range


def client_by_ports(pa: int, pb: int) -> bool | None:
    """True when the end with port `pa` is the client, False when `pb`'s is; None for equal
    ports (the caller decides by its own first packet, rule 7)."""
    if pa == pb:
        return None
    if (pa < 1024) != (pb < 1024):  # a well-known port is the server's
        return pb < 1024
    ea, eb = EPHEMERAL[0] <= pa <= EPHEMERAL[1], EPHEMERAL[0] <= pb <= EPHEMERAL[1]
    if ea != eb:  # the side outside the ephemeral range is the server
        return ea
    return pa > pb  # the lower port is the server's
