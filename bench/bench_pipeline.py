"""The aggregator's pipeline at a sustained rate: records/s until stored AND correlated, side by
side with DuckDB's own bulk insert of the same rows, and freshness under a steady stream.

Workloads (bench/bench_store.py's generators; records as the collectors write them):
- `merged`: every connection between pods on different hosts reported 4 times (client, server,
  both hosts' wire), each collector sending its own batches: 3 of 4 records join a connection
  that exists;
- `new`: every record a connection of its own.

1. Sustained rate. The batches in the wire form (msgpack + zstd, as POSTed) go through the
   pipeline's intake (aggregator/pipeline.py: decode into columns, journal, ack; the correlation
   worker behind it), as fast as intake takes them. The stream is longer than the backlog
   (`--backlog`, smaller than the default 500,000 so a run stays short): once it is full, intake
   answers Backlogged and the sender waits 10 ms and retries, as a collector's spool does. The
   clock stops when every batch is stored and correlated (raw rows, connections, rollups,
   workloads in DuckDB). Peer, in the same run: DuckDB's `INSERT ... SELECT FROM read_parquet`
   of the same raw rows, a transaction per batch (what our store owes every batch), and the
   acknowledged rate of the same stream. Reported: records/s, the ratios, the correlator's
   engine and what its C core holds at the end (connections, bytes, identity resolver calls),
   and the process's RSS growth from building the pipeline to the end (the aggregator's memory
   with every connection of the run held: `--workload new --records 1000000` for 1M).
2. Freshness. A sender thread keeps a steady `--rate` (records/s, default 100,000) of merged
   batches going for `--seconds`; each batch carries one marker connection to port 65001 seen
   by its client. A reader reads the graph as GET /api/v1/graph does (the read path, which
   first waits for every batch acknowledged before the read; filtered to the marker port) every
   `--poll` seconds, and a live stream subscriber for the marker port (the fan-out's hub, as
   GET /api/v1/flows/stream?to_port=65001 gets it) counts the marker connections: per batch, the time from its
   acknowledgement to its marker being visible in the graph and on the stream. Reported: p50 /
   p95 / max, and the rate acknowledged (a sender held back by "backlogged" waits and retries,
   as a collector does).

The correlator (aggregator/correlate_columns.py) runs its C core when the native library is
built, else the reference engine; `--engine reference` forces the reference (as
EASTWEST_CORRELATE_NATIVE=0 does), `--engine native` refuses to run without the C core.
Absolute numbers depend on the machine (2 cores here, shared: the load average is printed);
the ratios are the result.

    python bench/bench_pipeline.py [--records 600000] [--batch 5000] [--backlog 200000]
        [--workload merged|new|both] [--rate 100000] [--seconds 20] [--skip-freshness]
        [--engine native|reference]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_store import (  # noqa: E402
    T0,
    batches_of,
    make_merged,
    make_new,
    socket_record,
    static_map,
)

from aggregator.correlate_native import ENV as CORRELATE_ENV  # noqa: E402
from aggregator.identity import IdentityResolver  # noqa: E402
from aggregator.intake import Retry  # noqa: E402
from aggregator.pipeline import Pipeline, build  # noqa: E402
from aggregator.serve import SWITCH_INTERVAL_S  # noqa: E402
from aggregator.settings import AggregatorSettings  # noqa: E402
from aggregator.store.columns import flows_table  # noqa: E402
from aggregator.store.duckdb import FILE_NAME, FLOW_NAMES, DuckDBStore  # noqa: E402
from aggregator.store.query import EdgeQuery  # noqa: E402
from aggregator.store.wire_columns import decode_columns  # noqa: E402
from aggregator.worker import COALESCE, WorkerSettings  # noqa: E402
from eastwest import codec  # noqa: E402
from eastwest.filters import Filter  # noqa: E402

MARKER_PORT = 65001


def pipeline(data: Path, backlog: int, engine: str | None, coalesce: int = COALESCE) -> Pipeline:
    if engine == "reference":
        os.environ[CORRELATE_ENV] = "0"
    settings = AggregatorSettings(data_dir=data, insecure_open=True, retention=None,
                                  correlation_backlog=backlog,
                                  max_batch_records=min(backlog, 100_000))
    p = build(settings, store=DuckDBStore(data), own_store=True,
              resolver=IdentityResolver(static_map()), env={},
              worker=WorkerSettings(max_pending=backlog, coalesce=coalesce))
    if engine == "native" and not p.correlator.native:
        p.stop()
        sys.exit(f"bench_pipeline: --engine native: {p.correlator.why_not_native}")
    return p


def rss() -> int:
    """Resident bytes now (after handing freed heap back to the system)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def duckdb_memory(p: Pipeline) -> int:
    """Bytes DuckDB holds in its buffer manager (its own accounting, duckdb_memory())."""
    con = getattr(p.store, "_con", None)
    if con is None:
        return 0
    return int(con.cursor().execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()")
               .fetchone()[0] or 0)


