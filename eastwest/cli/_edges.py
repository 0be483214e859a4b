"""Graph edges as the `graph`, `top` and `diff` commands print them.

In:  edge objects of the API (`GET /api/v1/graph` edges, `GET /api/v1/diff` entries; docs/api.md).
Out: `Edge`: the numbers a table shows (connections, failed = never established, resets, bytes
     each way, retransmits, RTT, ports, the sets of observers with their counts, completeness)
     and `obj`, the object `-o json` writes unchanged. Reading the API's JSON happens here only,
     so a change of the API's edge shape is one edit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eastwest.errors import TransportError
from eastwest.output import Cell, human_bytes

# `top --by` name -> (Edge attribute, column header): each ranks by the column it names, so
# `--by failures` sorts by the FAILED column and nothing else
METRICS = {
    "bytes": ("bytes_total", "BYTES"),
    "connections": ("connections", "CONNS"),
    "failures": ("failed", "FAILED"),
    "resets": ("resets", "RESETS"),
    "retransmits": ("retransmits", "RETX"),
    "dns-errors": ("dns_errors", "DNS"),
    "drops": ("dropped", "DROPS"),
}


@dataclass(frozen=True)
class Edge:
    client: str  # node id: `namespace/name` (or the name), a namespace or a host (--group-by)
    server: str
    connections: int
    failed: int  # never established: refused, timed out (the API's connections_failed)
    resets: int  # established, then ended by a reset (the API's resets)
    bytes_c2s: int
    bytes_s2c: int
    retransmits: int
    rtt_avg_us: float | None
    ports: tuple[str, ...]
    observed_by: tuple[str, ...]  # the sets of observers, each `client,path,server`, by name
    complete: bool
    obj: Any
    # (set of observers, connections it saw), most connections first; None: a list, no counts
    observer_sets: tuple[tuple[str, int | None], ...] = ()
    dropped: int = 0  # packets the kernel dropped (the API's drops.packets)
    drop_reasons: tuple[tuple[str, int], ...] = ()  # by reason, most packets first
    dns: Mapping[str, Any] | None = None  # an edge to a resolver: its DNS (docs/api.md)
    dns_hint: bool = False  # the server's name is a DNS answer's, past its TTL for some
    encrypted: str | None = None  # "esp": encrypted between hosts, the wire saw no connection inside
    # folded service-mesh calls on the edge (the API's `mesh`): {proxy, connections, wire
    # bytes, and `hop` on a hop edge of --show-proxies}; None: none
    mesh: Mapping[str, Any] | None = None

    @property
    def dns_errors(self) -> int:
        """Responses other than NOERROR and unanswered queries (`top --by dns-errors`)."""
        return int(self.dns.get("errors") or 0) if self.dns else 0

    @property
    def bytes_total(self) -> int:
        return self.bytes_c2s + self.bytes_s2c

    @classmethod
    def from_api(cls, obj: Any) -> Edge:
        """An edge of `GET /api/v1/graph` (or a diff entry, which carries fewer numbers)."""
        if not isinstance(obj, Mapping):
            raise TransportError(f"the aggregator sent an edge that is not an object: {obj!r:.80}")
        try:
            rtt = obj.get("rtt_us") or {}
            observed = obj.get("observed_by") or {}
            return cls(
                client=str(obj["source"]), server=str(obj["target"]),
                connections=int(obj.get("connections_opened") or 0),
                failed=int(obj.get("connections_failed") or 0),
                resets=int(obj.get("resets") or 0),
                bytes_c2s=int(obj.get("bytes_c2s") or 0),
                bytes_s2c=int(obj.get("bytes_s2c") or 0),
                retransmits=int(obj.get("retransmits") or 0),
                rtt_avg_us=rtt.get("avg") if isinstance(rtt, Mapping) else None,
                ports=tuple(str(p) for p in obj.get("ports") or ()),
                # {"client,path,server": connections that set of observers saw}, or a list
                observed_by=tuple(sorted(observed)),
                complete=obj.get("complete") is not False,
                obj=obj,
                observer_sets=_observer_sets(observed),
                dns=obj.get("dns") if isinstance(obj.get("dns"), Mapping) else None,
                dns_hint=bool((obj.get("dns_named") or {}).get("hint")),
                encrypted=str(obj["encrypted"]) if obj.get("encrypted") else None,
                mesh=obj.get("mesh") if isinstance(obj.get("mesh"), Mapping) else None,
                **_drops(obj.get("drops")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"the aggregator sent an edge this CLI cannot read ({exc!r}); "
                                 "is it a different version?") from None


def _drops(d: Any) -> dict[str, Any]:
    """The edge's `drops` ({packets, reasons}) as Edge fields; none: zero."""
    if not isinstance(d, Mapping):
        return {}
    reasons = [(str(r), int(n)) for r, n in (d.get("reasons") or {}).items()]
    return {"dropped": int(d.get("packets") or 0),
            "drop_reasons": tuple(sorted(reasons, key=lambda x: (-x[1], x[0])))}


