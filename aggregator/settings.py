"""Aggregator settings: one object per process, built once at start-up from flags > environment
> token files > defaults, and passed down. Every error names the key and the bad value.

In:  parsed `eastwest aggregator` flags and the environment.  Out: `AggregatorSettings`.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aggregator.store.query import NODEPORT_RANGE
from eastwest.errors import ConfigError
from eastwest.filters import DIMENSIONS, Filter, parse_duration

_NODEPORTS = "{}-{}".format(*NODEPORT_RANGE)  # as the flags say it

INGEST_TOKEN_ENV = "EASTWEST_INGEST_TOKEN"
READ_TOKEN_ENV = "EASTWEST_READ_TOKEN"
DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_MAX_RECORDS = 100_000
MIN_TOKEN_LEN = 16
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
OTLP_SIGNALS = ("traces", "metrics")
OTLP_SERVICE_NAMES = ("name", "namespace/name")  # what a span's resource service.name carries
# NATS flags whose values NatsOptions checks; checked even when --nats is not given
NATS_VALUE_FLAGS = ("nats_stream", "nats_subject", "nats_max_bytes", "nats_max_age",
                    "nats_partitions",
                    "nats_creds", "nats_ca", "nats_cert", "nats_key")


@dataclass(frozen=True)
class AggregatorSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8470
    ingest_token: str | None = None
    read_token: str | None = None
    insecure_open: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_batch_records: int = DEFAULT_MAX_RECORDS
    store: str = "duckdb"
    # correlation, identity, retention, graph (issue #6; docs/aggregator.md)
    workload_map: Path | None = None
    k8s_api: str | None = None          # in-cluster | kubeconfig | URL (aggregator/k8s/config.py)
    k8s_token: str | None = None        # $KUBERNETES_TOKEN
    k8s_ca: Path | None = None
    k8s_token_file: Path | None = None
    kubeconfig: Path | None = None
    k8s_context: str | None = None
    k8s_keep_deleted_s: float = 3600.0  # ended address owners kept for late records
    reverse_dns: bool = False
    cidr_groups: tuple[str, ...] = ()
    retention: timedelta | None = timedelta(days=7)
    edge_budget: int = 2000
    nodeport_hold_s: float = 10.0  # unjoined NodePort halves kept off a live graph this long
    nodeport_range: tuple[int, int] = NODEPORT_RANGE  # the cluster's --service-node-port-range
    correlation_slack_s: float = 5.0
    correlation_backlog: int = 500_000
    identity_settle_s: float = 10.0      # names of a connection's ends may change this long
    # exporters (issue #7; docs/integrations.md): OTLP is on with an endpoint here or in
    # OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT; the rest of OTLP from OTEL_EXPORTER_OTLP_*
    otlp_endpoint: str | None = None
    otlp_protocol: str | None = None
    otlp_signals: tuple[str, ...] = ("traces", "metrics")
    otlp_sample: float = 1.0
    otlp_filter: str = "protocol=tcp&protocol=udp"
    otlp_timeout_s: float | None = None
    otlp_queue_size: int | None = None
    otlp_metrics_interval_s: float | None = None
    otlp_service_name: str = "name"      # or "namespace/name" (docs/integrations.md)
    otlp_late_after_s: float = 30.0      # Tempo's metrics_ingestion_time_range_slack
    export_settle_s: float = 5.0
    export_link_local: bool = False      # link-local and multicast to Prometheus/OTLP too
    # scale-out (issue #10; docs/scale-out.md): a shared ClickHouse store, NATS JetStream intake
    clickhouse_url: str | None = None
    nats: Any = None                 # eastwest.jetstream.NatsOptions when --nats is given
    nats_durable: str = "eastwest-aggregators"
    nats_ack_wait_s: float = 30.0
    nats_lease_s: float = 10.0
    nats_replica: str | None = None  # default: host-pid (aggregator/consume.py)
    # a partition's waiting shares correlated as one step and written at once (consume.py)
    nats_coalesce: int = 32            # messages; 1: one share at a time
    nats_coalesce_records: int = 60_000
    nats_coalesce_wait_s: float = 0.05
    # the live stream of every replica carries every partition (aggregator/live_fanin.py)
    live_fanin: bool = True

    def __post_init__(self) -> None:
        if self.insecure_open and not is_loopback(self.host):
            raise ConfigError("--insecure-open", self.host,
                              "only allowed when listening on loopback (127.0.0.1, ::1, localhost)")
        if not self.insecure_open:
            if not self.ingest_token:
                raise ConfigError(INGEST_TOKEN_ENV, None, "an ingest token is required (set it, "
                                  "or pass --ingest-token-file; --insecure-open only on loopback)")
            if not self.read_token:
                raise ConfigError(READ_TOKEN_ENV, None, "a read token is required (set it, or "
                                  "pass --read-token-file; --insecure-open only on loopback)")
        for key, tok in (("ingest token", self.ingest_token), ("read token", self.read_token)):
            if tok is not None and len(tok) < MIN_TOKEN_LEN:
                raise ConfigError(key, "<hidden>", f"too short: at least {MIN_TOKEN_LEN} characters")
        if self.ingest_token and self.ingest_token == self.read_token:
            raise ConfigError("read token", "<hidden>", "must differ from the ingest token")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert/--tls-key", f"{self.tls_cert}/{self.tls_key}",
                              "give both or neither")
        for key, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None and not path.is_file():
                raise ConfigError(key, str(path), "no such file")
        if self.max_body_bytes < 1024:
            raise ConfigError("--max-body-bytes", self.max_body_bytes, "must be at least 1024")
        if self.max_batch_records < 1:
            raise ConfigError("--max-batch-records", self.max_batch_records, "must be at least 1")
        if not 0 <= self.identity_settle_s <= 3600:
            raise ConfigError("--identity-settle", self.identity_settle_s,
                              "must be between 0 and 3600 seconds")
        if self.correlation_backlog < self.max_batch_records:
            raise ConfigError("--correlation-backlog", self.correlation_backlog,
                              f"must hold at least one whole batch (--max-batch-records "
                              f"{self.max_batch_records}): a larger batch could never be admitted "
                              "and its collector would retry it forever")
        if self.edge_budget < 1:
            raise ConfigError("--edge-budget", self.edge_budget, "must be at least 1")
        lo, hi = self.nodeport_range
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError("--nodeport-range", f"{lo}-{hi}",
                              "must be LOW-HIGH ports with 1 <= LOW <= HIGH <= 65535 "
                              f"(Kubernetes' default is {_NODEPORTS})")
        if not 0 <= self.nodeport_hold_s <= 60:
            raise ConfigError("--nodeport-hold", self.nodeport_hold_s,
                              "must be between 0 (off) and 60 seconds")
        _positive_seconds("--nats-ack-wait", self.nats_ack_wait_s)
        _positive_seconds("--nats-lease", self.nats_lease_s)
        if not 1 <= self.nats_coalesce <= 10_000:
            raise ConfigError("--nats-coalesce", self.nats_coalesce,
                              "must be 1..10000 messages (1: one share at a time)")
        if self.nats_coalesce_records < 1:
            raise ConfigError("--nats-coalesce-records", self.nats_coalesce_records,
                              "must be at least 1")
        if not (math.isfinite(self.nats_coalesce_wait_s) and
                0 <= self.nats_coalesce_wait_s <= 10):
            raise ConfigError("--nats-coalesce-wait", self.nats_coalesce_wait_s,
                              "must be 0..10 seconds")
        if self.nats_replica is not None and not self.nats_replica.strip():
            raise ConfigError("--nats-replica", self.nats_replica, "must not be empty")
        if not (math.isfinite(self.k8s_keep_deleted_s) and self.k8s_keep_deleted_s >= 0):
            raise ConfigError("--k8s-keep-deleted", self.k8s_keep_deleted_s,
                              "must be a duration of 0 or more, e.g. 1h")
        self.k8s_cluster()  # a Kubernetes flag that names no usable cluster: refused now
        if self.workload_map is not None and not self.workload_map.is_file():
            raise ConfigError("--workload-map", str(self.workload_map), "no such file")
        from aggregator.identity import parse_cidr_groups

        parse_cidr_groups(self.cidr_groups)
        if self.retention is not None and self.retention <= timedelta(0):
            raise ConfigError("--retention", _duration_text(self.retention),
                              "must be longer than 0 (what is older is deleted)")
        self._check_exporters()

    def _check_exporters(self) -> None:
        """The exporter flags' values, whether or not OTLP is on: an OTLP endpoint may come
        from the environment later, and a value that would be refused then is refused now
        (aggregator/exporters/otlp_config.py reads the rest from the environment)."""
        ep = self.otlp_endpoint
        if ep is not None and not ep.startswith(("http://", "https://")):
            raise ConfigError("--otlp-endpoint", ep, "expected a URL such as "
                              "http://tempo:4317 (gRPC) or http://tempo:4318 (HTTP/protobuf)")
        if self.otlp_protocol is not None and self.otlp_protocol not in OTLP_PROTOCOLS:
            raise ConfigError("--otlp-protocol", self.otlp_protocol,
                              f"expected one of {', '.join(OTLP_PROTOCOLS)}")
        if not self.otlp_signals:
            raise ConfigError("--otlp-signals", "", "expected traces, metrics or both")
        for sig in self.otlp_signals:
            if sig not in OTLP_SIGNALS:
                raise ConfigError("--otlp-signals", ",".join(self.otlp_signals),
                                  f"{sig!r}: expected traces, metrics")
        if not 0.0 <= self.otlp_sample <= 1.0:  # NaN too
            raise ConfigError("--otlp-sample", self.otlp_sample,
                              "expected a share between 0 and 1")
        for flag, value in (("--otlp-timeout", self.otlp_timeout_s),
                            ("--otlp-metrics-interval", self.otlp_metrics_interval_s)):
            if value is not None:
                _positive_seconds(flag, value)
        if self.otlp_service_name not in OTLP_SERVICE_NAMES:
            raise ConfigError("--otlp-service-name", self.otlp_service_name,
                              f"expected one of {', '.join(OTLP_SERVICE_NAMES)}")
        if not self.otlp_late_after_s > 0:  # NaN too
            raise ConfigError("--otlp-late-after", self.otlp_late_after_s, "must be > 0 seconds")
        if self.otlp_queue_size is not None and self.otlp_queue_size < 1:
            raise ConfigError("--otlp-queue-size", self.otlp_queue_size, "must be at least 1")
        if not (math.isfinite(self.export_settle_s) and self.export_settle_s >= 0):
            raise ConfigError("--export-settle", self.export_settle_s,
                              "must be a number of seconds, 0 or more")
        parse_filter(self.otlp_filter or "")

    def k8s_cluster(self, env: Mapping[str, str] | None = None) -> Any:
        """The Kubernetes cluster to watch (`aggregator.k8s.ClusterConfig`), None when off."""
        from aggregator.k8s.config import TOKEN_ENV, load_cluster

        env = dict(os.environ if env is None else env)
        if self.k8s_token:
            env[TOKEN_ENV] = self.k8s_token
        return load_cluster(self.k8s_api, ca=_opt_path(self.k8s_ca),
                            token_file=_opt_path(self.k8s_token_file),
                            kubeconfig=_opt_path(self.kubeconfig), context=self.k8s_context,
                            env=env)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  env: Mapping[str, str] | None = None) -> AggregatorSettings:
        """From the parsed `eastwest aggregator` flags (eastwest/cli/aggregator.py declares every
        one of them) and the environment."""
        env = os.environ if env is None else env
        host, port = parse_listen(args.listen)
        return cls(
            data_dir=Path(args.data),
            host=host,
            port=port,
            ingest_token=read_token(INGEST_TOKEN_ENV, env, args.ingest_token_file),
            read_token=read_token(READ_TOKEN_ENV, env, args.read_token_file),
            insecure_open=bool(args.insecure_open),
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            max_body_bytes=int(args.max_body_bytes),
            max_batch_records=int(args.max_batch_records),
            workload_map=Path(args.workload_map) if args.workload_map else None,
            k8s_api=args.k8s_api,
            k8s_token=env.get("KUBERNETES_TOKEN") or None,
            k8s_ca=Path(args.k8s_ca) if args.k8s_ca else None,
            k8s_token_file=Path(args.k8s_token_file) if args.k8s_token_file else None,
            kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
            k8s_context=args.k8s_context,
            k8s_keep_deleted_s=parse_duration("--k8s-keep-deleted",
                                              args.k8s_keep_deleted).total_seconds(),
            reverse_dns=bool(args.reverse_dns),
            cidr_groups=tuple(args.cidr_group or ()),
            retention=(parse_duration("--retention", args.retention)
                       if args.retention else timedelta(days=7)),
            edge_budget=int(args.edge_budget),
            nodeport_hold_s=float(args.nodeport_hold),
            nodeport_range=parse_port_range("--nodeport-range", args.nodeport_range),
            correlation_backlog=int(args.correlation_backlog),
            identity_settle_s=float(args.identity_settle),
            export_link_local=bool(args.export_link_local),
            **_exporter_args(args),
            **_scale_out_args(args, env),
        )


def _scale_out_args(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """--clickhouse and --nats (issue #10): the store URL is checked when the store opens."""
    from eastwest.jetstream import NatsOptions

    out: dict[str, Any] = {}
    url = args.clickhouse
    if url:
        out["clickhouse_url"], out["store"] = url, "clickhouse"
    if args.nats_ack_wait is not None:  # checked with or without --nats
        out["nats_ack_wait_s"] = float(args.nats_ack_wait)
    if getattr(args, "nats_lease", None) is not None:
        out["nats_lease_s"] = float(args.nats_lease)
    if getattr(args, "nats_replica", None) is not None:
        out["nats_replica"] = args.nats_replica
    if getattr(args, "no_live_fanin", False):
        out["live_fanin"] = False
    for flag, key, kind in (("nats_coalesce", "nats_coalesce", int),
                            ("nats_coalesce_records", "nats_coalesce_records", int),
                            ("nats_coalesce_wait", "nats_coalesce_wait_s", float)):
        if getattr(args, flag, None) is not None:
            out[key] = kind(getattr(args, flag))
    # a size or an age of 0 would otherwise mean "the default" (NatsOptions.from_args)
    if args.nats_max_bytes is not None and args.nats_max_bytes < 1024 * 1024:
        raise ConfigError("--nats-max-bytes", args.nats_max_bytes, "at least 1 MiB")
    if args.nats_max_age is not None:
        _positive_seconds("--nats-max-age", args.nats_max_age)
    if args.nats:
        out["nats"] = NatsOptions.from_args(args, dict(env))
        out["nats_durable"] = args.nats_durable or "eastwest-aggregators"
    elif any(vars(args).get(f) is not None for f in NATS_VALUE_FLAGS):
        # NATS flags without --nats do nothing, but a bad value is still an error: the same
        # rules, on a stand-in URL
        NatsOptions.from_args(argparse.Namespace(**{**vars(args), "nats": "nats://127.0.0.1"}),
                              dict(env))
    return out


def _exporter_args(args: argparse.Namespace) -> dict[str, Any]:
    """The exporter flags that were given (aggregator/exporters/otlp_config.py validates them)."""
    out: dict[str, Any] = {}
    for flag, key in (("otlp_endpoint", "otlp_endpoint"), ("otlp_protocol", "otlp_protocol"),
                      ("otlp_sample", "otlp_sample"), ("otlp_filter", "otlp_filter"),
                      ("otlp_timeout", "otlp_timeout_s"), ("otlp_queue_size", "otlp_queue_size"),
                      ("otlp_metrics_interval", "otlp_metrics_interval_s"),
                      ("otlp_service_name", "otlp_service_name"),
                      ("otlp_late_after", "otlp_late_after_s"),
                      ("export_settle", "export_settle_s")):
        value = vars(args).get(flag)
        if value is not None:
            out[key] = value
    signals = args.otlp_signals
    if signals is not None:
        out["otlp_signals"] = tuple(x.strip() for x in signals.split(",") if x.strip())
    return out


def parse_filter(text: str) -> Filter:
    """`protocol=tcp&protocol=udp&not_to_port=53`: the API's filter parameters (eastwest.filters),
    as `--otlp-filter` takes them."""
    items = parse_qsl(text, keep_blank_values=True, strict_parsing=False) if text else []
    for key, value in items:
        if key.removeprefix("not_") not in DIMENSIONS:
            raise ConfigError("--otlp-filter", f"{key}={value}",
                              f"unknown filter; known: {', '.join(DIMENSIONS)} (not_ negates)")
    try:
        return Filter.from_query(items)
    except ConfigError as exc:  # the filter language names CLI flags; name this flag's item
        name = exc.key.replace("--not --", "not_").removeprefix("--").replace("-", "_")
        raise ConfigError("--otlp-filter", f"{name}={exc.value}", exc.reason) from None


def _opt_path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _positive_seconds(flag: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(flag, value, "must be a positive number of seconds")


def _duration_text(d: timedelta) -> str:
    return f"{d.total_seconds():g}s"


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` -> (host, port); ConfigError names the flag and value."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError("--listen", text, "expected HOST:PORT, e.g. 127.0.0.1:8470")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError("--listen", text, f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError("--listen", text, "port must be 0..65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(env_name: str, env: Mapping[str, str], path: str | None) -> str | None:
    """A token from the environment, else from `path` (a bare token, or an env file holding
    `NAME=value` lines such as the one `make run` writes)."""
    if env.get(env_name):
        return env[env_name].strip()
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"token file for {env_name}", path, f"cannot be read: {exc.strerror}") from None
    return token_from_text(text, env_name, path)


def token_from_text(text: str, env_name: str, path: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    for ln in lines:
        name, eq, value = ln.partition("=")
        if eq and name.strip().removeprefix("export ").strip() == env_name:
            return value.strip().strip("'\"")
    if len(lines) == 1 and "=" not in lines[0]:
        return lines[0]
    raise ConfigError(f"token file for {env_name}", path,
                      f"holds neither a bare token nor a line {env_name}=...")


def parse_port_range(flag: str, text: str) -> tuple[int, int]:
    """`LOW-HIGH` (30000-32767) as two ports; ConfigError naming the flag otherwise (checked
    for 1 <= LOW <= HIGH <= 65535 with the other settings)."""
    low, sep, high = str(text).partition("-")
    try:
        if not sep:
            raise ValueError(text)
        return int(low), int(high)
    except ValueError:
        raise ConfigError(flag, text, "must be LOW-HIGH, two ports (Kubernetes' default is "
                          f"{_NODEPORTS})") from None
