"""The conntrack reader against the running kernel: a connection translated (DNAT) and opened
BEFORE the reader existed is known to it, from the dump it takes at start (the events alone
would never tell it: a collector started on a busy node). Root; one network namespace of its
own, with an address on its loopback and one iptables DNAT rule in its OUTPUT chain."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from collector.conntrack import ConntrackEvents, dump
from tests.lab.conftest import require_root

NS = f"ewctd{os.getpid() % 100000}"
VIP, BACKEND = ("10.96.7.7", 80), ("10.77.0.1", 8080)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def in_ns(fn):
    """Run `fn` in the test's namespace, on a thread of its own (setns is per thread)."""
    import ctypes

    out: list = []
    err: list = []

    def run() -> None:
        fd = os.open(f"/run/netns/{NS}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            err.append(exc)
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if err:
        raise err[0]
    return out[0]


@pytest.fixture
def netns():
    require_root()
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "-n", NS, "addr", "add", f"{BACKEND[0]}/32", "dev", "lo")
        sh("ip", "-n", NS, "route", "add", "10.96.0.0/16", "dev", "lo")  # the VIP's route
        sh("ip", "netns", "exec", NS, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
           "-d", VIP[0], "--dport", str(VIP[1]), "-j", "DNAT", "--to-destination",
           f"{BACKEND[0]}:{BACKEND[1]}")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def test_a_translated_connection_opened_before_the_reader_is_known_from_the_dump(netns):
    def call() -> tuple[socket.socket, socket.socket, tuple[str, int]]:
        srv = socket.socket()
        srv.bind(BACKEND)
        srv.listen()
        cli = socket.create_connection(VIP, timeout=5)
        return srv, cli, cli.getsockname()[:2]

    srv, cli, client = in_ns(call)
    try:
        assert any(t.original == (*client, *VIP) for t in dump(netns))
        reader = ConntrackEvents(netns)
        try:
            t = reader.table.for_client("tcp", client, VIP)
            assert t is not None and t.backend == BACKEND and reader.dumped >= 1
            assert reader.drain() == 0  # nothing new happened since: the dump, not an event
        finally:
            reader.close()
    finally:
        cli.close()
        srv.close()


def test_the_dump_of_a_namespace_without_translations_is_empty(netns):
    assert dump(netns) == []
