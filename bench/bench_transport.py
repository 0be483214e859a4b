"""Records/s through one collector -> aggregator link, side by side with a plain httpx POST loop.

Ours: `collector.export.AggregatorSink` fed the records in chunks of 1,000 (as the pipeline
does): batching (5,000 per batch), the wire form (msgpack + zstd), the on-disk spool, HTTP POST
with the ingest token, until the aggregator has acknowledged the last batch (= stored durably).
The aggregator acknowledges a batch once it is stored raw, durably; correlation runs behind
(aggregator/worker.py): the rates until everything is also correlated are shown too.
Peer: the very same encoded batches (pre-encoded, so the peer pays nothing for them), POSTed one
after the other by a bare `httpx.Client` loop to the same aggregator process.
Server: a real `eastwest aggregator` subprocess (uvicorn, DuckDB file, full ingest path).
Also shown: the collector side alone (records -> sealed, spooled batches, no network), i.e. what
the transport could carry if the server were free; and the steady state: a stream of
`--sustained` records to an aggregator whose backlog bound (`--correlation-backlog`) is
`--backlog` records, so that most of the stream is acknowledged at the pace of the worker that
stores and correlates behind the journal (what a stream longer than the default 500,000-record
backlog gets).

    python bench/bench_transport.py [--records 100000] [--batch 5000] [--rounds 2]
                                    [--sustained 300000] [--backlog 50000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from collector.export import SWITCH_INTERVAL_S, AggregatorSink, ExportSettings
from collector.pipeline import CollectorContext
from eastwest import codec
from eastwest.cli.demo import Stack
from eastwest.record import Endpoint, FlowRecord, Process, Rtt

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def make_records(n: int, collector: str) -> list[FlowRecord]:
    return [FlowRecord(
        record_id=f"{collector}:{i}", collector=collector, source="socket",
        start=T0 + timedelta(milliseconds=i), end=T0 + timedelta(milliseconds=i + 900),
        final=True, protocol="tcp", family=4,
        client=Endpoint(f"10.244.{i % 200 // 100 + 1}.{i % 100 + 10}", 30000 + i % 30000),
        server=Endpoint(f"10.244.3.{(i * 7) % 50 + 10}", 8080), observer="client",
        bytes_c2s=100 + i % 5000, bytes_s2c=2000 + i % 70000, connect="ok",
        rtt_us=Rtt(50, 80, 120), process=Process(1000 + i % 50, "ew-api"), netns=4026532000)
        for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_sink(url: str, token: str, records: list[FlowRecord], spool: Path, batch: int) -> float:
    settings = ExportSettings(url=url, token=token, spool_dir=spool, batch_size=batch,
                              batch_age=0.2, shutdown_timeout=600.0, request_timeout=120.0)
    sink = AggregatorSink(CollectorContext(records[0].collector), settings=settings)
    default_switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as the collector process runs (collector/main.py)
    t = time.perf_counter()
    for i in range(0, len(records), 1000):
        sink.write(records[i:i + 1000])
    sink.close()  # seals the rest, waits until the spool is drained (acknowledged)
    elapsed = time.perf_counter() - t
    sys.setswitchinterval(default_switch)
    assert len(sink.spool) == 0, "batches left unsent"
    assert sink.metrics.records_out._value.get() == len(records)
    return elapsed


def run_peer(url: str, token: str, bodies: list[bytes]) -> float:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": codec.CONTENT_TYPE}
    with httpx.Client(timeout=120.0) as client:
        t = time.perf_counter()
        for body in bodies:
            r = client.post(url + "/api/v1/ingest", content=body, headers=headers)
            r.raise_for_status()
        return time.perf_counter() - t


def correlated_after(url: str, t0: float) -> float:
    """Seconds from `t0` until the aggregator's correlation has caught up with what it
    acknowledged (its lag gauge at 0; GET /metrics itself waits up to 5 s for it)."""
    with httpx.Client(timeout=120.0) as client:
        while True:
            text = client.get(url + "/metrics").text
            lag = [ln for ln in text.splitlines()
                   if ln.startswith("eastwest_correlation_lag_records ")]
            if not lag or float(lag[0].split()[1]) == 0:
                return time.perf_counter() - t0
            time.sleep(0.05)


def run_collector_side(records: list[FlowRecord], spool: Path, batch: int) -> float:
    """Batching + encoding + spooling only: a sink whose sender never runs."""
    settings = ExportSettings(url="http://127.0.0.1:9", token="x" * 20, spool_dir=spool,
                              batch_size=batch, shutdown_timeout=0.0)
    sink = AggregatorSink(CollectorContext(records[0].collector), settings=settings, start=False)
    t = time.perf_counter()
    for i in range(0, len(records), 1000):
        sink.write(records[i:i + 1000])
    sink.flush()
    elapsed = time.perf_counter() - t
    assert sink.spool.records() == len(records)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2, help="peer and sink alternate: P S, S P, ...")
    ap.add_argument("--sustained", type=int, default=300_000,
                    help="records of the steady-state stream (0: skip it)")
    ap.add_argument("--backlog", type=int, default=50_000,
                    help="the aggregator's --correlation-backlog for the steady-state stream")
    args = ap.parse_args()
    n = args.records
    times: dict[str, list[float]] = {k: [] for k in ("peer", "sink", "peer_done", "sink_done")}
    with tempfile.TemporaryDirectory(prefix="ew-bench-transport-") as tmp:
        root = Path(tmp)
        local = run_collector_side(make_records(n, "bench-local"), root / "spool-local", args.batch)
        stack = Stack(root / "data", listen=f"127.0.0.1:{free_port()}")
        try:
            stack.start_aggregator()
            token = stack.tokens["EASTWEST_INGEST_TOKEN"]
            for r in range(args.rounds):
                ours = make_records(n, f"bench-sink{r}")
                theirs = make_records(n, f"bench-peer{r}")
                bodies = [codec.encode_batch(codec.Batch(f"bench-peer{r}", seq, T0,
                                                         theirs[i:i + args.batch]))
                          for seq, i in enumerate(range(0, n, args.batch), 1)]
                for side in (("peer", "sink") if r % 2 == 0 else ("sink", "peer")):
                    t0 = time.perf_counter()
                    if side == "peer":
                        times["peer"].append(run_peer(stack.url, token, bodies))
                    else:
                        times["sink"].append(run_sink(stack.url, token, ours, root / f"spool{r}",
                                                      args.batch))
                    times[side + "_done"].append(correlated_after(stack.url, t0))
            stored = stack.read("/readyz")["records"]
        finally:
            stack.stop()
        steady = None
        if args.sustained:
            stack = Stack(root / "data-steady", listen=f"127.0.0.1:{free_port()}")
            try:
                stack.start_aggregator(extra=["--correlation-backlog", str(args.backlog),
                                             "--max-batch-records",
                                             str(min(args.backlog, 100_000))])
                token = stack.tokens["EASTWEST_INGEST_TOKEN"]
                recs = make_records(args.sustained, "bench-steady")
                t0 = time.perf_counter()
                acked = run_sink(stack.url, token, recs, root / "spool-steady", args.batch)
                steady = (acked, correlated_after(stack.url, t0))
                got = stack.read("/readyz")["records"]
                assert got == args.sustained, f"the aggregator stored {got} records"
            finally:
                stack.stop()
    assert stored == 2 * n * args.rounds, f"the aggregator stored {stored} records"
    wire = sum(map(len, bodies))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"records: {n:,} per side and round, {args.rounds} rounds (alternating), batches of "
          f"{args.batch:,}, wire {wire / n:.1f} bytes/record (msgpack+zstd); medians, each round")
    print(f"{'path':<58} {'records/s':>12} {'vs peer':>8}  rounds")

    def row(name: str, key: str, peer_key: str | None) -> None:
        ratio = f"{med[peer_key] / med[key]:>8.2f}x" if peer_key else f"{'':>9}"
        each = " ".join(f"{n / t:,.0f}" for t in times[key])
        print(f"{name:<58} {n / med[key]:>12,.0f} {ratio}  {each}")

    row("httpx POST loop of the same encoded batches (peer), acked", "peer", "peer")
    row("AggregatorSink: batch + encode + spool + POST, acked", "sink", "peer")
    row("  peer, until the aggregator has also correlated them", "peer_done", "peer_done")
    row("  sink, until the aggregator has also correlated them", "sink_done", "peer_done")
    print(f"{'collector side alone: batch + encode + spool (no network)':<58} {n / local:>12,.0f}")
    if steady is not None:
        print(f"steady state: {args.sustained:,} records, backlog bound {args.backlog:,}")
        print(f"{'  AggregatorSink, acked':<58} {args.sustained / steady[0]:>12,.0f}")
        print(f"{'  until stored and correlated':<58} {args.sustained / steady[1]:>12,.0f}")
    print(f"stored by the aggregator: {stored:,} (every record once); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
