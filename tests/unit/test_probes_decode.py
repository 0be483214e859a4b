"""The bulk decoder of kernel connection records against field-by-field ctypes reading of the
same bytes (a differential test): close events, ring buffer records with their headers, batch
map entries; and its refusal of a layout that lacks a field."""

from __future__ import annotations

import ctypes as ct
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.probes.conn import ConnState
from collector.probes.decode import RING_HEADER, ConnDecoder
from eastwest.errors import CapabilityError


class Conn(ct.Structure):
    """struct conn_t of socket.bpf.c, as bcc describes it (the same ctypes types)."""

    _fields_ = [("start_ns", ct.c_ulong), ("end_ns", ct.c_ulong), ("bytes_sent", ct.c_ulong),
                ("bytes_recv", ct.c_ulong), ("rtt_sum_us", ct.c_ulong), ("cgroup_id", ct.c_ulong),
                ("rtt_count", ct.c_uint), ("rtt_min_us", ct.c_uint), ("rtt_max_us", ct.c_uint),
                ("retransmits", ct.c_uint), ("resets_sent", ct.c_uint), ("resets_recv", ct.c_uint),
                ("pid", ct.c_uint), ("netns", ct.c_uint), ("sk_err", ct.c_int),
                ("sport", ct.c_ushort), ("dport", ct.c_ushort), ("family", ct.c_ushort),
                ("role", ct.c_ubyte), ("phase", ct.c_ubyte), ("owner", ct.c_ubyte),
                ("close_oldstate", ct.c_ubyte), ("tcp_closed", ct.c_ubyte),
                ("deferred", ct.c_ubyte), ("saddr", ct.c_ubyte * 16), ("daddr", ct.c_ubyte * 16),
                ("comm", ct.c_char * 16)]


class Event(ct.Structure):
    _fields_ = [("sk", ct.c_uint64), ("conn", Conn)]


def by_fields(sk: int, c: Conn) -> ConnState:
    """The reference: every field read through ctypes, as the loader did before."""
    return ConnState(
        sk=sk, start_ns=c.start_ns, role=c.role, phase=c.phase, family=c.family,
        saddr=bytes(c.saddr), daddr=bytes(c.daddr), sport=c.sport, dport=c.dport, netns=c.netns,
        end_ns=c.end_ns, bytes_sent=c.bytes_sent, bytes_recv=c.bytes_recv,
        rtt_sum_us=c.rtt_sum_us, rtt_count=c.rtt_count, rtt_min_us=c.rtt_min_us,
        rtt_max_us=c.rtt_max_us, retransmits=c.retransmits, resets_sent=c.resets_sent,
        resets_recv=c.resets_recv, pid=c.pid, cgroup_id=c.cgroup_id, owner=c.owner,
        sk_err=c.sk_err, close_oldstate=c.close_oldstate, tcp_closed=bool(c.tcp_closed),
        deferred=bool(c.deferred), comm=bytes(c.comm).split(b"\0", 1)[0].decode())


u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
conn_values = st.fixed_dictionaries({
    "start_ns": u64, "end_ns": u64, "bytes_sent": u64, "bytes_recv": u64, "rtt_sum_us": u64,
    "cgroup_id": u64, "rtt_count": u32, "rtt_min_us": u32, "rtt_max_us": u32,
    "retransmits": u32, "resets_sent": u32, "resets_recv": u32, "pid": u32, "netns": u32,
    "sk_err": st.integers(-2**31, 2**31 - 1), "sport": st.integers(0, 65535),
    "dport": st.integers(0, 65535), "family": st.sampled_from([2, 10]),
    "role": st.integers(0, 255), "phase": st.integers(0, 255), "owner": st.integers(0, 255),
    "close_oldstate": st.integers(0, 255), "tcp_closed": st.integers(0, 1),
    "deferred": st.integers(0, 1), "saddr": st.binary(min_size=16, max_size=16),
    "daddr": st.binary(min_size=16, max_size=16),
    "comm": st.sampled_from([b"curl", b"ew-api", b"python3", b"x" * 15, "ü-app".encode()]),
})


def make(sk: int, values: dict) -> Event:
    e = Event()
    e.sk = sk
    for name, value in values.items():
        if name in ("saddr", "daddr"):
            ct.memmove(getattr(e.conn, name), value, 16)
        else:
            setattr(e.conn, name, value)
    return e


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(u64, conn_values), min_size=1, max_size=20))
def test_bulk_decoding_equals_field_by_field_reading(items):
    events = [make(sk, values) for sk, values in items]
    want = [by_fields(e.sk, e.conn) for e in events]
    dec = ConnDecoder(Conn, Event)
    assert dec.events(b"".join(bytes(e) for e in events)) == want
    stride = dec.ring_record_size
    ring = b"".join(struct.pack("=II", ct.sizeof(Event), 0) + bytes(e)
                    + bytes(stride - RING_HEADER - ct.sizeof(Event)) for e in events)
    assert dec.ring_records(ring) == want
    keys = [e.sk for e in events]
    assert dec.entries(keys, b"".join(bytes(e.conn) for e in events)) == want


def test_decoded_states_are_conn_states_with_python_types():
    e = make(7, {"sport": 40001, "dport": 80, "family": 2, "tcp_closed": 1, "comm": b"curl"})
    (s,) = ConnDecoder(Conn, Event).events(bytes(e))
    assert isinstance(s, ConnState)
    assert (s.sk, s.sport, s.dport, s.tcp_closed, s.deferred, s.comm) == (7, 40001, 80, True,
                                                                          False, "curl")
    assert type(s.saddr) is bytes and len(s.saddr) == 16


def test_a_partial_buffer_is_refused_with_its_size():
    dec = ConnDecoder(Conn, Event)
    with pytest.raises(ValueError, match="153 bytes"):
        dec.events(bytes(153))


def test_a_layout_without_a_field_of_conn_state_is_refused_by_name():
    class Short(ct.Structure):
        _fields_ = [f for f in Conn._fields_ if f[0] != "retransmits"]

    class ShortEvent(ct.Structure):
        _fields_ = [("sk", ct.c_uint64), ("conn", Short)]

    with pytest.raises(CapabilityError, match="retransmits"):
        ConnDecoder(Short, ShortEvent)
