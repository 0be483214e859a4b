"""Graph edges as the `graph`, `top` and `diff` commands print them.

In:  edge objects of the API (`GET /api/v1/graph` edges, `GET /api/v1/diff` entries; docs/api.md).
Out: `Edge`: the numbers a table shows (connections, failures, bytes each way, resets,
     retransmits, RTT, ports, observers, completeness) and `obj`, the object `-o json` writes
     unchanged. Reading the API's JSON happens here only, so a change of the API's edge shape is
     one edit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eastwest.errors import TransportError
from eastwest.output import Cell, human_bytes

METRICS = {  # `top --by` name -> (Edge attribute, column header)
    "bytes": ("bytes_total", "BYTES"),
    "connections": ("connections", "CONNS"),
    "failures": ("failures", "FAILED"),
    "retransmits": ("retransmits", "RETX"),
}


@dataclass(frozen=True)
class Edge:
    client: str  # node id: `namespace/name` (or the name), a namespace or a host (--group-by)
    server: str
    connections: int
    failed: int
    bytes_c2s: int
    bytes_s2c: int
    resets: int
    retransmits: int
    rtt_avg_us: float | None
    ports: tuple[str, ...]
    observed_by: tuple[str, ...]
    complete: bool
    obj: Any

    @property
    def bytes_total(self) -> int:
        return self.bytes_c2s + self.bytes_s2c

    @property
    def failures(self) -> int:
        """Connections that failed: never established (refused, timeout) or reset."""
        return self.failed + self.resets

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
                bytes_c2s=int(obj.get("bytes_c2s") or 0),
                bytes_s2c=int(obj.get("bytes_s2c") or 0),
                resets=int(obj.get("resets") or 0),
                retransmits=int(obj.get("retransmits") or 0),
                rtt_avg_us=rtt.get("avg") if isinstance(rtt, Mapping) else None,
                ports=tuple(str(p) for p in obj.get("ports") or ()),
                # {observer: connections it saw}, or a list
                observed_by=tuple(sorted(observed)),
                complete=obj.get("complete") is not False,
                obj=obj,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"the aggregator sent an edge this CLI cannot read ({exc!r}); "
                                 "is it a different version?") from None


def edges_of(doc: Any) -> list[Edge]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("edges"), list):
        raise TransportError("the aggregator's graph has no edges list")
    return [Edge.from_api(e) for e in doc["edges"]]


EDGE_HEADERS = ("CLIENT", "SERVER", "CONNS", "FAILED", "C->S", "S->C", "RESETS", "RETX", "RTT",
                "PORTS", "SEEN BY")
EDGE_CSV = ("client", "server", "connections", "failed", "bytes_c2s", "bytes_s2c", "resets",
            "retransmits", "rtt_avg_us", "ports", "observed_by", "complete")


def edge_cells(e: Edge) -> Sequence[Cell | str | int | None]:
    return (
        Cell(e.client, "cyan"), Cell(e.server, "cyan"), e.connections,
        Cell(str(e.failed), "red" if e.failed else None, right=True),
        Cell(human_bytes(e.bytes_c2s), right=True), Cell(human_bytes(e.bytes_s2c), right=True),
        e.resets, Cell(str(e.retransmits), "yellow" if e.retransmits else None, right=True),
        Cell(f"{e.rtt_avg_us / 1000:.2f}ms" if e.rtt_avg_us is not None else "", right=True),
        ",".join(e.ports), ",".join(e.observed_by) + ("" if e.complete else " (incomplete)"),
    )


def edge_csv(e: Edge) -> Sequence[Any]:
    return (e.client, e.server, e.connections, e.failed, e.bytes_c2s, e.bytes_s2c, e.resets,
            e.retransmits, e.rtt_avg_us, ";".join(e.ports), ";".join(e.observed_by),
            str(e.complete).lower())
