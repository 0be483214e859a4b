"""Where and how OTLP goes: eastwest's settings first, then the standard `OTEL_EXPORTER_OTLP_*`
environment variables, then the OpenTelemetry defaults.

Stage: start-up of the aggregator. In: `AggregatorSettings` (flags) and the environment. Out: an
`OtlpConfig` (or None: OTLP is off) and the SDK exporters it builds, for gRPC
(opentelemetry-exporter-otlp-proto-grpc) or HTTP/protobuf (-proto-http).

OTLP is on when `--otlp-endpoint` is given or one of `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` is set. Headers, TLS
(`*_CERTIFICATE`, `*_CLIENT_KEY`, `*_CLIENT_CERTIFICATE`, `*_INSECURE`) and compression come from
the environment, read by the SDK exporters themselves (spec: opentelemetry-specification
protocol/exporter.md); secrets such as an `Authorization` header never go on a command line.
The protocol follows `OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL`, default `http/protobuf`
(the specification's default); Tempo accepts both (4317 gRPC, 4318 HTTP).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.settings import OTLP_PROTOCOLS as PROTOCOLS
from aggregator.settings import OTLP_SIGNALS as SIGNALS
from aggregator.settings import AggregatorSettings, parse_filter
from eastwest.errors import ConfigError
from eastwest.filters import Filter

ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
HTTP_PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics"}
# why spans were older than Tempo's ingestion slack when queued or sent (otlp.py)
LATE_REASONS = ("ended_before_start", "completed_late", "export_delay")


@dataclass(frozen=True)
class OtlpConfig:
    endpoint: str | None            # None: each exporter reads its OTEL_EXPORTER_OTLP_* endpoint
    protocols: dict[str, str]       # signal -> grpc | http/protobuf
    signals: tuple[str, ...] = SIGNALS
    sample: float = 1.0             # share of connections exported as spans (by trace id)
    filter: Filter = field(default_factory=Filter)  # connections exported as spans
    timeout_s: float | None = None  # per export, retries included; None: OTEL_..._TIMEOUT or 10
    queue_size: int = 8192          # spans waiting for export; beyond, counted as dropped
    batch_size: int = 512           # spans per export request
    schedule_s: float = 1.0         # a partial batch waits at most this long
    metrics_interval_s: float = 15.0
    service_name: str = "name"      # resource service.name: "name" or "namespace/name"
    late_after_s: float = 30.0      # Tempo's ingestion slack: older spans are counted as late

    @classmethod
    def resolve(cls, settings: AggregatorSettings,
                env: Mapping[str, str] | None = None) -> OtlpConfig | None:
        env = os.environ if env is None else env
        endpoint = settings.otlp_endpoint or None
        if endpoint is None and not any(env.get(k) for k in ENDPOINT_ENVS):
            return None
        # the flags' own values were checked with the settings (AggregatorSettings), OTLP on
        # or off; what is checked here comes from the environment
        flag = settings.otlp_protocol
        protocols = {}
        for sig in SIGNALS:
            key = f"OTEL_EXPORTER_OTLP_{sig.upper()}_PROTOCOL"
            name, value = ("--otlp-protocol", flag) if flag else (
                (key, env[key]) if env.get(key) else
                ("OTEL_EXPORTER_OTLP_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"))
            if value not in PROTOCOLS:
                raise ConfigError(name, value, f"expected one of {', '.join(PROTOCOLS)}")
            protocols[sig] = value
        signals = tuple(settings.otlp_signals)
        kw: dict[str, Any] = {}
        for key, limit in (("queue_size", settings.otlp_queue_size),
                           ("metrics_interval_s", settings.otlp_metrics_interval_s),
                           ("timeout_s", settings.otlp_timeout_s)):
            if limit is not None:
                kw[key] = limit
        return cls(endpoint=endpoint, protocols=protocols, signals=signals,
                   sample=float(settings.otlp_sample), service_name=settings.otlp_service_name,
                   late_after_s=float(settings.otlp_late_after_s),
                   filter=parse_filter(settings.otlp_filter or ""), **kw)

    # -- the SDK exporters ----------------------------------------------------------------------
    def _endpoint(self, signal: str) -> str | None:
        if self.endpoint is None:
            return None
        if self.protocols[signal] == "grpc":
            return self.endpoint
        return self.endpoint.rstrip("/") + HTTP_PATHS[signal]

    def span_exporter(self) -> Any:
        if self.protocols["traces"] == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        return OTLPSpanExporter(endpoint=self._endpoint("traces"), timeout=self.timeout_s)

    def metric_exporter(self) -> Any:
        if self.protocols["metrics"] == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                OTLPMetricExporter,
            )
        return OTLPMetricExporter(endpoint=self._endpoint("metrics"), timeout=self.timeout_s)


