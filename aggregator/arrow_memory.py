"""Which allocator holds the aggregator's Arrow buffers: one that gives freed memory back.

Stage: set up once by `aggregator.pipeline.build`. Every step of the pipeline allocates Arrow
buffers (decoded batches, plans, connection rows, the fan-out's tables) and frees them a step
later. pyarrow's default pool on Linux is mimalloc, which kept the pages of those freed buffers:
with 1,000,000 connections held, 525 MiB of the aggregator's RSS were freed Arrow buffers, and the
run was slower too. jemalloc with a decay time returns dirty pages to the system `DECAY_MS` after
they are freed; side by side on the same stream (bench/bench_pipeline.py, docs/benchmarks.md) it
stored and correlated 1.2x the records per second with 35-40 % less memory.

A user's choice wins: with `ARROW_DEFAULT_MEMORY_POOL` set (Arrow's own variable: jemalloc,
mimalloc or system) nothing is changed. Without jemalloc in the pyarrow build, the system
allocator (glibc malloc, which unmaps large freed blocks) is used.
"""

from __future__ import annotations

import os

import pyarrow as pa

ENV = "ARROW_DEFAULT_MEMORY_POOL"
DECAY_MS = 1000


def use_returning_pool() -> str:
    """Make the Arrow pool one that returns freed memory; its backend name."""
    if os.environ.get(ENV):
        return str(pa.default_memory_pool().backend_name)
    try:
        pool = pa.jemalloc_memory_pool()
        pa.jemalloc_set_decay_ms(DECAY_MS)
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    return str(pool.backend_name)
