"""Three collectors started at once on one machine, each scoped with `--netns` to one lab host
and given neither `--collector-id` nor `--spool-dir` (docs/lab.md, "Three collectors"): all
three stay up, each has its own id (host name + first namespace) and its own locked spool
folder, and a real aggregator stores records from all three, the wire's (`path`, from the
documented `--underlay ewlab-hN/eth0`) as well as the socket probes'. This is issue 14's bug report:
they used to share the host name as id and one spool folder, and one died at start.

The commands are read from docs/lab.md's example, so the example stays true: only the lab name
(`ewlab` -> `ewspool`), the aggregator's URL and the spool base (`--spool-base`, a temporary
folder instead of /var/lib/eastwest/spool) are changed."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.spool_lock import LOCK_NAME, holder
from eastwest.cli.demo import Stack
from tests.servers import free_port

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewspool"  # a lab of its own: other lab tests may run on this machine at the same time
DOC = Path(__file__).resolve().parents[2] / "docs" / "lab.md"


def documented_commands() -> list[list[str]]:
    """The `eastwest collector` command lines of docs/lab.md's "Three collectors" example."""
    section = DOC.read_text().split("### Three collectors", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    text = block.group(1).replace("\\\n", " ")
    return [shlex.split(line.removesuffix("&"))[1:] for line in text.splitlines()
            if line.startswith("eastwest collector ")]


def values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(name=LAB, hosts=3, pods_per_host=2)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path / "data", listen=f"127.0.0.1:{free_port()}")
    yield s
    s.stop()


def test_three_collectors_scoped_to_three_hosts_get_three_ids_and_spools(lab, stack, tmp_path):
    stack.start_aggregator()
    base = tmp_path / "spool"
    hosts = [h["name"] for h in lab.inventory["hosts"]]
    commands = documented_commands()
    assert len(commands) == len(hosts) == 3
    started: dict[str, subprocess.Popen[bytes]] = {}
    for host, doc_args in zip(hosts, commands, strict=True):  # as documented, all at once
        args = [a.replace("http://127.0.0.1:8470", stack.url).replace("ewlab-", f"{LAB}-")
                for a in doc_args] + ["--spool-base", str(base)]
        inv = next(h for h in lab.inventory["hosts"] if h["name"] == host)
        assert values(args, "--netns") == lab.host_netns(host)
        assert values(args, "--underlay") == [f"{inv['netns']}/{inv['underlay_if']}"]
        log = open(stack.log_dir / f"{host}.log", "ab")  # noqa: SIM115 - the child's
        started[host] = stack.collectors[host] = subprocess.Popen(
            [sys.executable, "-m", "eastwest", *args], env={**os.environ, **stack.tokens},
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    ids = {host: f"{socket.gethostname()}-{lab.host_netns(host)[0]}" for host in hosts}
    assert sorted(ids.values()) == [f"{socket.gethostname()}-{LAB}-h{n}" for n in (1, 2, 3)]

    def collectors_seen(observer: str | None = None) -> set[str]:
        return {r["collector"] for r in stack.read("/api/v1/records", limit=100000)["records"]
                if observer is None or r["observer"] == observer}

    deadline = time.monotonic() + 240  # three bcc compiles on a small machine
    # each collector's socket probes and (--underlay) its wire view of its host
    while not (collectors_seen() >= set(ids.values())
               and collectors_seen("path") >= set(ids.values())):
        for host, proc in started.items():
            assert proc.poll() is None, (stack.log_dir / f"{host}.log").read_text()[-3000:]
        if time.monotonic() > deadline:
            pytest.fail(f"records only from {sorted(collectors_seen())}, want {sorted(ids.values())}")
        lab.traffic(duration=1.0, rate=20)

    assert collectors_seen() == set(ids.values())  # no record under the bare host name
    for host, proc in started.items():
        assert proc.poll() is None                 # all three stay up
        spool = base / ids[host]
        assert (spool / LOCK_NAME).exists() and holder(spool).pid == proc.pid
        log = (stack.log_dir / f"{host}.log").read_text()
        assert (f"collector id '{ids[host]}' (from the host name and the first --netns), "
                f"spool {spool} (locked by this process, pid {proc.pid})") in log
        assert "Traceback" not in log
    for host in hosts:
        assert stack.stop_collector(host, signal.SIGTERM) == 0
    assert all(holder(base / cid) is None for cid in ids.values())  # released at exit
    assert sorted(p.name for p in Path(base).iterdir()) == sorted(ids.values())
