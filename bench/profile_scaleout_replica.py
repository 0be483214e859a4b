"""Where one aggregator replica's time goes, one share at a time against coalesced (issue 19).

In process, no NATS: the records of bench_scaleout.py split into the P = 6 partitions' shares as
collectors publish them, fed to one replica that owns every partition (the correlation and
intake of tests/unit/test_coalesce.py, which aggregator/pipeline.py builds the same) on a real
ClickHouse 18.16 with 2 local shards: first one share at a time (`--nats-coalesce 1`), then each
partition's shares all at once (what a replica finds waiting when it is behind). Prints wall
time, process CPU per 1,000 records, the ClickHouse statements and their wall time, and the top
of a cProfile (internal time) of each. Run under `flock /tmp/ew-lab.lock` on a shared machine.

    python bench/profile_scaleout_replica.py [--records 100000] [--batch 5000] [--top 12]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_scaleout import T0, batches  # noqa: E402

from aggregator.store.clickhouse import ClickHouseStore  # noqa: E402
from eastwest import codec  # noqa: E402
from eastwest.codec import Batch  # noqa: E402
from eastwest.partition import mark_seq, record_partition  # noqa: E402
from tests.servers import ClickHouseServer  # noqa: E402
from tests.unit import test_coalesce  # noqa: E402

P = 6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    streams: dict[int, list[bytes]] = {k: [] for k in range(P)}
    for h, s, recs in batches(args.records, args.batch):
        for k in range(P):
            mine = [r for r in recs if record_partition(r, P) == k]
            if mine:
                streams[k].append(codec.encode_batch(Batch(h, mark_seq(s, k), T0, mine)))
    test_coalesce.P = P
    with tempfile.TemporaryDirectory(prefix="ew-profile-replica-") as d:
        ch = ClickHouseServer(Path(d) / "ch").start()
        try:
            for size in (1, 0):
                store = ClickHouseStore(ch.url(f"prof{size}"))
                spent = [0.0, 0]
                real = store._exec

                def timed(*a: Any, real: Any = real, spent: list = spent, **kw: Any) -> Any:
                    t = time.perf_counter()
                    try:
                        return real(*a, **kw)
                    finally:
                        spent[0] += time.perf_counter() - t
                        spent[1] += 1

                store._exec = timed  # type: ignore[method-assign]
                replica = test_coalesce.Replica(store)
                prof = cProfile.Profile()
                t0, c0 = time.perf_counter(), time.process_time()
                prof.enable()
                replica.feed(streams, size)
                prof.disable()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                n = store.count()
                mode = "one share at a time" if size == 1 else "coalesced"
                print(f"=== {mode}: {sum(map(len, streams.values()))} shares, {n} records, wall "
                      f"{wall:.2f} s ({n / wall:.0f} records/s), CPU {cpu:.2f} s "
                      f"({1000 * cpu / n:.3f} s per 1,000), {spent[1]} ClickHouse statements "
                      f"taking {spent[0]:.2f} s")
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
                print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
                store.close()
        finally:
            ch.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
