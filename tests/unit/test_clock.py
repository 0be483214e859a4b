"""Kernel time to UTC: one function, exact to the microsecond. The clocks components are given:
the system's sleeps and wakes when told to stop; the fake one never waits, time moves when a
component sleeps on it."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

from eastwest.clock import EPOCH, FakeClock, KernelClock, SystemClock, ktime_to_utc, unix_us


def test_ktime_to_utc_is_exact_to_the_microsecond():
    rng = random.Random(7)
    for _ in range(10_000):
        total_ns = rng.randrange(0, 4_000_000_000 * 10**9)
        ktime, offset = divmod(total_ns, 2)
        us = total_ns // 1000
        want = datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)
        assert ktime_to_utc(ktime, total_ns - ktime) == want


def test_kernel_clock_agrees_with_the_wall_clock():
    k = KernelClock()
    got = k.to_utc(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    assert abs((got - datetime.now(UTC)).total_seconds()) < 1.0
    assert got.tzinfo is UTC


def test_system_clock_sleep_ends_when_told_to_stop():
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    started = time.monotonic()
    assert SystemClock().sleep(30, until=stop) is True
    assert time.monotonic() - started < 10
    assert SystemClock().sleep(0.001) is False
    assert SystemClock().sleep(-1, until=threading.Event()) is False  # never a negative wait


def test_fake_clock_moves_only_when_slept_on_or_told():
    start = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    clock = FakeClock(start)
    assert (clock.now(), clock.monotonic()) == (start, 0.0)
    assert clock.sleep(1.5) is False
    clock.t += 0.25
    assert clock.now() == start + timedelta(seconds=1.75) and clock.monotonic() == 1.75
    stop = threading.Event()
    stop.set()
    assert clock.sleep(60, until=stop) is True      # already stopped: no time passes
    assert clock.slept == [1.5] and clock.monotonic() == 1.75


def test_unix_us_is_exact():
    assert unix_us(EPOCH + timedelta(microseconds=1_733_000_000_123_457)) == 1_733_000_000_123_457
    assert unix_us(ktime_to_utc(5_000_999, 0)) == 5_000
