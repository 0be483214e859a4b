"""The wire view (issues #4, #18): live capture and capture files -> flow records; VXLAN,
Geneve and VXLAN-GPE decapsulated, plain traffic taken as it is (files, `--wire-interface`).
The package keeps its first name; the drop stage is still called "vxlan".

    pcapfile.py   pcap / pcapng -> packet index (one memory map, offsets)
    capture.py    live AF_PACKET capture (kernel filter on the underlay), per interface
    bulk.py       the default decoder: native (ewvxlan_decode.c) or vectorized (numpy)
    reference.py  scapy decoder (`--decoder scapy`, and the numpy path's fallback)
    packets.py    the decoded columns, the decoding policy every decoder follows (`Policy`:
                  tunnel ports, plain traffic or not), the drop reasons
    grouping.py   decoded packets -> flow session rows (numpy)
    rows.py       the session row layout both groupers write (here and ewvxlan_flows.c)
    flows.py      flow table: sessions, orientation, interim and final records
    native.py     the C helper (ewvxlan*.c): record walk, decoding, grouping; scan.py drives it
    source.py     `PcapSource`; `live.py`: `LiveVxlanSource` (underlay, or `wire=True`),
                  `live_capture_wanted`

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
