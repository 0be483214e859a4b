"""One process per spool folder: a second spool on a held folder waits for the holder and takes
over when it lets go, refuses past the wait naming the folder and the holder, and finds the
folder free when the holder died (the kernel released its flock). The holder is this process
(a second `Spool` in it) with a fake clock, or a real second process."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collector import spool as spool_mod
from collector.spool import SEQ_BLOCK, Spool
from collector.spool_lock import DEFAULT_WAIT, LOCK_NAME, Holder, SpoolLock, holder
from eastwest.clock import FakeClock, SystemClock
from eastwest.errors import BusyError, ConfigError

REPO = Path(__file__).resolve().parents[2]
# a second process holding a spool: "held" once it has it, releases it at the first line on
# stdin, exits at the second (or when killed)
HOLDER = """
import sys
from collector.spool import Spool
s = Spool(sys.argv[1])
s.put(s.allocate_seq(), "final", 3, b"from the holder")
print("held", flush=True)
sys.stdin.readline()
s.close()
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def other_process(tmp_path):
    """Start a process holding tmp_path/spool, with a password in its command line."""
    procs: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "spool"),
                              "--nats", "nats://user:s3cret@nats:4222"], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_spool_waits_for_the_first_and_takes_over_its_batches(tmp_path, caplog):
    first = Spool(tmp_path, clock=FakeClock())
    seqs = [first.allocate_seq() for _ in range(3)]
    assert first.put(seqs[0], "final", 5, b"spooled by the first")

    class FirstFinishes(FakeClock):  # the first finishes while the second waits
        def sleep(self, seconds, until=None):
            first.close()
            return super().sleep(seconds, until)

    clock = FirstFinishes()
    with caplog.at_level(logging.WARNING, logger="eastwest.spool"):
        second = Spool(tmp_path, lock_wait=30, clock=clock)
    assert len(clock.slept) == 1
    waiting = caplog.records[0].getMessage()
    assert str(tmp_path) in waiting and f"pid {os.getpid()}" in waiting
    assert "waiting up to 30 s (--spool-lock-wait)" in waiting
    assert "takes it over" in caplog.records[1].getMessage()
    assert [e.seq for e in second.entries()] == [seqs[0]]       # the first's batch is kept
    assert second.allocate_seq() > max(seqs)                    # and its numbers are not reused
    second.close()


def test_past_the_wait_it_refuses_naming_the_folder_and_the_holder(tmp_path):
    first = Spool(tmp_path, clock=FakeClock())
    clock = FakeClock()
    with pytest.raises(BusyError) as err:
        Spool(tmp_path, lock_wait=5, clock=clock)
    msg = str(err.value)
    assert msg.startswith(f"--spool-dir={str(tmp_path)!r}: in use by another collector, "
                          f"pid {os.getpid()} (")
    assert "waited 5 s (--spool-lock-wait)" in msg
    assert sum(clock.slept) == 5.0                 # exactly the wait, in polls, no real sleep
    assert first.put(first.allocate_seq(), "final", 1, b"x")  # the holder is undisturbed
    first.close()


def test_no_wait_refuses_at_once(tmp_path):
    first = Spool(tmp_path, clock=FakeClock())
    clock = FakeClock()
    with pytest.raises(BusyError):
        Spool(tmp_path, clock=clock)  # lock_wait=0
    assert clock.slept == []
    first.close()


def test_another_process_is_named_with_its_command_line_without_its_password(tmp_path,
                                                                              other_process):
    proc = other_process()
    with pytest.raises(BusyError) as err:
        Spool(tmp_path / "spool")
    msg = str(err.value)
    assert f"pid {proc.pid} (" in msg and "--nats nats://***@nats:4222" in msg
    assert "s3cret" not in msg and "s3cret" not in (tmp_path / "spool" / LOCK_NAME).read_text()
    assert holder(tmp_path / "spool") == Holder.parse((tmp_path / "spool" / LOCK_NAME).read_text())


