"""Kernel map sizes from the host's limits (collector/probes/sizing.py), --map-entries, and the
memory --check prints for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.capabilities import map_lines
from collector.probes.kernel import ENTRY_PAIR_BYTES, ProbeConfig
from collector.probes.sizing import choose, hash_map_bytes, map_sizes
from eastwest.errors import ConfigError


def host(tmp_path: Path, mem_kib: int, ehash: int | None, threads: int = 100_000) -> tuple[Path, Path]:
    sys_dir = tmp_path / "sys"
    (sys_dir / "net" / "ipv4").mkdir(parents=True)
    (sys_dir / "kernel").mkdir()
    if ehash is not None:
        (sys_dir / "net" / "ipv4" / "tcp_ehash_entries").write_text(f"{ehash}\n")
    (sys_dir / "kernel" / "threads-max").write_text(f"{threads}\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {mem_kib} kB\nMemFree:        1000 kB\n")
    return sys_dir, meminfo


def test_memory_of_a_hash_map_matches_what_the_kernel_reported_in_fdinfo() -> None:
    # memlock of /proc/PID/fdinfo on 6.18 with 2 CPUs, minus the map's fixed header and locks
    # (912 bytes): conns, udp_flows, procs_seen (LRU)
    assert hash_map_bytes(65536, 8, 144, cpus=2) == 14157088 - 912
    assert hash_map_bytes(65536, 40, 104, cpus=2) == 13632784 - 912
    assert hash_map_bytes(8192, 20, 1, cpus=2, lru=True) == 787328 - 896


@pytest.mark.parametrize(("mem_gib", "ehash", "entries"), [
    (24, 262144, 131072),   # this machine: 0.25% of 24 GiB = 151,967 entries -> 131,072
    (256, 2097152, 1048576),  # 0.25% of 256 GiB = 1.6 M -> 1,048,576, below the kernel's table
    (64, 65536, 65536),     # a kernel table smaller than the budget (thash_entries=)
    (2, 16384, 16384),      # a small VM: the floor
])
def test_entries_are_the_kernels_tcp_table_capped_by_a_memory_share(
        tmp_path: Path, mem_gib: int, ehash: int, entries: int) -> None:
    sys_dir, meminfo = host(tmp_path, mem_gib << 20, ehash)
    sizes = choose(ENTRY_PAIR_BYTES, proc_sys=sys_dir, meminfo=meminfo)
    assert sizes.entries == entries
    assert f"net.ipv4.tcp_ehash_entries {ehash}" in sizes.why and sizes.why.endswith(f"-> {entries}")
    cfg = ProbeConfig(conn_entries=sizes.entries, udp_entries=sizes.entries)
    conns_udp = sum(b for name, _, b in cfg.map_memory() if name in ("conns", "udp_flows"))
    assert entries == 16384 or conns_udp <= (mem_gib << 30) * 0.0025 * 1.01


def test_without_the_sysctl_the_kernels_rule_is_applied_to_memory(tmp_path: Path) -> None:
    sys_dir, meminfo = host(tmp_path, 8 << 20, None)  # 8 GiB: 65,536 slots of 128 KiB
    sizes = choose(ENTRY_PAIR_BYTES, proc_sys=sys_dir, meminfo=meminfo)
    assert "8192 MiB of memory / 128 KiB = 65536" in sizes.why
    assert sizes.entries == 32768  # 0.25% of 8 GiB = 50,659 entries -> 32,768


def test_udp_calls_follow_threads_max_within_bounds(tmp_path: Path) -> None:
    for threads, calls in ((500, 1024), (9000, 9000), (192735, 16384)):
        sys_dir, meminfo = host(tmp_path / str(threads), 24 << 20, 262144, threads)
        assert choose(ENTRY_PAIR_BYTES, proc_sys=sys_dir, meminfo=meminfo).udp_calls == calls


def test_map_entries_flag_overrides_and_names_bad_values() -> None:
    assert map_sizes("4096", ENTRY_PAIR_BYTES).entries == 4096
    assert map_sizes("4096", ENTRY_PAIR_BYTES).why == "--map-entries"
    assert map_sizes("auto", ENTRY_PAIR_BYTES).why.startswith("auto: ")
    for bad in ("lots", "12", str(1 << 25)):
        with pytest.raises(ConfigError) as err:
            map_sizes(bad, ENTRY_PAIR_BYTES)
        assert "--map-entries" in str(err.value) and bad in str(err.value)


def test_check_lists_every_map_with_its_memory_and_why() -> None:
    sizes = map_sizes("4096", ENTRY_PAIR_BYTES)
    cfg = ProbeConfig(conn_entries=4096, udp_entries=4096, udp_call_entries=sizes.udp_calls)
    lines = map_lines(cfg, sizes)
    text = "\n".join(lines)
    assert "4096 connections and 4096 UDP flows tracked at once" in text
    assert "conn_map_full / udp_map_full" in text and "--map-entries" in text
    for name in ("conns", "overflow", "listeners", "procs_seen", "udp_flows", "udp_calls"):
        assert any(line.strip().startswith(name + ":") for line in lines), name
    total = float(lines[0].split()[2])
    assert abs(total - cfg.map_memory_bytes() / 2**20) < 0.06
