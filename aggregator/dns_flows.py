"""DNS on the flows of the API: the server end named by the DNS answer its client got, and the
DNS a flow to a resolver carried.

Stage: query side, between the store's connection rows and the flow JSON of GET /api/v1/flows
(aggregator/api/views.py `flow_json`). In: a page of connection rows, the store. Out: per row,
what DNS adds (`DnsOfRow`): the server's name from an answer (aggregator/dns_names.py, the rule;
the identity layer `dns`, only for a server named by a layer below it) and the `dns` object of a
flow to a resolver (aggregator/dns_names.py `edge_dns` of its one flow). The stored connection
keeps its stored names (docs/aggregator.md, "Identity from DNS answers"); only what is shown
changes, so a filter on workloads matches the stored names.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NamedTuple

from aggregator.dns_graph import BELOW_DNS, SLACK
from aggregator.dns_names import DNS_PORT, LOOKBACK, DnsFacts, Named, display_name, edge_dns
from aggregator.store.base import ReadStore
from aggregator.store.query import RecordQuery
from eastwest.record import DnsSummary


class DnsOfRow(NamedTuple):
    named: Named | None
    dns: dict[str, Any] | None


NOTHING = DnsOfRow(None, None)


def dns_of_rows(store: ReadStore, rows: Sequence[dict[str, Any]]) -> list[DnsOfRow]:
    """What DNS adds to each row (NOTHING for most); reads the DNS records of the page's span
    only when a row can get something."""
    cands = [r for r in rows if r["server_id_source"] in BELOW_DNS or r["server_port"] == DNS_PORT]
    if not cands:
        return [NOTHING] * len(rows)
    since = min(r["start_ts"] for r in cands) - LOOKBACK
    until = max(r["last_seen"] for r in cands) + SLACK + timedelta(microseconds=1)
    facts = DnsFacts.of_records(store.records(RecordQuery(since=since, server_port=DNS_PORT)),
                                until)
    flows: dict[tuple[str, str, int, str, int], list[Any]] = {}
    for f in facts.flows:
        flows.setdefault(f.key, []).append(f)
    out = []
    for r in rows:
        named = None
        if r["server_id_source"] in BELOW_DNS:
            named = facts.name_for(r["client_ip"], r["server_ip"], r["start_ts"])
        dns = None
        if r["server_port"] == DNS_PORT:
            key = (r["protocol"], r["client_ip"], r["client_port"], r["server_ip"],
                   r["server_port"])
            mine = [f.summary for f in flows.get(key, ())
                    if r["start_ts"] - SLACK <= f.end and f.start <= r["last_seen"] + SLACK]
            dns = flow_dns(mine) if mine else None
        out.append(DnsOfRow(named, dns))
    return out


def flow_dns(summaries: Sequence[DnsSummary]) -> dict[str, Any]:
    """A flow's `dns`: the edge's form (`edge_dns`) and the answers the client got."""
    out = edge_dns(summaries)
    answers = {(display_name(a.name), a.type, a.value, a.ttl, a.at)
               for s in summaries for a in s.answers}
    out["answers"] = [{"name": n, "type": t, "value": v, "ttl": ttl,
                       "at": at.isoformat().replace("+00:00", "Z")}
                      for n, t, v, ttl, at in sorted(answers)]
    return out


def with_dns(flow: dict[str, Any], extra: DnsOfRow) -> dict[str, Any]:
    """The flow JSON with what DNS adds: the server's workload named by the answer, `dns`."""
    if extra.named is not None:
        w = flow["server"]["workload"]
        flow["server"]["workload"] = {**w, "id": extra.named.name, "name": extra.named.name,
                                      "namespace": None, "kind": "DNS", "host": None,
                                      "resolved_by": extra.named.source}
    flow["dns"] = extra.dns
    return flow
