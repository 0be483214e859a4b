"""Merged NodePort halves in ClickHouse: a mutation per merge (before) vs a tombstone row (now).

A NodePort call whose client half was stored before its middle host's record is merged, and
the half's stored connection must go (docs/aggregator.md, "NodePort calls with masquerade").
Both ways run the same real pipeline (aggregator/pipeline.py, the real correlator) into a fresh
database of the same ClickHouse server (tests/servers.py: clickhouse-server 18.16, the cluster of
2 local shards the tests use):

- `mutation`: the previous code, `ALTER TABLE <shard>.connections DELETE WHERE conn_id IN (...)`
  on every shard, awaited (ClickHouseStore `_delete`), per step that removes a half;
- `tombstone`: the store as it is: one insert of a row of the half's key with `deleted = 1`
  (aggregator/store/clickhouse.py `_tombstones`).

Per call: the client half (one batch), then the middle record (one batch: the merge). First
`--background` other connections are stored (a mutation rewrites the parts holding them).
Printed: the wall time of the merge batches, the time in the removal itself, per merge, the
ratio, the load average (the machine is shared) and the answers checked equal (one connection
per call, no half).

    python bench/bench_nodeport_delete.py [--calls 100] [--background 20000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.identity import IdentityResolver  # noqa: E402
from aggregator.store.clickhouse import ClickHouseStore  # noqa: E402
from aggregator.store.clickhouse_schema import Location  # noqa: E402
from eastwest.record import Endpoint  # noqa: E402
from tests.servers import ClickHouseServer  # noqa: E402
from tests.unit.pipes import driven  # noqa: E402
from tests.unit.test_correlate import MAP, rec  # noqa: E402
from tests.unit.test_correlate_nodeport import CLIENT, T0, piece  # noqa: E402


class MutationStore(ClickHouseStore):
    """The store before tombstones: every version of a merged half deleted by a mutation on
    every shard, awaited (the code this replaced)."""

    def _tombstones(self, removed: dict[str, tuple[str, str, int, str, int, int]]) -> None:
        ids = ", ".join("'" + cid + "'" for cid in removed if cid.isalnum())
        if ids:
            self._delete("connections", f"conn_id IN ({ids})", None)


def timed(store: ClickHouseStore, spent: list[float]) -> None:
    real: Callable[..., Any] = store._tombstones

    def wrapped(removed: dict[str, tuple[str, str, int, str, int, int]]) -> None:
        t = time.perf_counter()
        real(removed)
        spent.append(time.perf_counter() - t)

    store._tombstones = wrapped  # type: ignore[method-assign]


def run(kind: str, url: str, calls: int, background: int) -> dict[str, float]:
    store = (MutationStore if kind == "mutation" else ClickHouseStore)(Location.parse(url))
    spent: list[float] = []
    timed(store, spent)
    s = driven(store, IdentityResolver(MAP))
    try:
        per = 5000
        for b in range(0, background, per):
            s.ingest("bg", b // per + 1, [rec("client", collector="bg", cport=1024 + (b + i) % 60000,
                                              start=T0 - timedelta(seconds=(b + i) // 60000))
                                          for i in range(min(per, background - b))])
        s.flush()
        merge_wall = 0.0
        for i in range(calls):
            client = Endpoint(CLIENT.ip, 20000 + i)
            s.ingest("h1", i + 1, [piece("client", final=True, client=client)])
            s.flush()
            t = time.perf_counter()
            s.ingest("h2", i + 1, [piece("middle", final=True, client=client)])
            s.flush()
            merge_wall += time.perf_counter() - t
        assert len(spent) == calls, f"{kind}: {len(spent)} removals for {calls} merges"
        n = s.connection_count()
        assert n == background + calls, f"{kind}: {n} connections"
        return {"merge_wall": merge_wall, "removal": sum(spent)}
    finally:
        s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100, help="NodePort calls merged (default 100)")
    ap.add_argument("--background", type=int, default=20000,
                    help="other connections stored first (default 20000)")
    a = ap.parse_args()
    server = ClickHouseServer().start()
    try:
        print(f"load average before: {os.getloadavg()}")
        got = {}
        for kind in ("mutation", "tombstone"):
            got[kind] = run(kind, server.url(f"bench_{kind}"), a.calls, a.background)
            r = got[kind]
            print(f"{kind:9s}: {a.calls} merges, merge batches {r['merge_wall']:.2f} s "
                  f"({1000 * r['merge_wall'] / a.calls:.1f} ms each), removal "
                  f"{r['removal']:.2f} s ({1000 * r['removal'] / a.calls:.1f} ms each); "
                  f"load {os.getloadavg()[0]:.2f}")
        m, t = got["mutation"], got["tombstone"]
        print(f"ratio mutation/tombstone: removal {m['removal'] / t['removal']:.1f}x, "
              f"merge batches {m['merge_wall'] / t['merge_wall']:.1f}x")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
