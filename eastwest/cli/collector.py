"""`eastwest collector`: the per-host agent.

Flags are declared here (cheap); the collector itself (bcc, scapy) is imported only when the
command runs, in `collector.main`.
"""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  eastwest collector --check                      what this kernel supports, as a table
  eastwest collector --stdout --duration 30       socket probes for 30 s, JSON lines on stdout
  eastwest collector --stdout --netns ewlab-h1    only one lab host's namespace (repeatable)
  eastwest collector --pcap capture.pcap --stdout every TCP/UDP/ICMP flow of a capture (tunnels
                                                  decapsulated: VXLAN, Geneve, VXLAN-GPE), then exit
  eastwest collector --underlay eth0 --no-socket  live VXLAN capture only
  eastwest collector --wire-interface eth0 --no-socket --stdout
                                                  every flow on eth0, plain or tunnelled (source wire)
  eastwest collector --netns ewlab-h2-p1 --dns scoped --stdout
                                                  connections and the DNS of one lab pod (api)
  eastwest collector --geneve-port 6081 --geneve-port 6082 --pcap ovn.pcap --stdout
  eastwest collector --aggregator URL --netns ewlab-h2 --netns ewlab-h2-p0
  eastwest collector --netns ewlab-h1 --netns ewlab-h1-p0 --mesh-proxy myproxy:7001:7002 --stdout
                                                  fold sidecar calls (Istio, Linkerd, Consul, the
                                                  lab's ew-sidecar by default) into the app's call
  eastwest collector --drops --no-socket --no-vxlan --stdout --netns ewlab-h1
                                                  packets the kernel drops, with its reason
                                                  collector id HOST-ewlab-h2, its own spool

Records are one per connection per interval (final=false while alive, final=true at the end),
counters cumulative since the connection started: see docs/flow-record.md.

One process per spool folder: a collector locks its folder (DIR/lock) for its whole life. A
second collector on the same folder waits --spool-lock-wait seconds for the first to finish
(a rolling update), then refuses to start naming the other process (docs/transport.md)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "collector",
        help="per-host agent: eBPF socket probes and wire capture -> flow records",
        description="The per-host agent. Sees every TCP connection of every process through "
        "stable kernel tracepoints (no kprobes), decapsulates VXLAN, Geneve and VXLAN-GPE on "
        "the underlay, and reads plain traffic from the interfaces and captures it is given.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--check", action="store_true",
                   help="print the kernel capability table and exit 0 (all needed present) or 1")
    g.add_argument("--no-socket", action="store_true", help="do not load the eBPF socket probes")
    g.add_argument("--no-vxlan", action="store_true", help="do not capture VXLAN on the underlay")
    g.add_argument("--drops", action="store_true",
                   help="also count the packets the kernel drops (skb:kfree_skb), per flow and "
                   "drop reason: records of source `drops` (docs/policy.md, \"Drops\"), which the "
                   "aggregator joins to their connections (`eastwest flows --outcome dropped`)")
    g.add_argument("--pcap", metavar="FILE", action="append", default=[],
                   help="read a pcap/pcapng capture instead of live sources, then exit (repeatable)")
    g.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")

    g = p.add_argument_group("scope")
    g.add_argument("--netns", metavar="NAME|INODE", action="append", default=[],
                   help="only connections in this network namespace (name under /run/netns or "
                   "inode number); repeatable; default: all")
    g.add_argument("--underlay", metavar="IF", action="append", default=[],
                   help="capture VXLAN on this interface; IF or NETNS/IF (repeatable); default: "
                   "the underlay devices of this host's VXLAN links")
    g.add_argument("--wire-interface", metavar="IF", action="append", default=[],
                   help="capture every packet on this interface, plain or tunnelled (records "
                   "with source wire); IF or NETNS/IF (repeatable); replaces the default "
                   "underlay (an --underlay given still runs)")
    g.add_argument("--vxlan-port", metavar="PORT", type=int, action="append", default=[],
                   help="UDP port carrying VXLAN (repeatable; default 4789 and 8472)")
    g.add_argument("--geneve-port", metavar="PORT", type=int, action="append", default=[],
                   help="UDP port carrying Geneve (repeatable; default 6081)")
    g.add_argument("--gpe-port", metavar="PORT", type=int, action="append", default=[],
                   help="UDP port carrying VXLAN-GPE (repeatable; default 4790)")
    g.add_argument("--dns", metavar="NETNS[/IF]", action="append", default=[],
                   help="watch DNS (port 53, UDP and TCP) of this network namespace (all its "
                   "interfaces; NETNS/IF: one interface; /IF: this namespace's); `scoped`: every "
                   "--netns given by name; repeatable; records of flows to resolvers carry a dns "
                   "summary (docs/flow-record.md); a flow the underlay capture also sees gets "
                   "it on the underlay's records: one path record stream per flow "
                   "(docs/collector.md, DNS)")
    g.add_argument("--dns-timeout", type=float, default=5.0, metavar="S",
                   help="a DNS query without an answer for S seconds counts as a timeout (default 5)")
    g.add_argument("--dns-top-names", type=int, default=10, metavar="N",
                   help="names kept per flow with their counts; the rest counted as other (default 10)")
    g.add_argument("--decoder", choices=("bulk", "scapy"), default="bulk",
                   help="wire decoder: the fast bulk path (default) or scapy for every packet")

    g = p.add_argument_group("records")
    g.add_argument("--collector-id", metavar="ID",
                   help="name of this collector in record ids and batches (default: the host "
                   "name; with --netns, the host name and the first --netns, e.g. "
                   "HOST-ewlab-h2, so collectors scoped to different namespaces differ)")
    g.add_argument("--interval", type=float, default=5.0, metavar="S",
                   help="seconds between interim records of live connections (default 5)")
    g.add_argument("--idle-timeout", type=float, default=30.0, metavar="S",
                   help="a flow without packets for S seconds ends: packet-observed flows and "
                   "the socket probes' UDP flows alike (default 30)")
    g.add_argument("--map-entries", default="auto", metavar="N|auto",
                   help="entries of the kernel's TCP connection map and of its UDP flow map "
                   "each; auto (default): from the host's limits (net.ipv4.tcp_ehash_entries, "
                   "at most 0.25%% of memory); --check prints the sizes, why, and their memory")
    g.add_argument("--cgroup-root", metavar="DIR",
                   help="the host's cgroup v2 tree, for container ids (default: this system's "
                   "cgroup2 mount); in a container, the host's /sys/fs/cgroup mounted read-only, "
                   "e.g. /host/sys/fs/cgroup (the DaemonSet does this)")
    g.add_argument("--no-udp", action="store_true",
                   help="socket probes: TCP only, no UDP flows (the UDP hooks add a syscall "
                   "tracepoint to every send/recv call of every process; docs/collector.md)")
    g.add_argument("--no-nat", action="store_true",
                   help="do not resolve NAT from conntrack: a Service call's client record then "
                   "names the ClusterIP, not the backend, and does not join its server's "
                   "(docs/collector.md, \"NAT\")")
    g.add_argument("--no-mesh", action="store_true",
                   help="do not fold service-mesh calls: each sidecar socket is then a record "
                   "of its own (docs/collector.md, \"Service mesh\")")
    g.add_argument("--mesh-proxy", metavar="NAME:OUTBOUND:INBOUND[:HANDOFF]", action="append",
                   default=[],
                   help="also recognise this sidecar proxy: its process name, the ports the "
                   "pod's REDIRECTs send outbound and inbound calls to, and the address it hands "
                   "inbound calls to the app from (default 127.0.0.6; `self`: the pod's own); "
                   "repeatable, added to the defaults ew-sidecar:15001:15006, Istio's "
                   "envoy:15001:15006, Consul's envoy:15001:20000:127.0.0.1 and "
                   "linkerd2-proxy:4140:4143:self")
    g.add_argument("--mesh-hold", type=float, metavar="S",
                   help="hold a mesh call's sockets at most S seconds for their partners, then "
                   "send them unfolded, marked incomplete: mesh (default: --interval + 2)")
    g.add_argument("--print-bpf", action="store_true", help="print the BPF C program and exit")

    g = p.add_argument_group("output")
    g.add_argument("--stdout", action="store_true", help="write records as JSON lines to stdout")
    g.add_argument("--output", metavar="FILE", help="write JSON lines to FILE")
    g.add_argument("--aggregator", metavar="URL", help="send batches to this aggregator, e.g. "
                   "http://127.0.0.1:8470 (token: $EASTWEST_INGEST_TOKEN or --ingest-token-file)")
    g.add_argument("--ingest-token-file", metavar="FILE",
                   help="file holding the ingest token (bare, or EASTWEST_INGEST_TOKEN=...)")
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify an https aggregator")
    g.add_argument("--spool-dir", metavar="DIR", help="on-disk spool of unsent batches "
                   "(default BASE/COLLECTOR_ID, see --spool-base); survives restarts; one "
                   "collector at a time (locked)")
    g.add_argument("--spool-base", metavar="BASE", help="folder of the default spool folders "
                   "(default /var/lib/eastwest/spool); ignored with --spool-dir")
    g.add_argument("--spool-lock-wait", type=float, default=60.0, metavar="S",
                   help="when another process holds the spool folder, wait up to S seconds for "
                   "it to finish (the old collector of a restart), then exit 1 naming it "
                   "(default 60; 0: do not wait)")
    g.add_argument("--spool-max-bytes", type=int, default=512 * 1024 * 1024, metavar="N",
                   help="spool bound; when full, interim records are shed before final ones "
                   "(default 512 MiB)")
    g.add_argument("--batch-size", type=int, default=5000, metavar="N",
                   help="records per batch at most (default 5000)")
    g.add_argument("--batch-age", type=float, default=1.0, metavar="S",
                   help="a batch is sent at the latest S seconds after its first record (default 1)")
    g.add_argument("--send-deadline", type=float, default=30.0, metavar="S",
                   help="retry one batch for at most S seconds, then keep it spooled (default 30)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="at exit, try to drain the spool for S seconds (default 10)")

    g = p.add_argument_group("NATS JetStream transport, instead of --aggregator (docs/scale-out.md)")
    g.add_argument("--nats", metavar="URL", help="publish batches to NATS JetStream, e.g. "
                   "nats://nats:4222 (several: comma-separated; tls:// for TLS); subjects "
                   "PREFIX.p<K>.COLLECTOR_ID, one per partition K; the spool, batching and retries stay as with --aggregator")
    g.add_argument("--nats-stream", metavar="NAME", help="JetStream stream, created if missing "
                   "(default EASTWEST)")
    g.add_argument("--nats-subject", metavar="PREFIX", help="subject prefix (default eastwest.flows)")
    g.add_argument("--nats-partitions", type=int, metavar="P", help="partitions of the stream "
                   "(default 6): each batch is split by connection, every record of a "
                   "connection goes to one partition; P is fixed when the stream is created")
    g.add_argument("--nats-max-bytes", type=int, metavar="N", help="byte limit of a stream this "
                   "collector creates; when full, batches wait in the spool (default 1 GiB)")
    g.add_argument("--nats-max-age", type=float, metavar="S", help="age limit of a stream this "
                   "collector creates (default 86400)")
    g.add_argument("--nats-creds", metavar="FILE", help="NATS credentials file (JWT + nkey); "
                   "or a token in $EASTWEST_NATS_TOKEN, or user:password in the URL")
    g.add_argument("--nats-ca", metavar="FILE", help="CA bundle to verify the NATS server (TLS)")
    g.add_argument("--nats-cert", metavar="FILE", help="client certificate for mutual TLS")
    g.add_argument("--nats-key", metavar="FILE", help="key of --nats-cert")

    g = p.add_argument_group("metrics and logging")
    g.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus /metrics here, e.g. 127.0.0.1:9470")
    g.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from collector.main import run

    return run(args)
