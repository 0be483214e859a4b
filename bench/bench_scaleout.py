"""Scale-out path, side by side on this machine (issue #10):

1. End to end, records/s: collector batches published to NATS JetStream (`NatsSender`) ->
   aggregator consumer (decode, correlate, ClickHouse with 2 local shards behind Distributed
   tables, ack) against the direct path: the same batches POSTed (`HttpSender`) to an aggregator
   on DuckDB. Both paths run the whole aggregator (correlation, connections, rollups, workloads).
2. Replicas (issue 19): the batches published to the partitioned stream first, then 1, 2 and 3
   aggregator replicas (processes, `eastwest aggregator --nats`) consume them into ClickHouse:
   records/s until every record is stored and correlated, and each replica's CPU seconds per
   1,000 records it stored (from /proc; the work should divide, nothing redone), with the
   default P; the same rows inserted by `clickhouse-client` (3.) are the peer. Each replica count
   runs once per `--coalesce` value (`--nats-coalesce`): 1 is the one-share-at-a-time path
   before coalescing, the peer of the default (a partition's waiting shares in one step and
   one store write); both in the same run, on the same records.
3. ClickHouse insert rate, rows/s: `ClickHouseStore.ingest` (raw records, one synchronous
   Distributed insert per batch + the batch mark) against `clickhouse-client` inserting the same
   rows from a TSV file into the same Distributed table (one INSERT per batch file too).
   Target: at least 0.5x.

Real servers (tests/servers.py): nats-server 2.9, clickhouse-server 18.16. Ratios only, never
absolute pass/fail; the load average is printed (the machine is shared).

    python bench/bench_scaleout.py [--records 100000] [--batch 5000] [--replicas 1,2,3]
                                   [--coalesce 1,32] [--replicas-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from aggregator.app import create_app  # noqa: E402
from aggregator.settings import AggregatorSettings  # noqa: E402
from aggregator.store.clickhouse import ClickHouseStore, arrow_columns, day_of  # noqa: E402
from aggregator.store.columns import to_table  # noqa: E402
from collector.retry import Backoff, RetryPolicy  # noqa: E402
from collector.transport_http import HttpSender  # noqa: E402
from collector.transport_nats import NatsSender  # noqa: E402
from eastwest.clock import SystemClock  # noqa: E402

RETRY = RetryPolicy(Backoff(0.05, 1), 60, SystemClock())
from eastwest import codec  # noqa: E402
from eastwest.codec import Batch  # noqa: E402
from eastwest.jetstream import NatsOptions  # noqa: E402
from eastwest.record import Endpoint, FlowRecord, Process  # noqa: E402
from tests.servers import ClickHouseServer, NatsServer, free_port  # noqa: E402

T0 = datetime(2026, 11, 1, tzinfo=UTC)
INGEST, READ = "i" * 24, "r" * 24


def batches(n: int, size: int) -> list[tuple[str, int, list[FlowRecord]]]:
    """Connections between 50 workloads on 3 hosts, each reported by its client's and its
    server's collector (half the records join a connection that exists)."""
    out: dict[str, list[FlowRecord]] = {"h1": [], "h2": [], "h3": []}
    for i in range(n // 2):
        c, s = i % 50, (i * 7 + 3) % 50
        start = T0 + timedelta(milliseconds=i)
        for obs, host in (("client", f"h{c % 3 + 1}"), ("server", f"h{s % 3 + 1}")):
            out[host].append(FlowRecord(
                record_id=f"{host}:{len(out[host])}", collector=host, source="socket",
                start=start, end=start + timedelta(seconds=1), final=True, protocol="tcp",
                family=4, client=Endpoint(f"10.244.{c}.10", 20000 + i % 40000),
                server=Endpoint(f"10.244.{s}.10", 8080), observer=obs, bytes_c2s=100 + i % 900,
                bytes_s2c=1000, connect="ok", process=Process(1000 + c, f"ew-svc{c}")))
    result = []
    for host, recs in out.items():
        for k in range(0, len(recs), size):
            result.append((host, k // size + 1, recs[k:k + size]))
    result.sort(key=lambda b: b[2][0].start)
    return result


def serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    return server, t, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def http_path(bs, tmp: Path) -> float:
    settings = AggregatorSettings(data_dir=tmp / "duck", ingest_token=INGEST, read_token=READ,
                                  retention=None)
    server, t, url = serve(create_app(settings))
    bodies = [codec.encode_batch(Batch(h, s, T0, r)) for h, s, r in bs]
    with httpx.Client(timeout=60) as client:
        sender = HttpSender(client, url + "/api/v1/ingest", INGEST)
        started = time.perf_counter()
        for b in bodies:
            assert RETRY.deliver(sender, b).outcome == "ok"
        took = time.perf_counter() - started
    server.should_exit = True
    t.join(10)
    return took


def nats_path(bs, tmp: Path, nats: NatsServer, ch: ClickHouseServer) -> float:
    from fastapi.testclient import TestClient

    opts = NatsOptions(nats.url, max_bytes=256 * 1024**2)
    settings = AggregatorSettings(data_dir=tmp / "agg", ingest_token=INGEST, read_token=READ,
                                  retention=None, store="clickhouse",
                                  clickhouse_url=ch.url("bench_e2e"), nats=opts)
    bodies = [(h, codec.encode_batch(Batch(h, s, T0, r))) for h, s, r in bs]
    senders = {h: NatsSender(opts, h) for h in ("h1", "h2", "h3")}
    with TestClient(create_app(settings)) as c:
        consumer = c.app.state.pipeline.consumer
        assert consumer.ready.wait(30)
        started = time.perf_counter()
        for h, b in bodies:
            assert RETRY.deliver(senders[h], b).outcome == "ok"
        while consumer.records < sum(len(r) for _, _, r in bs):
            time.sleep(0.005)
        took = time.perf_counter() - started
    for s in senders.values():
        s.close()
    return took


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def replicas_path(bs, tmp: Path, nats: NatsServer, ch: ClickHouseServer, n: int,
                  coalesce: int = 32) -> tuple[float, list[tuple[float, float, int]]]:
    """Start n replicas (`--nats-coalesce coalesce`), wait until they share the partitions, then
    publish everything and time them until every record is stored. Returns (seconds, [(cpu
    seconds, records stored, partitions owned)])."""
    stream = f"EWB{n}C{coalesce}"
    subject = f"bench{n}c{coalesce}.flows"
    # a small stream each: the server's file store reserves every stream's max_bytes
    opts = NatsOptions(nats.url, stream=stream, subject_prefix=subject,
                       max_bytes=256 * 1024**2)
    total = sum(len(r) for _, _, r in bs)
    bodies = [(h, codec.encode_batch(Batch(h, s, T0, r))) for h, s, r in bs]
    procs = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for k in range(n):
        port = free_port()
        p = subprocess.Popen(
            [sys.executable, "-m", "eastwest", "aggregator", "--listen", f"127.0.0.1:{port}",
             "--data", str(tmp / f"r{n}c{coalesce}-{k}"), "--insecure-open", "--retention",
             "3650d", "--clickhouse", ch.url(f"bench_r{n}c{coalesce}"), "--nats", nats.url,
             "--nats-stream", stream, "--nats-subject", subject, "--nats-replica", f"r{k}",
             "--nats-max-bytes", str(256 * 1024**2), "--nats-coalesce", str(coalesce),
             "--nats-lease", "3"], env=env, stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"r{n}c{coalesce}-{k}.log", "wb"))  # noqa: SIM115
        procs.append((p, f"http://127.0.0.1:{port}"))
    for k, (p, url) in enumerate(procs):
        while True:
            assert p.poll() is None, (tmp / f"r{n}c{coalesce}-{k}.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    share = [6 // n + (1 if k < 6 % n else 0) for k in range(n)]
    while sorted(int(_metric(u, "eastwest_nats_partitions_owned")) for _, u in procs) != sorted(share):
        time.sleep(0.2)
    senders = {h: NatsSender(opts, h) for h in ("h1", "h2", "h3")}
    cpu0 = [_cpu_s(p.pid) for p, _ in procs]  # started, idle: consuming from here on
    started = time.perf_counter()
    for h, b in bodies:
        assert RETRY.deliver(senders[h], b).outcome == "ok"
    for x in senders.values():
        x.close()
    while sum(_metric(url, "eastwest_records_out_total") for _, url in procs) < total:
        time.sleep(0.1)
    took = time.perf_counter() - started
    out = [(_cpu_s(p.pid) - c0, _metric(url, "eastwest_records_out_total"),
            int(_metric(url, "eastwest_nats_partitions_owned")))
           for (p, url), c0 in zip(procs, cpu0, strict=True)]
    for p, _ in procs:
        p.terminate()
    for p, _ in procs:
        p.wait(60)
    return took, out


def _tsv(v: object) -> bytes:
    if v is None:
        return b"\\N"
    if isinstance(v, bytes):
        return (v.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n")
                .replace(b"\r", b"\\r").replace(b"\0", b"\\0").replace(b"'", b"\\'"))
    if isinstance(v, str):
        return _tsv(v.encode())
    if isinstance(v, bool):
        return b"1" if v else b"0"
    return str(v).encode()


def insert_rates(bs, ch: ClickHouseServer, tmp: Path) -> tuple[float, float, int]:
    ours = ClickHouseStore(ch.url("bench_ours"))
    rows = 0
    started = time.perf_counter()
    for h, s, recs in bs:
        ours.ingest(h, s, recs)
        rows += len(recs)
    ours_s = time.perf_counter() - started
    ours.close()
    peer = ClickHouseStore(ch.url("bench_peer"))  # same tables, filled by clickhouse-client
    files = []
    now = datetime.now(UTC)
    for i, (h, s, recs) in enumerate(bs):
        cols = arrow_columns(to_table(h, s, recs, now))
        cols = {"day": [day_of(us).isoformat() for us in cols["end_ts"]], **cols}
        names = list(cols)
        f = tmp / f"batch-{i}.tsv"
        with open(f, "wb") as out:
            for row in zip(*cols.values(), strict=True):
                out.write(b"\t".join(_tsv(v) for v in row) + b"\n")
        files.append(f)
    peer.close()
    query = f"INSERT INTO bench_peer.flows ({', '.join(names)}) FORMAT TabSeparated"
    started = time.perf_counter()
    for f in files:
        with open(f, "rb") as inp:
            subprocess.run(["clickhouse-client", "--port", str(ch.port), "--insert_distributed_sync",
                            "1", "--query", query], stdin=inp, check=True)
    peer_s = time.perf_counter() - started
    got = ch.client().execute("SELECT count() FROM bench_peer.flows FINAL")[0][0]
    assert got == rows, (got, rows)
    return ours_s, peer_s, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--replicas", default="1,2,3", help="replica counts to run (default 1,2,3)")
    ap.add_argument("--coalesce", default="1,32", help="--nats-coalesce values each replica "
                    "count runs with, side by side (default 1,32; 1: one share at a time)")
    ap.add_argument("--replicas-only", action="store_true", help="only the replicas (2.): "
                    "not the single-aggregator paths nor the insert rates")
    args = ap.parse_args()
    counts = [int(x) for x in args.replicas.split(",") if x]
    modes = [int(x) for x in args.coalesce.split(",") if x]
    if not counts or not modes or min(counts + modes) < 1:
        ap.error("--replicas and --coalesce: comma-separated integers of 1 or more")
    bs = batches(args.records, args.batch)
    n = sum(len(r) for _, _, r in bs)
    print(f"{n} records in {len(bs)} batches of <= {args.batch}; load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="ew-bench-scaleout-") as d:
        tmp = Path(d)
        ch = ClickHouseServer(tmp / "ch").start()
        nats = NatsServer(tmp / "nats").start()
        try:
            if not args.replicas_only:
                http_s = http_path(bs, tmp)
                nats_s = nats_path(bs, tmp, nats, ch)
                print(f"end to end  HTTP -> aggregator (DuckDB):             {n / http_s:10.0f} records/s")
                print(f"end to end  NATS JetStream -> aggregator (ClickHouse): {n / nats_s:10.0f} records/s"
                      f"   ratio {http_s / nats_s:.2f}x")
            for r in counts:
                for c in modes:
                    load = os.getloadavg()[0]
                    took, per = replicas_path(bs, tmp, nats, ch, r, c)
                    print(f"replicas {r}   NATS (P=6) -> {r} aggregator(s), --nats-coalesce {c:<3} "
                          f"-> ClickHouse: {n / took:10.0f} records/s   (load {load:.2f} -> "
                          f"{os.getloadavg()[0]:.2f})")
                    for k, (cpu, recs, owned) in enumerate(per):
                        print(f"            replica {k}: {recs:8.0f} records, {owned} partitions, "
                              f"{cpu:6.2f} CPU s, {1000 * cpu / max(recs, 1):.3f} CPU s per 1,000")
            if not args.replicas_only:
                ours_s, peer_s, rows = insert_rates(bs, ch, tmp)
                print(f"insert      clickhouse-client TSV files:               {rows / peer_s:10.0f} rows/s")
                print(f"insert      ClickHouseStore.ingest (raw):              {rows / ours_s:10.0f} rows/s"
                      f"   ratio {peer_s / ours_s:.2f}x (target >= 0.5x)")
        finally:
            nats.stop()
            ch.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
