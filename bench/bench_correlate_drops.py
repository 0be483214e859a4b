"""Benchmark: the aggregator's cost of drop records (issue 21), side by side with the same
workload without them. Not a test: it reports ratios, never passes or fails.

Workload: bench/bench_store.py's `merged` (every connection reported by its client's and its
server's socket probes and both hosts' wires). The peer run is that workload as it is; the
drops run replaces `--share` of the wire records by records of a drop source of the same
collector, connection and times (source `drops`, one or two reasons), so both runs correlate
the same number of records into the same connections. Timed: the column correlator with its C
core (plan + commit on the flat tables `decode_columns` gives, as the correlation worker runs),
where drop records are expanded to one row per reason in Python (aggregator/correlate_drops.py)
and kept as views; and the store rows of those plans (`drop_reasons` is read off the views blob
of each connection with drops). Runs alternate, best of `--repeat`.

    python bench/bench_correlate_drops.py [--records 200000] [--batch 5000] [--share 0.25]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import pyarrow as pa
from bench_correlate import column_correlator, table_of
from bench_store import batches_of, make_merged

from aggregator.store.columns import gc_paused
from eastwest.record import Drop, FlowRecord


def with_drops(per: dict[str, list[FlowRecord]], share: float) -> dict[str, list[FlowRecord]]:
    """`share` of the wire records replaced by a drop source's record of the same flow."""
    out: dict[str, list[FlowRecord]] = {}
    every = max(1, round(1 / share)) if share > 0 else 0
    k = 0
    for coll, recs in per.items():
        got = []
        for r in recs:
            if r.observer == "path" and every:
                k += 1
                if k % every == 0:
                    drops = ([Drop("NETFILTER_DROP", 1 + k % 7)] if k % 2 else
                             [Drop("NETFILTER_DROP", 3), Drop("NO_SOCKET", 1)])
                    r = FlowRecord(record_id=r.record_id, collector=r.collector, source="drops",
                                   start=r.start, end=r.end, final=r.final,
                                   protocol=r.protocol, family=r.family, client=r.client,
                                   server=r.server, observer="path", drops=drops)
            got.append(r)
        out[coll] = got
    return out


def timed(tables: list[pa.Table]) -> float:
    c = column_correlator()
    gc.collect()
    with gc_paused():
        t0 = time.perf_counter()
        for t in tables:
            c.commit(c.plan(t))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--share", type=float, default=0.25, help="share of wire records replaced")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    per = make_merged(args.records)
    runs = {"peer: no drop records": per, f"{args.share:.0%} of wire records are drop records":
            with_drops(per, args.share)}
    tables = {name: [table_of(recs) for _, _, recs in batches_of(p, args.batch)]
              for name, p in runs.items()}
    n = sum(t.num_rows for t in next(iter(tables.values())))
    drops = sum(int(pa.compute.sum(pa.compute.equal(t.column("source"), "drops")).as_py() or 0)
                for t in tables[list(tables)[1]])
    best = {name: float("inf") for name in tables}
    for _ in range(args.repeat):
        for name, ts in tables.items():
            best[name] = min(best[name], timed(ts))
    print(f"{n:,} records ({drops:,} drop records in the second run), batches of {args.batch:,}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    peer = best[list(best)[0]]
    for name, s in best.items():
        print(f"{name:<44} {s:>7.2f} s {n / s:>11,.0f} records/s {s / peer:>6.2f}x the peer's time")


if __name__ == "__main__":
    main()
