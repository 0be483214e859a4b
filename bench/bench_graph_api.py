"""Graph API latency: GET /api/v1/graph with 1,000 workloads, 10,000 edges and N stored flows.

Generated straight into the store's tables by DuckDB (bench/ owns its data generator): N
correlated connections over 24 hours on 10,000 (client, server) workload pairs among 1,000
workloads (settled connections: the correlator no longer holds them), their minute rollups, and
the workloads table. Then, through the real app (FastAPI TestClient, read token, JSON response):
- ours: GET /api/v1/graph for a past 15-minute and 1-hour window (time travel, not cached), p50/p95
  of `--requests` windows after one warm-up request (the first query of a fresh process reads the
  file's column segments); with an edge budget of 20,000 (all 10,000 edges returned) and with
  the default budget of 2,000 (8,001 edges folded into other -> other);
- peer: DuckDB alone computing the same per-edge numbers, side by side on the same file and
  windows: the GROUP BY of the window's connections (counts, RTT, observers, ports, protocols) and
  of its minute rollups (volumes), fetched as Arrow: no JSON, no HTTP, no Python per edge.
Target (issue #6): p95 at most 200 ms at 10 million flows. The load average is printed: the
machine is shared.

`--group-by service` asks for the Service view instead (issue 16, aggregator/service_view.py):
the connections of 3 of every 4 (client, server) pairs dialled the server workload's Service (a
ClusterIP of 10.96.0.0/16, one per workload, named in the workload map's `services` section), so
7,500 of the 10,000 edges end at a Service and list its backends. The peer stays the workload
view's bare GROUP BYs, and the workload view's API request is timed on the same windows,
interleaved with the Service view's (columns `workload p50/p95`, `svc/wl p50`): the Service view
costs what the workload view costs plus what it adds (docs/benchmarks.md, "The Service view").

    python bench/bench_graph_api.py [--flows 10000000] [--requests 40] [--data DIR]
                                    [--group-by workload|service]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from aggregator.store.duckdb import FILE_NAME, DuckDBStore
from aggregator.store.duckdb_derived import SHOWN
from aggregator.store.duckdb_edges import _counts_sql, _volumes_sql

T_END = datetime(2026, 11, 27, 0, 0, tzinfo=UTC)


class _Graph(msgspec.Struct):
    edges: list[msgspec.Raw]


_doc = msgspec.json.Decoder(_Graph)
WORKLOADS, EDGES = 1000, 10_000
READ = "bench-read-token-0123456789"


def generate(data: Path, flows: int) -> float:
    DuckDBStore(data).close()  # the schema
    con = duckdb.connect(str(data / FILE_NAME))
    t0 = time.perf_counter()
    span_us = 24 * 3600 * 1_000_000
    start = T_END - timedelta(hours=24)
    # edge e: client workload e % 1000, server workload (e * 7 + 1 + e // 1000) % 1000
    values = {n: "NULL" for n in SHOWN}
    values.update({
        "conn_id": "lpad(printf('%x', i), 32, '0')", "protocol": "'tcp'", "family": "4",
        "client_ip": "'10.0.0.1'", "client_ip_hex": "'00000000000000000000ffff0a000001'",
        "client_port": "(i % 28000 + 32768)::INTEGER", "server_ip": "'10.0.0.2'",
        "server_ip_hex": "'00000000000000000000ffff0a000002'", "server_port": "(8000 + e % 50)::INTEGER",
        "scope": "0", "start_ts": "ts", "last_seen": "ts + INTERVAL 2 SECOND", "closed": "true",
        "closed_ts": "ts + INTERVAL 2 SECOND", "observed_by": "',client,server,'",
        "connect": "CASE WHEN i % 50 = 0 THEN 'refused' ELSE 'ok' END",
        "outcome": "CASE WHEN i % 50 = 0 THEN 'refused' ELSE 'ok' END",
        "bytes_c2s": "(i % 997)::BIGINT", "bytes_s2c": "(i % 9973)::BIGINT", "packets_c2s": "0",
        "packets_s2c": "0", "retransmits": "0", "resets": "0", "rtt_min_us": "50",
        "rtt_avg_us": "80", "rtt_max_us": "200", "byte_mismatch": "false", "incomplete": "false",
        "client_wid": "'bench/w' || (e % 1000)", "client_name": "'w' || (e % 1000)",
        "client_namespace": "'bench'", "client_host": "'h' || (e % 1000 % 20)",
        "client_id_source": "'static'",
        "server_wid": "'bench/w' || ((e * 7 + 1 + e // 1000) % 1000)",
        "server_name": "'w' || ((e * 7 + 1 + e // 1000) % 1000)", "server_namespace": "'bench'",
        "server_host": "'h' || ((e * 7 + 1 + e // 1000) % 1000 % 20)", "server_id_source": "'static'",
        # 3 of 4 connections dialled the server workload's Service (--group-by service)
        "service_ip": "CASE WHEN i % 4 <> 0 THEN '10.96.' || ((e * 7 + 1 + e // 1000) % 1000 // 250)"
                      " || '.' || ((e * 7 + 1 + e // 1000) % 1000 % 250 + 1) END",
        "service_port": "CASE WHEN i % 4 <> 0 THEN 80 END",
    })
    select = ", ".join(f"{values[n]} AS {n}" for n in SHOWN)
    con.execute(f"""INSERT INTO connections_settled ({', '.join(SHOWN)}) SELECT {select} FROM (
        SELECT i, i % {EDGES} AS e,
               TIMESTAMPTZ '{start.isoformat()}' + to_microseconds((i * {span_us // flows})::BIGINT) AS ts
        FROM range({flows}) t(i))""")
    con.execute("""INSERT INTO rollups (minute, client_wid, server_wid, client_host, server_host,
        server_port, protocol, link_local, client_name, client_namespace, server_name,
        server_namespace, bytes_c2s, bytes_s2c, packets_c2s, packets_s2c, retransmits, resets)
        SELECT date_trunc('minute', last_seen), client_wid, server_wid,
        client_host, server_host, server_port, protocol, false, any_value(client_name),
        any_value(client_namespace), any_value(server_name), any_value(server_namespace),
        sum(bytes_c2s), sum(bytes_s2c), 0, 0, 0, 0 FROM connections
        GROUP BY ALL""")
    for side in ("client", "server"):
        con.execute(f"""INSERT INTO workloads SELECT {side}_wid, any_value({side}_name), 'bench',
            NULL, any_value({side}_host), '{{}}', 'static', min(start_ts), max(last_seen)
            FROM connections GROUP BY 1 ON CONFLICT DO UPDATE SET
            first_seen = least(workloads.first_seen, excluded.first_seen),
            last_seen = greatest(workloads.last_seen, excluded.last_seen)""")
    con.execute("CHECKPOINT")
    con.close()
    return time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=10_000_000)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--data", type=Path, help="keep the generated store in this directory and "
                    "reuse it on the next run (same --flows), instead of a temporary one")
    ap.add_argument("--group-by", choices=("workload", "service"), default="workload",
                    help="the graph's grouping (service: the Service view, module docstring)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or Path(tmp) / "data"
        if a.data is not None and (data / FILE_NAME).exists():
            print(f"reusing the store in {data}")
        else:
            gen_s = generate(data, a.flows)
            print(f"generated {a.flows:,} connections on {EDGES:,} edges of {WORKLOADS:,} "
                  f"workloads in {gen_s:.1f} s")
        wmap = Path(tmp) / "services.yaml"  # the Services' names (--group-by service)
        wmap.write_text("workloads: []\nservices:\n" + "".join(
            f"- {{match: 10.96.{w // 250}.{w % 250 + 1}, name: svc{w}, namespace: bench}}\n"
            for w in range(WORKLOADS)))
        settings = AggregatorSettings(data_dir=data, ingest_token="bench-ingest-token-012345",
                                      read_token=READ, retention=None, edge_budget=20_000,
                                      workload_map=wmap)
        results = []
        peer_sql = (_counts_sql("workload", "true"), _volumes_sql("workload", "true"))
        with TestClient(create_app(settings)) as c:
            con = c.app.state.pipeline.store._con.cursor()  # the peer: DuckDB on the same file

            def api(since: datetime, until: datetime, group_by: str = a.group_by
                    ) -> tuple[float, int]:
                t0 = time.perf_counter()
                r = c.get("/api/v1/graph", params={"from": since.isoformat(), "to": until.isoformat(),
                                                   "group_by": group_by},
                          headers={"Authorization": f"Bearer {READ}"})
                took = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                # counted without building 10,000 dicts: the client shares the server's process
                # here, and its garbage would slow the server's next requests (full collections)
                return took, len(_doc.decode(r.content).edges)

            def peer(since: datetime, until: datetime) -> float:
                t0 = time.perf_counter()
                for sql in peer_sql:
                    con.sql(sql, params=[since, until]).to_arrow_table()
                return time.perf_counter() - t0

            for budget, label, minutes in ((20_000, "15 min", 15), (20_000, "1 h", 60),
                                           (2_000, "15 min", 15), (2_000, "1 h", 60)):
                c.app.state.settings = replace(settings, edge_budget=budget)  # read per request
                warm = T_END - timedelta(minutes=20)
                api(warm - timedelta(minutes=minutes), warm)
                peer(warm - timedelta(minutes=minutes), warm)
                side = a.group_by == "service"  # the workload view, side by side
                if side:
                    api(warm - timedelta(minutes=minutes), warm, "workload")
                ours, theirs, wl = [], [], []
                for k in range(a.requests):
                    # a different past window each time: nothing is served from a cache
                    end = T_END - timedelta(minutes=30 + 7 * k)
                    took, edges = api(end - timedelta(minutes=minutes), end)
                    ours.append(took)
                    theirs.append(peer(end - timedelta(minutes=minutes), end))
                    if side:
                        wl.append(api(end - timedelta(minutes=minutes), end, "workload")[0])
                results.append((budget, label, edges, ours, theirs, wl))
            con.close()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load}; group_by {a.group_by}")
    print(f"{'budget':>6} {'window':<8} {'edges':>6} {'API p50 ms':>10} {'API p95 ms':>10} "
          f"{'peer p50':>9} {'peer p95':>9} {'API/peer p95':>12}"
          + (f" {'workload p50':>12} {'workload p95':>12} {'svc/wl p50':>10} {'svc/wl p95':>10}"
             if a.group_by == "service" else ""))
    for budget, label, edges, ours, theirs, wl in results:
        line = (f"{budget:>6} {label:<8} {edges:>6} {statistics.median(ours) * 1e3:>10.1f} "
                f"{pct(ours, .95) * 1e3:>10.1f} {statistics.median(theirs) * 1e3:>9.1f} "
                f"{pct(theirs, .95) * 1e3:>9.1f} {pct(ours, .95) / pct(theirs, .95):>11.2f}x")
        if wl:
            line += (f" {statistics.median(wl) * 1e3:>12.1f} {pct(wl, .95) * 1e3:>12.1f} "
                     f"{statistics.median(ours) / statistics.median(wl):>9.2f}x "
                     f"{pct(ours, .95) / pct(wl, .95):>9.2f}x")
        print(line)


if __name__ == "__main__":
    main()
