"""The ingest journal (aggregator/store/journal.py): what `append` returned survives a crash,
a torn tail is cut off, damage is counted and skipped, released segments are deleted."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aggregator.store.base import StoreError
from aggregator.store.journal import Journal


def entries(j: Journal) -> list[tuple[str, int, int, list[int], bytes]]:
    return [(e.collector, e.batch_seq, e.records, list(e.rejected), e.body) for e in j.replay()]


def test_entries_come_back_in_order_after_a_restart(tmp_path):
    j = Journal(tmp_path)
    assert entries(j) == []
    j.append("h1", 1, 3, [], b"EWB1aaa")
    j.append("h2", 7, 2, [0, 4], b"EWB1" + bytes(range(256)))
    j.close()
    j = Journal(tmp_path)
    assert entries(j) == [("h1", 1, 3, [], b"EWB1aaa"), ("h2", 7, 2, [0, 4], b"EWB1" + bytes(range(256)))]
    j.append("h1", 2, 1, [], b"x")  # appended to the newest segment
    j.close()
    assert [e[1] for e in entries(Journal(tmp_path))] == [1, 7, 2]
    assert len(list(tmp_path.iterdir())) == 1


def test_segments_roll_over_and_released_ones_are_deleted(tmp_path):
    j = Journal(tmp_path, segment_bytes=200)
    written = [j.append("h1", i, 1, [], b"b" * 100) for i in range(5)]
    segs = sorted(p.name for p in tmp_path.iterdir())
    assert len(segs) == 5  # one 100-byte body fills a 200-byte segment
    assert j.bytes() == sum(p.stat().st_size for p in tmp_path.iterdir())
    j.release(written[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == segs[3:]
    j.close()
    j = Journal(tmp_path, segment_bytes=200)
    again = list(j.replay())
    assert [e.batch_seq for e in again] == [3, 4]  # not released before the "restart": replayed
    j.release(again)  # the segment appended to goes too once it is large and holds nothing live
    assert list(tmp_path.iterdir()) == [] and j.bytes() == 0
    j.append("h1", 5, 1, [], b"b")
    assert [p.name for p in tmp_path.iterdir()] == ["0000000000000006.ewj"]
    j.close()
    assert [e[1] for e in entries(Journal(tmp_path))] == [5]


def test_a_clean_close_leaves_no_segment_of_applied_entries(tmp_path):
    j = Journal(tmp_path)
    done = [j.append("h1", i, 1, [], b"x" * 10) for i in range(3)]
    j.release(done[:2])
    j.close()  # one entry not applied: its segment stays
    assert len(list(tmp_path.iterdir())) == 1
    j = Journal(tmp_path)
    left = list(j.replay())  # releases are not written down: the store's marks tell them apart
    assert [e.batch_seq for e in left] == [0, 1, 2]
    j.release(left)
    j.close()
    assert list(tmp_path.iterdir()) == []


def test_a_torn_tail_is_cut_off_and_appending_goes_on(tmp_path):
    j = Journal(tmp_path)
    j.append("h1", 1, 1, [], b"one")
    j.append("h1", 2, 1, [], b"two" * 50)
    j.close()
    (seg,) = tmp_path.iterdir()
    size = seg.stat().st_size
    with open(seg, "r+b") as f:  # the crash came in the middle of writing entry 2
        f.truncate(size - 40)
    j = Journal(tmp_path)
    assert [e[1] for e in entries(j)] == [1] and j.corrupt == 0
    j.append("h1", 3, 1, [], b"three")
    j.close()
    assert [e[1] for e in entries(Journal(tmp_path))] == [1, 3]


def test_damage_is_counted_skipped_and_never_appended_behind(tmp_path):
    j = Journal(tmp_path)
    for i in range(3):
        j.append("h1", i, 1, [], b"entry %d" % i)
    j.close()
    (seg,) = tmp_path.iterdir()
    data = bytearray(seg.read_bytes())
    second = data.index(b"EWJ1", 4)
    data[second + 20] ^= 0xFF  # a flipped bit in entry 1's payload: its CRC fails
    seg.write_bytes(bytes(data))
    j = Journal(tmp_path)
    assert [e[1] for e in entries(j)] == [0] and j.corrupt == 1
    j.append("h1", 9, 1, [], b"after")  # a new segment: the damaged one is left as it is
    j.close()
    assert len(list(tmp_path.iterdir())) == 2
    j = Journal(tmp_path)
    assert [e[1] for e in entries(j)] == [0, 9] and j.corrupt == 1


def test_a_failed_write_is_a_store_error_and_the_next_entry_starts_a_new_segment(tmp_path, monkeypatch):
    """Disk full cannot be made here for real without a filesystem of our own: os.write is made
    to fail (after writing part of the frame, as a full disk does)."""
    j = Journal(tmp_path)
    j.append("h1", 1, 1, [], b"ok")
    real = os.write

    def full(fd, data):
        real(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreError, match=r"batch \('h1', 2\) not written: .*No space left"):
        j.append("h1", 2, 1, [], b"lost")
    monkeypatch.setattr(os, "write", real)
    j.append("h1", 3, 1, [], b"ok again")
    j.close()
    j = Journal(tmp_path)
    assert [e[1] for e in entries(j)] == [1, 3] and j.corrupt == 1  # the partial frame: skipped


def test_what_append_returned_survives_kill_9(tmp_path):
    """A writer process appends as fast as it can and prints each sequence number once `append`
    has returned; killed -9 at a random moment, every printed entry is replayed intact."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from aggregator.store.journal import Journal
        j = Journal({str(tmp_path)!r}, segment_bytes=64 * 1024)
        i = 0
        while True:
            j.append("h1", i, 5, [], b"EWB1" + bytes([i % 256]) * (100 + i % 3000))
            print(i, flush=True)
            i += 1
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    os.kill(p.pid, signal.SIGKILL)
    out, _ = p.communicate()
    acked = [int(x) for x in out.split()]
    assert len(acked) > 50, "the writer did not get going"
    got = entries(Journal(tmp_path, segment_bytes=64 * 1024))
    seqs = [e[1] for e in got]
    assert seqs[:len(acked)] == acked  # everything acknowledged, in order (one more may be there)
    assert len(seqs) - len(acked) <= 1
    for _, i, _, _, body in got:
        assert body == b"EWB1" + bytes([i % 256]) * (100 + i % 3000)
