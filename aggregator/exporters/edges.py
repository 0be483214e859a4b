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

from aggregator.connection import Identity

EDGE_LABELS = ("client", "client_namespace", "server", "server_namespace", "server_port",
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

    def of(self, client: Identity, server: Identity, port: int, protocol: str) -> EdgeKey:
        key: EdgeKey = (client.name, client.namespace or "", server.name, server.namespace or "",
                        str(port), protocol)
        if key in self.known:
            return key
        with self._lock:
            if key in self.known or len(self.known) < self.budget - 1:
                self.known.add(key)
                return key
            self.folded += 1
        return OTHER

    def __len__(self) -> int:
        return len(self.known)
