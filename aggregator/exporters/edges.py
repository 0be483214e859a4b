"""Edge labels within the cardinality budget, shared by every exporter of per-edge metrics.

Stage: exporters (after correlation). In: a connection's client and server `Identity`, its server
port and protocol. Out: the label values of its edge series, `EDGE_LABELS`, the same for the
Prometheus /metrics series (prometheus.py) and the OTLP metrics (otlp.py).

Counters must never lose a series they have started, so the budget is first come, first served:
the first `budget - 1` distinct edges keep their own labels; every later edge is folded into the
one series `OTHER` (client="other", server="other"), and each folded update is counted
(`eastwest_edge_series_folded_total`). The API's graphs fold by weight instead (aggregator/graph.py)
because they are recomputed per request; a counter cannot be.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.connection import Identity

EDGE_LABELS = ("client", "client_namespace", "server", "server_namespace", "server_port",
               "protocol")
# the same, as the columns of a connection row (aggregator/store/derived.py)
ROW_LABELS = ("client_name", "client_namespace", "server_name", "server_namespace", "server_port",
              "protocol")
EdgeKey = tuple[str, str, str, str, str, str]
OTHER: EdgeKey = ("other", "", "other", "", "", "")


class EdgeLabels:
    def __init__(self, budget: int) -> None:
        if budget < 2:
            raise ValueError(f"edge budget {budget}: at least 2 (one edge and 'other')")
        self.budget = budget
        self.known: set[EdgeKey] = set()
        self.folded = 0
        self._lock = threading.Lock()

    def of(self, client: Identity, server: Identity, port: int, protocol: str, *,
           count: bool = True) -> EdgeKey:
        """The edge's labels, or OTHER past the budget (`count`: a fold is counted; OTLP's
        spans ask about edges the counters count already, and do not count twice)."""
        return self.of_names(client.name, client.namespace, server.name, server.namespace, port,
                             protocol, count=count)

    def of_names(self, client: str, client_namespace: str | None, server: str,
                 server_namespace: str | None, port: int, protocol: str, *,
                 count: bool = True) -> EdgeKey:
        key: EdgeKey = (client, client_namespace or "", server, server_namespace or "",
                        str(port), protocol)
        if key in self.known:
            return key
        with self._lock:
            if key in self.known or len(self.known) < self.budget - 1:
                self.known.add(key)
                return key
            if count:
                self.folded += 1
        return OTHER

    def per_edge(self, t: pa.Table, sums: Sequence[str], counts: Sequence[str] = ()
                 ) -> list[tuple[EdgeKey, list[int]]]:
        """`t`'s rows summed per edge (its label columns, named as in a connection row:
        client_name, client_namespace, server_name, server_namespace, server_port, protocol),
        each edge's labels within the budget: [(labels, [sums..., counts of true...])]. One
        Python step per edge, none per row."""
        if t.num_rows == 0:
            return []
        aggs = [(n, "sum") for n in sums] + [(n, "sum") for n in counts]
        g = t.group_by(list(ROW_LABELS), use_threads=False).aggregate(aggs)
        cols = [g.column(n).to_pylist() for n in ROW_LABELS]
        vals = [g.column(f"{n}_sum").to_pylist() for n in (*sums, *counts)]
        out = []
        for i in range(g.num_rows):
            edge = self.of_names(cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i],
                                 cols[5][i])
            out.append((edge, [int(v[i] or 0) for v in vals]))
        return out

    def count_per_edge(self, t: pa.Table, column: str, values: Sequence[str]
                       ) -> list[tuple[EdgeKey, str, int]]:
        """How many of `t`'s rows have each of `values` in `column`, per edge (labels within the
        budget, as `per_edge`): [(labels, value, count)], value by value."""
        out = []
        col = t.column(column)
        for value in values:
            hit = t.filter(pc.equal(col, value))
            if hit.num_rows:
                one = hit.append_column("_one", pa.array(np.ones(hit.num_rows, np.int64)))
                out += [(edge, value, n) for edge, (n,) in self.per_edge(one, ("_one",))]
        return out

    def __len__(self) -> int:
        return len(self.known)
