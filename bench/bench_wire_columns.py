"""A wire batch -> Arrow columns, in records/s: the native decoder against the reference.

Both take the body of an ingest POST (`MAGIC` + zstd(msgpack(Batch))) and give the same table
(aggregator/store/wire_columns.py):
- ours: `decode_columns(body)`, the native decoder (aggregator/store/ewwire.c);
- the reference: `codec.decode_batch(body)` (msgspec, one `FlowRecord` per record) +
  `columns.flat_table` (attribute walk -> Arrow), what ingest did before.
Workloads: `make_merged` and `make_new` of bench/bench_store.py, in batches of `--batch` records,
and `services`: `merged` with a `nat` on every client record (a Service call's DNAT, as
collector/natfold.py writes it: most client records of a cluster carry one).
Runs alternate (ours, reference, ours, ...); the best of `--repeat` runs of each is reported, with
the load average (the machine is shared). Goal: >= 1,000,000 records/s native on `merged`.

    python bench/bench_wire_columns.py [--records 100000] [--batch 5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aggregator.store.columns import flat_table  # noqa: E402
from aggregator.store.wire_columns import decode_columns, native_available  # noqa: E402
from bench.bench_store import batches_of, make_merged, make_new  # noqa: E402
from eastwest import codec  # noqa: E402
from eastwest.record import Endpoint, FlowRecord, Nat  # noqa: E402

SENT = datetime(2026, 11, 28, tzinfo=UTC)


def ours(bodies: list[bytes]) -> int:
    n = 0
    for body in bodies:
        n += decode_columns(body).table.num_rows
    return n


def reference(bodies: list[bytes]) -> int:
    n = 0
    for body in bodies:
        n += flat_table(codec.decode_batch(body).records).num_rows
    return n


def timed(fn, bodies: list[bytes]) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(bodies)
    return time.perf_counter() - t, n


def make_services(n: int) -> dict[str, list[FlowRecord]]:
    """`make_merged`, every client record a ClusterIP call (its dialled address in `nat`)."""
    vip = Endpoint("10.96.0.10", 80)
    return {coll: [r.replace(nat=[Nat("dnat", vip, r.server, 4026531840)])
                   if r.observer == "client" else r for r in recs]
            for coll, recs in make_merged(n).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    ok, why = native_available()
    if not ok:
        print(f"native decoder not loaded ({why}): ours is the reference path")
    print(f"records={args.records} batch={args.batch} repeat={args.repeat} "
          f"load average at start {os.getloadavg()[0]:.2f}")
    for name, make in (("merged", make_merged), ("new", make_new), ("services", make_services)):
        bodies = [codec.encode_batch(codec.Batch(coll, seq, SENT, recs))
                  for coll, seq, recs in batches_of(make(args.records), args.batch)]
        rows = sum(decode_columns(b, native=False).table.num_rows for b in bodies)
        deferred = sum(decode_columns(b).deferred for b in bodies)
        best = {"ours": float("inf"), "reference": float("inf")}
        for _ in range(args.repeat):
            for label, fn in (("ours", ours), ("reference", reference)):
                secs, n = timed(fn, bodies)
                assert n == rows, (label, n, rows)
                best[label] = min(best[label], secs)
        r_ours, r_ref = rows / best["ours"], rows / best["reference"]
        print(f"{name:7s} {rows} records in {len(bodies)} batches, {deferred} deferred: "
              f"native {r_ours:,.0f} records/s ({1e6 / r_ours:.2f} us/record), reference "
              f"{r_ref:,.0f} records/s ({1e6 / r_ref:.2f} us/record), ratio {r_ours / r_ref:.1f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
