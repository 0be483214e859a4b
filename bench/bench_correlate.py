"""Correlation alone (plan + commit, no store), records/s: the columnar correlator with its C core
(aggregator/correlate_columns.py) side by side with the reference `Correlator`
(aggregator/correlate.py), on the same batches, in the same process.

Workloads: bench/bench_store.py's `merged` (every connection reported 4 times: its client's and
its server's socket probes and both hosts' wires, each collector sending its own batches) and
`new` (every record a connection of its own), with its static workload map.
Batches: `--batch` records per collector batch (default 5,000) as the collectors send them, and
coalesced by 4 (20,000: what the correlation worker takes when it is behind).
Inputs are made before timing: the reference gets `FlowRecord` lists, the columnar correlator
the flat tables `decode_columns` gives (with a `collector` column); its `plan_records`
(records -> `flat_table` -> plan) is timed too. A `ColumnPlan` carries the store's tables
(rows, rollups, workloads), which the reference builds later (`Derived`, in the store write):
"reference plan + Derived" is the like-for-like line, "reference" the correlation alone.
Under `gc_paused()`, as the correlation worker runs. Memory: in a fresh process per
correlator, the RSS growth (after `malloc_trim`) per connection held, and the bytes the C
structures allocated. There is no per-record Python slow path: its share is printed as 0.

    python bench/bench_correlate.py [--records 200000] [--batch 5000] [--workload merged|new|both]
    python bench/bench_correlate.py --memory col --workload new --records 1000000 --keep-s 86400
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pyarrow as pa
from bench_store import batches_of, make_merged, make_new, static_map

from aggregator.correlate import Correlator
from aggregator.correlate_columns import ColumnCorrelator
from aggregator.identity import IdentityResolver
from aggregator.store.columns import flat_table, gc_paused
from aggregator.store.derived import Derived
from eastwest.record import FlowRecord

Batch = list[FlowRecord]


def rss() -> int:
    """Resident bytes, after handing freed heap back to the system (no stale garbage)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def coalesced(batches: list[Batch], k: int) -> list[Batch]:
    return [[r for b in batches[i:i + k] for r in b] for i in range(0, len(batches), k)]


def table_of(batch: Batch) -> pa.Table:
    return flat_table(batch).append_column(
        "collector", pa.array([r.collector for r in batch], pa.string()))


def inputs(workload: str, n: int, size: int) -> list[Batch]:
    per = make_merged(n) if workload == "merged" else make_new(n)
    return [recs for _, _, recs in batches_of(per, size)]


KEEP: dict[str, timedelta] = {}  # --keep-s: how long connections are held (memory runs)


def column_correlator() -> ColumnCorrelator:
    return ColumnCorrelator(IdentityResolver(static_map()), native_core=True, **KEEP)


def reference() -> Correlator:
    return Correlator(IdentityResolver(static_map()), **KEEP)


def col_step(c: ColumnCorrelator, t: pa.Table) -> None:
    c.commit(c.plan(t))


def col_records(c: ColumnCorrelator, b: Batch) -> None:
    c.commit(c.plan_records(b))


def ref_step(c: Correlator, b: Batch) -> None:
    c.commit(c.plan(b))


def ref_tables(c: Correlator, b: Batch) -> None:
    """The reference plan and the tables a `ColumnPlan` carries (what the store writes)."""
    plan = c.plan(b)
    d = Derived(plan)
    _ = d.connection_rows(), d.rollups, d.workloads
    c.commit(plan)


PATHS: dict[str, tuple[str, Callable[[], Any], Callable[[Any, Any], None], bool]] = {
    "ref": ("reference Correlator.plan (records)", reference, ref_step, False),
    "ref+tables": ("reference plan + Derived rows/rollups/workloads", reference, ref_tables,
                   False),
    "col": ("ColumnCorrelator.plan (flat tables, C core)", column_correlator, col_step, True),
    "col-records": ("ColumnCorrelator.plan_records (records -> flat_table)", column_correlator,
                    col_records, False),
}


def timed(path: str, batches: list[Batch]) -> float:
    _, make, step, tables = PATHS[path]
    xs: list[Any] = [table_of(b) for b in batches] if tables else batches
    c = make()
    gc.collect()
    with gc_paused():
        t0 = time.perf_counter()
        for x in xs:
            step(c, x)
        return time.perf_counter() - t0


def memory(path: str, workload: str, n: int, size: int) -> None:
    """In a fresh process: RSS growth per connection held (printed as `bytes conns`)."""
    batches = inputs(workload, n, size)
    _, make, step, tables = PATHS[path]
    xs: list[Any] = [table_of(b) for b in batches] if tables else batches
    before = rss()
    c = make()
    for x in xs:
        step(c, x)
    grown = rss() - before
    extra = f" {c.stats()['bytes']}" if isinstance(c, ColumnCorrelator) else ""
    print(grown, len(c), extra)


def per_connection(path: str, workload: str, n: int, size: int) -> tuple[float, float | None]:
    out = subprocess.run([sys.executable, __file__, "--memory", path, "--workload", workload,
                          "--records", str(n), "--batch", str(size)], capture_output=True,
                         text=True, check=True).stdout.split()
    structs = int(out[2]) / int(out[1]) if len(out) > 2 else None
    return int(out[0]) / int(out[1]), structs


def run(workload: str, n: int, size: int) -> None:
    base = inputs(workload, n, size)
    records = sum(len(b) for b in base)
    print(f"\nworkload {workload}: {records:,} records; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'path':<52} {'batch':>6} {'seconds':>8} {'records/s':>11} {'vs ref':>7}")
    for k in (1, 4):
        batches = base if k == 1 else coalesced(base, k)
        seconds = {p: timed(p, batches) for p in PATHS}
        for p, (name, _, _, _) in PATHS.items():
            print(f"{name:<52} {size * k:>6,} {seconds[p]:>8.2f} {records / seconds[p]:>11,.0f} "
                  f"{seconds['ref'] / seconds[p]:>6.1f}x")
    ref_bytes, _ = per_connection("ref", workload, n, size)
    col_bytes, structs = per_connection("col", workload, n, size)
    print(f"  RSS per connection held: reference {ref_bytes:,.0f} bytes, ColumnCorrelator "
          f"{col_bytes:,.0f} bytes (its C structures: {structs or 0:,.0f} allocated); records "
          f"on a Python slow path: 0 (0.0 %: there is none)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--workload", choices=("merged", "new", "both"), default="both")
    ap.add_argument("--memory", choices=list(PATHS),
                    help="only print RSS growth, connections held (and C bytes) for one path")
    ap.add_argument("--keep-s", type=float, help="keep_closed = keep_open, seconds")
    a = ap.parse_args()
    if a.keep_s is not None:
        KEEP.update(keep_closed=timedelta(seconds=a.keep_s), keep_open=timedelta(seconds=a.keep_s))
    if a.memory:
        memory(a.memory, a.workload, a.records, a.batch)
        return
    for w in (("merged", "new") if a.workload == "both" else (a.workload,)):
        run(w, a.records, a.batch)


if __name__ == "__main__":
    main()
