#!/usr/bin/env python3
"""Generates eastwest's Grafana dashboards (the JSON files beside this script) from one source.

Run `python dashboards/build.py` after changing it; `python dashboards/build.py --check` exits 1
when a JSON file is not what this script makes (tests/unit/test_dashboards.py runs it).

In: nothing but this file. Out: four dashboards (Grafana schema 39, Grafana 10+):
- eastwest-service-map.json  the service map: a Node Graph panel fed from Prometheus (workloads as
                             nodes, client -> server edges) and the edge table;
- eastwest-edge-detail.json  one edge (or a set, by regex) over time: bytes, connections,
                             failures, retransmits, RTT quantiles;
- eastwest-health.json       collectors and aggregator: records, drops (lost events included),
                             spool, ingest, store, correlator, exporters, OTLP;
- eastwest-tempo.json        Tempo's service graph (built by Tempo's metrics-generator from the
                             span pairs eastwest exports, docs/integrations.md) and trace search.

Datasources are variables (`${datasource}`, `${tempo}`), never UIDs of one installation. Every
metric name used here is defined in aggregator/ or collector/ code (a test checks it), and every
PromQL expression returns data against a real Prometheus scraping a lab run (a lab test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROM = {"type": "prometheus", "uid": "${datasource}"}
TEMPO = {"type": "tempo", "uid": "${tempo}"}
EDGE = 'client=~"$client", server=~"$server", server_port=~"$port"'


# -- building blocks -----------------------------------------------------------------------------
def datasource_var(name: str, kind: str, label: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "datasource", "query": kind, "current": {},
            "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False,
            "multi": False}


def query_var(name: str, label: str, metric: str, label_name: str) -> dict[str, Any]:
    q = f"label_values({metric}, {label_name})"
    return {"name": name, "label": label, "type": "query", "datasource": PROM,
            "query": {"query": q, "refId": f"var-{name}"}, "definition": q, "refresh": 2,
            "includeAll": True, "allValue": ".*", "multi": True, "sort": 1, "hide": 0,
            "current": {"text": "All", "value": "$__all"}, "options": [], "regex": ""}


def prom(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
         table: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": PROM, "refId": ref, "expr": expr, "legendFormat": legend,
                         "range": not instant, "instant": instant, "editorMode": "code"}
    if table:
        t["format"] = "table"
    return t


class Layout:
    """Places panels left to right, 24 columns wide, and numbers them."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = self.next_id
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0


