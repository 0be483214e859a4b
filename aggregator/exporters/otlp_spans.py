"""A completed connection -> a CLIENT span and, when a server saw it, a SERVER span, in one trace.

Stage: exporters (OTLP traces). In: a completed `Connection` (aggregator/connection.py). Out: its
finished SDK spans, handed together to a sink (otlp.py's bounded queue takes both or neither):

- CLIENT span, resource `service.name` = the client workload (`service.namespace`, `host.name`);
- SERVER span, resource `service.name` = the server workload, its parent being the client span,
  only when the server took part: its own collector saw the connection (a `server` view), or
  the wire saw it answer (a `path` view with packets from the server; UDP flows are seen on the
  wire only), the connection being neither refused nor timed out.

That is what Tempo's service-graph processor (grafana/tempo modules/generator/processor/
servicegraphs; the rules as facts in tests/unit/tempo_servicegraph.py) joins into an edge: a
CLIENT span keyed by (trace id, its span id), a SERVER span by (trace id, its parent span id);
either one's ERROR status makes the request failed. Tempo names a node by `service.name` only,
so the namespace is either a `dimensions: [service.namespace]` of Tempo's (the default naming,
`name`) or part of the name (`namespace/name`, `--otlp-service-name`).

No SERVER span is made up when no server was seen (a refused or timed-out connect, an external
server outside the captured underlay): the CLIENT span's `peer.service` (the server's node
name, in the same naming) makes Tempo draw the edge to a virtual node once `wait` has passed,
with the client's times only. Past the edge budget, `external:<ip>` ends are named `external`
(the caller decides, `names`), so scanners do not make one Tempo node per address.

Attributes: OpenTelemetry semantic conventions for the network (`server.address`, `server.port`,
`client.address`, `client.port`, `network.transport`, `network.type`, `network.peer.*`,
`network.local.*`, `peer.service`), eastwest's own (`eastwest.*`: bytes each way, retransmits,
resets, connect outcome, observers, RTT, VNI and VTEP hosts, connection id) and
`eastwest.sample.ratio`, the `--otlp-sample` share as a double, which Tempo's
`span_multiplier_key` turns into the weight 1/ratio. Status ERROR for refused, reset, dropped and
timed-out connections. Resources are built from these attributes alone: the aggregator's own
OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME describe the aggregator, not the workloads.

The trace id IS the connection id (a UUID's 128 bits): a flow of eastwest's API can be looked up
in Tempo by its `conn_id`. Span ids are derived from it, so an export retried by a later process
would produce the same spans. Times: the client span covers the client's view (else the
connection's first to last record); the server span the server's view, clamped into the client
span (clocks of different hosts differ a little), or the wire's view of the answer.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode

from aggregator.connection import Connection, Identity, ProcInfo, View
from eastwest import __version__

SCOPE = "eastwest.aggregator"
FAILED = ("refused", "reset", "timeout", "dropped")
SAMPLE_RATIO = "eastwest.sample.ratio"   # Tempo: span_multiplier_key
NAMINGS = ("name", "namespace/name")


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

    def set(self, conn_id: str, made: int = 0) -> None:
        """The next ids are of `conn_id`'s spans, `made` of them (client first) already made."""
        self._local.conn_id, self._local.n = conn_id, made

    def generate_trace_id(self) -> int:
        return trace_id_of(self._local.conn_id)

    def generate_span_id(self) -> int:
        self._local.n += 1
        return span_id_of(self._local.conn_id, ("client", "server")[min(self._local.n, 2) - 1])


def _ns(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000) * 1000


def node_name(ident: Identity, naming: str = "name", name: str | None = None) -> str:
    """The workload's service.name under `naming` (`name` alone, or `namespace/name`)."""
    name = ident.name if name is None else name
    if naming == "namespace/name" and ident.namespace:
        return f"{ident.namespace}/{name}"
    return name


def _resource(ident: Identity, proc: ProcInfo | None, naming: str = "name",
              name: str | None = None) -> tuple[tuple[str, str], ...]:
    attrs = {"service.name": node_name(ident, naming, name)}
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
        "eastwest.connection.outcome": conn.outcome(),
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
        a["eastwest.vni"], a["eastwest.tunnel.type"] = t.vni, t.type
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


