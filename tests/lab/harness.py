"""Shared by the lab tests that stand up a real aggregator and one collector per lab host:
the aggregator app under uvicorn in this process, a lab host's collector (eBPF socket probes
scoped to the host's namespaces + VXLAN capture on its underlay) sending to it, and the truth's
edges for comparison. Moved out of test_aggregator_e2e.py so the export tests reuse them."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn

INGEST, READ = "ewg-ingest-token-0123456789", "ewg-read-token-0123456789"
RH = {"Authorization": f"Bearer {READ}"}

T = TypeVar("T")


def paired(truth: list[dict[str, Any]], items: list[T], truth_key: Callable[[dict[str, Any]], Hashable],
           item_key: Callable[[T], Hashable], item_start: Callable[[T], Any]
           ) -> list[tuple[dict[str, Any], T | None]]:
    """Each truth connection with what the product made of it (a flow, a span pair): by 5-tuple,
    then in order of start. A port freed by a reset or a refusal is handed out again at once, so
    one 5-tuple can be two connections; None where the product has fewer than the truth."""
    by_key: dict[Hashable, list[T]] = defaultdict(list)
    for x in sorted(items, key=item_start):
        by_key[item_key(x)].append(x)
    out: list[tuple[dict[str, Any], T | None]] = []
    for t in sorted(truth, key=lambda t: t["start"]):
        got = by_key.get(truth_key(t))
        out.append((t, got.pop(0) if got else None))
    return out


class Aggregator:
    """The real app under uvicorn on loopback, in this process."""

    def __init__(self, data: Path | None, workload_map: str | None, *, settings: Any = None,
                 **settings_over: Any) -> None:
        """`settings`: whole AggregatorSettings (e.g. parsed from `eastwest aggregator` flags);
        else built from `data`, `workload_map` and `settings_over`."""
        from aggregator.app import create_app
        from aggregator.settings import AggregatorSettings

        if settings is None:
            assert data is not None
            settings = AggregatorSettings(
                data_dir=data, ingest_token=INGEST, read_token=READ,
                workload_map=Path(workload_map) if workload_map else None, **settings_over)
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1",
                                                    port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Aggregator:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                pytest.fail("the aggregator did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def get(self, path: str, **params: str | list[str]) -> dict:
        r = httpx.get(self.url + path, params=params, headers=RH, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()


class HostCollector:
    """One lab host's collector: socket probes + VXLAN on its underlay -> the aggregator."""

    def __init__(self, lab, host: str, url: str, spool: Path, metrics: bool = False,
                 keep: bool = False, nat: bool = False, wire: bool = False,
                 mesh: bool = False) -> None:
        """`wire`: capture every packet of the host's underlay link (`--wire-interface
        NETNS/eth0`: plain flows, ESP, and VXLAN decapsulated) instead of its VXLAN only.
        `mesh` (needs `nat`): service-mesh calls fold into the app's call (collector/mesh.py)
        after NAT folding, as collector/main.py wires it."""
        from collector.export import AggregatorSink, ExportSettings
        from collector.pipeline import CollectorContext
        from collector.probes import SocketProbeSource
        from collector.vxlan import LiveVxlanSource

        self.host = host
        self.ctx = CollectorContext(collector_id=f"{lab.name}-{host}")
        netns = lab.host_netns(host)
        args = argparse.Namespace(netns=netns, interval=1.0, idle_timeout=30.0, map_entries=8192,
                                  verbose=False, underlay=[f"{netns[0]}/eth0"],
                                  vxlan_port=[lab.inventory["vxlan_port"]], decoder="bulk",
                                  wire_interface=[f"{netns[0]}/eth0"], geneve_port=None,
                                  gpe_port=None)
        self.socket = SocketProbeSource(self.ctx, args)
        self.vxlan = LiveVxlanSource(self.ctx, args, wire=wire)
        self.sink = AggregatorSink(self.ctx, settings=ExportSettings(
            url=url, token=INGEST, spool_dir=spool / host, batch_age=0.2))
        self.sink.metrics.watch_sources([self.socket, self.vxlan])  # as collector/main.py
        # its /metrics on a free loopback port, for a Prometheus to scrape (metrics_target)
        self.metrics_server = self.sink.metrics.serve("127.0.0.1:0") if metrics else None
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        # keep=True: every record the sources emitted is also kept here, as the sink got it
        self.records: list[Any] = []
        self._keep = keep
        # nat=True: records fold by the host's conntrack (collector/natfold.py), as
        # collector/main.py wires it; `folder` holds its counters
        self.folder = None
        if nat:
            from collector.natfold import folder_for

            self.folder = folder_for(args)
        self.mesh = None
        if mesh:
            assert nat, "the mesh fold recognises an app's socket by its REDIRECT: nat=True"
            from collector.mesh import MeshFolder
            from collector.mesh_proxies import settings_from

            settings = settings_from(args)
            assert settings is not None
            self.mesh = MeshFolder(settings, self.ctx.next_record_id, self.ctx.drops)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def write(self, records: list[Any]) -> None:  # the pipeline's sink when keep=True
        self.records.extend(records)
        self.sink.write(records)

    def close(self) -> None:
        self.sink.close()

    def _run(self) -> None:
        from collector.pipeline import run_pipeline

        sink: Any = self if self._keep else self.sink
        if self.mesh is not None:
            from collector.mesh import MeshFoldingSink

            sink = MeshFoldingSink(sink, self.mesh, self.ctx.clock.now)
        if self.folder is not None:
            from collector.natfold import NatFoldingSink

            sink = NatFoldingSink(sink, self.folder, self.ctx.clock.now)
        try:
            run_pipeline([self.socket, self.vxlan], sink, stop=self.stop_event,
                         handle_signals=False)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)
            self.socket.ready.set()

    def start(self) -> None:
        self.thread.start()
        if not self.socket.ready.wait(180) or self.errors:
            self.stop()
            pytest.fail(f"collector {self.host} did not start: {self.errors}")

    @property
    def metrics_target(self) -> str:
        assert self.metrics_server is not None, "built without metrics=True"
        return f"127.0.0.1:{self.metrics_server.server_port}"

    def stop(self) -> None:
        """Stop: every source flushes its final records, the sink sends them all, then returns."""
        self.stop_event.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), f"collector {self.host} did not stop"
        assert not self.errors, self.errors


