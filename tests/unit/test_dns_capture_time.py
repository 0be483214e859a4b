"""The DNS capture's packet times are the kernel's (SCM_TIMESTAMPNS), not the time of the read: a
collector that reads a query and its answer in one go (busy, or woken late) still measures the
latency between them. Real packet socket on this namespace's loopback; the datagram goes to
127.0.0.1:53, where nothing listens (the kernel answers with an ICMP error, which is not DNS)."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from collector.dns.capture import SO_TIMESTAMPNS, DnsCapture, packet_time_us


def test_packet_time_is_when_the_packet_passed_not_when_it_was_read() -> None:
    try:
        cap = DnsCapture("/lo")
    except Exception as exc:  # noqa: BLE001 - not root: nothing to test here
        pytest.skip(f"no packet socket: {exc}")
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sent = time.time_ns() // 1000
        s.sendto(b"\x12\x34" + b"\x00" * 10, ("127.0.0.1", 53))
        s.close()
        time.sleep(0.4)  # the collector reads late
        read_at = time.time_ns() // 1000
        got = list(cap.packets())
    finally:
        cap.close()
    assert got, "the query to port 53 was not captured"
    ts = got[0][0]
    assert sent - 5_000 <= ts <= sent + 100_000 < read_at - 250_000


def test_packet_time_without_a_kernel_timestamp_is_now() -> None:
    spec = struct.pack("@ll", 1_700_000_000, 123_456_789)
    assert packet_time_us([(socket.SOL_SOCKET, SO_TIMESTAMPNS, spec)]) == 1_700_000_000_123_456
    before = time.time_ns() // 1000
    assert before <= packet_time_us([]) <= time.time_ns() // 1000


@pytest.mark.parametrize("spec", ["", "ns/", "/"])
def test_a_spec_without_a_namespace_or_interface_is_refused(spec: str) -> None:
    from eastwest.errors import ConfigError

    with pytest.raises(ConfigError, match="expected NETNS, NETNS/IF or /IF"):
        DnsCapture(spec)
