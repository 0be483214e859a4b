"""One flow as the `eastwest flows` printers show it, whichever way it came.

In:  a `FlowRecord` (from `--input-file`, one observer's view) or a flow object of the API
     (`GET /api/v1/flows`, `/api/v1/flows/stream`: one connection, observers merged).
Out: `FlowRow`: the cells of the table, compact and csv formats; `obj`, the JSON object that
     `-o json|jsonl` writes unchanged (a record stays a record, an API flow stays an API flow, so
     either parses back with what made it); and `view`, the mapping `eastwest.filters` matches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from eastwest.errors import TransportError
from eastwest.filters import outcome_of, view_of_record
from eastwest.output import Cell, human_bytes
from eastwest.record import FlowRecord


@dataclass(frozen=True)
class Side:
    ip: str
    port: int
    workload: str | None = None
    namespace: str | None = None
    comm: str | None = None

    @property
    def label(self) -> str:
        addr = f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"
        return f"{self.workload} {addr}" if self.workload else addr


@dataclass(frozen=True)
class FlowRow:
    start: datetime
    end: datetime
    protocol: str
    client: Side
    server: Side
    outcome: str
    bytes_c2s: int
    bytes_s2c: int
    retransmits: int
    resets: int
    rtt_avg_us: int | None
    observed_by: tuple[str, ...]
    vni: int | None
    final: bool
    obj: Any  # what -o json/jsonl writes
    view: Mapping[str, Any]  # what the filter matches
    drops: str = ""  # packets the kernel dropped by reason ("NETFILTER_DROP=3"), "" when none
    # the Service the client dialled (`namespace/name`, else its ClusterIP:port), None: none
    service: str | None = None
    # a folded service-mesh call: its sidecar's name (`mesh.proxy`), None: not meshed
    mesh: str | None = None

    @property
    def server_label(self) -> str:
        """The server, the Service it was reached through and the sidecars it went through:
        `api 10.244.2.11:8080 via svc:shop/api [mesh ew-sidecar]`."""
        return (self.server.label + (f" via svc:{self.service}" if self.service else "")
                + (f" [mesh {self.mesh}]" if self.mesh else ""))

    @classmethod
    def from_record(cls, r: FlowRecord) -> FlowRow:
        cw, sw = r.client_workload, r.server_workload
        comm = r.process.comm if r.process else None
        return cls(
            start=r.start, end=r.end, protocol=r.protocol,
            client=Side(r.client.ip, r.client.port, cw.name if cw else None,
                        cw.namespace if cw else None, comm if r.observer == "client" else None),
            server=Side(r.server.ip, r.server.port, sw.name if sw else None,
                        sw.namespace if sw else None, comm if r.observer == "server" else None),
            outcome=outcome_of(r.connect, r.resets, r.source == "drops"),
            bytes_c2s=r.bytes_c2s, bytes_s2c=r.bytes_s2c,
            retransmits=r.retransmits, resets=r.resets,
            rtt_avg_us=r.rtt_us.avg if r.rtt_us else None,
            observed_by=("drops",) if r.source == "drops" else (r.observer,),
            vni=r.tunnel.vni if r.tunnel else None, final=r.final, obj=r.to_builtins(),
            view=view_of_record(r), drops=drops_text({d.reason: d.packets for d in r.drops or ()}),
            service=_addr(r.dialled.ip, r.dialled.port) if r.dialled is not None else None,
            mesh=r.mesh.proxy if r.mesh is not None else None,
        )

    @classmethod
    def from_api(cls, obj: Any) -> FlowRow:
        """A flow object of the API (one connection, observers merged): see docs/api.md."""
        if not isinstance(obj, dict):
            raise TransportError(f"the aggregator sent a flow that is not an object: {obj!r:.80}")
        try:
            client, server = _side(obj["client"]), _side(obj["server"])
            start = _time(obj["start"])
            end = _time(obj.get("end") or obj.get("closed_at") or obj.get("last_seen")
                        or obj["start"])
            observed = tuple(obj.get("observed_by") or ())
            tunnel = obj.get("tunnel") or {}
            vni = obj.get("vni", tunnel.get("vni") if isinstance(tunnel, dict) else None)
            rtt = obj.get("rtt_us") or {}
            outcome = obj.get("outcome") or outcome_of(obj.get("connect"), obj.get("resets", 0))
            view = {
                "client_ip": client.ip, "server_ip": server.ip, "client_port": client.port,
                "server_port": server.port, "protocol": obj["protocol"], "outcome": outcome,
                "observers": set(observed), "vni": vni,
                "client_workload": client.workload, "server_workload": server.workload,
                "client_namespace": client.namespace, "server_namespace": server.namespace,
                "service_ip": obj.get("service_ip"),
            }
            return cls(
                start=start, end=end, protocol=str(obj["protocol"]), client=client,
                server=server, outcome=str(outcome), bytes_c2s=int(obj.get("bytes_c2s") or 0),
                bytes_s2c=int(obj.get("bytes_s2c") or 0),
                retransmits=int(obj.get("retransmits") or 0), resets=int(obj.get("resets") or 0),
                rtt_avg_us=rtt.get("avg") if isinstance(rtt, dict) else None,
                observed_by=observed, vni=vni,
                final=bool(obj.get("final", obj.get("closed", True))), obj=obj,
                view=view, drops=drops_text((obj.get("drops") or {}).get("reasons") or {}),
                service=_service(obj), mesh=_mesh(obj),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a side not an object
            raise TransportError(f"the aggregator sent a flow this CLI cannot read ({exc!r}); "
                                 "is it a different version?") from None


def _addr(ip: str, port: int | None) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _service(obj: Mapping[str, Any]) -> str | None:
    """The API flow's Service: its name (`namespace/name`), else the dialled address."""
    svc = obj.get("service")
    if isinstance(svc, Mapping) and svc.get("name"):
        return f"{svc['namespace']}/{svc['name']}" if svc.get("namespace") else str(svc["name"])
    ip = obj.get("service_ip")
    return _addr(str(ip), obj.get("service_port")) if ip else None


