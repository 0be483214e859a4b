"""A completed connection -> a CLIENT span and a SERVER span in one trace, through the OTel SDK.

Stage: exporters (OTLP traces). In: a completed `Connection` (aggregator/connection.py). Out: two
finished SDK spans handed to a span processor (otlp.py's bounded queue):

- CLIENT span, resource `service.name` = the client workload (`service.namespace`, `host.name`);
- SERVER span, resource `service.name` = the server workload, its parent being the client span.

That is the pair Tempo's metrics-generator (service-graphs processor) joins into a service-graph
edge: a CLIENT span and a SERVER span whose parent span id is the client's, in one trace; either
one's error status makes the edge's request failed (grafana/tempo modules/generator/processor/
servicegraphs). Attributes: OpenTelemetry semantic conventions for the network (`server.address`,
`server.port`, `client.address`, `client.port`, `network.transport`, `network.type`,
`network.peer.*`, `network.local.*`, `peer.service`) and eastwest's own (`eastwest.*`: bytes each
way, retransmits, resets, connect outcome, observers, RTT, VNI and VTEP hosts, connection id).
Status ERROR for refused, reset and timed-out connections.

The trace id IS the connection id (a UUID's 128 bits): a flow of eastwest's API can be looked up
in Tempo by its `conn_id`. Span ids are derived from it, so an export retried by a later process
would produce the same spans. Times: the client span covers the client's view (else the
connection's first to last record); the server span the server's view, clamped into the client
span (clocks of different hosts differ a little), or the client span's times when no server saw it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode

from aggregator.connection import Connection, Identity, ProcInfo, View
from eastwest import __version__
from eastwest.filters import outcome_of

SCOPE = "eastwest.aggregator"
FAILED = ("refused", "reset", "timeout")


def trace_id_of(conn_id: str) -> int:
    try:
        tid = int(conn_id, 16) & ((1 << 128) - 1)
    except ValueError:
        tid = int.from_bytes(hashlib.blake2b(conn_id.encode(), digest_size=16).digest(), "big")
    return tid or 1


def span_id_of(conn_id: str, role: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{conn_id}/{role}".encode(), digest_size=8).digest(),
                          "big") or 1


class _ConnectionIds(IdGenerator):
    """Ids for the spans being made on this thread: trace id = the connection's id."""

    def __init__(self) -> None:
        self._local = threading.local()

    def set(self, conn_id: str) -> None:
        self._local.conn_id, self._local.n = conn_id, 0

    def generate_trace_id(self) -> int:
        return trace_id_of(self._local.conn_id)

    def generate_span_id(self) -> int:
        self._local.n += 1
        return span_id_of(self._local.conn_id, ("client", "server")[min(self._local.n, 2) - 1])


def _ns(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000) * 1000


def _resource(ident: Identity, proc: ProcInfo | None) -> tuple[tuple[str, str], ...]:
    attrs = {"service.name": ident.name}
    if ident.namespace:
        attrs["service.namespace"] = ident.namespace
    host = ident.host or (proc.collector if proc is not None else None)
    if host:
        attrs["host.name"] = host
    if ident.kind:
        attrs["eastwest.workload.kind"] = ident.kind
    attrs["eastwest.identity.source"] = ident.source
    return tuple(sorted(attrs.items()))


