"""Two collector processes overlap on one spool folder, as the old and the new pod of a
DaemonSet's rolling update do: the second waits (logging the first's pid) while the first drains
its spool and exits, then takes the folder over. Nothing crashes, and a real aggregator stores
every record of both exactly once.

Both collectors read a capture (`--pcap`, no root, no lab) under one `--collector-id`,
`--spool-dir` and `--metrics-listen` port (a DaemonSet's pods share the node's network: the
second must wait for the spool, not fail on the port the first still holds); the aggregator is down while the first tries to drain, so the overlap lasts until
the test starts the aggregator. Expected records: the same captures through `--stdout`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from eastwest.cli.demo import Stack
from tests.servers import free_port

CID = "takeover"
FIRST, SECOND = "OISF_suricata-verify_vxlan.pcap", "the-tcpdump-group_tcpdump_vxlan_port_8472.pcap"


def await_(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def key(rec: dict) -> tuple:
    return (rec["record_id"], rec["final"], rec["protocol"], rec["client"]["ip"],
            rec["client"]["port"], rec["server"]["ip"], rec["server"]["port"], rec["bytes_c2s"],
            rec["bytes_s2c"])


def records_of(pcap: Path) -> list[tuple]:
    out = subprocess.run([sys.executable, "-m", "eastwest", "collector", "--pcap", str(pcap),
                          "--stdout", "--collector-id", CID], capture_output=True, text=True,
                         check=True).stdout
    return [key(json.loads(line)) for line in out.splitlines()]


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path / "data", listen=f"127.0.0.1:{free_port()}")
    yield s
    s.stop()


def start(stack: Stack, name: str, pcap: Path, spool: Path, metrics: int
          ) -> subprocess.Popen[bytes]:
    log = open(stack.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child's
    proc = subprocess.Popen(
        [sys.executable, "-m", "eastwest", "collector", "--pcap", str(pcap), "--aggregator",
         stack.url, "--collector-id", CID, "--spool-dir", str(spool), "--batch-size", "3",
         "--send-deadline", "1", "--shutdown-timeout", "120", "--spool-lock-wait", "120",
         "--metrics-listen", f"127.0.0.1:{metrics}"],
        env={**os.environ, **stack.tokens}, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        start_new_session=True)
    stack.collectors[name] = proc  # stopped by stack.stop() if the test fails
    return proc


def log_of(stack: Stack, name: str) -> str:
    return (stack.log_dir / f"{name}.log").read_text()


def test_the_second_collector_waits_for_the_draining_first_then_takes_over(stack, tmp_path,
                                                                            pcaps):
    first_records, second_records = records_of(pcaps / FIRST), records_of(pcaps / SECOND)
    assert len(first_records) >= 20 and second_records     # several batches of 3, and some
    want = Counter(first_records + second_records)
    spool, metrics = tmp_path / "spool", free_port()

    first = start(stack, "first", pcaps / FIRST, spool, metrics)     # no aggregator yet: it cannot drain
    await_(lambda: "not delivered" in log_of(stack, "first") and len(list(spool.glob("*.ewb")))
           >= 7, 60, "the first to spool its batches (3 records a batch) and try to send")
    second = start(stack, "second", pcaps / SECOND, spool, metrics)
    await_(lambda: second.poll() is not None
           or f"is in use by pid {first.pid} (" in log_of(stack, "second"), 60,
           "the second to say whom it waits for")
    assert second.poll() is None, log_of(stack, "second")   # it waits, it did not fail
    assert first.poll() is None                             # the first still drains

    stack.start_aggregator(extra=["--retention", "36500d"])  # the captures are from 2019
    assert first.wait(120) == 0
    assert second.wait(120) == 0
    assert "takes it over" in log_of(stack, "second")
    assert f"collector id '{CID}' (from --collector-id), spool {spool}" in log_of(stack, "second")
    assert "Traceback" not in log_of(stack, "first") + log_of(stack, "second")
    assert not list(spool.glob("*.ewb"))                    # everything was acknowledged
    stack.stop()

    con = duckdb.connect(str(stack.data / "store" / "eastwest.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT batch_seq, record_id, final, protocol, client_ip, client_port, server_ip, "
            "server_port, bytes_c2s, bytes_s2c FROM flows WHERE collector = ?", [CID]).fetchall()
        marks = {s for (s,) in con.execute(
            "SELECT batch_seq FROM ingested_batches WHERE collector = ?", [CID]).fetchall()}
    finally:
        con.close()
    got = Counter(tuple(r[1:]) for r in rows)
    assert got == want                                      # none lost, none twice
    assert marks == {r[0] for r in rows}                    # every batch applied once, marked
    # one sequence: the second continued the folder's numbers after the first's
    first_keys = set(first_records)
    firsts = [r[0] for r in rows if tuple(r[1:]) in first_keys]
    seconds = [r[0] for r in rows if tuple(r[1:]) not in first_keys]
    assert max(firsts) < min(seconds)