def _times(conn: Connection) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The client span's (start, end) and the server span's, None when no server saw it."""
    client: View | None = conn.views.get("client")
    c0 = _ns(client.start if client else conn.start)
    c1 = _ns(client.end if client else (conn.closed_at or conn.last_seen))
    c1 = max(c0, c1)
    server = server_view(conn)
    if server is None:
        return (c0, c1), None
    s0 = min(max(_ns(server.start), c0), c1)
    s1 = min(max(_ns(server.end), s0), c1)
    return (c0, c1), (s0, s1)


def server_view(conn: Connection) -> View | None:
    """The view that shows the server took part: its own socket view, else a wire view that saw
    it answer (payload or packets from the server, on a connection neither refused nor timed
    out: UDP flows and hosts without socket probes are seen on the wire only). None: no server
    was seen, and no SERVER span is made."""
    server = conn.views.get("server")
    if server is not None:
        return server
    if conn.outcome() in ("refused", "timeout", "dropped"):
        return None
    wire = [v for v in conn.views.values() if v.observer == "path"
            and (v.bytes_s2c > 0 or (v.packets_s2c or 0) > 0)]
    return min(wire, key=lambda v: v.start) if wire else None


def end_ns(conn: Connection) -> int:
    """When the connection's last span ends (its client span's end)."""
    return _times(conn)[0][1]


class _Collect(SpanProcessor):
    """Keeps the spans ended on this thread until `take()`: a connection's spans leave together."""

    def __init__(self) -> None:
        self._local = threading.local()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        got = getattr(self._local, "spans", None)
        if got is None:
            got = self._local.spans = []
        got.append(span)

    def take(self) -> list[ReadableSpan]:
        got = getattr(self._local, "spans", None) or []
        self._local.spans = []
        return got


class SpanFactory:
    """Makes the spans of a connection with one `TracerProvider` per resource (workload and host)
    and hands each connection's spans to `sink` in one call."""

    def __init__(self, sink: Callable[[Sequence[ReadableSpan]], object], max_resources: int = 4096,
                 *, naming: str = "name", sample_ratio: float = 1.0) -> None:
        if naming not in NAMINGS:
            raise ValueError(f"service naming {naming!r}: expected one of {', '.join(NAMINGS)}")
        self.sink = sink
        self.naming = naming
        self.sample_ratio = float(sample_ratio)
        self._collect = _Collect()
        self._multi = SynchronousMultiSpanProcessor()
        self._multi.add_span_processor(self._collect)
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
            # Resource(...), not Resource.create(...): create() would merge the aggregator's own
            # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME into every workload
            provider = TracerProvider(resource=Resource(dict(res)), shutdown_on_exit=False,
                                      active_span_processor=self._multi, id_generator=self._ids)
            t = provider.get_tracer(SCOPE, __version__)
            self._tracers[res] = t
            if len(self._tracers) > self._max:
                self._tracers.popitem(last=False)
            return t

    def emit(self, conn: Connection, names: tuple[str, str] | None = None, *,
             server_only: bool = False) -> int:
        """The connection's spans to the sink, together; `names` replaces the client's and the
        server's workload names (folding); `server_only`: the SERVER span alone, for a
        connection whose CLIENT span an earlier process exported without one (otlp.py), child
        of that client span by its derived id. Returns how many spans."""
        shared = attributes(conn)
        shared[SAMPLE_RATIO] = self.sample_ratio
        outcome = shared["eastwest.connection.outcome"]
        status = (Status(StatusCode.ERROR, f"connection {outcome}") if outcome in FAILED
                  else Status(StatusCode.UNSET))
        cname, sname = names if names is not None else (conn.client.name, conn.server.name)
        name = f"{conn.protocol.upper()} {sname}:{conn.server_port}"
        (c0, c1), server_times = _times(conn)
        client_attrs = {**shared, "network.peer.address": conn.server_ip,
                        "network.peer.port": conn.server_port,
                        "peer.service": node_name(conn.server, self.naming, sname),
                        "network.local.address": conn.client_ip,
                        "network.local.port": conn.client_port}
        self._collect.take()  # nothing of an earlier, failed emit leaks into this one
        if server_only:
            if server_times is None:
                return 0
            self._ids.set(conn.conn_id, made=1)
            parent = trace_api.NonRecordingSpan(trace_api.SpanContext(
                trace_id_of(conn.conn_id), span_id_of(conn.conn_id, "client"), is_remote=True,
                trace_flags=trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)))
            self._server(conn, name, sname, status, shared, server_times,
                         trace_api.set_span_in_context(parent))
        else:
            self._ids.set(conn.conn_id)
            ctracer = self._tracer(_resource(conn.client, conn.client_proc, self.naming, cname))
            client = ctracer.start_span(name, kind=SpanKind.CLIENT, attributes=client_attrs,
                                        start_time=c0, context=Context())  # a root, whatever runs
            client.set_status(status)
            if server_times is not None:
                self._server(conn, name, sname, status, shared, server_times,
                             trace_api.set_span_in_context(client))
            client.end(end_time=c1)
        spans = self._collect.take()
        self.sink(spans)
        return len(spans)

    def _server(self, conn: Connection, name: str, sname: str, status: Status,
                shared: dict[str, Any], times: tuple[int, int], parent: Context) -> None:
        s0, s1 = times
        server_attrs = {**shared, "network.peer.address": conn.client_ip,
                        "network.peer.port": conn.client_port,
                        "network.local.address": conn.server_ip,
                        "network.local.port": conn.server_port}
        stracer = self._tracer(_resource(conn.server, conn.server_proc, self.naming, sname))
        server = stracer.start_span(name, kind=SpanKind.SERVER, attributes=server_attrs,
                                    start_time=s0, context=parent)
        server.set_status(status)
        server.end(end_time=s1)
