"""Edges of encrypted traffic between hosts: what the wire carried but could not see inside.

Stage: query side, as a window's graph is built (aggregator/graph_edges.py `GraphData`).
In: each edge's JSON object, as the store wrote it.  Out: the same object, with
`"encrypted": "esp", "wire_sees_inside": false` added when the edge carries IPsec ESP (its
`protocols` hold `esp`): the wire's record of an encrypted overlay between two hosts
(docs/vxlan.md "Encrypted traffic (ESP)"), shown as the underlay edge it is, between the two
hosts' workloads (nodes in a workload map). The connections inside are edges of their own,
observed by their sockets only. Other edges are returned unchanged (the same string).
"""

from __future__ import annotations

import re

_ESP = re.compile(r'"protocols":\[[^\]]*"esp"')
MARK = ',"encrypted":"esp","wire_sees_inside":false}'


def mark(edge_json: str) -> str:
    """`edge_json` (one JSON object) with the encrypted-traffic fields when it carries ESP."""
    if '"esp"' not in edge_json or not _ESP.search(edge_json):
        return edge_json
    return edge_json[:-1] + MARK


def mark_all(edges_json: list[str]) -> list[str]:
    return [mark(j) if '"esp"' in j else j for j in edges_json]