def engine_of(p: Pipeline) -> str:
    """The correlator's engine and, with the C core, what it holds."""
    if not p.correlator.native:
        return f"reference engine ({p.correlator.why_not_native})"
    held = ", ".join(f"{k} {v:,}" for k, v in p.correlator.stats().items())
    return f"C core ({held})"


def sustained(workload: str, n: int, size: int, backlog: int, engine: str | None,
              coalesce: int) -> None:
    per = make_merged(n) if workload == "merged" else make_new(n)
    batches = batches_of(per, size)
    rows = sum(len(b[2]) for b in batches)
    now = datetime.now(UTC)
    bodies = [codec.encode_batch(codec.Batch(coll, seq, now, recs)) for coll, seq, recs in batches]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        # the peer: the raw rows our store writes, from Parquet, a transaction per batch
        files = []
        for k, (coll, seq, recs) in enumerate(batches):
            pq.write_table(flows_table(coll, seq, recs, now), t / f"b{k}.parquet")
            files.append(str(t / f"b{k}.parquet"))
        DuckDBStore(t / "peer").close()
        con = duckdb.connect(str(t / "peer" / FILE_NAME))
        cols = ", ".join(FLOW_NAMES)
        t0 = time.perf_counter()
        for f in files:
            con.execute("BEGIN")
            con.execute(f"INSERT INTO flows ({cols}) SELECT {cols} FROM read_parquet(?)", [f])
            con.execute("COMMIT")
        con.execute("CHECKPOINT")
        peer = time.perf_counter() - t0
        con.close()

        gc.collect()
        rss0 = rss()
        p = pipeline(t / "agg", backlog, engine, coalesce)
        default_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # as `eastwest aggregator` runs (serve.py)
        waits = 0
        t0 = time.perf_counter()
        for body in bodies:
            while True:
                try:
                    p.intake.accept(decode_columns(body), body)
                    break
                except Retry:  # the backlog is full: as a collector, wait and send again
                    waits += 1
                    time.sleep(0.01)
        acked = time.perf_counter() - t0
        assert p.correlation.applied(None)
        done = time.perf_counter() - t0
        p.store.checkpoint()  # as the peer: no work left behind in the WAL
        flushed = time.perf_counter() - t0
        sys.setswitchinterval(default_switch)
        conns = p.read().connection_count()
        gc.collect()
        grown = rss() - rss0
        duck = duckdb_memory(p)
        kind = engine_of(p)
        p.stop()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nsustained, workload {workload}: {rows:,} records in {len(batches)} batches of "
          f"<= {size}, {conns:,} connections, backlog {backlog:,} ({waits} full-backlog waits); "
          f"load average {load}")
    print(f"correlator: {kind}")
    print(f"{'path':<58} {'seconds':>8} {'records/s':>11} {'vs peer':>8}")
    for name, s in (("peer: DuckDB read_parquet, a transaction per batch (raw)", peer),
                    ("pipeline, acknowledged (last batch journaled)", acked),
                    ("pipeline, until stored and correlated", done),
                    ("pipeline, until stored, correlated and checkpointed", flushed)):
        print(f"{name:<58} {s:>8.2f} {rows / s:>11,.0f} {peer / s:>7.2f}x")
    print(f"stored+correlated / acknowledged rate: {acked / done:.2f}x")
    print(f"the aggregator's memory (RSS growth from building the pipeline to the end): "
          f"{grown / 2**20:,.0f} MiB for {conns:,} connections held, "
          f"{grown / max(conns, 1):,.0f} bytes a connection")
    print(f"  of which DuckDB's buffers {duck / 2**20:,.0f} MiB, Arrow's pool "
          f"({pa.default_memory_pool().backend_name}) {pa.total_allocated_bytes() / 2**20:,.0f} MiB")


