"""`eastwest aggregator`: central ingest, store and API (correlation and graph: issue #6).

Flags are declared here (cheap); FastAPI, DuckDB and uvicorn are imported only when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  export EASTWEST_INGEST_TOKEN=$(openssl rand -hex 24) EASTWEST_READ_TOKEN=$(openssl rand -hex 24)
  eastwest aggregator --listen 127.0.0.1:8470 --data ./data
  eastwest aggregator --listen 0.0.0.0:8470 --data /var/lib/eastwest \\
      --tls-cert server.pem --tls-key server.key
  eastwest aggregator --listen 127.0.0.1:8470 --data ./data --insecure-open   # loopback only
  eastwest aggregator --listen 0.0.0.0:8470 --clickhouse 'clickhouse://ch:9000/eastwest?cluster=ew' \\
      --nats nats://nats:4222          # one of N replicas (docs/scale-out.md)
  eastwest aggregator --data ./data --k8s-api in-cluster   # in a pod: its service account
  eastwest aggregator --data ./data --kubeconfig ~/.kube/config --k8s-context prod
  eastwest aggregator --data ./data --k8s-api https://10.0.0.1:6443 --k8s-ca ca.crt \\
      --k8s-token-file token       # the CA that signed the API server's certificate
  eastwest aggregator --data ./data --otlp-endpoint http://tempo:4317 --otlp-protocol grpc \\
      --otlp-sample 0.1                # 10% of connections as span pairs (docs/integrations.md)

Tokens: the ingest token (EASTWEST_INGEST_TOKEN or --ingest-token-file) lets collectors POST
batches to /api/v1/ingest; the read token (EASTWEST_READ_TOKEN or --read-token-file) is needed
for every read. A token file holds the bare token or NAME=value lines (make run writes
./data/tokens.env, mode 0600). API reference: /docs on the running server, docs/api.md.

Every flag's value is checked at start, whether or not what it tunes is on (an --otlp-* value
without an endpoint, a --nats-* value without --nats): a bad one exits 2 naming the flag."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "aggregator",
        help="central service: ingest, store, web API",
        description="Receives flow-record batches from collectors (authenticated, idempotent per "
        "collector and batch number), stores them durably in DuckDB, and serves the API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("serving")
    g.add_argument("--listen", default="127.0.0.1:8470", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:8470; [::1]:8470 for IPv6; "
                   "port 0: any free port, printed). Bound first: a port already in use is "
                   "one line and exit 1, before the store opens")
    g.add_argument("--data", default="./data", metavar="DIR",
                   help="directory of the DuckDB store (created if missing; default ./data)")
    g.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    g.add_argument("-v", "--verbose", action="store_true", help="log every request")

    g = p.add_argument_group("security")
    g.add_argument("--ingest-token-file", metavar="FILE",
                   help="ingest token file, used when EASTWEST_INGEST_TOKEN is not set")
    g.add_argument("--read-token-file", metavar="FILE",
                   help="read token file, used when EASTWEST_READ_TOKEN is not set")
    g.add_argument("--insecure-open", action="store_true",
                   help="serve the read API without a token (refused unless --listen is loopback)")

    g = p.add_argument_group("limits")
    g.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, metavar="N",
                   help="largest ingest body; larger ones get 413 (default 64 MiB)")
    g.add_argument("--max-batch-records", type=int, default=100_000, metavar="N",
                   help="most records in one batch; more get 413 (default 100000)")

    g = p.add_argument_group("correlation, identity and retention (docs/aggregator.md)")
    g.add_argument("--workload-map", metavar="FILE", help="static workload map (YAML: workloads: "
                   "[{match: CIDR or ip:port, name, namespace, kind, host, labels}]); first layer")
    g = p.add_argument_group(
        "Kubernetes identity (docs/aggregator.md): pods, services, EndpointSlices and nodes, "
        "listed and watched in the background; RBAC: list/watch on them (docs/deploy.md)")
    g.add_argument("--k8s-api", metavar="in-cluster|kubeconfig|URL",
                   help="name connection ends from this cluster: `in-cluster` (in a pod: "
                   "$KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA, re-read "
                   "when the token rotates), `kubeconfig` (see --kubeconfig), or the API "
                   "server's URL, e.g. https://10.0.0.1:6443 (token: --k8s-token-file or "
                   "$KUBERNETES_TOKEN; CA: --k8s-ca)")
    g.add_argument("--k8s-ca", metavar="FILE", help="PEM CA that signed the API server's "
                   "certificate (overrides in-cluster's and the kubeconfig's); without it the "
                   "system CAs, and a cluster CA fails with 'certificate verify failed'")
    g.add_argument("--k8s-token-file", metavar="FILE", help="bearer token file, read again "
                   "when it changes (projected service-account tokens rotate)")
    g.add_argument("--kubeconfig", metavar="FILE", help="outside a cluster: this kubeconfig "
                   "(implies --k8s-api kubeconfig; default $KUBECONFIG, else ~/.kube/config); "
                   "its CA data, client certificate or token; exec plugins are not supported")
    g.add_argument("--k8s-context", metavar="NAME", help="kubeconfig context (default: its "
                   "current-context)")
    g.add_argument("--k8s-keep-deleted", default="1h", metavar="DURATION",
                   help="keep who owned an address for this long after the pod (service, node) "
                   "is gone, so late records of its connections are named after it and not "
                   "after the next owner of a reused IP (default 1h)")
    g = p.add_argument_group("identity fallbacks and retention")
    g.add_argument("--reverse-dns", action="store_true", help="name unresolved peers by PTR lookup")
    g.add_argument("--cidr-group", metavar="NAME=CIDR", action="append", default=[],
                   help="group unresolved peers in CIDR under NAME (repeatable); else external:<ip>")
    g.add_argument("--retention", default="7d", metavar="DURATION",
                   help="delete flows, connections and rollups older than this: 30m, 36h, 7d, "
                   "2w; more than 0 (default 7d)")
    g.add_argument("--edge-budget", type=int, default=2000, metavar="N",
                   help="graphs keep the N heaviest edges and fold the rest into 'other' (default 2000)")
    g.add_argument("--nodeport-hold", type=float, default=10.0, metavar="SECONDS",
                   help="a graph leaves out an edge made only of NodePort halves (a call to a "
                   "node's NodePort seen by its client only, or from a node's address seen by "
                   "its server only) that started less than this ago, while the middle host's "
                   "record may still join them into one call (it reports the call at its "
                   "collector's next --interval tick, default 5 s, plus --batch-age); a real edge "
                   "is shown once this has passed; 0 turns it off (default 10; docs/aggregator.md, "
                   "\"NodePort calls with masquerade\")")
    g.add_argument("--nodeport-range", default="30000-32767", metavar="LOW-HIGH",
                   help="the cluster's NodePort range (kube-apiserver's "
                   "--service-node-port-range): a call to a node on a port in it, seen by its "
                   "client only, is a NodePort half that --nodeport-hold applies to "
                   "(default 30000-32767)")
    g.add_argument("--identity-settle", type=float, default=10.0, metavar="SECONDS",
                   help="an end of a connection is named by the most specific thing any of its "
                   "observers knows (the server's own process, say); a name may change for this "
                   "long after the connection opened, then it is final and kept. Observers whose "
                   "records arrive later than this after the first one do not rename it; "
                   "Prometheus/OTLP counters wait this long (default 10)")
    g.add_argument("--correlation-backlog", type=int, default=500_000, metavar="N",
                   help="records acknowledged (in the ingest journal) that may wait to be stored "
                   "and correlated, kept compressed (~30 bytes each); beyond N, ingest waits up "
                   "to 2 s, then answers 429 + Retry-After (default 500000)")

    g = p.add_argument_group("scale-out: shared ClickHouse store, NATS JetStream intake "
                             "(docs/scale-out.md)")
    g.add_argument("--clickhouse", metavar="URL", help="store in ClickHouse instead of DuckDB: "
                   "clickhouse://[user@]host:9000/database[?cluster=NAME&secure=1&ca=FILE"
                   "&ttl_days=N&alt_hosts=H:P,H:P&insert_quorum=N] (password: "
                   "$EASTWEST_CLICKHOUSE_PASSWORD); with cluster, Distributed tables over its "
                   "shards, replicated tables when a shard has replicas (ZooKeeper)")
    g.add_argument("--nats", metavar="URL", help="also consume batches from NATS JetStream, "
                   "e.g. nats://nats:4222; the replicas share the stream's partitions through "
                   "leases (each owned partition: its own durable pull consumer and "
                   "correlator) and ack a batch only once it is stored")
    g.add_argument("--nats-stream", metavar="NAME", help="JetStream stream (default EASTWEST; "
                   "created if missing)")
    g.add_argument("--nats-subject", metavar="PREFIX", help="subject prefix (default eastwest.flows)")
    g.add_argument("--nats-durable", metavar="NAME", help="prefix of the partitions' durable "
                   "consumers, <NAME>-p<K> (default eastwest-aggregators)")
    g.add_argument("--nats-partitions", type=int, metavar="P", help="partitions of the stream "
                   "(default 6): fixed when the stream is created, every collector and "
                   "aggregator of a stream must state the same P")
    g.add_argument("--nats-lease", type=float, metavar="S", help="a replica's hold on a "
                   "partition: renewed every S/3 seconds, taken over by another replica S "
                   "seconds after its replica died (default 10; the lease bucket's, when it "
                   "exists)")
    g.add_argument("--nats-replica", metavar="ID", help="this replica's name in the leases "
                   "(default HOST-PID)")
    g.add_argument("--nats-coalesce", type=int, metavar="N", help="shares of a partition "
                   "waiting in the stream that a replica fetches and correlates as one step "
                   "with ONE store write (every share's mark kept: still exactly once); also "
                   "the partition consumer's max_ack_pending (default 32; 1: one share at a "
                   "time)")
    g.add_argument("--nats-coalesce-records", type=int, metavar="N", help="records of one "
                   "coalesced write, at most (default 60000; a larger share is written alone)")
    g.add_argument("--nats-coalesce-wait", type=float, metavar="S", help="after a partition's "
                   "first waiting share, how long to wait for more to coalesce (default 0.05)")
    g.add_argument("--no-live-fanin", action="store_true", help="the live stream (GET "
                   "/api/v1/flows/stream) of a replica carries only the partitions it owns; "
                   "by default the replicas send each other their rows over NATS "
                   "(<subject-prefix>.live, only while a replica has subscribers), so every "
                   "replica's stream carries every partition")
    g.add_argument("--nats-ack-wait", type=float, metavar="S", help="a batch not acked within S "
                   "seconds (its replica died) is redelivered to its partition's next owner "
                   "(default 30)")
    g.add_argument("--nats-max-bytes", type=int, metavar="N", help="byte limit of a stream "
                   "created here (default 1 GiB)")
    g.add_argument("--nats-max-age", type=float, metavar="S", help="age limit of a stream created "
                   "here (default 86400)")
    g.add_argument("--nats-creds", metavar="FILE", help="NATS credentials file; or a token in "
                   "$EASTWEST_NATS_TOKEN, or user:password in the URL")
    g.add_argument("--nats-ca", metavar="FILE", help="CA bundle to verify the NATS server (TLS)")
    g.add_argument("--nats-cert", metavar="FILE", help="client certificate for mutual TLS")
    g.add_argument("--nats-key", metavar="FILE", help="key of --nats-cert")

    g = p.add_argument_group("exporters: OTLP and Prometheus (docs/integrations.md)")
    g.add_argument("--otlp-endpoint", metavar="URL", help="send OTLP traces and metrics here, e.g. "
                   "http://tempo:4318 (HTTP/protobuf) or http://tempo:4317 with --otlp-protocol "
                   "grpc; default $OTEL_EXPORTER_OTLP_ENDPOINT (OTLP is off when neither is set); "
                   "headers, TLS, compression: the standard OTEL_EXPORTER_OTLP_* variables")
    g.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"),
                   help="default $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf")
    g.add_argument("--otlp-signals", metavar="LIST", help="traces,metrics (default both)")
    g.add_argument("--otlp-sample", type=float, metavar="SHARE",
                   help="share of connections exported as span pairs, 0..1 (default 1: all)")
    g.add_argument("--otlp-filter", metavar="QUERY", help="connections exported as spans, in the "
                   "API's filter parameters (default 'protocol=tcp&protocol=udp')")
    g.add_argument("--otlp-timeout", type=float, metavar="SECONDS",
                   help="per export request, retries included (default $OTEL_EXPORTER_OTLP_TIMEOUT or 10)")
    g.add_argument("--otlp-queue-size", type=int, metavar="N",
                   help="spans waiting for export; more are dropped and counted (default 8192)")
    g.add_argument("--otlp-metrics-interval", type=float, metavar="SECONDS",
                   help="OTLP metrics export period (default 15)")
    g.add_argument("--otlp-service-name", choices=("name", "namespace/name"),
                   help="a span's service.name: the workload's name, its namespace in "
                   "service.namespace (default: name; Tempo then needs the service.namespace "
                   "dimension), or namespace/name")
    g.add_argument("--otlp-late-after", type=float, metavar="SECONDS",
                   help="spans whose connection ended longer ago than this when exported are "
                   "counted as late, by reason (default 30: Tempo's "
                   "metrics_ingestion_time_range_slack; set both alike)")
    g.add_argument("--export-settle", type=float, metavar="SECONDS",
                   help="a closed connection is exported (span pair, failure, RTT) after this "
                   "long without a new record, so every observer's view is in (default 5)")
    g.add_argument("--export-link-local", action="store_true",
                   help="also export link-local and multicast traffic (fe80::/10, ff00::/8, "
                   "224.0.0.0/4, 255.255.255.255: neighbour discovery, MLD, mDNS, DHCP) to "
                   "Prometheus and OTLP; left out by default, like the graph's default view")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from aggregator.serve import serve
    from aggregator.settings import AggregatorSettings

    return serve(AggregatorSettings.from_args(args), verbose=args.verbose)