def test_a_spool_waits_for_a_real_second_process_and_takes_over(tmp_path, other_process):
    proc = other_process()
    told: list[float] = []

    class TellingClock(SystemClock):  # real time; the holder is told to finish at the first wait
        def sleep(self, seconds, until=None):
            if not told:
                assert proc.stdin is not None
                proc.stdin.write("release\n")
                proc.stdin.flush()
            told.append(seconds)
            return super().sleep(seconds, until)

    spool = Spool(tmp_path / "spool", lock_wait=60, clock=TellingClock())
    assert told                                     # it did wait
    assert proc.poll() is None                      # the holder is alive: it let go, it did not die
    assert [e.records for e in spool.entries()] == [3]
    assert holder(tmp_path / "spool").pid == os.getpid()
    spool.close()


def test_a_holder_killed_by_sigkill_leaves_the_folder_free(tmp_path, other_process):
    proc = other_process()
    assert holder(tmp_path / "spool").pid == proc.pid
    proc.kill()
    proc.wait()
    note = (tmp_path / "spool" / LOCK_NAME).read_text()
    assert f"pid={proc.pid}\n" in note              # its note is still there ...
    assert holder(tmp_path / "spool") is None       # ... but the kernel released its lock
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    assert clock.slept == [] and len(spool) == 1    # at once, with what the dead one spooled
    assert (tmp_path / "spool" / LOCK_NAME).read_text().startswith(f"pid={os.getpid()}\n")
    spool.close()


def test_a_closed_spool_frees_the_folder_and_the_lock_file_stays(tmp_path):
    with Spool(tmp_path, clock=FakeClock()) as s:
        assert holder(tmp_path).pid == os.getpid()
        assert s.flock.held
    assert not s.flock.held and holder(tmp_path) is None
    assert (tmp_path / LOCK_NAME).exists()           # never deleted (see collector/spool_lock.py)
    assert holder(tmp_path / "nothing-here") is None


def test_the_seq_reservation_is_written_under_a_name_of_this_process(tmp_path, monkeypatch):
    renamed: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(spool_mod.os, "replace",
                        lambda a, b: (renamed.append((Path(a).name, Path(b).name)), real(a, b)))
    s = Spool(tmp_path, clock=FakeClock())
    for _ in range(SEQ_BLOCK + 1):
        s.allocate_seq()
    assert renamed == [(f"seq.{os.getpid()}.tmp", "seq")] * 2  # at start, then one block later
    s.close()


def test_a_negative_wait_names_the_flag(tmp_path):
    with pytest.raises(ConfigError) as err:
        SpoolLock.acquire(tmp_path, -1)
    assert err.value.key == "--spool-lock-wait"


def test_the_flag_default_is_the_library_default():
    from eastwest.cli import collector as collector_cli

    parser = argparse.ArgumentParser()
    collector_cli.register(parser.add_subparsers())
    args = parser.parse_args(["collector"])
    assert args.spool_lock_wait == DEFAULT_WAIT
    assert args.collector_id is None and args.spool_dir is None and args.spool_base is None


def test_a_collector_on_a_held_spool_exits_1_naming_folder_and_pid(tmp_path, pcaps, capsys,
                                                                    monkeypatch):
    from eastwest.cli import main

    monkeypatch.setenv("EASTWEST_INGEST_TOKEN", "t" * 32)
    held = Spool(tmp_path / "spool", clock=FakeClock())
    rc = main(["collector", "--pcap", str(pcaps / "CESNET_FlowTest_vxlan.pcap"),
               "--aggregator", "http://127.0.0.1:9", "--spool-dir", str(tmp_path / "spool"),
               "--spool-lock-wait", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"eastwest collector: --spool-dir={str(tmp_path / 'spool')!r}: in use "
                          f"by another collector, pid {os.getpid()} (")
    held.close()
