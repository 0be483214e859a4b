"""Graph analysis and rendering: upstream, downstream, impact, cycles, hubs, the cardinality
budget (fold into `other`, sums kept), diff of two windows, and renderers that escape names."""

from __future__ import annotations

import networkx as nx

from aggregator import analysis
from aggregator.graph import SUMMED, fold, to_dot, to_graphml, to_json, to_mermaid


def g_of(edges) -> nx.DiGraph:
    g = nx.DiGraph(since=None, until=None, group_by="workload", volume_source="rollups", filter="")
    for u, v, n in edges:
        for x in (u, v):
            g.add_node(x, name=x, namespace=None, kind=None)
        g.add_edge(u, v, **{k: 0 for k in SUMMED}, rtt_us=None, ports=[80], protocols=["tcp"],
                   first_seen=None, last_seen=None, complete=True, observed_by={"client": n},
                   folded=1)
        g.edges[u, v].update(connections_opened=n, bytes_c2s=10 * n)
    return g


DEMO = [("loadgen", "frontend", 9), ("frontend", "api", 9), ("api", "db", 8), ("api", "cache", 6),
        ("api", "auth", 4), ("api", "resolver", 3)]


def test_upstream_downstream_and_impact():
    g = g_of(DEMO)
    assert analysis.downstream(g, "frontend") == ["api", "auth", "cache", "db", "resolver"]
    assert analysis.upstream(g, "db") == ["api", "frontend", "loadgen"]
    assert analysis.impact(g, "db") == [{"workload": "api", "distance": 1},
                                        {"workload": "frontend", "distance": 2},
                                        {"workload": "loadgen", "distance": 3}]
    assert analysis.impact(g, "loadgen") == [] and analysis.impact(g, "nope") == []


def test_cycles_and_hubs():
    g = g_of([*DEMO, ("db", "frontend", 1)])
    assert analysis.cycles(g) == [["api", "db", "frontend"]]
    hubs = analysis.hubs(g, min_degree=3)
    assert [(h["workload"], h["degree"]) for h in hubs] == [("api", 5), ("frontend", 3)]


def test_budget_keeps_the_heaviest_edges_and_folds_the_rest_with_their_sums():
    g = g_of([(f"c{i}", f"s{i}", i + 1) for i in range(50)])
    total = sum(a["connections_opened"] for *_, a in g.edges(data=True))
    assert fold(g, 10) == 41
    assert g.number_of_edges() == 10
    assert g.edges["other", "other"]["folded"] == 41
    assert ("c49", "s49") in g.edges and ("c0", "s0") not in g.edges
    assert sum(a["connections_opened"] for *_, a in g.edges(data=True)) == total
    assert fold(g, 10) == 0


def test_diff_added_removed_changed():
    a = g_of(DEMO)
    b = g_of([*DEMO[:5], ("api", "payments", 2)])
    b.edges["api", "db"]["connections_failed"] = 3
    b.edges["frontend", "api"]["bytes_c2s"] = 900
    d = analysis.diff(a, b)
    assert [(e["source"], e["target"]) for e in d["added"]] == [("api", "payments")]
    assert [(e["source"], e["target"]) for e in d["removed"]] == [("api", "resolver")]
    assert {(e["source"], e["target"]): e["changed"] for e in d["changed"]} == {
        ("api", "db"): ["connections_failed"], ("frontend", "api"): ["bytes_c2s"]}
    assert d["nodes_added"] == ["payments"] and d["nodes_removed"] == ["resolver"]


def test_renderers_escape_hostile_names():
    g = g_of([('a"];evil', "b<script>|x", 1)])
    assert '"a\\"];evil"' in to_dot(g)
    m = to_mermaid(g)
    assert "<script>" not in m and "&lt;script&gt;&#124;x" in m
    back = nx.parse_graphml(to_graphml(g))
    assert list(back.edges) == [('a"];evil', "b<script>|x")]
    assert to_json(g)["edges"][0]["connections_opened"] == 1