def timeseries(title: str, targets: list[dict[str, Any]], unit: str, desc: str = "") -> dict[str, Any]:
    return {"type": "timeseries", "title": title, "description": desc, "datasource": PROM,
            "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "custom": {"fillOpacity": 10}}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["mean", "max"]}, "tooltip": {"mode": "multi"}}}


def stat(title: str, expr: str, unit: str) -> dict[str, Any]:
    return {"type": "stat", "title": title, "datasource": PROM,
            "targets": [prom(expr, instant=True)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}}


def dashboard(uid: str, title: str, desc: str, variables: list[dict[str, Any]],
              layout: Layout, time_from: str = "now-1h") -> dict[str, Any]:
    return {"uid": uid, "title": title, "description": desc, "tags": ["eastwest"],
            "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
            "time": {"from": time_from, "to": "now"}, "refresh": "30s", "timezone": "",
            "templating": {"list": variables}, "annotations": {"list": []},
            "links": [{"title": "eastwest", "type": "dashboards", "tags": ["eastwest"],
                       "asDropdown": True}],
            "panels": layout.panels}


# -- the service map -----------------------------------------------------------------------------
def service_map() -> dict[str, Any]:
    conns = 'sum by ({by}) (increase(eastwest_edge_connections_total{{job=~"$job"}}[$__range]))'
    node = ('label_replace(label_replace(label_join({inner}, "id", "/", "{side}_namespace", "{side}"),'
            ' "title", "$1", "{side}", "(.*)"), "subtitle", "$1", "{side}_namespace", "(.*)")')
    nodes_expr = ("sum by (id, title, subtitle) (" +
                  node.format(inner=conns.format(by="server, server_namespace"), side="server") +
                  ") or sum by (id, title, subtitle) (" +
                  node.format(inner=conns.format(by="client, client_namespace"), side="client") + ")")
    edges_expr = ('label_join(label_join(label_join(' +
                  conns.format(by="client, client_namespace, server, server_namespace") +
                  ', "source", "/", "client_namespace", "client"), "target", "/", '
                  '"server_namespace", "server"), "id", " -> ", "source", "target")')
    lay = Layout()
    lay.add({"type": "nodegraph", "title": "Service map: connections in the time range",
             "description": "Workloads (namespace/name) and who connects to whom, from the "
             "aggregator's per-edge series. Node: connections received (or made, for clients "
             "only). Edge: connections opened.",
             "datasource": PROM,
             "targets": [prom(nodes_expr, ref="nodes", instant=True, table=True),
                         prom(edges_expr, ref="edges", instant=True, table=True)],
             "transformations": [{"id": "organize", "options": {"renameByName": {
                 "Value #nodes": "mainstat", "Value #edges": "mainstat"},
                 "excludeByName": {"Time": True}}}],
             "options": {"nodes": {"mainStatUnit": "short"}, "edges": {"mainStatUnit": "short"}}},
            24, 16)
    table_expr = {
        "connections": 'sum by (client, server, server_port, protocol) (increase(eastwest_edge_connections_total{job=~"$job"}[$__range]))',
        "bytes": 'sum by (client, server, server_port, protocol) (increase(eastwest_edge_bytes_total{job=~"$job"}[$__range]))',
        "failures": 'sum by (client, server, server_port, protocol) (increase(eastwest_edge_failures_total{job=~"$job"}[$__range]))',
    }
    lay.add({"type": "table", "title": "Edges in the time range", "datasource": PROM,
             "targets": [prom(e, ref=k, instant=True, table=True) for k, e in table_expr.items()],
             "transformations": [{"id": "merge", "options": {}},
                                 {"id": "organize", "options": {
                                     "excludeByName": {"Time": True},
                                     "renameByName": {"Value #connections": "connections",
                                                      "Value #bytes": "bytes",
                                                      "Value #failures": "failures"}}}],
             "fieldConfig": {"defaults": {}, "overrides": [
                 {"matcher": {"id": "byName", "options": "bytes"},
                  "properties": [{"id": "unit", "value": "bytes"}]}]},
             "options": {"sortBy": [{"displayName": "bytes", "desc": True}]}}, 24, 10)
    return dashboard("eastwest-service-map", "eastwest / service map",
                     "Who talks to whom: workloads and their connections, from Prometheus.",
                     [datasource_var("datasource", "prometheus", "Prometheus"),
                      query_var("job", "aggregator job", "eastwest_edge_series", "job")], lay)


# -- edge detail ---------------------------------------------------------------------------------
def edge_detail() -> dict[str, Any]:
    sel = '{job=~"$job", ' + EDGE + "}"
    lay = Layout()
    lay.add(stat("Connections in range", f"sum(increase(eastwest_edge_connections_total{sel}[$__range]))", "short"), 6, 4)
    lay.add(stat("Failed in range", f"sum(increase(eastwest_edge_failures_total{sel}[$__range]))", "short"), 6, 4)
    lay.add(stat("Bytes in range", f"sum(increase(eastwest_edge_bytes_total{sel}[$__range]))", "bytes"), 6, 4)
    lay.add(stat("Retransmits in range", f"sum(increase(eastwest_edge_retransmits_total{sel}[$__range]))", "short"), 6, 4)
    lay.add(timeseries("Bytes per second, each way", [prom(
        f"sum by (client, server, direction) (rate(eastwest_edge_bytes_total{sel}[$__rate_interval]))",
        "{{client}} -> {{server}} {{direction}}")], "Bps",
        "c2s: client to server; s2c: server to client (payload bytes)"))
    lay.add(timeseries("Connections opened per second", [prom(
        f"sum by (client, server, server_port) (rate(eastwest_edge_connections_total{sel}[$__rate_interval]))",
        "{{client}} -> {{server}}:{{server_port}}")], "cps"))
    lay.add(timeseries("Failures per second, by reason", [prom(
        f"sum by (client, server, reason) (rate(eastwest_edge_failures_total{sel}[$__rate_interval]))",
        "{{client}} -> {{server}} {{reason}}")], "cps",
        "refused (nobody listened), reset (RST on an established connection), timeout"))
    lay.add(timeseries("Retransmitted segments per second", [prom(
        f"sum by (client, server) (rate(eastwest_edge_retransmits_total{sel}[$__rate_interval]))",
        "{{client}} -> {{server}}")], "short"))
    rtt = f"sum by (le) (rate(eastwest_edge_rtt_seconds_bucket{sel}[$__rate_interval]))"
    lay.add(timeseries("RTT (smoothed, per completed connection)", [
        prom(f"histogram_quantile(0.5, {rtt})", "p50", "A"),
        prom(f"histogram_quantile(0.95, {rtt})", "p95", "B"),
        prom(f"sum(rate(eastwest_edge_rtt_seconds_sum{sel}[$__rate_interval])) / "
             f"sum(rate(eastwest_edge_rtt_seconds_count{sel}[$__rate_interval]))", "mean", "C")],
        "s"), 24)
    return dashboard("eastwest-edge-detail", "eastwest / edge detail",
                     "One edge, or every edge matching the variables, over time.",
                     [datasource_var("datasource", "prometheus", "Prometheus"),
                      query_var("job", "aggregator job", "eastwest_edge_series", "job"),
                      query_var("client", "client", "eastwest_edge_connections_total", "client"),
                      query_var("server", "server", "eastwest_edge_connections_total", "server"),
                      query_var("port", "server port", "eastwest_edge_connections_total", "server_port")],
                     lay)


# -- health --------------------------------------------------------------------------------------
def health() -> dict[str, Any]:
    agg, col = '{job=~"$job"}', '{job=~"$collector_job"}'
    ri = "$__rate_interval"
    lay = Layout()
    lay.row("Everything dropped (collectors and aggregator)")
    lay.add(timeseries("Dropped per second, by stage and reason", [prom(
        f"sum by (job, instance, stage, reason) (rate(eastwest_dropped_total[{ri}]))",
        "{{instance}} {{stage}}/{{reason}}")], "short",
        "Every record, event, batch or span dropped anywhere, with the stage that dropped it: "
        "probes (kernel ring/map losses: lost events), vxlan, spool, export, ingest, stream, "
        "exporters, otlp."), 24)
    lay.row("Collectors")
    lay.add(timeseries("Records handed to export / acknowledged", [
        prom(f"sum by (instance) (rate(eastwest_records_in_total{col}[{ri}]))", "{{instance}} in", "A"),
        prom(f"sum by (instance) (rate(eastwest_records_out_total{col}[{ri}]))", "{{instance}} acked", "B")],
        "short"))
    lay.add(timeseries("Spool", [
        prom(f"sum by (instance) (eastwest_spool_bytes{col})", "{{instance}} bytes", "A")], "bytes",
        "Batches waiting on disk for the aggregator: grows while it is unreachable."))
    lay.add(timeseries("Export: attempts per second and p95 time to acknowledgement", [
        prom(f"sum by (instance) (rate(eastwest_export_attempts_total{col}[{ri}]))", "{{instance}} attempts", "A"),
        prom(f"histogram_quantile(0.95, sum by (instance, le) (rate(eastwest_export_batch_seconds_bucket{col}[{ri}])))",
             "{{instance}} p95 s", "B")], "short"))
    lay.add(timeseries("Spooled batches and records", [
        prom(f"sum by (instance) (eastwest_spool_batches{col})", "{{instance}} batches", "A"),
        prom(f"sum by (instance) (eastwest_spool_records{col})", "{{instance}} records", "B")], "short"))
    lay.add(timeseries("Socket probes: connection map fill", [
        prom(f"max by (instance) (eastwest_probe_map_entries{col} / eastwest_probe_map_capacity{col})",
             "{{instance}} fill", "A"),
        prom(f"sum by (instance) (rate(eastwest_probe_kernel_events_total{{job=~\"$collector_job\", event=\"opened\"}}[{ri}]))",
             "{{instance}} tracked /s", "B")], "percentunit",
        "Entries of the kernel's connection map over its capacity (--map-entries), at the last "
        "interval. Near 100% the kernel cannot track new connections (drops: probes/conn_map_full)."))
    lay.row("Aggregator")
    lay.add(timeseries("Ingest: records in / stored per second", [
        prom(f"sum(rate(eastwest_records_in_total{agg}[{ri}]))", "received", "A"),
        prom(f"sum(rate(eastwest_records_out_total{agg}[{ri}]))", "stored", "B")], "short"))
    lay.add(timeseries("Ingest batches by result, and p95 store time", [
        prom(f"sum by (result) (rate(eastwest_ingest_batches_total{agg}[{ri}]))", "{{result}}", "A"),
        prom(f"histogram_quantile(0.95, sum by (le) (rate(eastwest_ingest_batch_seconds_bucket{agg}[{ri}])))",
             "p95 s", "B")], "short"))
    lay.add(timeseries("Store", [
        prom(f"sum(eastwest_store_records{agg})", "records", "A"),
        prom(f"sum(eastwest_store_bytes{agg})", "bytes on disk", "B")], "short"))
    lay.add(timeseries("Correlator and exporters", [
        prom(f"sum(eastwest_correlator_connections{agg})", "connections in the index", "A"),
        prom(f"sum(eastwest_export_pending_connections{agg})", "waiting to complete", "B"),
        prom(f"sum(rate(eastwest_export_completed_connections_total{agg}[{ri}]))", "completed /s", "C"),
        prom(f"sum(eastwest_edge_series{agg})", "edge series (budget)", "D")], "short"))
    lay.add(timeseries("OTLP: spans exported, queued; requests by result", [
        prom(f"sum(rate(eastwest_otlp_spans_exported_total{agg}[{ri}]))", "spans exported /s", "A"),
        prom(f"sum(eastwest_otlp_queue_spans{agg})", "spans queued", "B"),
        prom(f"sum by (result) (rate(eastwest_otlp_export_requests_total{agg}[{ri}]))", "requests {{result}} /s", "C"),
        prom(f"sum by (result) (rate(eastwest_otlp_connections_total{agg}[{ri}]))", "connections {{result}} /s", "D"),
        prom(f"sum by (reason) (rate(eastwest_otlp_late_spans_total{agg}[{ri}]))", "late spans {{reason}} /s", "E")],
        "short", "Spans dropped by the OTLP exporter are in the drops panel (stage otlp). Late "
        "spans were older than Tempo's ingestion slack when sent: Tempo keeps the trace, its "
        "service graph misses the edge (docs/integrations.md)."), 24)
    return dashboard("eastwest-health", "eastwest / collectors and aggregator",
                     "Is eastwest seeing everything? Drops, spool, ingest, store, exporters.",
                     [datasource_var("datasource", "prometheus", "Prometheus"),
                      query_var("job", "aggregator job", "eastwest_store_records", "job"),
                      query_var("collector_job", "collector job", "eastwest_spool_bytes", "job")],
                     lay)


# -- Tempo ---------------------------------------------------------------------------------------
# a label selector on Tempo's traces_service_graph_* series, with the labels Tempo writes when it
# keeps eastwest's namespaces (docs/integrations.md: dimensions [service.namespace] with
# enable_client_server_prefix); tested against the Tempo double (tests/unit/test_dashboards.py)
SERVICE_MAP_QUERY = ('{client_service_namespace=~"$namespace", client=~"$service"}')


def tempo() -> dict[str, Any]:
    lay = Layout()
    lay.add({"type": "nodegraph", "title": "Tempo service graph",
             "description": "Built by Tempo's metrics-generator (service-graphs processor) from the "
             "CLIENT/SERVER span pairs eastwest exports; needs the Tempo datasource's service "
             "graph set to the Prometheus that receives Tempo's remote write.",
             "datasource": TEMPO,
             "targets": [{"datasource": TEMPO, "refId": "A", "queryType": "serviceMap",
                          "serviceMapQuery": SERVICE_MAP_QUERY}]}, 24, 14)
    search = ('{ resource.service.name =~ "$service" && '
              'span.eastwest.connection.outcome =~ "$outcome" }')
    lay.add({"type": "table", "title": "Connections (span pairs) in Tempo",
             "description": "One trace per connection; its trace id is eastwest's conn_id.",
             "datasource": TEMPO,
             "targets": [{"datasource": TEMPO, "refId": "A", "queryType": "traceql",
                          "query": search, "limit": 50, "tableType": "traces"}]}, 24, 10)
    lay.add({"type": "table", "title": "Failed connections (refused, reset, timeout)",
             "datasource": TEMPO,
             "targets": [{"datasource": TEMPO, "refId": "A", "queryType": "traceql",
                          "query": '{ status = error && resource.service.name =~ "$service" }',
                          "limit": 50, "tableType": "traces"}]}, 24, 10)
    return dashboard("eastwest-tempo", "eastwest / Tempo service graph and traces",
                     "eastwest's connections as traces in Tempo.",
                     [datasource_var("tempo", "tempo", "Tempo"),
                      {"name": "namespace", "label": "client namespace (regex)", "type": "textbox",
                       "query": ".*", "current": {"text": ".*", "value": ".*"}, "hide": 0},
                      {"name": "service", "label": "service (regex)", "type": "textbox",
                       "query": ".*", "current": {"text": ".*", "value": ".*"}, "hide": 0},
                      {"name": "outcome", "label": "outcome", "type": "custom",
                       "query": "ok,refused,reset,timeout", "includeAll": True, "allValue": ".*",
                       "multi": True, "current": {"text": "All", "value": "$__all"},
                       "options": [], "hide": 0}],
                     lay)


DASHBOARDS = {
    "eastwest-service-map.json": service_map,
    "eastwest-edge-detail.json": edge_detail,
    "eastwest-health.json": health,
    "eastwest-tempo.json": tempo,
}


def render(make: Any) -> str:
    return json.dumps(make(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, make in DASHBOARDS.items():
        path = HERE / name
        text = render(make)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run python dashboards/build.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