def drops_cell(e: Edge) -> str:
    """`10 NETFILTER_DROP 9, NO_SOCKET 1`; "" without drops."""
    if not e.dropped:
        return ""
    return f"{e.dropped} " + ", ".join(f"{r} {n}" for r, n in e.drop_reasons)


def _observer_sets(observed: Any) -> tuple[tuple[str, int | None], ...]:
    """`{"client,path,server": 323, "client,path": 16}` -> ((set, 323), (set, 16)): most
    connections first, then by name; a list of sets carries no counts."""
    if isinstance(observed, Mapping):
        counted = [(str(k), int(n)) for k, n in observed.items()]
        return tuple(sorted(counted, key=lambda x: (-x[1], x[0])))
    return tuple((str(k), None) for k in sorted(observed))


def seen_by(e: Edge) -> str:
    """The SEEN BY cell: each set of observers joined by `+`, with the connections it saw,
    largest first: `client+path+server 323, client+path 16`; `(incomplete)` when an observer
    lost events."""
    sets = [("+".join(x for x in key.split(",") if x) or "-") + ("" if n is None else f" {n}")
            for key, n in e.observer_sets]
    return ", ".join(sets) + ("" if e.complete else " (incomplete)" if sets else "(incomplete)")


def edges_of(doc: Any) -> list[Edge]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("edges"), list):
        raise TransportError("the aggregator's graph has no edges list")
    return [Edge.from_api(e) for e in doc["edges"]]


EDGE_HEADERS = ("CLIENT", "SERVER", "CONNS", "FAILED", "C->S", "S->C", "RESETS", "RETX", "RTT",
                "PORTS", "SEEN BY")
EDGE_CSV = ("client", "server", "connections", "failed", "bytes_c2s", "bytes_s2c", "resets",
            "retransmits", "rtt_avg_us", "ports", "observed_by", "complete", "dns_queries",
            "dns_nxdomain", "dns_servfail", "dns_timeouts", "dns_errors", "dns_latency_avg_us",
            "dns_names", "dropped", "drop_reasons", "mesh_proxy", "mesh_connections", "mesh_hop")


def edge_headers(edges: Sequence[Edge]) -> tuple[str, ...]:
    """The table's columns: DNS only when some edge goes to a resolver that carried DNS
    (collector --dns), DROPS only when some edge had drops (collector --drops), MESH only when
    some edge had folded service-mesh calls."""
    return (*EDGE_HEADERS, *(("DNS",) if any(e.dns for e in edges) else ()),
            *(("DROPS",) if any(e.dropped for e in edges) else ()),
            *(("MESH",) if any(e.mesh for e in edges) else ()))


def mesh_cell(e: Edge) -> str:
    """`ew-sidecar 12` (the sidecar, the meshed connections); a hop edge of --show-proxies
    names its hop: `ew-sidecar 12 proxy-proxy`; "" without mesh."""
    m = e.mesh
    if not m:
        return ""
    return " ".join(str(x) for x in (m.get("proxy"), m.get("connections"), m.get("hop")) if x)


def dns_cell(e: Edge) -> str:
    """The DNS cell of an edge to a resolver: `12q 2nx 1sf 1to 0.84ms api.example.com 7, ...`
    (queries, NXDOMAIN, SERVFAIL, timeouts, average latency, the names most asked)."""
    d = e.dns
    if not d:
        return ""
    parts = [f"{int(d.get('queries') or 0)}q"]
    for key, tag in (("nxdomain", "nx"), ("servfail", "sf"), ("timeouts", "to")):
        if d.get(key):
            parts.append(f"{int(d[key])}{tag}")
    lat = d.get("latency_us")
    if isinstance(lat, Mapping) and lat.get("avg") is not None:
        parts.append(f"{lat['avg'] / 1000:.2f}ms")
    names = [f"{n.get('name')} {n.get('count')}" for n in (d.get("names") or ())[:3]
             if isinstance(n, Mapping)]
    return " ".join(parts) + (" " + ", ".join(names) if names else "")


