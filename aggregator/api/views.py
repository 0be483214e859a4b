"""One flow (a correlated connection) as the API shows it, from a store row or from memory.

Stage: API boundary. In: a `connections` row (dict): from the store, or from the live hub
(aggregator/fanout.py).
Out: the flow JSON documented field by field in docs/api.md, and the filter view of
eastwest.filters (so the stream matches with the same Filter the store compiles to SQL).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aggregator import mesh
from aggregator.service_view import ServiceNames, flow_service
from aggregator.store.derived import CONN_COLUMNS, parse_drop_reasons

ROW_COLUMNS = [n for n, _, _ in CONN_COLUMNS if n != "state"]


def _iso(v: datetime | None) -> str | None:
    return v.isoformat().replace("+00:00", "Z") if v is not None else None


def _side(r: dict[str, Any], side: str) -> dict[str, Any]:
    return {
        "ip": r[f"{side}_ip"], "port": r[f"{side}_port"],
        "workload": {"id": r[f"{side}_wid"], "name": r[f"{side}_name"],
                     "namespace": r[f"{side}_namespace"], "kind": r[f"{side}_kind"],
                     "host": r[f"{side}_host"], "resolved_by": r[f"{side}_id_source"]},
        "process": None if r[f"{side}_collector"] is None else {
            "pid": r[f"{side}_pid"], "comm": r[f"{side}_comm"], "netns": r[f"{side}_netns"],
            "container": r[f"{side}_container"], "collector": r[f"{side}_collector"]},
    }


def flow_json(r: dict[str, Any], names: ServiceNames | None = None) -> dict[str, Any]:
    """`names`: what names the dialled Service (`service`, aggregator/service_view.py)."""
    observed = [x for x in r["observed_by"].split(",") if x]
    return {
        "id": r["conn_id"], "protocol": r["protocol"], "family": r["family"],
        "client": _side(r, "client"), "server": _side(r, "server"),
        "start": _iso(r["start_ts"]), "last_seen": _iso(r["last_seen"]), "closed": r["closed"],
        "closed_at": _iso(r["closed_ts"]), "connect": r["connect"], "outcome": r["outcome"],
        "observed_by": observed,
        "bytes_c2s": r["bytes_c2s"], "bytes_s2c": r["bytes_s2c"],
        "packets_c2s": r["packets_c2s"], "packets_s2c": r["packets_s2c"],
        "by_observer": {
            obs: (None if r[f"{obs}_bytes_c2s"] is None else
                  {"bytes_c2s": r[f"{obs}_bytes_c2s"], "bytes_s2c": r[f"{obs}_bytes_s2c"]})
            for obs in ("client", "server", "path")},
        "byte_mismatch": r["byte_mismatch"], "retransmits": r["retransmits"], "resets": r["resets"],
        "rtt_us": None if r["rtt_min_us"] is None else
        {"min": r["rtt_min_us"], "avg": r["rtt_avg_us"], "max": r["rtt_max_us"]},
        "tunnel": None if r["vni"] is None else {
            # rows stored before the type was kept (NULL) were VXLAN, the only type then
            "type": r.get("tunnel_type") or "vxlan", "vni": r["vni"],
            "vtep_src": r["vtep_src"], "vtep_dst": r["vtep_dst"],
            "vtep_src_host": r["vtep_src_host"], "vtep_dst_host": r["vtep_dst_host"]},
        "complete": not r["incomplete"],
        # the address the client dialled when NAT took it to `server` (a Service's ClusterIP);
        # rows stored before it was kept have none (`get`)
        "service_ip": r.get("service_ip"), "service_port": r.get("service_port"),
        "dns": None,  # GET /api/v1/flows fills it (aggregator/dns_flows.py)
        # packets the kernel dropped (drop sources, docs/policy.md "Drops"); null: none reported
        "drops": None if r.get("dropped") is None else {
            "packets": r["dropped"], "reasons": parse_drop_reasons(r.get("drop_reasons"))},
        "service": flow_service(names, r.get("service_ip"), r.get("service_port"), r["start_ts"]),
        # a folded service-mesh call: proxy, hops, the wire's bytes (aggregator/mesh.py); null:
        # not meshed (rows stored before it was kept have none: `get`)
        "mesh": mesh.shown(r.get("mesh"), r["path_bytes_c2s"], r["path_bytes_s2c"]),
    }


def filter_view(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "client_ip": r["client_ip"], "server_ip": r["server_ip"], "client_port": r["client_port"],
        "server_port": r["server_port"], "protocol": r["protocol"], "outcome": r["outcome"],
        "observers": {x for x in r["observed_by"].split(",") if x}, "vni": r["vni"],
        "client_workload": r["client_name"], "server_workload": r["server_name"],
        "client_namespace": r["client_namespace"], "server_namespace": r["server_namespace"],
        "service_ip": r.get("service_ip"),
    }
