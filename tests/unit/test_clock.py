"""Kernel time to UTC: one function, exact to the microsecond."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

from eastwest.clock import KernelClock, ktime_to_utc


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