@contextlib.contextmanager
def collectors(lab, url: str, spool: Path, hosts: list[str], metrics: bool = False,
               keep: bool = False, nat: bool = False, wire: bool = False, mesh: bool = False):
    running = [HostCollector(lab, h, url, spool, metrics, keep, nat, wire, mesh) for h in hosts]
    try:
        for c in running:
            c.start()
        yield running
    finally:
        for c in running:
            if c.thread.is_alive():
                c.stop()
            if c.metrics_server is not None:
                c.metrics_server.shutdown()


def truth_edges(lab, truth: list[dict]) -> dict[tuple[str, str], dict[str, int]]:
    """Workload id of each pod IP from the lab's static map: (client, server) -> sums."""
    import yaml

    wl = yaml.safe_load(Path(lab.inventory["workload_map"]).read_text())["workloads"]
    wid = {e["match"].split("/")[0]: (f"{e['namespace']}/{e['name']}" if e["namespace"] else e["name"])
           for e in wl}
    out: dict[tuple[str, str], dict[str, int]] = {}
    for t in truth:
        e = out.setdefault((wid[t["client_ip"]], wid[t["server_ip"]]),
                           {"connections": 0, "bytes_c2s": 0, "bytes_s2c": 0, "failed": 0})
        e["connections"] += 1
        e["bytes_c2s"] += t["bytes_c2s"]
        e["bytes_s2c"] += t["bytes_s2c"]
        e["failed"] += t["outcome"] in ("refused", "timeout")
    return out


def names_by_observers(lab, t: dict) -> tuple[str, str]:
    """What an aggregator without a workload map names the ends of truth connection `t`: the
    container (its first 12 hex digits; the lab's pods run in container cgroups) or else the
    process of each end its own socket probe saw (TCP and UDP: the client always, the server
    when it accepted or received), else the address. Every address of a pod (IPv4 and IPv6 in a
    dual-stack lab) names it."""
    who = {a: (f"container:{p['container_id'][:12]}" if p.get("container_id")
               else f"process:{p['comm']}")
           for p in lab.inventory["pods"] for a in p.get("ips", [p["ip"]])}
    accepted = t["outcome"] not in ("refused", "timeout")
    return (who[t["client_ip"]],
            who[t["server_ip"]] if accepted else f"external:{t['server_ip']}")


def truth_edges_by_observers(lab, truth: list[dict]) -> dict[tuple[str, str], dict[str, int]]:
    """`truth_edges` as an aggregator without a workload map names them (names_by_observers)."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for t in truth:
        e = out.setdefault(names_by_observers(lab, t),
                           {"connections": 0, "bytes_c2s": 0, "bytes_s2c": 0, "failed": 0})
        e["connections"] += 1
        e["bytes_c2s"] += t["bytes_c2s"]
        e["bytes_s2c"] += t["bytes_s2c"]
        e["failed"] += t["outcome"] in ("refused", "timeout")
    return out


def served_edges(graph: dict) -> dict[tuple[str, str], dict[str, int]]:
    return {(e["source"], e["target"]): {"connections": e["connections_opened"],
                                         "bytes_c2s": e["bytes_c2s"], "bytes_s2c": e["bytes_s2c"],
                                         "failed": e["connections_failed"]}
            for e in graph["edges"]}


def window_of(truth: list[dict]) -> dict[str, str]:
    start = min(datetime.fromisoformat(t["start"].replace("Z", "+00:00")) for t in truth)
    end = max(datetime.fromisoformat(t["end"].replace("Z", "+00:00")) for t in truth)
    # the application's protocols (its truth lists TCP and UDP connections); callers that check
    # the default view delete "protocol"
    return {"from": (start - timedelta(seconds=1)).isoformat(),
            "to": (end + timedelta(seconds=1)).isoformat(), "protocol": ["tcp", "udp"]}


# -- TCP retransmissions: the wire carries a segment sent twice twice ---------------------------
def retransmitted(netns: str) -> int:
    """The namespace's TCP segments retransmitted so far (/proc/net/snmp, Tcp RetransSegs)."""
    text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout
    names, values = (line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:"))
    return int(dict(zip(names, values, strict=True))["RetransSegs"])


def same_or_retransmitted(got: list[int], want: list[int], senders: tuple[int, int]) -> bool:
    """The wire's payload bytes of a connection equal the truth, or exceed it only in a
    direction whose sender retransmitted in the run (the wire carries a segment sent twice
    twice: a loaded machine drops one now and then)."""
    return all(g == w or (g > w and n > 0) for g, w, n in zip(got, want, senders, strict=True))
