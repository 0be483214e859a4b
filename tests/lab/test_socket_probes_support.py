"""Helpers of the socket probe lab tests: a collector running in-process, two namespaces of our
own joined by a veth, and workload scripts that write their own ground truth.

Everything runs in namespaces the tests create (`ewp-c`, `ewp-s`, 10.77.0.0/24) and is removed
afterwards, also when a test fails. Building them must work: when it does not, the test FAILS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from collector.pipeline import CollectorContext, run_pipeline
from eastwest.record import FlowRecord
from tests.conftest import require_root

CLIENT_NS, SERVER_NS = "ewp-c", "ewp-s"
CLIENT_IP, SERVER_IP = "10.77.0.1", "10.77.0.2"
SCRIPTS = Path(__file__).with_name("test_socket_probes_workload.py")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@contextmanager
def namespace_pair(names: tuple[str, str] = (CLIENT_NS, SERVER_NS),
                   ips: tuple[str, str] = (CLIENT_IP, SERVER_IP),
                   links: tuple[str, str] = ("ewp-c0", "ewp-s0"),
                   then: Sequence[tuple[str, ...]] = ()) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth (`links`, addresses `ips`/24), then the commands `then`
    (a test's iptables); removed on exit whatever happened."""
    require_root()
    (a, b), (a_ip, b_ip), (a_link, b_link) = names, ips, links
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)
    try:
        steps = [
            ("ip", "netns", "add", a), ("ip", "netns", "add", b),
            ("ip", "link", "add", a_link, "netns", a, "type", "veth", "peer", "name",
             b_link, "netns", b),
            ("ip", "-n", a, "addr", "add", f"{a_ip}/24", "dev", a_link),
            ("ip", "-n", b, "addr", "add", f"{b_ip}/24", "dev", b_link),
        ]
        for ns in names:
            steps += [("ip", "-n", ns, "link", "set", "lo", "up")]
        steps += [("ip", "-n", a, "link", "set", a_link, "up"),
                  ("ip", "-n", b, "link", "set", b_link, "up"), *then]
        for step in steps:
            r = sh(*step, check=False)
            if r.returncode != 0:
                pytest.fail(f"cannot build the test namespaces: {' '.join(step)}: {r.stderr}")
        yield a, b
    finally:
        for ns in names:
            sh("ip", "netns", "del", ns, check=False)


def netns_inode(name: str) -> int:
    import os

    return os.stat(f"/run/netns/{name}").st_ino


class Collected:
    """The socket probe source in a thread, its records in a list one can await; with `drops`,
    the drop source too (the collector's `--drops`, built the way its flags build it)."""

    def __init__(self, netns: list[str], interval: float = 1.0, idle_timeout: float = 30.0,
                 drops: bool = False) -> None:
        from collector.drops.source import drop_source
        from collector.probes import SocketProbeSource

        self.records: list[FlowRecord] = []
        self.ctx = CollectorContext(collector_id="ewp-test")
        args = argparse.Namespace(netns=netns, interval=interval, map_entries=4096, verbose=False,
                                  idle_timeout=idle_timeout)
        self.source = SocketProbeSource(self.ctx, args)
        self.sources: list = [self.source] + ([drop_source(self.ctx, args)] if drops else [])
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    # the sink
    def write(self, records: list[FlowRecord]) -> None:
        with self._cond:
            self.records.extend(records)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            run_pipeline(self.sources, self, stop=self._stop, handle_signals=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self._errors.append(exc)
            for source in self.sources:
                source.ready.set()

    def __enter__(self) -> Collected:
        self._thread.start()
        if not all(s.ready.wait(120) for s in self.sources) or self._errors:
            self.stop()
            pytest.fail(f"the socket probes did not start: {self._errors}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, predicate: Callable[[list[FlowRecord]], bool], timeout: float = 60) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.records) or bool(self._errors), timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        if self._errors:
            raise self._errors[0]

    def finals(self, observer: str | None = None) -> list[FlowRecord]:
        with self._cond:
            return [r for r in self.records if r.final and observer in (None, r.observer)]


def finals_count(observer: str, n: int) -> Callable[[list[FlowRecord]], bool]:
    return lambda recs: sum(1 for r in recs if r.final and r.observer == observer) >= n


class Server:
    """The workload server in the server namespace; `ready` once it listens."""

    def __init__(self, *args: str) -> None:
        cmd = ["ip", "netns", "exec", SERVER_NS, sys.executable, str(SCRIPTS), "serve",
               "--ip", SERVER_IP, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.proc.kill()
            pytest.fail(f"the workload server did not start: {line!r} {self.proc.stderr.read()}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def run_client(*args: str) -> list[dict]:
    """Run the workload client in the client namespace; its truth lines."""
    r = subprocess.run(["ip", "netns", "exec", CLIENT_NS, sys.executable, str(SCRIPTS), "connect",
                        "--ip", SERVER_IP, *args], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"the workload client failed: {r.stderr}")
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