def _mesh(obj: Mapping[str, Any]) -> str | None:
    """The API flow's sidecar (`mesh.proxy`), None when not meshed."""
    m = obj.get("mesh")
    return str(m.get("proxy") or "?") if isinstance(m, Mapping) else None


def drops_text(reasons: Mapping[str, Any]) -> str:
    """`NETFILTER_DROP=3,NO_SOCKET=1` (by reason), "" without drops."""
    return ",".join(f"{r}={int(n)}" for r, n in sorted(reasons.items()))


def _side(d: Any) -> Side:
    wl = d.get("workload")
    name, ns = (wl.get("name"), wl.get("namespace")) if isinstance(wl, dict) else (wl, None)
    proc = d.get("process")
    comm = proc.get("comm") if isinstance(proc, dict) else d.get("comm")
    return Side(str(d["ip"]), int(d["port"]), name, ns or d.get("namespace"), comm)


def _time(text: Any) -> datetime:
    t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# -- the cells of each format -----------------------------------------------------------------
TABLE_HEADERS = ("START", "CLIENT", "SERVER", "PROTO", "OUTCOME", "C->S", "S->C", "RETX",
                 "RTT", "SEEN BY", "VNI")
CSV_HEADERS = ("start", "end", "protocol", "client_workload", "client_namespace", "client_ip",
               "client_port", "client_comm", "server_workload", "server_namespace", "server_ip",
               "server_port", "server_comm", "outcome", "bytes_c2s", "bytes_s2c", "retransmits",
               "resets", "rtt_avg_us", "observed_by", "vni", "final", "drops", "service", "mesh")


def outcome_style(outcome: str) -> str | None:
    return None if outcome == "ok" else "red"


def outcome_cell(f: FlowRow) -> str:
    """The outcome, with the packets the kernel dropped by reason when there were any:
    `dropped (NETFILTER_DROP=3)`."""
    return f"{f.outcome} ({f.drops})" if f.drops else f.outcome


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def table_cells(f: FlowRow) -> Sequence[Cell | str | int | None]:
    return (
        stamp(f.start), Cell(f.client.label, "cyan"), Cell(f.server_label, "cyan"), f.protocol,
        Cell(outcome_cell(f), outcome_style(f.outcome)),
        Cell(human_bytes(f.bytes_c2s), right=True),
        Cell(human_bytes(f.bytes_s2c), right=True),
        Cell(str(f.retransmits), "yellow" if f.retransmits else None, right=True),
        Cell(f"{f.rtt_avg_us / 1000:.2f}ms" if f.rtt_avg_us is not None else "", right=True),
        ",".join(f.observed_by), "" if f.vni is None else str(f.vni),
    )


def compact_line(f: FlowRow) -> list[tuple[str, str | None]]:
    """(text, style) pieces of one line: `START client -> server proto outcome bytes [seen by]`."""
    extra = f" retx={f.retransmits}" if f.retransmits else ""
    vni = f" vni={f.vni}" if f.vni is not None else ""
    vni += f" drops={f.drops}" if f.drops else ""
    return [
        (stamp(f.start) + " ", None), (f.client.label, "cyan"), (" -> ", None),
        (f.server_label, "cyan"), (f" {f.protocol} ", None), (f.outcome, outcome_style(f.outcome)),
        (f" {f.bytes_c2s}B/{f.bytes_s2c}B{extra}{vni} [{','.join(f.observed_by)}]", None),
    ]


def csv_cells(f: FlowRow) -> Sequence[Any]:
    return (
        f.start.isoformat().replace("+00:00", "Z"), f.end.isoformat().replace("+00:00", "Z"),
        f.protocol, f.client.workload, f.client.namespace, f.client.ip, f.client.port,
        f.client.comm, f.server.workload, f.server.namespace, f.server.ip, f.server.port,
        f.server.comm, f.outcome, f.bytes_c2s, f.bytes_s2c, f.retransmits, f.resets,
        f.rtt_avg_us, ";".join(f.observed_by), f.vni, str(f.final).lower(), f.drops.replace(",", ";"), f.service,
        f.mesh,
    )
