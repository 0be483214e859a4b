"""Collector process entry: settings from flags -> sources -> sink.

Wires the stages in one place. Sources:
- `collector.probes.SocketProbeSource(ctx, args)`: eBPF socket probes (issue #3)
- `collector.vxlan.LiveVxlanSource(ctx, args)`: tunnels on underlay interfaces (issue #4)
- `collector.vxlan.LiveVxlanSource(ctx, args, wire=True)`: every packet of `--wire-interface`
  interfaces, tunnelled or plain (issue #18)
Between the sources and the sink, `collector.natfold.NatFoldingSink` rewrites the records of
translated connections (a Service's DNAT, a node's masquerade) to their real ends from conntrack
(issue #16; `--no-nat` turns it off); then `collector.mesh.MeshFoldingSink` folds a service-mesh
call's sidecar sockets into one record of the application's call (issue #20; `--no-mesh` turns
it off); then, when `--dns` runs beside a packet capture,
`collector.dns.wirejoin.DnsJoiningSink` puts the DNS summary of a flow to a resolver onto the
wire's records of that flow instead of sending a second path record stream (issue #17).
- `collector.vxlan.PcapSource(ctx, path, args)`: a capture file (issue #4)

Who this collector is (its id and spool folder, collector/identity.py) is decided first, once,
and written back into `args` for every stage; `--check` and the start-up line of a spooling
collector say it. The spool folder is locked by the sink (collector/spool_lock.py): a collector
whose folder another process holds waits `--spool-lock-wait` seconds, then exits 1 naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from collector import identity
from collector.pipeline import (
    CollectorContext,
    JsonLinesSink,
    Sink,
    Source,
    live_first_seq,
    run_pipeline,
)
from eastwest.errors import ConfigError

log = logging.getLogger("eastwest.collector")

if TYPE_CHECKING:
    from collector.metrics import CollectorMetrics


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s collector %(levelname)s %(message)s", stream=sys.stderr)
    ident = identity.resolve(args)  # ConfigError naming --collector-id
    args.collector_id = ident.collector_id
    args.spool_dir = str(ident.spool_dir) if ident.spool_dir is not None else None
    from collector import mesh, mesh_proxies

    mesh_settings = mesh_proxies.settings_from(args)  # ConfigError naming the flag
    if args.check:
        from collector.capabilities import main_check

        print(identity_lines(ident) + "\n")
        return main_check(args)
    if args.print_bpf:
        from collector.probes import bpf_source

        print(bpf_source(args))
        return 0

    ctx = CollectorContext(collector_id=args.collector_id,
                           first_seq=1 if args.pcap else live_first_seq())
    sources = make_sources(ctx, args)

    metrics = None
    if args.aggregator or getattr(args, "nats", None) or getattr(args, "metrics_listen", None):
        from collector.metrics import CollectorMetrics  # prometheus_client: only when served

        metrics = CollectorMetrics(ctx.drops)
        metrics.watch_sources(sources)  # BPF map fill, kernel counters: what a source reports
    # the sink first: a spooling sink waits for a spool folder another collector still holds,
    # and that one still serves the --metrics-listen port until it exits
    sink = _make_sink(args, ctx, metrics, ident)
    from collector.dns.wirejoin import joining_sink

    # one path stream per DNS flow: the DNS capture's summary onto the wire's records
    sink = joining_sink(sink, sources, ctx)
    if mesh_settings is not None:  # a mesh call's sidecar sockets: one record of the app's call
        sink = mesh.MeshFoldingSink(sink, mesh.MeshFolder(mesh_settings, ctx.next_record_id,
                                                          ctx.drops), ctx.clock.now)
    from collector.natfold import NatFoldingSink, folder_for

    # Service calls: records keyed by the backend (conntrack); runs first, the mesh fold needs it
    folder = folder_for(args)
    if folder is not None:
        sink = NatFoldingSink(sink, folder, ctx.clock.now)
    server = (metrics.serve(args.metrics_listen)
              if metrics is not None and getattr(args, "metrics_listen", None) else None)
    try:
        run_pipeline(sources, sink, duration=args.duration,
                     on_ready=None if args.pcap else lambda: say_running(sources, args))
    finally:
        if server is not None:
            server.shutdown()
    dropped = ctx.drops.snapshot()
    if dropped:
        summary = ", ".join(f"{s}/{r}={n}" for (s, r), n in sorted(dropped.items()))
        print(f"eastwest collector: dropped {summary}", file=sys.stderr)
    return 0


def say_running(sources: list[Source], args: argparse.Namespace) -> None:
    """One line on stderr once every source sees traffic (the socket probes compile and attach
    for seconds): from then on nothing is missed. Scripts and `eastwest demo` wait for it."""
    to = (args.aggregator or (f"NATS {args.nats}" if getattr(args, "nats", None) else None)
          or args.output or "stdout")
    print(f"eastwest collector: running: {', '.join(s.name for s in sources)} -> {to} "
          f"({'for ' + format(args.duration, 'g') + ' s' if args.duration else 'Ctrl-C stops'})",
          file=sys.stderr, flush=True)


def make_sources(ctx: CollectorContext, args: argparse.Namespace) -> list[Source]:
    """The sources the flags ask for: capture files, else the live ones."""
    if args.pcap:
        from collector.vxlan import PcapSource

        return [PcapSource(ctx, path, args) for path in args.pcap]
    sources: list[Source] = []
    if not args.no_socket:
        from collector.probes import SocketProbeSource

        sources.append(SocketProbeSource(ctx, args))
    wire = bool(getattr(args, "wire_interface", None))
    if wire:
        from collector.vxlan import LiveVxlanSource

        sources.append(LiveVxlanSource(ctx, args, wire=True))
    if not args.no_vxlan:
        from collector.vxlan import LiveVxlanSource, live_capture_wanted

        # --wire-interface replaces the VXLAN devices' underlay as the default (the same
        # packets would be seen twice); a named --underlay still runs beside it
        if args.underlay or (not wire and live_capture_wanted(args)):
            sources.append(LiveVxlanSource(ctx, args))
        elif not wire:
            _say_no_underlay(args)
    if getattr(args, "dns", None):
        from collector.dns import DnsSource

        sources.append(DnsSource(ctx, dns_specs(args), interval=args.interval,
                                 idle_timeout=args.idle_timeout, query_timeout=args.dns_timeout,
                                 top_names=args.dns_top_names))
    if getattr(args, "drops", False):
        from collector.drops.source import drop_source

        sources.append(drop_source(ctx, args))
    if not sources:
        raise ConfigError("sources", "none", "every source is disabled (--no-socket, --no-vxlan)")
    return sources


def dns_specs(args: argparse.Namespace) -> list[str]:
    """--dns values, `scoped` expanded to every --netns given by name."""
    if args.dns_timeout <= 0:
        raise ConfigError("--dns-timeout", args.dns_timeout, "must be > 0")
    if args.dns_top_names < 1:
        raise ConfigError("--dns-top-names", args.dns_top_names, "must be >= 1")
    specs: list[str] = []
    for spec in args.dns:
        if spec == "scoped":
            named = [n for n in args.netns if not n.isdigit()]
            if not named:
                raise ConfigError("--dns", spec, "needs --netns NAME (a namespace by name)")
            specs += named
        else:
            specs.append(spec)
    return list(dict.fromkeys(specs))


def _make_sink(args: argparse.Namespace, ctx: CollectorContext,
               metrics: CollectorMetrics | None, ident: identity.Identity) -> Sink:
    if args.aggregator or getattr(args, "nats", None):
        assert metrics is not None
        from collector.export import SWITCH_INTERVAL_S, AggregatorSink

        sys.setswitchinterval(SWITCH_INTERVAL_S)  # the sender thread gets the GIL back promptly
        sink = AggregatorSink(ctx, args, metrics=metrics)  # waits here while the spool is held
        print(f"eastwest collector: collector id {ident.collector_id!r} (from {ident.id_from}), "
              f"spool {sink.settings.spool_dir} (locked by this process, pid {os.getpid()})",
              file=sys.stderr, flush=True)
        return sink
    if args.output:
        return JsonLinesSink(open(args.output, "ab"))  # noqa: SIM115 - closed by the sink
    if args.stdout:
        return JsonLinesSink()
    raise ConfigError("output", None, "choose where records go: --stdout, --output FILE, --aggregator URL or --nats URL")


def identity_lines(ident: identity.Identity) -> str:
    """`--check`'s lines about who this collector is, aligned with its table's checks."""
    from collector.spool_lock import holder

    how = "" if ident.id_from == "--collector-id" else "; set one with --collector-id"
    if ident.spool_dir is None:
        spool = f"none: {ident.spool_from}"
    else:
        if not ident.spool_dir.exists():
            state = "not created yet"
        else:
            other = holder(ident.spool_dir)
            state = "free" if other is None else f"IN USE by {other.describe()}"
        spool = f"{ident.spool_dir}  (from {ident.spool_from}; {state})"
    return (f"{'collector id:':<28} {ident.collector_id}  ({ident.id_from}{how})\n"
            f"{'spool folder:':<28} {spool}")


def _say_no_underlay(args: argparse.Namespace) -> None:
    """No VXLAN device in the collector's namespace and no --underlay: no wire (`path`) records.
    A scoped collector (--netns) is told loudly: its hosts' VXLAN devices live in the namespaces
    it scopes to, not in the one it runs in, so it must name their underlay."""
    scoped = bool(getattr(args, "netns", None))
    log.log(logging.WARNING if scoped else logging.INFO,
            "no VXLAN device in this namespace and no --underlay: no wire (path) records%s",
            "; name each scoped host's underlay link, e.g. --underlay NETNS/eth0" if scoped else "")
