"""VXLAN capture and decapsulation (issue #4): live underlay capture and capture files.

    pcapfile.py   pcap / pcapng -> packet index (one memory map, offsets)
    capture.py    live AF_PACKET capture with a kernel filter, per underlay interface
    bulk.py       vectorized decoder (numpy), the default
    reference.py  scapy decoder (`--decoder scapy`, and the bulk path's fallback)
    packets.py    the decoded columns and the decoding policy both decoders follow
    grouping.py   decoded packets -> flow session rows (numpy)
    rows.py       the session row layout both groupers write (here and ewvxlan_flows.c)
    flows.py      flow table: sessions, orientation, interim and final records
    native.py     the C helper (ewvxlan*.c): record walk, decoding, grouping; scan.py drives it
    source.py     `PcapSource`; `live.py`: `LiveVxlanSource`, `live_capture_wanted`

See docs/vxlan.md.
"""

from __future__ import annotations

from typing import Any

from collector.vxlan.source import PcapSource

__all__ = ["PcapSource", "LiveVxlanSource", "live_capture_wanted"]


def __getattr__(name: str) -> Any:  # the live path imports pyroute2 only when asked for
    if name in ("LiveVxlanSource", "live_capture_wanted"):
        from collector.vxlan import live

        return getattr(live, name)
    raise AttributeError(name)
