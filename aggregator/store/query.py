"""The typed queries of the read path: what the API asks a store, never SQL.

Stage: between the read routes (aggregator/api/) and a store backend. In: a request's window,
filter (eastwest/filters.py), sort, cursor, grouping. Out: one frozen query object per kind of
read; each backend compiles it in its own SQL dialect (aggregator/store/sql.py and the
backend's query module), so no route handler and nothing in `eastwest/` holds backend SQL.

- `RecordQuery`: raw records whose `end` is in [since, until) (to `server_port`), oldest first.
- `ConnectionQuery`: correlated connections matching a filter, active in [since, until) (last
  seen at or after `since`, started before `until`), sorted by a `Sort`, keyset-paged by a
  `Cursor` (the last row's sort value and id: https://use-the-index-luke.com/no-offset).
- `EdgeQuery`: the service graph's edges of a window, grouped by workload, namespace or host,
  or by Service (`service`: a connection that dialled a Service ends at the Service, the others
  at their server workload; `services` names the dialled addresses: `ServiceAddress` rows,
  aggregator/service_view.py). The store groups, counts the backends and writes each edge's
  `service` and `backends` itself (aggregator/store/service_edges.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from eastwest.filters import DIMENSIONS, Filter

NODEPORT_RANGE = (30000, 32767)  # Kubernetes' default --service-node-port-range

GROUP_BY = ("workload", "namespace", "host", "service")
# sort key -> what it orders by (the store maps each to its column expression)
SORT_KEYS = ("start", "last_seen", "bytes", "client_workload", "server_workload")
# the filter's view keys the rollups can answer (they have no addresses, client ports,
# outcomes, observers or VNIs); `link_local` is a rollup key column
ROLLUP_KEYS = frozenset({"client_workload", "server_workload", "client_namespace",
                         "server_namespace", "server_port", "protocol"})


@dataclass(frozen=True)
class RecordQuery:
    since: datetime | None = None
    until: datetime | None = None
    collector: str | None = None
    limit: int | None = None
    server_port: int | None = None  # only the records of flows to this port (DNS: 53)


EVERY_RECORD = RecordQuery()


@dataclass(frozen=True)
class Sort:
    key: str = "start"
    descending: bool = True

    def __post_init__(self) -> None:
        if self.key not in SORT_KEYS:
            raise ValueError(f"sort key {self.key!r}: one of {', '.join(SORT_KEYS)}")

    @classmethod
    def parse(cls, text: str) -> Sort:
        """`start`, `-bytes`, ...: a leading `-` sorts descending."""
        return cls(text.lstrip("-"), text.startswith("-"))

    def __str__(self) -> str:
        return ("-" if self.descending else "") + self.key


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended: its last row's sort value and connection id."""

    value: Any
    conn_id: str


@dataclass(frozen=True)
class ConnectionQuery:
    filter: Filter = field(default_factory=Filter)
    since: datetime | None = None   # last seen at or after
    until: datetime | None = None   # started before
    sort: Sort = field(default_factory=Sort)
    cursor: Cursor | None = None
    limit: int = 100
    columns: tuple[str, ...] = ()   # empty: every shown column
    meshed: bool = False            # only folded service-mesh calls (`mesh` not null)
    # only NodePort halves not (yet) joined that started after this time (sql.py
    # `nodeport_half`; aggregator/nodeport_graph.py)
    halves_since: datetime | None = None
    halves_ports: tuple[int, int] = NODEPORT_RANGE  # the cluster's NodePort range


class ServiceAddress(NamedTuple):
    """A dialled address of the Service view: `node`, its Service node's id (`svc:ns/name`,
    `svc:<ip>:<port>` when unnamed); `name`/`namespace` the Service's (None when unnamed)."""

    ip: str
    port: int
    node: str
    name: str | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class EdgeQuery:
    since: datetime
    until: datetime
    group_by: str = "workload"
    filter: Filter = field(default_factory=Filter)
    # group_by service: the dialled addresses' Service nodes (an address not in it: svc:ip:port)
    services: tuple[ServiceAddress, ...] = ()

    def __post_init__(self) -> None:
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by {self.group_by!r}: one of {', '.join(GROUP_BY)}")

    @property
    def volumes_from_rollups(self) -> bool:
        """Whether the minute rollups can answer the filter (else an edge's volumes are the
        totals of its matching connections). The rollups keep no dialled address: a Service
        view's volumes are always its connections'."""
        return self.group_by != "service" and rollups_can_answer(self.filter)


def rollups_can_answer(flt: Filter) -> bool:
    return all(all(f in ROLLUP_KEYS for f in DIMENSIONS[c.dim].fields) for c in flt.clauses)
