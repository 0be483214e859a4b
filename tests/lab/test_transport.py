"""Collector -> aggregator transport in a real lab run, with real collectors (eBPF socket probes)
as subprocesses and a real aggregator: kill -9 of the aggregator mid-run loses and doubles
nothing; a collector restart loses nothing that was spooled.

Ground truth: the lab application's own lines, one per connection (docs/lab.md). For every TCP
truth connection the client's collector must store exactly one final `client` record and, unless
the connect was refused, the server's collector exactly one final `server` record. UDP is seen
by the wire only (VXLAN capture), so it is not counted here.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from eastwest import codec
from eastwest.cli.demo import Stack
from tests.servers import free_port

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewt"


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(name=LAB, hosts=3, pods_per_host=2)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path / "data", listen=f"127.0.0.1:{free_port()}")
    yield s
    s.stop()


def cid(host: str) -> str:
    return f"{LAB}-{host.split('-')[-1]}"


def start_collectors(stack: Stack, lab, extra=()) -> list[str]:
    ids = []
    for h in lab.inventory["hosts"]:
        stack.start_collector(cid(h["name"]), netns=lab.host_netns(h["name"]),
                              extra=["--interval", "1", *extra])
        ids.append(cid(h["name"]))
    return ids


def await_(predicate, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def stored(stack: Stack) -> list[dict]:
    return stack.read("/api/v1/records", limit=100000)["records"]


def expected(truth: list[dict]) -> Counter:
    """(key, observer, collector) -> 1 for every final record the truth calls for."""
    want: Counter = Counter()
    for t in truth:
        if t["protocol"] != "tcp":
            continue
        key = ("tcp", t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])
        want[(key, "client", cid(t["client_host"]))] += 1
        if t["outcome"] != "refused":
            want[(key, "server", cid(t["server_host"]))] += 1
    return want


def run_start(truth: list[dict]) -> datetime:
    """When the run began: its first truth connection's start, less a little for the clocks
    (the collector maps kernel time to wall time)."""
    return min(datetime.fromisoformat(t["start"]) for t in truth) - timedelta(milliseconds=50)


def finals(records: list[dict], keys, since: datetime) -> Counter:
    """Final socket records per (5-tuple, observer, collector) of connections begun at `since`
    or later: a warm-up connection can hold a 5-tuple the run uses again (ephemeral ports are
    reused), and it is not part of the run's truth."""
    got: Counter = Counter()
    for r in records:
        if (r["final"] and r["source"] == "socket"
                and datetime.fromisoformat(r["start"]) >= since):
            key = (r["protocol"], r["client"]["ip"], r["client"]["port"], r["server"]["ip"],
                   r["server"]["port"])
            if key in keys:
                got[(key, r["observer"], r["collector"])] += 1
    return got


def warm_up(lab, ready) -> None:
    """Drive the lab until every collector shows records: the probes are loaded."""
    await_(lambda: lab.traffic(duration=1.0, rate=20) is not None and ready(), 180,
           "every collector's first records", step=0)


def no_doubles(store_dir: Path) -> None:
    con = duckdb.connect(str(store_dir / "eastwest.duckdb"), read_only=True)
    try:
        doubled = con.execute("SELECT collector, batch_seq, record_id, count(*) FROM flows "
                              "GROUP BY ALL HAVING count(*) > 1").fetchall()
        assert doubled == []
        marks = con.execute("SELECT count(*) FROM ingested_batches").fetchone()[0]
        batches = con.execute("SELECT count(DISTINCT (collector, batch_seq)) FROM flows").fetchone()[0]
        assert batches <= marks
    finally:
        con.close()


def test_aggregator_killed_mid_run_stores_every_truth_connection_exactly_once(lab, stack, tmp_path):
    stack.start_aggregator()
    ids = start_collectors(stack, lab)
    warm_up(lab, lambda: {r["collector"] for r in stored(stack)} >= set(ids))

    truth: list[dict] = []
    run = threading.Thread(target=lambda: truth.extend(lab.traffic(duration=12.0, seed=7)))
    before = len(stored(stack))
    run.start()
    await_(lambda: len(stored(stack)) > before, 60, "records of the run")
    stack.kill_aggregator()
    spools = [stack.data / "spool" / c for c in ids]
    # the outage is felt: collectors hold unsent batches in their spools
    await_(lambda: sum(len(list(p.glob("*.ewb"))) for p in spools) >= 3, 60, "spooled batches")
    stack.start_aggregator()
    run.join()
    assert len(truth) > 50 and any(t["outcome"] == "refused" for t in truth)

    want = expected(truth)
    keys, since = {k for k, _, _ in want}, run_start(truth)
    await_(lambda: finals(stored(stack), keys, since) == want, 180,
           "every truth connection's records")
    got = finals(stored(stack), keys, since)
    # nothing lost, nothing doubled: per 5-tuple and observer, as many final records as the
    # truth has connections (a client port reused within the run is two connections)
    assert got == want
    stack.stop()
    no_doubles(stack.data / "store")


def spooled_ids(directory: Path) -> Counter:
    ids: Counter = Counter()
    for f in sorted(directory.glob("*.ewb")):
        b = codec.decode_batch(f.read_bytes())
        ids.update((b.batch_seq, r.record_id) for r in b.records)
    return ids


@pytest.mark.heavy  # ~25 s: `make test-heavy` (the suite's 25-minute budget; the spool's
# restart and take-over are also proved by tests/unit/test_spool_takeover.py)
def test_a_restarted_collector_sends_everything_it_had_spooled(lab, stack):
    # no aggregator yet: everything the collectors produce stays in their spools
    ids = start_collectors(stack, lab, extra=["--shutdown-timeout", "1"])
    spools = {c: stack.data / "spool" / c for c in ids}
    warm_up(lab, lambda: all(list(p.glob("*.ewb")) for p in spools.values()))
    truth = lab.traffic(duration=6.0, seed=11)

    stack.stop_collector(ids[0], signal.SIGKILL)        # a crash: the spool is what is left
    for c in ids[1:]:
        assert stack.stop_collector(c) == 0             # graceful: flushes into the spool
    before = {c: spooled_ids(p) for c, p in spools.items()}
    assert all(before.values())
    # graceful stops spooled the final records of every truth connection they saw
    graceful = Counter({k: n for k, n in expected(truth).items() if k[2] in ids[1:]})
    in_spools = Counter()
    for c in ids[1:]:
        recs = [r for f in sorted(spools[c].glob("*.ewb"))
                for r in codec.decode_batch(f.read_bytes()).records]
        in_spools += finals([r.to_builtins() for r in recs], {k for k, _, _ in graceful},
                            run_start(truth))
    assert in_spools == graceful

    stack.start_aggregator()
    hosts = {cid(h["name"]): h["name"] for h in lab.inventory["hosts"]}
    for c in ids:
        stack.start_collector(c, netns=lab.host_netns(hosts[c]))
    await_(lambda: all(not list(p.glob("*.ewb")) for p in spools.values()), 120,
           "the spools to drain")
    stack.stop()
    con = duckdb.connect(str(stack.data / "store" / "eastwest.duckdb"), read_only=True)
    rows = con.execute("SELECT collector, batch_seq, record_id FROM flows").fetchall()
    con.close()
    stored_ids = {c: Counter((s, r) for cc, s, r in rows if cc == c) for c in ids}
    for c in ids:
        missing = before[c] - stored_ids[c]
        assert not missing, f"{c}: {sum(missing.values())} spooled records never stored"
        assert all(stored_ids[c][k] == 1 for k in before[c])   # and none twice
    no_doubles(stack.data / "store")
