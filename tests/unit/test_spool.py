"""The on-disk spool: in-order drain, survives reopening, never reuses a batch number, sheds
interim batches before final ones when full and counts every shed record by reason."""

from __future__ import annotations

from datetime import timedelta

from collector.spool import SEQ_BLOCK, Spool
from eastwest.clock import EPOCH, FakeClock
from eastwest.drops import Drops


def at_us(us: int) -> FakeClock:
    """A clock whose wall time is `us` µs after the epoch (the floor of new batch numbers)."""
    return FakeClock(EPOCH + timedelta(microseconds=us))


def fill(spool: Spool, kinds: str, size: int = 100) -> list[int]:
    seqs = []
    for k in kinds:
        seq = spool.allocate_seq()
        assert spool.put(seq, "interim" if k == "i" else "final", 10, bytes([len(seqs)]) * size)
        seqs.append(seq)
    return seqs


def test_batches_drain_oldest_first_and_leave_when_removed(tmp_path):
    spool = Spool(tmp_path, 10_000, clock=at_us(1000))
    seqs = fill(spool, "ifif")
    assert seqs == [1000, 1001, 1002, 1003]
    got = []
    while (e := spool.oldest()) is not None:
        got.append((e.seq, e.kind, spool.read(e)[:1]))
        spool.remove(e)
    assert got == [(1000, "interim", b"\x00"), (1001, "final", b"\x01"),
                   (1002, "interim", b"\x02"), (1003, "final", b"\x03")]
    assert spool.bytes == 0 and list(tmp_path.glob("*.ewb")) == []


def test_a_reopened_spool_holds_the_same_batches_and_continues_the_numbers(tmp_path):
    first = Spool(tmp_path, 10_000, clock=at_us(5))
    seqs = fill(first, "iff")
    (tmp_path / f"{99:020d}-final-3.tmp").write_bytes(b"half a batch")  # a cut write
    first.close()                              # the process ended: the folder is free
    again = Spool(tmp_path, 10_000, clock=at_us(5))  # same clock: only the files tell
    assert [e.seq for e in again.entries()] == seqs
    assert again.records() == 30 and again.bytes == 300
    assert again.allocate_seq() > max(seqs)
    assert not list(tmp_path.glob("*.tmp"))


def test_numbers_never_repeat_even_when_the_clock_goes_back(tmp_path):
    a = Spool(tmp_path, 10_000, clock=at_us(10**9))
    used = {a.allocate_seq() for _ in range(SEQ_BLOCK + 5)}  # crosses a reservation block
    a.close()
    b = Spool(tmp_path, 10_000, clock=at_us(1))  # empty spool, clock stepped back
    assert b.allocate_seq() > max(used)


def test_when_full_interim_batches_are_shed_oldest_first_before_any_final(tmp_path):
    drops = Drops()
    spool = Spool(tmp_path, 500, drops, clock=at_us(1))
    fill(spool, "ifif")                               # 400 bytes: 2 interim, 2 final
    seq = spool.allocate_seq()
    assert spool.put(seq, "final", 10, b"F" * 200)    # needs 100 more: sheds the oldest interim
    assert [e.kind for e in spool.entries()] == ["final", "interim", "final", "final"]
    assert [e.seq for e in spool.entries()][0] == 2
    assert drops.snapshot() == {("spool", "full_interim"): 10}


def test_when_only_final_batches_are_left_the_incoming_batch_is_shed_and_counted(tmp_path):
    drops = Drops()
    spool = Spool(tmp_path, 300, drops, clock=at_us(1))
    fill(spool, "fff")
    assert not spool.put(spool.allocate_seq(), "final", 7, b"x" * 50)
    assert not spool.put(spool.allocate_seq(), "interim", 4, b"x" * 50)
    assert len(spool) == 3
    assert drops.snapshot() == {("spool", "full_final"): 7, ("spool", "full_interim"): 4}


def test_the_batch_in_flight_is_never_shed(tmp_path):
    drops = Drops()
    spool = Spool(tmp_path, 200, drops, clock=at_us(1))
    fill(spool, "ii")
    sending = spool.oldest()
    assert spool.put(spool.allocate_seq(), "final", 10, b"x" * 100)
    assert [e.seq for e in spool.entries()] == [sending.seq, 3]
    assert drops.snapshot() == {("spool", "full_interim"): 10}


def test_a_batch_larger_than_the_whole_spool_is_counted(tmp_path):
    drops = Drops()
    spool = Spool(tmp_path, 100, drops, clock=at_us(1))
    assert not spool.put(spool.allocate_seq(), "final", 3, b"x" * 101)
    assert drops.snapshot() == {("spool", "batch_too_large"): 3}
