"""Ingest into the flow store, in rows/s, side by side with DuckDB's own bulk load of the same rows.

Peer: the same rows, already in a Parquet file, loaded by DuckDB itself into the same `flows`
table (`INSERT INTO flows SELECT * FROM read_parquet(...)`), the fastest way DuckDB has to take
rows in. Ours: `DuckDBStore.ingest` per batch of 5,000 `FlowRecord`s (records -> Arrow columns ->
one INSERT ... SELECT and the batch mark in one durable transaction), and the full aggregator
path `CorrelatingStore.ingest` (also correlation, identity, connections/rollups/workloads upserts
in the same transaction). Target (issue #6): the raw store at least 0.8x the peer.

    python bench/bench_store.py [--rows 200000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from aggregator.correlate import Correlator
from aggregator.correlating import CorrelatingStore
from aggregator.identity import IdentityResolver, StaticMap
from aggregator.store.columns import COLUMN_NAMES, to_table
from aggregator.store.duckdb import DuckDBStore
from eastwest.drops import Drops
from eastwest.record import Endpoint, FlowRecord, Process, Rtt

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def make_records(n: int, workloads: int = 200) -> list[FlowRecord]:
    out = []
    for i in range(n):
        c, s = i % workloads, (i * 7 + 1) % workloads
        start = T0 + timedelta(milliseconds=i)
        out.append(FlowRecord(
            record_id=f"bench:{i}", collector="bench", source="socket", start=start,
            end=start + timedelta(seconds=1), final=True, protocol="tcp", family=4,
            client=Endpoint(f"10.{c // 250}.{c % 250}.1", 30000 + i % 30000),
            server=Endpoint(f"10.{s // 250}.{s % 250}.2", 8000 + s % 50),
            observer="client" if i % 2 else "server", bytes_c2s=100 + i % 997,
            bytes_s2c=1000 + i % 9973, connect="ok", rtt_us=Rtt(50, 80, 200),
            process=Process(1000 + c, f"svc-{c}")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    a = ap.parse_args()
    recs = make_records(a.rows)
    batches = [recs[i:i + a.batch] for i in range(0, len(recs), a.batch)]
    static = StaticMap([{"match": f"10.{w // 250}.{w % 250}.0/24", "name": f"svc-{w}",
                         "namespace": "bench"} for w in range(200)])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        # the peer: the same rows as Parquet, loaded by DuckDB itself
        table = to_table("bench", 1, recs, datetime.now(UTC))
        pq.write_table(table, t / "rows.parquet")
        peer = DuckDBStore(t / "peer")
        peer.close()
        con = duckdb.connect(str(t / "peer" / "eastwest.duckdb"))
        cols = ", ".join(COLUMN_NAMES)
        t0 = time.perf_counter()
        con.execute("BEGIN")
        con.execute(f"INSERT INTO flows ({cols}) SELECT {cols} FROM read_parquet(?)",
                    [str(t / "rows.parquet")])
        con.execute("COMMIT")
        peer_s = time.perf_counter() - t0
        con.close()

        raw = DuckDBStore(t / "raw")
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            raw.ingest("bench", i, b)
        raw_s = time.perf_counter() - t0
        raw.close()

        full = CorrelatingStore(DuckDBStore(t / "full"), Correlator(IdentityResolver(static)),
                                Drops())
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            full.ingest("bench", i, b)
        full_s = time.perf_counter() - t0
        conns = full.connection_count()
        full.close()

    n = len(recs)
    print(f"rows: {n}, batches of {a.batch}")
    print(f"{'path':<46} {'seconds':>8} {'rows/s':>10} {'vs peer':>8}")
    for name, s in (("duckdb read_parquet -> flows (peer)", peer_s),
                    ("DuckDBStore.ingest (raw flows)", raw_s),
                    ("CorrelatingStore.ingest (+ connections, rollups)", full_s)):
        print(f"{name:<46} {s:>8.2f} {n / s:>10,.0f} {peer_s / s:>7.2f}x")
    print(f"connections correlated: {conns}")


if __name__ == "__main__":
    main()
