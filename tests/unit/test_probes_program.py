"""The constants the socket probe program is compiled with: wake-up batching sized from the
ring buffer and the CPU count, the process announcement maps, and the memory they take."""

from __future__ import annotations

from collector.probes.btf import KernelOffsets
from collector.probes.kernel import RINGBUF_RECORD_BYTES, ProbeConfig, program_text


def test_the_reader_is_woken_when_a_quarter_of_the_ring_is_shared_by_all_cpus():
    cfg = ProbeConfig()  # 256 pages: 1 MiB / 160-byte records = 6553 close events
    assert RINGBUF_RECORD_BYTES == 160
    assert cfg.wakeup_threshold(cpus=2) == 6553 // 8 == 819
    assert cfg.wakeup_threshold(cpus=64) == 25
    assert cfg.wakeup_threshold(cpus=1) == 1024  # capped: a busy single CPU still gets batches
    assert ProbeConfig(ringbuf_pages=1).wakeup_threshold(cpus=512) == 1
    assert ProbeConfig(wakeup_every=7).wakeup_threshold(cpus=2) == 7


def test_program_text_defines_every_constant_the_c_file_uses():
    text = program_text(KernelOffsets(48, 176, 284, 1680), ProbeConfig(wakeup_every=5))
    head = text.split("\n\n", 1)[0]
    for line in ("#define WAKEUP_EVERY 5", "#define PROCS_SEEN_ENTRIES 8192",
                 "#define PROC_RINGBUF_PAGES 4", "#define RINGBUF_PAGES 256",
                 "#define OFF_NET_NS_INUM 176"):
        assert line in head.splitlines()
    body = text.split("\n\n", 1)[1]
    for name in ("WAKEUP_EVERY", "PROCS_SEEN_ENTRIES", "PROC_RINGBUF_PAGES"):
        assert name in body


def test_map_memory_counts_the_process_maps_and_both_rings():
    base = ProbeConfig(procs_seen_entries=0, proc_ringbuf_pages=0).map_memory_bytes()
    full = ProbeConfig().map_memory_bytes()
    assert full - base == 8192 * (20 + 8 + 48) + 4 * 4096
