"""GET /api/v1/flows (correlated connections, filtered, sorted, cursor-paginated) and
GET /api/v1/flows/stream (the same filters, live, as Server-Sent Events).

In: filters of eastwest.filters (from_workload, to_workload, workload, namespace, ip, from_ip,
to_ip, port, to_port, protocol, outcome, observer, vni, each repeatable and negatable with a
`not_` prefix), since/until, sort, limit, cursor; on the stored flows also the DNS filters of the
graph (`dns_name`, `dns_rcode`: eastwest/dns_filter.py, on each flow's `dns`). Out: flows as
docs/api.md defines them.
The one `Filter` goes to the store in a typed query (aggregator/store/query.py) and matches in
memory for the stream.

Cursor pagination is keyset: the cursor holds the last row's sort value and id, so pages stay
consistent while connections keep arriving (https://use-the-index-luke.com/no-offset).
SSE framing: https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from aggregator.api.graph import TIME_HELP
from aggregator.api.params import (
    LINK_LOCAL_HELP,
    check_names,
    choice,
    dns_filter,
    positive_int,
    query_filter,
    service_names,
)
from aggregator.api.state import reader
from aggregator.api.views import ROW_COLUMNS, filter_view, flow_json
from aggregator.auth import require_read
from aggregator.dns_flows import DnsOfRow, dns_of_rows, with_dns
from aggregator.dns_names import DNS_PORT
from aggregator.store.base import ReadStore
from aggregator.store.query import SORT_KEYS, ConnectionQuery, Cursor, Sort
from eastwest.dns_filter import DnsEdgeFilter
from eastwest.errors import ConfigError
from eastwest.filters import Clause, Filter, parse_time

router = APIRouter(dependencies=[Depends(require_read)])
SORT_CHOICES = tuple(s for k in SORT_KEYS for s in (k, f"-{k}"))
MAX_PAGE = 10_000
HEARTBEAT_S = 15.0


def _encode_cursor(value: Any, conn_id: str) -> str:
    v = value.isoformat() if isinstance(value, datetime) else value
    return base64.urlsafe_b64encode(json.dumps([v, conn_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, sort: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value, conn_id = json.loads(raw)
        if sort in ("start", "last_seen"):
            value = datetime.fromisoformat(value)
        elif sort == "bytes" and not isinstance(value, int):
            raise ValueError(value)
        if not isinstance(conn_id, str):
            raise ValueError(conn_id)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError("cursor", cursor, "not a cursor of this sort order: pass the "
                          "`next_cursor` of the previous page, with the same sort") from None
    return value, conn_id


def _sort_value(row: dict[str, Any], key: str) -> Any:
    return {"start": row["start_ts"], "last_seen": row["last_seen"],
            "bytes": row["bytes_c2s"] + row["bytes_s2c"], "client_workload": row["client_wid"],
            "server_workload": row["server_wid"]}[key]


def _dns_matching(store: ReadStore, q: ConnectionQuery, dnsf: DnsEdgeFilter, size: int,
                  ) -> tuple[list[dict[str, Any]], list[DnsOfRow], bool]:
    """`dns_name`/`dns_rcode`: up to `size` rows of `q` whose `dns` matches (eastwest/dns_filter.py,
    as the graph's edges), and whether there are more. Only flows to port 53 carry DNS: the
    store is asked for those, page after page in the query's order, until `size` + 1 matched or
    the rows ended (the cursor of the next page is the last row returned, so none is skipped)."""
    q = dataclasses.replace(q, filter=Filter([*q.filter.clauses, Clause("to_port", (DNS_PORT,))],
                                             q.filter.link_local))
    rows: list[dict[str, Any]] = []
    extras: list[DnsOfRow] = []
    while True:
        page = store.connections(q)
        for r, x in zip(page, dns_of_rows(store, page), strict=True):
            if dnsf.matches(x.dns):
                rows.append(r)
                extras.append(x)
                if len(rows) > size:
                    return rows[:size], extras[:size], True
        if len(page) < q.limit:
            return rows, extras, False
        last = page[-1]
        q = dataclasses.replace(q, cursor=Cursor(_sort_value(last, q.sort.key), last["conn_id"]))


@router.get("/api/v1/flows", summary="Correlated connections (one per connection), filtered and paginated",
            description="Each flow as docs/api.md describes it; a service-mesh call its "
            "collectors folded from the sidecars' sockets has `mesh`: {proxy, hops: [{hop, "
            "observer, client: {ip, port}, server: {ip, port}, bytes_c2s, bytes_s2c, process, "
            "pid}], wire_bytes_c2s, wire_bytes_s2c} (null when not meshed; wire bytes null "
            "when no wire saw it)")
def flows(request: Request,
          since: str | None = Query(None, description=f"last seen at or after: {TIME_HELP}"),
          until: str | None = Query(None, description=f"started before: {TIME_HELP}"),
          sort: str = Query("-start", description="start, last_seen, bytes, client_workload, "
                            "server_workload; a leading - sorts descending"),
          limit: str | None = Query(None, description=f"page size, 1..{MAX_PAGE} (default 100)"),
          cursor: str | None = Query(None, description="next_cursor of the previous page"),
          link_local: str | None = Query(None, description=LINK_LOCAL_HELP),
          dns_name: str | None = Query(None, description="only flows to a resolver that asked a "
                                       "name matching this glob (*.example.com); repeatable"),
          dns_rcode: str | None = Query(None, description="only flows to a resolver that got "
                                        "this response code (nxdomain, servfail, ..., or "
                                        "timeout); repeatable; with dns_name: a matching name "
                                        "got it")) -> dict[str, Any]:
    check_names(request, {"since", "until", "sort", "limit", "cursor", "dns_name", "dns_rcode"},
                filters=True)
    flt = query_filter(request)
    dnsf = dns_filter(request)
    sort = choice("sort", sort, SORT_CHOICES)
    key = sort.lstrip("-")
    size = positive_int("limit", limit, 100, MAX_PAGE)
    q = ConnectionQuery(
        filter=flt, since=parse_time("since", since) if since is not None else None,
        until=parse_time("until", until) if until is not None else None,
        sort=Sort.parse(sort), cursor=Cursor(*_decode_cursor(cursor, key)) if cursor else None,
        limit=size + 1, columns=tuple(ROW_COLUMNS))
    if dnsf.empty:
        rows = reader(request).connections(q)
        more = len(rows) > size
        rows = rows[:size]
        extras = dns_of_rows(reader(request), rows)
    else:
        rows, extras, more = _dns_matching(reader(request), q, dnsf, size)
    nxt = None
    if more and rows:
        last = rows[-1]
        nxt = _encode_cursor(_sort_value(last, key), last["conn_id"])
    names = service_names(request)
    return {"flows": [with_dns(flow_json(r, names), x) for r, x in zip(rows, extras, strict=True)],
            "count": len(rows), "next_cursor": nxt,
            "filter": _filter_text(flt, dnsf), "sort": sort}


def _filter_text(flt: Filter, dnsf: DnsEdgeFilter) -> str:
    """The filter in words, the DNS filter's clauses after the others'."""
    if dnsf.empty:
        return str(flt)
    return f"{flt} AND {dnsf}" if flt.clauses or flt.link_local else str(dnsf)


@router.get("/api/v1/flows/stream", summary="Live flows as Server-Sent Events (same filters as /flows)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description":
                             "`event: flow` with one flow JSON per correlated update"}})
async def stream(request: Request,
                 limit: str | None = Query(None, description="close after this many events "
                                           "(default: never)"),
                 link_local: str | None = Query(None, description=LINK_LOCAL_HELP)) -> StreamingResponse:
    check_names(request, {"limit"}, filters=True)
    flt = query_filter(request)
    most = positive_int("limit", limit, 0, 10**9) if limit is not None else None
    names = service_names(request)
    hub = request.app.state.pipeline.fanout.hub
    sub = hub.subscribe(flt)

    async def events() -> AsyncIterator[bytes]:
        sent = 0
        try:
            yield b": eastwest flow stream; filter " + str(flt).encode() + b"\n\n"
            while most is None or sent < most:
                try:
                    row = await asyncio.wait_for(sub.get(), HEARTBEAT_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    yield b": keep-alive\n\n"
                    continue
                if not flt.matches(filter_view(row)):
                    continue
                sent += 1
                data = json.dumps(flow_json(row, names), default=str)
                yield f"event: flow\nid: {row['conn_id']}\ndata: {data}\n\n".encode()
        finally:
            hub.unsubscribe(sub)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
