"""The aggregator's Arrow pool gives freed buffers back to the system (aggregator/arrow_memory.py).

Each case runs in a fresh interpreter: the pool is process-wide and RSS is the process's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys, time
    import numpy as np, pyarrow as pa, pyarrow.compute as pc
    from aggregator.arrow_memory import use_returning_pool

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    backend = use_returning_pool()
    base = np.arange(40_000, dtype=np.int64)
    before = rss()
    held = [pc.add(pa.array(base), i) for i in range(800)]  # 800 buffers of 320 KB, as steps do
    grown = rss() - before
    del held
    deadline = time.monotonic() + float(sys.argv[1])
    while rss() - before > grown // 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    print(backend, grown >> 20, (rss() - before) >> 20)
""")


def probe(env: dict[str, str], wait_s: float) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(wait_s)], capture_output=True, text=True,
                         env=env, check=True, timeout=60).stdout.split()
    return out[0], int(out[1]), int(out[2])


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}


def test_freed_buffers_go_back_to_the_system():
    backend, grown, left = probe(clean_env(), 10)
    assert backend == "jemalloc"
    assert grown >= 200, f"the probe allocated only {grown} MiB"
    assert left <= grown // 4, f"{left} of {grown} MiB still resident after the buffers were freed"


@pytest.mark.parametrize("chosen", ["mimalloc", "system"])
def test_a_pool_the_user_chose_is_kept(chosen):
    backend, grown, left = probe({**clean_env(), "ARROW_DEFAULT_MEMORY_POOL": chosen}, 2.5)
    assert backend == chosen
    # what the default would cost (and what the test above tells apart): Arrow's mimalloc and
    # glibc keep the freed pages, where jemalloc's 1 s decay has returned them
    assert left > grown // 2