def freshness(rate: float, seconds: float, size: int, engine: str | None,
              coalesce: int, poll: float) -> None:
    per = make_merged(int(rate * seconds))
    batches = batches_of(per, size)
    now = datetime.now(UTC)
    # one marker connection per batch: a client record to MARKER_PORT, its own client port
    marked = []
    for k, (coll, seq, recs) in enumerate(batches):
        r = recs[-1]
        marker = socket_record(10_000_000 + k, coll, "client", r.start, r.end, 1, 2, 1024 + k,
                               (1, 1), 1)
        marker = marker.__class__.from_builtins({**marker.to_builtins(), "server": {
            "ip": marker.server.ip, "port": MARKER_PORT}})
        marked.append(codec.encode_batch(codec.Batch(coll, seq, now, [*recs, marker])))
    with tempfile.TemporaryDirectory() as tmp:
        p = pipeline(Path(tmp), 500_000, engine, coalesce)
        loop = asyncio.new_event_loop()
        lt = threading.Thread(target=loop.run_forever, daemon=True)
        lt.start()
        sub = asyncio.run_coroutine_threadsafe(_subscribe(p), loop).result()
        acked: dict[int, float] = {}
        seen_graph: dict[int, float] = {}
        seen_stream: dict[int, float] = {}
        seen_told: dict[int, float] = {}

        def told(ch: Any) -> None:  # a fan-out listener, as the exporters: the step is stored
            t = time.perf_counter()
            ports = ch.rows.column("server_port").to_numpy(zero_copy_only=False)
            for i in (ports == MARKER_PORT).nonzero()[0].tolist():
                seen_told.setdefault(ch.rows.column("client_port")[i].as_py() - 1024, t)

        p.fanout.add_listener(told)
        stop = threading.Event()
        held = [0]  # answers "backlogged" (429): the stream outran the aggregator
        t_send = [0.0, 0.0]

        def send() -> None:
            interval = size / rate
            t_next = t_send[0] = time.perf_counter()
            for k, body in enumerate(marked):
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t_next += interval
                while True:
                    try:
                        p.intake.accept(decode_columns(body), body)
                        break
                    except Retry:  # as a collector's spool: wait, send again
                        held[0] += 1
                        time.sleep(0.01)
                acked[k] = time.perf_counter()
            t_send[1] = time.perf_counter()
            stop.set()

        def graph_reader() -> None:
            q = EdgeQuery(T0 - timedelta(days=1), T0 + timedelta(days=1),
                          filter=Filter.build([("to_port", str(MARKER_PORT), False)]))
            while not stop.is_set() or len(seen_graph) < len(marked):
                edges = p.read(5).edges(q)
                n = 0
                for j in edges["json"]:
                    n += int(_field(j, "connections_opened"))
                t = time.perf_counter()
                for k in range(len(seen_graph), min(n, len(marked))):
                    seen_graph[k] = t
                if stop.is_set() and time.perf_counter() - acked.get(len(marked) - 1, 0) > 30:
                    break
                time.sleep(poll)

        async def stream_reader() -> None:  # on the hub's loop, as the SSE route reads it
            while len(seen_stream) < len(marked):
                row = await sub.get()
                if row["server_port"] == MARKER_PORT:
                    seen_stream[row["client_port"] - 1024] = time.perf_counter()

        streaming = asyncio.run_coroutine_threadsafe(stream_reader(), loop)
        threads = [threading.Thread(target=f, daemon=True) for f in (send, graph_reader)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()  # the reader gives up 30 s after the last acknowledgement
        try:
            streaming.result(30)
        except Exception:  # noqa: BLE001 - not every marker arrived: reported below
            streaming.cancel()
        p.fanout.hub.unsubscribe(sub)
        loop.call_soon_threadsafe(loop.stop)
        kind = "C core" if p.correlator.native else "reference engine"
        p.stop()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sent = sum(len(b[2]) + 1 for b in batches) / max(t_send[1] - t_send[0], 1e-9)
    print(f"\nfreshness: {rate:,.0f} records/s offered for {seconds:g} s ({len(marked)} batches "
          f"of {size} + a marker), {sent:,.0f} records/s acknowledged ({held[0]} backlogged "
          f"answers); graph polled every {poll * 1000:g} ms; correlator {kind}; "
          f"load average {load}")
    for name, seen in (("stored (fan-out listener)", seen_told), ("GET /api/v1/graph", seen_graph),
                       ("live stream (SSE hub)", seen_stream)):
        lat = sorted(seen[k] - acked[k] for k in seen if k in acked)
        if not lat:
            print(f"{name:<24} nothing seen")
            continue
        p95 = lat[int(0.95 * (len(lat) - 1))]
        print(f"{name:<24} seen {len(lat)}/{len(marked)}: p50 {statistics.median(lat) * 1000:.0f} ms, "
              f"p95 {p95 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms")


async def _subscribe(p: Pipeline) -> Any:  # as `eastwest flows --follow --to-port 65001`
    return p.fanout.hub.subscribe(Filter.build([("to_port", str(MARKER_PORT), False)]))


def _field(json_text: str, name: str) -> Any:
    import json

    return json.loads(json_text)[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=600_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--backlog", type=int, default=200_000)
    ap.add_argument("--workload", choices=("merged", "new", "both"), default="both")
    ap.add_argument("--rate", type=float, default=100_000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--engine", choices=("native", "reference"),
                    help="the correlator's engine (default: the C core when built)")
    ap.add_argument("--skip-freshness", action="store_true")
    ap.add_argument("--poll", type=float, default=0.1,
                    help="seconds between two graph reads (a dashboard polls every few)")
    ap.add_argument("--coalesce", type=int, default=COALESCE,
                    help=f"records correlated in one step when behind (default {COALESCE:,})")
    a = ap.parse_args()
    for w in (("merged", "new") if a.workload == "both" else (a.workload,)):
        sustained(w, a.records, a.batch, a.backlog, a.engine, a.coalesce)
    if not a.skip_freshness:
        freshness(a.rate, a.seconds, a.batch, a.engine, a.coalesce, a.poll)


if __name__ == "__main__":
    pa.set_cpu_count(2)
    main()