def ports_cell(e: Edge) -> Cell | str:
    """The server ports; an encrypted edge (IPsec ESP between two hosts) says so instead of
    ports, which the wire could not see."""
    if e.encrypted:
        return Cell(f"{e.encrypted.upper()} (encrypted)", "magenta")
    return ",".join(e.ports)


def edge_cells(e: Edge, heads: Sequence[str] = EDGE_HEADERS) -> Sequence[Cell | str | int | None]:
    """One table row; `heads` (edge_headers) says whether the DNS and DROPS columns are shown."""
    cells: tuple[Cell | str | int | None, ...] = (
        Cell(e.client, "cyan"), Cell(e.server + ("*" if e.dns_hint else ""), "cyan"),
        e.connections,
        Cell(str(e.failed), "red" if e.failed else None, right=True),
        Cell(human_bytes(e.bytes_c2s), right=True), Cell(human_bytes(e.bytes_s2c), right=True),
        e.resets, Cell(str(e.retransmits), "yellow" if e.retransmits else None, right=True),
        Cell(f"{e.rtt_avg_us / 1000:.2f}ms" if e.rtt_avg_us is not None else "", right=True),
        ports_cell(e), seen_by(e),
    )
    if "DNS" in heads:
        cells = (*cells, Cell(dns_cell(e), "red" if e.dns_errors else None))
    if "DROPS" in heads:
        cells = (*cells, Cell(drops_cell(e), "red" if e.dropped else None))
    if "MESH" in heads:
        cells = (*cells, Cell(mesh_cell(e), "magenta" if e.mesh else None))
    return cells


def backends_text(e: Edge) -> str:
    """The BACKENDS cell of a Service edge (`--group-by service`): each backend workload with
    the connections it served in the window, most first: `shop/api 2, shop/api-canary 1`."""
    backends = e.obj.get("backends") if isinstance(e.obj, Mapping) else None
    if not isinstance(backends, list):
        return ""
    items = [(str(b.get("id")), int(b.get("connections_opened") or 0)) for b in backends
             if isinstance(b, Mapping)]
    return ", ".join(f"{w} {n}" for w, n in sorted(items, key=lambda x: (-x[1], x[0])))


def service_columns(group_by: str | None, edges: Sequence[Edge],
                    ) -> tuple[tuple[str, ...], tuple[str, ...], Any]:
    """The table headers (edge_headers), the csv headers and the cells of an edge (`cells(e,
    csv)`): with `--group-by service`, a BACKENDS column (csv `backends`) after the edge's own."""
    heads = edge_headers(edges)
    if group_by != "service":
        return heads, EDGE_CSV, lambda e, csv: edge_csv(e) if csv else edge_cells(e, heads)
    return ((*heads, "BACKENDS"), (*EDGE_CSV, "backends"),
            lambda e, csv: (*(edge_csv(e) if csv else edge_cells(e, heads)), backends_text(e)))


def edge_csv(e: Edge) -> Sequence[Any]:
    d = e.dns or {}
    lat = d.get("latency_us") if isinstance(d.get("latency_us"), Mapping) else {}
    return (e.client, e.server, e.connections, e.failed, e.bytes_c2s, e.bytes_s2c, e.resets,
            e.retransmits, e.rtt_avg_us, ";".join(e.ports), ";".join(e.observed_by),
            str(e.complete).lower(),
            *((d.get(k) for k in ("queries", "nxdomain", "servfail", "timeouts", "errors"))
              if e.dns else ("",) * 5),
            (lat or {}).get("avg", "") if e.dns else "",
            ";".join(f"{n.get('name')}:{n.get('count')}" for n in d.get("names") or ()),
            e.dropped, ";".join(f"{r}={n}" for r, n in e.drop_reasons),
            *((m.get("proxy"), m.get("connections"), m.get("hop") or "") if (m := e.mesh)
              else ("", "", "")))
