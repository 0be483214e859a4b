"""Ingest into the flow store, in rows/s, side by side with DuckDB's own bulk load of the same rows.

Workloads (records as the collectors write them: socket records with process, cmdline, cgroup
and RTT; VXLAN path records with tunnel, packets, L3 bytes and TCP flags):
- `merged`: every connection between pods on different hosts is reported 4 times, by its
  client's and its server's socket probes and by both hosts' underlays, each collector sending
  its own batches (the lab's shape; 3 of 4 records join a connection that exists);
- `new`: every record a connection of its own (the previous version of this bench).

Paths, one durable transaction per batch of `--batch` records:
- peer A: DuckDB loads the rows our store writes from Parquet, ALL in one transaction
  (`INSERT INTO flows SELECT ... FROM read_parquet(...)`): the issue's peer;
- peer B: the same, one transaction per batch (the durability our ingest owes every batch);
- `DuckDBStore.ingest`, records in hand: `FlowRecord`s -> columns -> DuckDB (raw flows);
- wire batch -> columns -> DuckDB: what the store gets in the aggregator, each batch in the wire
  form (msgpack + zstd, as POSTed), decoded straight into columns (aggregator/store/
  wire_columns.py, its native decoder when built) and written in one durable transaction: THE
  store ingest path, compared with the peers;
- the aggregator path: the same bytes through the pipeline's intake (aggregator/pipeline.py).
  Acknowledged: the batch is durable in the ingest journal (aggregator/store/journal.py; the
  store and correlation run behind it, at most `--correlation-backlog` records,
  aggregator/worker.py); until
  stored and correlated: until the raw rows, connections, rollups and workloads are in DuckDB
  too (the worker caught up).
Target (issue #6): at least 0.8x the peer. The load average is printed: the machine is shared.

    python bench/bench_store.py [--records 200000] [--batch 5000] [--workload merged|new|both]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from aggregator.identity import IdentityResolver, StaticMap
from aggregator.pipeline import build
from aggregator.serve import SWITCH_INTERVAL_S
from aggregator.settings import AggregatorSettings
from aggregator.store.columns import flows_table
from aggregator.store.duckdb import FILE_NAME, FLOW_NAMES, DuckDBStore
from aggregator.store.wire_columns import decode_columns, native_available
from eastwest import codec
from eastwest.record import Cgroup, Endpoint, FlowRecord, Process, Rtt, Tunnel, flags_from_bits

T0 = datetime(2026, 11, 1, tzinfo=UTC)
WORKLOADS, HOSTS = 200, 3


def ip_of(w: int) -> str:
    return f"10.{w // 250}.{w % 250}.1"


def host_of(w: int) -> int:
    return w % HOSTS + 1


def static_map() -> StaticMap:
    return StaticMap([{"match": f"10.{w // 250}.{w % 250}.0/24", "name": f"svc-{w}",
                       "namespace": "bench", "host": f"h{host_of(w)}"} for w in range(WORKLOADS)]
                     + [{"match": f"10.213.0.{h}/32", "name": f"node-h{h}", "kind": "Node",
                         "host": f"h{h}"} for h in range(1, HOSTS + 1)])


def socket_record(seq: int, coll: str, observer: str, start: datetime, end: datetime, c: int,
                  s: int, cport: int, b: tuple[int, int], w: int) -> FlowRecord:
    return FlowRecord(
        record_id=f"{coll}:{seq}", collector=coll, source="socket", start=start, end=end,
        final=True, protocol="tcp", family=4, client=Endpoint(ip_of(c), cport),
        server=Endpoint(ip_of(s), 8000 + s % 50), observer=observer,  # type: ignore[arg-type]
        bytes_c2s=b[0], bytes_s2c=b[1], connect="ok", retransmits=0, rtt_us=Rtt(50, 80, 200),
        process=Process(1000 + w, f"ew-svc-{w}", f"/usr/bin/python3 -m app --service svc-{w}"),
        netns=4026532000 + w, cgroup=Cgroup(7000 + w, f"/kubepods/pod-svc-{w}/app"))


def path_record(seq: int, coll: str, h_c: int, h_s: int, start: datetime, end: datetime, c: int,
                s: int, cport: int, b: tuple[int, int]) -> FlowRecord:
    return FlowRecord(
        record_id=f"{coll}:{seq}", collector=coll, source="vxlan", start=start, end=end,
        final=True, protocol="tcp", family=4, client=Endpoint(ip_of(c), cport),
        server=Endpoint(ip_of(s), 8000 + s % 50), observer="path", bytes_c2s=b[0],
        bytes_s2c=b[1], packets_c2s=b[0] // 1400 + 3, packets_s2c=b[1] // 1400 + 3,
        l3_bytes_c2s=b[0] + 40 * (b[0] // 1400 + 3), l3_bytes_s2c=b[1] + 40 * (b[1] // 1400 + 3),
        connect="ok", tunnel=Tunnel("vxlan", 42, f"10.213.0.{h_c}", f"10.213.0.{h_s}", 4789),
        tcp_flags=flags_from_bits(0x1B))


def make_merged(n: int) -> dict[str, list[FlowRecord]]:
    """About `n` records of connections between pods on different hosts, per collector."""
    per: dict[str, list[FlowRecord]] = {f"h{h}": [] for h in range(1, HOSTS + 1)}
    seq = 0
    i = 0
    while sum(len(v) for v in per.values()) < n:
        c = i % WORKLOADS
        s = (i * 7 + 1) % WORKLOADS
        if host_of(c) == host_of(s):
            s = (s + 1) % WORKLOADS
        hc, hs = host_of(c), host_of(s)
        start = T0 + timedelta(microseconds=500 * i)
        end = start + timedelta(milliseconds=200 + i % 800)
        cport = 32768 + i % 28000
        b = (100 + i % 997, 1000 + i % 9973)
        skew = timedelta(microseconds=i % 900)  # the server host's clock is a little ahead
        for coll, rec in (
                (f"h{hc}", socket_record(seq, f"h{hc}", "client", start, end, c, s, cport, b, c)),
                (f"h{hs}", socket_record(seq + 1, f"h{hs}", "server", start + skew, end + skew,
                                         c, s, cport, b, s)),
                (f"h{hc}", path_record(seq + 2, f"h{hc}", hc, hs, start, end, c, s, cport, b)),
                (f"h{hs}", path_record(seq + 3, f"h{hs}", hc, hs, start + skew, end + skew, c,
                                       s, cport, b))):
            per[coll].append(rec)
        seq += 4
        i += 1
    return per


def make_new(n: int) -> dict[str, list[FlowRecord]]:
    out = []
    for i in range(n):
        c, s = i % WORKLOADS, (i * 7 + 1) % WORKLOADS
        start = T0 + timedelta(milliseconds=i)
        rec = socket_record(i, "bench", "client" if i % 2 else "server", start,
                            start + timedelta(seconds=1), c, s, 30000 + i % 30000,
                            (100 + i % 997, 1000 + i % 9973), c if i % 2 else s)
        out.append(rec)
    return {"bench": out}


def batches_of(per: dict[str, list[FlowRecord]], size: int) -> list[tuple[str, int, list[FlowRecord]]]:
    """Each collector's records in batches, the collectors' batches interleaved by time."""
    out = []
    for coll, recs in per.items():
        recs = sorted(recs, key=lambda r: r.end)
        for k, i in enumerate(range(0, len(recs), size)):
            out.append((coll, k, recs[i:i + size]))
    return sorted(out, key=lambda b: (b[2][-1].end, b[0]))


def run(workload: str, n: int, size: int) -> list[tuple[str, float]]:
    per = make_merged(n) if workload == "merged" else make_new(n)
    batches = batches_of(per, size)
    rows = sum(len(b[2]) for b in batches)
    now = datetime.now(UTC)
    cols = ", ".join(FLOW_NAMES)
    native = "" if native_available()[0] else " [no native decoder]"
    out: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        # the rows exactly as our store writes them, already columns, in Parquet files
        files = []
        for k, (coll, seq, recs) in enumerate(batches):
            table = flows_table(coll, seq, recs, now)
            pq.write_table(table, t / f"b{k}.parquet")
            files.append(str(t / f"b{k}.parquet"))
        pq.write_table(pa.concat_tables([pq.read_table(f) for f in files]), t / "all.parquet")
        for name, per_batch in (("peer A: read_parquet, one transaction", False),
                                ("peer B: read_parquet, a transaction per batch", True)):
            DuckDBStore(t / name[:6].replace(" ", "")).close()
            con = duckdb.connect(str(t / name[:6].replace(" ", "") / FILE_NAME))
            t0 = time.perf_counter()
            for f in (files if per_batch else [str(t / "all.parquet")]):
                con.execute("BEGIN")
                con.execute(f"INSERT INTO flows ({cols}) SELECT {cols} FROM read_parquet(?)", [f])
                con.execute("COMMIT")
            con.execute("CHECKPOINT")
            out.append((name, time.perf_counter() - t0))
            con.close()

        # what the aggregator receives: each batch in the wire form (msgpack + zstd)
        bodies = [codec.encode_batch(codec.Batch(coll, seq, now, recs))
                  for coll, seq, recs in batches]
        raw = DuckDBStore(t / "raw")
        t0 = time.perf_counter()
        for coll, seq, recs in batches:
            raw.ingest(coll, seq, recs)
        raw.checkpoint()
        out.append(("DuckDBStore.ingest, records in hand (raw)", time.perf_counter() - t0))
        raw.close()

        wire = DuckDBStore(t / "wire")
        t0 = time.perf_counter()
        for body in bodies:
            b = decode_columns(body)
            wire.ingest_table(b.collector, b.batch_seq, b.table, b.table.num_rows)
        wire.checkpoint()
        out.append((f"wire batch -> columns -> DuckDB (raw){native}", time.perf_counter() - t0))
        wire.close()

        store = DuckDBStore(t / "full")
        full = build(AggregatorSettings(data_dir=t / "full", insecure_open=True, retention=None),
                     store=store, resolver=IdentityResolver(static_map()), env={})
        default_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # as `eastwest aggregator` runs (serve.py)
        t0 = time.perf_counter()
        for body in bodies:
            full.intake.accept(decode_columns(body), body)
        acked = time.perf_counter() - t0
        full.correlation.applied(None)  # until correlation has caught up
        store.checkpoint()
        out.append(("aggregator path (wire -> journal; store behind), acked", acked))
        out.append(("aggregator path, until stored and correlated", time.perf_counter() - t0))
        conns = full.read().connection_count()
        full.stop()
        store.close()
        sys.setswitchinterval(default_switch)
    print(f"\nworkload {workload}: {rows:,} records in {len(batches)} batches of <= {size}, "
          f"{conns:,} connections; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'path':<60} {'seconds':>8} {'rows/s':>10} {'vs A':>6} {'vs B':>6}")
    peer_a, peer_b = out[0][1], out[1][1]
    for name, s in out:
        print(f"{name:<60} {s:>8.2f} {rows / s:>10,.0f} {peer_a / s:>5.2f}x {peer_b / s:>5.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--workload", choices=("merged", "new", "both"), default="both")
    a = ap.parse_args()
    for w in (("merged", "new") if a.workload == "both" else (a.workload,)):
        run(w, a.records, a.batch)


if __name__ == "__main__":
    main()