def attributes(conn: Connection) -> dict[str, Any]:
    """The attributes both spans share (each adds its own network.peer/local side)."""
    b = conn.best()
    a: dict[str, Any] = {
        "server.address": conn.server_ip, "server.port": conn.server_port,
        "client.address": conn.client_ip, "client.port": conn.client_port,
        "network.transport": conn.protocol, "network.type": "ipv6" if conn.family == 6 else "ipv4",
        "eastwest.connection.id": conn.conn_id,
        "eastwest.connection.outcome": outcome_of(conn.connect, b[5]),
        "eastwest.bytes.client_to_server": b[0], "eastwest.bytes.server_to_client": b[1],
        "eastwest.retransmits": b[4], "eastwest.resets": b[5],
        "eastwest.observed_by": conn.observed_by,
        "eastwest.client.workload": conn.client.wid, "eastwest.server.workload": conn.server.wid,
    }
    if conn.connect is not None:
        a["eastwest.connect"] = conn.connect
    if b[2] or b[3]:
        a["eastwest.packets.client_to_server"], a["eastwest.packets.server_to_client"] = b[2], b[3]
    if conn.rtt is not None:
        a["eastwest.rtt_us"] = conn.rtt[1]
    if conn.tunnel is not None:
        t = conn.tunnel
        a["eastwest.vni"] = t.vni
        a["eastwest.vtep.source"], a["eastwest.vtep.destination"] = t.vtep_src, t.vtep_dst
        if t.vtep_src_host:
            a["eastwest.vtep.source_host"] = t.vtep_src_host
        if t.vtep_dst_host:
            a["eastwest.vtep.destination_host"] = t.vtep_dst_host
    for side, proc in (("client", conn.client_proc), ("server", conn.server_proc)):
        if proc is not None and proc.comm:
            a[f"eastwest.{side}.comm"] = proc.comm
        if proc is not None and proc.pid:
            a[f"eastwest.{side}.pid"] = proc.pid
    return a


def _times(conn: Connection) -> tuple[tuple[int, int], tuple[int, int]]:
    client: View | None = conn.views.get("client")
    c0 = _ns(client.start if client else conn.start)
    c1 = _ns(client.end if client else (conn.closed_at or conn.last_seen))
    c1 = max(c0, c1)
    server = conn.views.get("server")
    if server is None:
        return (c0, c1), (c0, c1)
    s0 = min(max(_ns(server.start), c0), c1)
    s1 = min(max(_ns(server.end), s0), c1)
    return (c0, c1), (s0, s1)


class SpanFactory:
    """Makes the spans of a connection with one `TracerProvider` per resource (workload and host),
    all feeding the one `processor`."""

    def __init__(self, processor: SpanProcessor, max_resources: int = 4096) -> None:
        self._multi = SynchronousMultiSpanProcessor()
        self._multi.add_span_processor(processor)
        self._ids = _ConnectionIds()
        self._tracers: OrderedDict[tuple[tuple[str, str], ...], trace_api.Tracer] = OrderedDict()
        self._max = max_resources
        self._lock = threading.Lock()

    def _tracer(self, res: tuple[tuple[str, str], ...]) -> trace_api.Tracer:
        with self._lock:
            t = self._tracers.get(res)
            if t is not None:
                self._tracers.move_to_end(res)
                return t
            provider = TracerProvider(resource=Resource.create(dict(res)), shutdown_on_exit=False,
                                      active_span_processor=self._multi, id_generator=self._ids)
            t = provider.get_tracer(SCOPE, __version__)
            self._tracers[res] = t
            if len(self._tracers) > self._max:
                self._tracers.popitem(last=False)
            return t

    def emit(self, conn: Connection) -> None:
        shared = attributes(conn)
        outcome = shared["eastwest.connection.outcome"]
        status = (Status(StatusCode.ERROR, f"connection {outcome}") if outcome in FAILED
                  else Status(StatusCode.UNSET))
        name = f"{conn.protocol.upper()} {conn.server.name}:{conn.server_port}"
        (c0, c1), (s0, s1) = _times(conn)
        client_attrs = {**shared, "network.peer.address": conn.server_ip,
                        "network.peer.port": conn.server_port, "peer.service": conn.server.name,
                        "network.local.address": conn.client_ip,
                        "network.local.port": conn.client_port}
        server_attrs = {**shared, "network.peer.address": conn.client_ip,
                        "network.peer.port": conn.client_port,
                        "network.local.address": conn.server_ip,
                        "network.local.port": conn.server_port}
        self._ids.set(conn.conn_id)
        ctracer = self._tracer(_resource(conn.client, conn.client_proc))
        stracer = self._tracer(_resource(conn.server, conn.server_proc))
        client = ctracer.start_span(name, kind=SpanKind.CLIENT, attributes=client_attrs,
                                    start_time=c0, context=Context())  # a root, whatever runs
        server = stracer.start_span(name, kind=SpanKind.SERVER, attributes=server_attrs,
                                    start_time=s0,
                                    context=trace_api.set_span_in_context(client))
        client.set_status(status)
        server.set_status(status)
        server.end(end_time=s1)
        client.end(end_time=c1)
