"""The constants the socket probe program is compiled with: wake-up batching sized from the
ring buffer and the CPU count, the overflow and process announcement maps, and the memory
they take."""

from __future__ import annotations

import os

from collector.probes.btf import KernelOffsets
from collector.probes.kernel import RINGBUF_RECORD_BYTES, ProbeConfig, program_text


def test_the_reader_is_woken_when_a_quarter_of_the_ring_is_shared_by_all_cpus():
    small = ProbeConfig(ringbuf_pages=256)  # 1 MiB / 160-byte records = 6553 close events
    assert RINGBUF_RECORD_BYTES == 160
    assert small.wakeup_threshold(cpus=2) == 6553 // 8 == 819
    assert small.wakeup_threshold(cpus=64) == 25
    assert ProbeConfig().wakeup_threshold(cpus=2) == 1024  # capped: batches, not seconds
    assert ProbeConfig().wakeup_threshold(cpus=64) == 26214 // 256 == 102
    assert ProbeConfig(ringbuf_pages=1).wakeup_threshold(cpus=512) == 1
    assert ProbeConfig(wakeup_every=7).wakeup_threshold(cpus=2) == 7


def test_program_text_defines_every_constant_the_c_file_uses():
    text = program_text(KernelOffsets(48, 176, 284, 1680), ProbeConfig(wakeup_every=5))
    head, body = text.split("\n\n", 1)
    for line in ("#define WAKEUP_EVERY 5", "#define PROCS_SEEN_ENTRIES 8192",
                 "#define PROC_RINGBUF_PAGES 4", "#define RINGBUF_PAGES 1024",
                 "#define OVERFLOW_ENTRIES 8192", "#define OFF_NET_NS_INUM 176"):
        assert line in head.splitlines()
    for name in ("WAKEUP_EVERY", "PROCS_SEEN_ENTRIES", "PROC_RINGBUF_PAGES", "OVERFLOW_ENTRIES"):
        assert name in body


def test_map_memory_counts_every_map_and_both_rings():
    none = ProbeConfig(conn_entries=0, listen_entries=0, overflow_entries=0, procs_seen_entries=0,
                       ringbuf_pages=0, proc_ringbuf_pages=0, udp_entries=0,
                       udp_call_entries=0).map_memory_bytes()
    assert none == 0
    cfg = ProbeConfig()
    n = os.cpu_count() or 1  # a preallocated hash map has one spare element per CPU

    def htab(entries: int, elem: int, lru: bool = False) -> int:  # 16-byte buckets, 48-byte headers
        return entries * 16 + (entries + (0 if lru else n)) * (48 + elem)

    tcp = (htab(65536, 8 + 144) + htab(8192, 16 + 144) + htab(4096, 8 + 32)
           + htab(8192, 24 + 8, lru=True) + (1024 + 4) * 4096)
    udp = htab(65536, 40 + 104) + htab(16384, 8 + 32)  # udp_flows, udp_calls
    assert cfg.map_memory_bytes() == tcp + udp
    assert ProbeConfig(hooks=frozenset({"bytes"})).map_memory_bytes() == tcp  # UDP off


def test_udp_is_compiled_only_with_its_offsets_and_the_byte_hooks():
    from collector.probes.btf import UdpOffsets

    offs = KernelOffsets(48, 176, 284, 1680)
    udp = UdpOffsets(*range(1, 17))
    text = program_text(offs, ProbeConfig(), udp)
    head = text.split("\n\n", 1)[0].splitlines()
    assert "#define HAVE_UDP 1" in head and "#define UDP_MMSG_MAX 64" in head
    assert "#define OFF_MMSG_SIZE 16" in head and "sys_exit_recvmmsg" in text
    for off in ("OFF_SK_PROTOCOL", "OFF_SOCKET_INODE", "OFF_MSG_NAMELEN", "OFF_MMSG_HDR"):
        assert any(line.startswith(f"#define {off} ") for line in head)
    assert "#define HAVE_UDP 0" in program_text(offs, ProbeConfig())  # offsets unknown
    no_bytes = ProbeConfig(hooks=frozenset({"udp", "rtt"}))
    assert "sys_exit_recvmmsg" not in program_text(offs, no_bytes, udp)
