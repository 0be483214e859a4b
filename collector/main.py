"""Collector process entry: settings from flags -> sources -> sink.

Wires the stages in one place. Sources:
- `collector.probes.SocketProbeSource(ctx, args)`: eBPF socket probes (issue #3)
- `collector.vxlan.LiveVxlanSource(ctx, args)`: VXLAN on underlay interfaces (issue #4)
- `collector.vxlan.PcapSource(ctx, path, args)`: a capture file (issue #4)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from collector.pipeline import (
    CollectorContext,
    JsonLinesSink,
    Sink,
    Source,
    live_first_seq,
    run_pipeline,
)
from eastwest.errors import ConfigError

if TYPE_CHECKING:
    from collector.metrics import CollectorMetrics


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s collector %(levelname)s %(message)s", stream=sys.stderr)
    if args.check:
        from collector.capabilities import main_check

        return main_check(args)
    if args.print_bpf:
        from collector.probes import bpf_source

        print(bpf_source(args))
        return 0

    from collector.export import SWITCH_INTERVAL_S

    sys.setswitchinterval(SWITCH_INTERVAL_S)  # the sender thread gets the GIL back promptly
    ctx = CollectorContext(collector_id=args.collector_id,
                           first_seq=1 if args.pcap else live_first_seq())
    sources: list[Source] = []
    if args.pcap:
        from collector.vxlan import PcapSource

        sources = [PcapSource(ctx, path, args) for path in args.pcap]
    else:
        if not args.no_socket:
            from collector.probes import SocketProbeSource

            sources.append(SocketProbeSource(ctx, args))
        if not args.no_vxlan:
            from collector.vxlan import LiveVxlanSource, live_capture_wanted

            if live_capture_wanted(args):
                sources.append(LiveVxlanSource(ctx, args))
        if not sources:
            raise ConfigError("sources", "none", "every source is disabled (--no-socket, --no-vxlan)")

    from collector.metrics import CollectorMetrics

    metrics = CollectorMetrics(ctx.drops)
    metrics.watch_sources(sources)  # BPF map fill, kernel counters: what a source reports
    server = metrics.serve(args.metrics_listen) if getattr(args, "metrics_listen", None) else None
    sink = _make_sink(args, ctx, metrics)
    try:
        run_pipeline(sources, sink, duration=args.duration)
    finally:
        if server is not None:
            server.shutdown()
    dropped = ctx.drops.snapshot()
    if dropped:
        summary = ", ".join(f"{s}/{r}={n}" for (s, r), n in sorted(dropped.items()))
        print(f"eastwest collector: dropped {summary}", file=sys.stderr)
    return 0


def _make_sink(args: argparse.Namespace, ctx: CollectorContext, metrics: CollectorMetrics) -> Sink:
    if args.aggregator or getattr(args, "nats", None):
        from collector.export import AggregatorSink

        return AggregatorSink(ctx, args, metrics=metrics)
    if args.output:
        return JsonLinesSink(open(args.output, "ab"))  # noqa: SIM115 - closed by the sink
    if args.stdout:
        return JsonLinesSink()
    raise ConfigError("output", None, "choose where records go: --stdout, --output FILE, --aggregator URL or --nats URL")
