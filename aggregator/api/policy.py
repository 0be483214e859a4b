"""GET /api/v1/policy/observed (the window's traffic as NetworkPolicy sees it) and
GET /api/v1/policy/suggest (the NetworkPolicies that allow exactly that traffic).

In: from/to (as /graph) and the filters of eastwest.filters (namespace=, workload=, ...); for
suggest, `namespace`/`workload` also choose whose policies are written. Out: edges client ->
server port/protocol with connection counts and both ends' namespace, name, kind and labels
(those every entry of the workload in the static map shares, else the identity's as stored:
Kubernetes, the collector's), or the suggested objects
(eastwest/policy/suggest.py), JSON or YAML (docs/api.md, docs/policy.md).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from aggregator.api.graph import TIME_HELP
from aggregator.api.params import LINK_LOCAL_HELP, check_names, choice, query_filter, window
from aggregator.api.state import reader
from aggregator.auth import require_read
from aggregator.identity import StaticMap
from aggregator.store.query import ConnectionQuery
from eastwest.errors import ConfigError
from eastwest.policy.observed import End, ObservedEdge
from eastwest.policy.semantics import PROTOCOLS

router = APIRouter(dependencies=[Depends(require_read)])
COLUMNS = ("protocol", "client_ip", "client_wid", "client_name", "client_namespace", "client_kind",
           "server_ip", "server_port", "server_wid", "server_name", "server_namespace",
           "server_kind")
MAX_CONNECTIONS = 2_000_000  # one window's connections read for policy (a bound, not a page)


def _iso(v: datetime) -> str:
    return v.isoformat().replace("+00:00", "Z")


def _labels(raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


MapFacts = tuple[dict[str, dict[str, str]], dict[str, dict[str, tuple[int, str]]]]


@cache
def _map_facts(path: str, mtime_ns: int) -> MapFacts:
    m = StaticMap.load(path)
    return m.workload_labels(), m.named_ports


def map_facts(request: Request) -> MapFacts:
    """The workload map's labels (shared by all entries of a workload) and named container
    ports of each workload it names, read again when the file changes; empty without a map."""
    path = request.app.state.settings.workload_map
    if not path:
        return {}, {}
    try:
        return _map_facts(str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return {}, {}


def observed(request: Request, since: datetime, until: datetime) -> tuple[list[ObservedEdge], int]:
    """The window's edges (TCP, UDP, SCTP) and how many connections of other protocols were
    left out (NetworkPolicy ports name only these three). More than `max_connections` in the
    window is an error, never a partial answer."""
    max_connections = MAX_CONNECTIONS
    store = reader(request)
    rows = store.connections(ConnectionQuery(filter=query_filter(request), since=since,
                                             until=until, limit=max_connections + 1,
                                             columns=COLUMNS))
    if len(rows) > max_connections:  # a policy from part of a window would deny the rest
        raise ConfigError("from", _iso(since), f"the window holds more than {max_connections} "
                          "connections: narrow it (a later from=, namespace=, workload=)")
    labels = {r["wid"]: _labels(r.get("labels")) for r in store.workload_rows()}
    map_labels, named_ports = map_facts(request)
    labels.update(map_labels)  # the map's, shared by every pod of a workload
    counts: Counter[tuple[Any, ...]] = Counter()
    other = 0
    for r in rows:
        proto = str(r["protocol"]).upper()
        if proto not in PROTOCOLS or not r["server_port"]:
            other += 1
            continue
        ends = []
        for side in ("client", "server"):
            ns = r[f"{side}_namespace"]
            ends.append((r[f"{side}_wid"] or r[f"{side}_ip"], ns, r[f"{side}_name"],
                         r[f"{side}_kind"], None if ns else r[f"{side}_ip"]))
        counts[(*ends, int(r["server_port"]), proto)] += 1

    def end(t: tuple[Any, ...]) -> End:
        wid, ns, name, kind, ip = t
        if not ns:
            return End(wid, ns, name, kind, {}, ip)
        return End(wid, ns, name, kind, labels.get(wid, {}), None, named_ports.get(wid))

    edges = [ObservedEdge(end(c), end(s), port, proto, n)
             for (c, s, port, proto), n in counts.items()]
    edges.sort(key=lambda e: (e.client.id, e.server.id, e.port, e.protocol))
    return edges, other


@router.get("/api/v1/policy/observed",
            summary="The window's edges client -> server port/protocol, for NetworkPolicy")
def policy_observed(request: Request,
                    from_: str | None = Query(None, alias="from", description=TIME_HELP),
                    to: str | None = Query(None, description=TIME_HELP),
                    link_local: str | None = Query(None, description=LINK_LOCAL_HELP)) -> dict[str, Any]:
    check_names(request, {"from", "to"}, filters=True)
    since, until, _ = window(from_, to)
    edges, other = observed(request, since, until)
    return {"from": _iso(since), "to": _iso(until), "other_protocols": other,
            "edges": [e.to_json() for e in edges]}


@router.get("/api/v1/policy/suggest",
            summary="NetworkPolicies that allow exactly the traffic observed in a window")
def policy_suggest(request: Request,
                   from_: str | None = Query(None, alias="from", description=TIME_HELP),
                   to: str | None = Query(None, description=TIME_HELP),
                   format: str = Query("json", description="json | yaml"),
                   link_local: str | None = Query(None, description=LINK_LOCAL_HELP)) -> Response:
    from eastwest.policy.suggest import Scope, suggest, to_json_list, to_yaml

    check_names(request, {"from", "to", "format"}, filters=True)
    fmt = choice("format", format, ("json", "yaml"))
    since, until, _ = window(from_, to)
    edges, _other = observed(request, since, until)
    q = request.query_params
    win = f"{_iso(since)}..{_iso(until)}"
    objs = suggest(edges, win, Scope(q.get("namespace"), q.get("workload")))
    if fmt == "yaml":
        return Response(to_yaml(objs), media_type="application/yaml")
    return Response(json.dumps(to_json_list(objs), indent=1), media_type="application/json")
