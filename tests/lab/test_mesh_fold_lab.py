"""Mesh folding against the real kernel (collector/mesh.py): two namespaces of our own, an
Istio-style sidecar relay in each (iptables REDIRECT of the client pod's outbound calls to 15001
and of the server pod's inbound calls to 15006, the handoff to the app from 127.0.0.6,
tests/lab/mesh_workload.py), the socket probes and NAT folding as the collector wires them.
Proves that the probes give the six sockets the fold expects, and that the fold turns each call
into one client and one server record with the app's exact bytes, keyed like the wire would
see the proxy-to-proxy hop."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pytest

from collector.mesh import MeshFolder, MeshFoldingSink
from collector.mesh_proxies import DEFAULT_PROXIES, MeshSettings
from collector.natfold import NatFolder, NatFoldingSink
from collector.pipeline import Sink, run_pipeline
from eastwest.record import Endpoint, FlowRecord
from tests.lab.test_socket_probes_support import Collected, namespace_pair, netns_inode

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
A_NS, B_NS = "ewmf-a", "ewmf-b"
A_IP, B_IP = "10.78.0.1", "10.78.0.2"
WORKLOAD = Path(__file__).with_name("mesh_workload.py")
CALLS, SEND, REPLY = 3, 1000, 2000


def mesh_pods() -> AbstractContextManager[tuple[str, str]]:
    """Two pods joined by a veth, each with its sidecar's REDIRECT rules; removed on exit."""
    return namespace_pair((A_NS, B_NS), (A_IP, B_IP), ("ewmf-a0", "ewmf-b0"), then=[
        ("ip", "netns", "exec", A_NS, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
         "-d", B_IP, "-m", "mark", "!", "--mark", "0x539", "-j", "REDIRECT", "--to-ports",
         "15001"),
        ("ip", "netns", "exec", B_NS, "iptables", "-t", "nat", "-A", "PREROUTING", "-p",
         "tcp", "--dport", "8080", "-j", "REDIRECT", "--to-ports", "15006")])


