"""The Service view's rules as the stores apply them (issue 16, aggregator/service_view.py).

Stage: store (query side). In: an `EdgeQuery` grouped by `service`, whose `services` lists the
window's dialled addresses with their Service node (`ServiceAddress`: named by the identity
layers before the query, aggregator/service_view.py). Out: what both backends write, DuckDB in
its one aggregation (aggregator/store/duckdb_edges.py), ClickHouse from its grouped rows
(aggregator/store/clickhouse_derived.py):
- the server end of a connection: its server workload when it dialled no Service, else its
  dialled address's Service node, else `svc:<ip>:<port>` (an address `services` lacks);
- a Service node's attributes: the Service's name and namespace (`<ip>:<port>` and none when
  unnamed), kind `Service`;
- per Service edge `service` ({id, name, namespace, addresses: the node's dialled addresses in
  the window, `ip:port`/`[ip]:port`, sorted}) and `backends` (per backend workload of the edge's
  connections: id, name, namespace, kind, connections, connections_opened; sorted by id);
  `null` and `[]` on the other edges (docs/api.md, "The Service view").
"""

from __future__ import annotations

from typing import Any

import msgspec
import pyarrow as pa

from aggregator.store.query import ServiceAddress

PREFIX = "svc:"
SERVICE_TABLE = "_svc"  # the addresses as DuckDB's queries see them (registered on the cursor)
_SCHEMA = pa.schema([("_svc_ip", pa.string()), ("_svc_port", pa.int32()),
                     ("_svc_node", pa.string()), ("_svc_name", pa.string()),
                     ("_svc_namespace", pa.string()), ("_svc_json", pa.string())])
_enc = msgspec.json.Encoder()


def service_objects(services: tuple[ServiceAddress, ...]) -> dict[str, dict[str, Any]]:
    """Per Service node of `services`, its `service` object (its addresses among them)."""
    addrs: dict[str, set[str]] = {}
    named: dict[str, ServiceAddress] = {}
    for a in services:
        addrs.setdefault(a.node, set()).add(address(a.ip, a.port))
        named.setdefault(a.node, a)
    return {node: service_object(node, a.name, a.namespace, addrs[node])
            for node, a in named.items()}


def service_arrow(services: tuple[ServiceAddress, ...]) -> pa.Table:
    """`services` as the Arrow table `_svc`: one row per dialled address, with its node's
    `service` object as JSON text (written once per node)."""
    objects = service_objects(services)
    texts = {node: _enc.encode(obj).decode() for node, obj in objects.items()}
    cols = [*map(list, zip(*services, strict=True)), [texts[a.node] for a in services]] \
        if services else [[]] * 6
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, _SCHEMA, strict=True)],
                                schema=_SCHEMA)


def unnamed_node(ip: str, port: int) -> str:
    return f"{PREFIX}{ip}:{port}"


def address(ip: str, port: int) -> str:
    """A dialled address as `service.addresses` lists it: `ip:port`, `[ip]:port` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def node_attrs(node: str, name: str | None, namespace: str | None) -> tuple[str, str | None, str]:
    """A Service node's (name, namespace, kind)."""
    return (name if name is not None else node[len(PREFIX):], namespace, "Service")


def service_object(node: str, name: str | None, namespace: str | None,
                   addresses: set[str]) -> dict[str, Any]:
    return {"id": node, "name": name, "namespace": namespace, "addresses": sorted(addresses)}


def unlisted_object(node: str) -> dict[str, Any]:
    """The `service` of a node `svc:<ip>:<port>` whose address the query did not list (a
    connection stored after the query listed the window's addresses): unnamed, that address."""
    ip, _, port = node[len(PREFIX):].rpartition(":")
    return service_object(node, None, None, {address(ip, int(port))})


def backend_object(wid: str, workload: dict[str, Any] | None, n: int, opened: int
                   ) -> dict[str, Any]:
    """One backend of a Service edge; `workload`: its row of the workloads table (None: none)."""
    w = workload or {}
    return {"id": wid, "name": w.get("name") or wid, "namespace": w.get("namespace"),
            "kind": w.get("kind"), "connections": int(n), "connections_opened": int(opened)}