@contextmanager
def started(ns: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(WORKLOAD), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            pytest.fail(f"{args[0]} did not start: {line!r} "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        yield proc
    finally:
        proc.kill()
        proc.wait()


class _Tee:
    """Keeps what NAT folding hands on (the mesh fold's input) and passes it on."""

    def __init__(self, seen: list[FlowRecord], inner: Sink) -> None:
        self.seen, self.inner = seen, inner

    def write(self, records: list[FlowRecord]) -> None:
        self.seen.extend(records)
        self.inner.write(records)

    def close(self) -> None:
        self.inner.close()


class MeshCollected(Collected):
    """The socket probes, NAT folding and the mesh fold, wired as collector/main.py wires them."""

    def __init__(self, netns: list[str]) -> None:
        super().__init__(netns, interval=1.0)
        self.raw: list[FlowRecord] = []
        mesh = MeshFolder(MeshSettings(DEFAULT_PROXIES, 3.0), self.ctx.next_record_id,
                          self.ctx.drops)
        now = self.ctx.clock.now
        self.chain = NatFoldingSink(_Tee(self.raw, MeshFoldingSink(self, mesh, now)),
                                    NatFolder(netns), now)

    def _run(self) -> None:
        try:
            run_pipeline(self.sources, self.chain, stop=self._stop, handle_signals=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self._errors.append(exc)
            for source in self.sources:
                source.ready.set()


def folded(observer: str):  # type: ignore[no-untyped-def]
    return lambda recs: sum(1 for r in recs if r.final and r.mesh is not None
                            and r.observer == observer) >= CALLS


def test_redirected_calls_through_sidecars_fold_to_one_app_record_per_side():
    with ExitStack() as stack:
        stack.enter_context(mesh_pods())
        col = stack.enter_context(MeshCollected([A_NS, B_NS]))
        stack.enter_context(started(B_NS, "serve", "--reply", str(REPLY)))
        stack.enter_context(started(B_NS, "relay-in"))
        stack.enter_context(started(A_NS, "relay-out"))
        r = subprocess.run(["ip", "netns", "exec", A_NS, sys.executable, str(WORKLOAD), "call",
                            "--to", f"{B_IP}:8080", "--count", str(CALLS), "--send", str(SEND)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        truth = [json.loads(x) for x in r.stdout.splitlines()]
        assert [(t["sent"], t["received"]) for t in truth] == [(SEND, REPLY)] * CALLS
        ok = col.wait_for(lambda recs: folded("client")(recs) and folded("server")(recs), 30)
        a_ns, b_ns = netns_inode(A_NS), netns_inode(B_NS)
    assert ok, [(r.observer, r.client, r.server, r.process, r.incomplete) for r in col.records]

    # what the socket probes and NAT folding give for one call: the six sockets of the doc
    raw = [r for r in col.raw if r.final and r.protocol == "tcp"]
    ports = {t["client_port"] for t in truth}
    r1 = [r for r in raw if r.observer == "client" and r.client.port in ports]
    assert len(r1) == CALLS
    for r in r1:
        assert r.server == Endpoint("127.0.0.1", 15001) and r.netns == a_ns
        assert r.nat is not None and r.nat[0].type == "redirect"
        assert r.nat[0].original == Endpoint(B_IP, 8080)
        assert (r.bytes_c2s, r.bytes_s2c) == (SEND, REPLY)
    side = [r for r in raw if r.process is not None and r.process.comm == "ew-sidecar"]
    r2 = [r for r in side if r.observer == "server" and r.server.port == 15001]
    r3 = [r for r in side if r.observer == "client" and not r.loopback]
    r4 = [r for r in side if r.observer == "server" and r.server.port == 15006]
    r5 = [r for r in side if r.observer == "client" and r.loopback]
    r6 = [r for r in raw if r.observer == "server" and r.client.ip == "127.0.0.6"
          and r not in side]
    assert [len(x) for x in (r2, r3, r4, r5, r6)] == [CALLS] * 5
    assert {r.client.port for r in r2} == ports and all(r.loopback for r in r2)
    assert all((r.bytes_c2s, r.bytes_s2c) == (SEND + 4, REPLY) for r in r3 + r4)  # framing
    assert all(r.server == Endpoint(B_IP, 8080) for r in r5 + r6)
    assert all(r.nat and r.nat[-1].translated == Endpoint(B_IP, 15006) for r in r3 + r4)

    # the fold: one client and one server record per call, the apps' bytes, the hop's key
    out = [r for r in col.records if r.final and r.protocol == "tcp"]
    assert not [r for r in out if r.process is not None and r.process.comm == "ew-sidecar"]
    clients = [r for r in out if r.mesh is not None and r.observer == "client"]
    servers = [r for r in out if r.mesh is not None and r.observer == "server"]
    assert len(clients) == len(servers) == CALLS
    assert {r.key for r in clients} == {r.key for r in servers} == {
        ("tcp", A_IP, r.client.port, B_IP, 8080) for r in r3}
    for r in clients + servers:
        assert (r.bytes_c2s, r.bytes_s2c) == (SEND, REPLY) and not r.loopback
        assert r.mesh is not None and r.mesh.proxy == "ew-sidecar" and "mesh" not in r.incomplete
        assert r.nat is None  # the pod's REDIRECTs are hops, not translations
    for r in clients:
        assert r.netns == a_ns and r.mesh is not None
        assert [h.hop for h in r.mesh.hops] == ["app-proxy", "proxy-proxy"]
        assert r.mesh.hops[0].client.port in ports and r.mesh.hops[1].bytes_c2s == SEND + 4
    for r in servers:
        assert r.netns == b_ns and r.mesh is not None
        assert [h.hop for h in r.mesh.hops] == ["proxy-proxy", "proxy-app"]
        assert r.mesh.hops[0].server == Endpoint(B_IP, 15006)
        assert r.mesh.hops[1].client.ip == "127.0.0.6"
    assert col.ctx.drops.total("mesh") == 0
