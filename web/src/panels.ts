// The side panel: a node's metrics, upstream, downstream and impact (GET /api/v1/workloads/{id});
// an edge's numbers from the graph, its connections and bytes over time, who observed it, its
// VXLAN tunnel and its recent flows (GET /api/v1/flows). Every number shown carries its exact
// value in data-value, so tests compare it with the API. Untrusted strings are escaped.
import { get, outcomeText, type EdgeDns, type Flow, type Flows, type Graph, type GraphEdge, type Workload, type WorkloadDetail } from "./api";
import { buckets, chart } from "./chart";
import { edgeId } from "./map";
import { byWorkload, bytes, esc, filterParams, int, when, type State } from "./state";

export interface PanelContext { graph: Graph; state: State; workloads: Map<string, Workload> | null;
  select: (kind: "node" | "edge", id: string) => void }

const panel = () => document.getElementById("panel")!;
const FLOW_PAGE = 500;

function kv(rows: [string, string, string | number | null][]): string {
  return `<dl class="kv">${rows.map(([field, label, v]) =>
    `<dt>${esc(label)}</dt><dd data-field="${esc(field)}" data-value="${esc(v ?? "")}">${
      typeof v === "number" ? esc(int(v)) : esc(v ?? "–")}</dd>`).join("")}</dl>`;
}

function chips(ids: string[], empty: string): string {
  if (!ids.length) return `<p class="muted mini">${esc(empty)}</p>`;
  return `<div class="chips">${ids.map((id) =>
    `<button type="button" class="chip" data-node="${esc(id)}">${esc(id)}</button>`).join("")}</div>`;
}

export function open(title: string, body: string, kind: string, id: string): void {
  const p = panel();
  p.hidden = false;
  p.dataset.kind = kind;
  p.dataset.id = id;
  document.getElementById("panel-title")!.textContent = title;
  document.getElementById("panel-body")!.innerHTML = body;
  p.focus();
}

export function close(): void {
  panel().hidden = true;
}

function wireChips(ctx: PanelContext): void {
  for (const b of document.querySelectorAll<HTMLButtonElement>("#panel-body .chip[data-node]")) {
    b.onclick = () => ctx.select("node", b.dataset.node!);
  }
}

function windowParams(g: Graph): URLSearchParams {
  return new URLSearchParams({ from: g.since, to: g.until });
}

export async function nodePanel(ctx: PanelContext, id: string): Promise<void> {
  const g = ctx.graph;
  const n = g.nodes.find((x) => x.id === id);
  const ins = g.edges.filter((e) => e.target === id), outs = g.edges.filter((e) => e.source === id);
  const sum = (es: GraphEdge[], f: (e: GraphEdge) => number) => es.reduce((a, e) => a + f(e), 0);
  const wl = ctx.workloads?.get(id);
  const head = kv([
    ["kind", "kind", n?.kind ?? null], ["namespace", "namespace", n?.namespace ?? null],
    ["host", "host", wl?.host ?? null], ["resolved_by", "identity from", wl?.resolved_by ?? null],
    ["callers", "callers", ins.length], ["callees", "callees", outs.length],
    ["in_connections", "connections in", sum(ins, (e) => e.connections_opened)],
    ["out_connections", "connections out", sum(outs, (e) => e.connections_opened)],
    ["in_failed", "failed in (refused, reset)", sum(ins, (e) => e.connections_failed + e.resets)],
    ["out_failed", "failed out (refused, reset)", sum(outs, (e) => e.connections_failed + e.resets)],
    ["bytes_in", "bytes received as a server", sum(ins, (e) => e.bytes_c2s)],
    ["bytes_out", "bytes sent as a server", sum(ins, (e) => e.bytes_s2c)],
  ]);
  open(id, head + `<div id="node-detail"><p class="muted mini">loading upstream and downstream…</p></div>`, "node", id);
  if (!byWorkload(g.group_by) || id === "other" || n?.kind === "Service") {
    document.getElementById("node-detail")!.innerHTML =
      `<h3>Peers</h3>${chips([...new Set([...ins.map((e) => e.source), ...outs.map((e) => e.target)])], "none")}` +
      (g.group_by === "namespace" ? `<p class="mini">Double-click the node (or <button type="button" class="chip" id="expand">expand</button>) to see its workloads.</p>` : "");
    wireChips(ctx);
    return;
  }
  try {
    const d = await get<WorkloadDetail>(`/api/v1/workloads/${encodeURIComponent(id)}`, windowParams(g));
    if (panel().dataset.id !== id) return;
    document.getElementById("node-detail")!.innerHTML =
      `<h3>Downstream: what it depends on</h3>${chips(d.downstream, "depends on nothing seen")}` +
      `<h3>Upstream: what depends on it</h3>${chips(d.upstream, "nothing calls it")}` +
      `<h3>Impact: what breaks if it breaks</h3>` +
      (d.impact.length ? `<div class="chips">${d.impact.map((i) =>
        `<button type="button" class="chip" data-node="${esc(i.workload)}" title="distance ${i.distance}">${esc(i.workload)} <span class="muted">·${i.distance}</span></button>`).join("")}</div>`
        : `<p class="muted mini">nothing</p>`);
    wireChips(ctx);
  } catch (e) {
    document.getElementById("node-detail")!.innerHTML = `<p class="err">${esc((e as Error).message)}</p>`;
  }
}

function edgeNumbers(e: GraphEdge): string {
  const obs = Object.entries(e.observed_by).sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `${k}: ${v}`).join("; ");
  return kv([
    ["connections_opened", "connections opened", e.connections_opened],
    ["connections_active", "still open at the end", e.connections_active],
    ["connections_closed", "closed", e.connections_closed],
    ["connections_failed", "failed (refused, timeout, dropped)", e.connections_failed],
    ["resets", "reset", e.resets],
    ["bytes_c2s", "bytes client → server", e.bytes_c2s],
    ["bytes_s2c", "bytes server → client", e.bytes_s2c],
    ["packets_c2s", "packets → (wire)", e.packets_c2s],
    ["packets_s2c", "packets ← (wire)", e.packets_s2c],
    ["retransmits", "retransmits", e.retransmits],
    ["drops", "packets dropped by the kernel", e.drops ? e.drops.packets : null],
    ["rtt_us", "RTT µs (min/avg/max)", e.rtt_us ? `${e.rtt_us.min} / ${e.rtt_us.avg} / ${e.rtt_us.max}` : null],
    ["ports", "server ports", e.ports.join(", ")],
    ["protocols", "protocols", e.protocols.join(", ")],
    ["encrypted", "encrypted", e.encrypted ? `${e.encrypted.toUpperCase()}: the wire could not see the connections inside` : null],
    ["mesh", "service mesh", e.mesh ? `via ${e.mesh.proxy}: ${int(e.mesh.connections)} of ${int(e.connections_opened)} connections through sidecars` : null],
    ["mesh_wire", "the wire carried (with the proxies' framing)", e.mesh && e.mesh.wire_bytes_c2s !== null
      ? `${int(e.mesh.wire_bytes_c2s)} → · ← ${int(e.mesh.wire_bytes_s2c ?? 0)} bytes` : null],
    ["observed_by", "observed by (connections)", obs],
    ["complete", "complete", e.complete ? "yes" : "no: an observer lost events"],
    ["first_seen", "first seen", when(e.first_seen)], ["last_seen", "last seen", when(e.last_seen)],
  ]) + dropReasons(e.drops) + `<p class="mini muted">${esc(bytes(e.bytes_c2s))} → · ← ${esc(bytes(e.bytes_s2c))}` +
    (e.folded > 1 ? ` · stands for ${int(e.folded)} folded edges` : "") + `</p>`;
}

const HOP_NAMES: Record<string, string> = { "app-proxy": "app → its sidecar", "proxy-proxy": "sidecar → sidecar (the network)",
  "proxy-app": "sidecar → app" };

/** The socket hops one mesh call was folded from, as its observers saw them (docs/api.md "mesh"). */
function meshHops(f: Flow): string {
  const m = f.mesh!;
  const order = ["app-proxy", "proxy-proxy", "proxy-app"];
  const hops = [...m.hops].sort((a, b) => order.indexOf(a.hop) - order.indexOf(b.hop) || a.observer.localeCompare(b.observer));
  return `<h3>Mesh hops of a call (${esc(m.proxy)})</h3><table class="mini" id="edge-mesh-hops"><thead><tr><th>hop</th>` +
    `<th>seen by</th><th>socket</th><th>bytes →/←</th><th>proxy</th></tr></thead><tbody>` +
    hops.map((h) => `<tr data-hop="${esc(h.hop)}" data-observer="${esc(h.observer)}" data-bytes="${h.bytes_c2s}/${h.bytes_s2c}">` +
      `<td>${esc(HOP_NAMES[h.hop] ?? h.hop)}</td><td>${esc(h.observer)}</td>` +
      `<td>${esc(h.client.ip)}:${h.client.port} → ${esc(h.server.ip)}:${h.server.port}</td>` +
      `<td>${esc(int(h.bytes_c2s))} / ${esc(int(h.bytes_s2c))}</td><td>${esc(h.process ?? "")}${h.pid ? ` <span class="muted">${h.pid}</span>` : ""}</td></tr>`).join("") +
    `</tbody></table><p class="mini muted">the app's bytes: ${esc(int(f.bytes_c2s))} / ${esc(int(f.bytes_s2c))}` +
    (m.wire_bytes_c2s !== null ? `; on the wire: ${esc(int(m.wire_bytes_c2s))} / ${esc(int(m.wire_bytes_s2c ?? 0))}` : "") + `</p>`;
}

/** The Service view's server end of a flow: its Service (as the graph names it), else its workload. */
function serviceEnd(f: Flow): string {
  if (!f.service_ip) return f.server.workload.id;
  if (f.service) return `svc:${f.service.namespace ? `${f.service.namespace}/` : ""}${f.service.name}`;
  return `svc:${f.service_ip}:${f.service_port}`;  // no layer names it: aggregator/service_view.py
}

/** The DNS of an edge to a resolver: its counts, latency and the names asked (docs/api.md). */
function edgeDns(d: EdgeDns): string {
  const codes = Object.entries(d.rcodes).map(([k, v]) => `${k} ${v}`).join(", ");
  const lat = d.latency_us ? `${d.latency_us.min} / ${d.latency_us.avg} / ${d.latency_us.max}` : null;
  return `<h3>DNS</h3><div id="edge-dns">` + kv([
    ["dns_queries", "queries", d.queries], ["dns_responses", "responses", d.responses],
    ["dns_nxdomain", "NXDOMAIN", d.nxdomain], ["dns_servfail", "SERVFAIL", d.servfail],
    ["dns_timeouts", "timeouts (no answer)", d.timeouts], ["dns_rcodes", "response codes", codes || null],
    ["dns_latency_us", "latency µs (min/avg/max)", lat],
  ]) + `<table class="mini" id="edge-dns-names"><thead><tr><th>name</th><th>type</th><th>asked</th>` +
    `<th>responses</th><th>no answer</th></tr></thead><tbody>` +
    d.names.map((n) => `<tr class="${Object.keys(n.rcodes).some((c) => c !== "NOERROR") || n.timeouts ? "fail" : ""}" data-name="${esc(n.name)}">` +
      `<td>${esc(n.name)}</td><td>${esc(n.type)}</td><td>${esc(int(n.count))}</td>` +
      `<td>${esc(Object.entries(n.rcodes).map(([k, v]) => `${k} ${v}`).join(", "))}</td><td>${esc(int(n.timeouts))}</td></tr>`).join("") +
    `</tbody></table>` + (d.other_names ? `<p class="mini muted">and ${esc(int(d.other_names))} queries for other names</p>` : "") +
    `</div>`;
}

function dnsNamed(e: GraphEdge): string {
  const n = e.dns_named;
  if (!n) return "";
  return `<p class="mini" id="edge-dns-named" data-ttl="${n.ttl}" data-hint="${n.hint}">${esc(e.target)} is the name the ` +
    `client got in DNS answers for these addresses: ${esc(int(n.ttl))} connections within the answer's TTL` +
    (n.hint ? `, ${esc(int(n.hint))} after it (a hint)` : "") + `</p>`;
}

/** The edge's dropped packets by the kernel's drop reason, most first (docs/policy.md "Drops"). */
function dropReasons(d: GraphEdge["drops"]): string {
  if (!d) return "";
  const rows = Object.entries(d.reasons).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  return `<h3>Dropped by the kernel</h3><ul class="mini" id="edge-drops">${rows.map(([r, n]) =>
    `<li data-reason="${esc(r)}" data-packets="${esc(n)}"><code>${esc(r)}</code> ${esc(int(n))} packets</li>`).join("")}</ul>`;
}

/** Does a flow belong to the edge source -> target under the graph's grouping? */
function onEdge(f: Flow, g: Graph, source: string, target: string): boolean {
  const key = (s: Flow["client"]) => byWorkload(g.group_by) ? s.workload.id
    : g.group_by === "namespace" ? (s.workload.namespace ?? s.workload.id) : (s.workload.host ?? "");
  const server = g.group_by === "service" ? serviceEnd(f) : key(f.server);
  return source === "other" || (key(f.client) === source && server === target);
}

/** A Service edge's backends (the Service view): each workload with the connections it served. */
function backendsTable(e: GraphEdge): string {
  if (!e.service) return "";
  const rows = [...(e.backends ?? [])].sort((a, b) => b.connections_opened - a.connections_opened || (a.id < b.id ? -1 : 1));
  return `<h3>Service ${esc(e.service.name ? (e.service.namespace ? `${e.service.namespace}/${e.service.name}` : e.service.name) : e.target.slice(4))}</h3>` +
    `<p class="mini muted" data-field="service_addresses" data-value="${esc(e.service.addresses.join(" "))}">dialled: ${esc(e.service.addresses.join(", ") || "–")}</p>` +
    `<h3>Backends: who served its connections</h3>` +
    (rows.length ? `<table class="mini backends"><thead><tr><th>backend</th><th>connections</th></tr></thead><tbody>` +
      rows.map((b) => `<tr data-field="backend" data-value="${esc(b.id)}"><td><button type="button" class="chip" data-node="${esc(b.id)}">${esc(b.id)}</button></td>` +
        `<td data-field="backend_connections" data-value="${b.connections_opened}">${esc(int(b.connections_opened))}</td></tr>`).join("") +
      `</tbody></table>` : `<p class="muted mini">no connection started in the window</p>`);
}

export async function edgePanel(ctx: PanelContext, id: string): Promise<void> {
  const g = ctx.graph;
  const e = g.edges.find((x) => edgeId(x.source, x.target) === id);
  if (!e) return;
  open(`${e.source} → ${e.target}`, edgeNumbers(e) + backendsTable(e) + dnsNamed(e) + (e.dns ? edgeDns(e.dns) : "") +
    `<div id="edge-flows"><p class="muted mini">loading its flows…</p></div>`, "edge", id);
  wireChips(ctx);
  const p = filterParams(ctx.state);
  p.set("since", g.since); p.set("until", g.until); p.set("limit", String(FLOW_PAGE)); p.set("sort", "-start");
  if (byWorkload(g.group_by) && e.source !== "other") {
    const sn = g.nodes.find((n) => n.id === e.source), tn = g.nodes.find((n) => n.id === e.target);
    if (sn) p.append("from_workload", sn.name);
    // a name from DNS answers is shown, not stored: the flows' filter knows the stored name
    if (e.service) {  // a Service edge: the calls through its addresses
      for (const a of e.service.addresses) p.append("to_service", a.replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1"));
    } else if (tn && tn.kind !== "DNS") p.append("to_workload", tn.name);
  }
  try {
    const res = await get<Flows>("/api/v1/flows", p);
    if (panel().dataset.id !== id) return;
    const flows = res.flows.filter((f) => onEdge(f, g, e.source, e.target));
    const since = Date.parse(g.since), until = Date.parse(g.until);
    const tunnels = new Map<string, number>();
    for (const f of flows) if (f.tunnel) {
      const t = f.tunnel;
      const k = `VNI ${t.vni}: ${t.vtep_src_host ?? t.vtep_src} → ${t.vtep_dst_host ?? t.vtep_dst}`;
      tunnels.set(k, (tunnels.get(k) ?? 0) + 1);
    }
    const meshed = flows.find((f) => f.mesh);
    const tun = [...tunnels].map(([k, n]) => `<li data-field="tunnel">${esc(k)} <span class="muted">(${n} flows)</span></li>`).join("");
    document.getElementById("edge-flows")!.innerHTML =
      `<h3>Over the window</h3>${chart(buckets(flows, since, until))}` +
      `<p class="mini muted">bars: connections started (failed in the failure colour); line: bytes` +
      (res.next_cursor ? `; the latest ${FLOW_PAGE} connections only` : "") + `</p>` +
      `<h3>Tunnel</h3>${tun ? `<ul class="mini">${tun}</ul>` : `<p class="mini muted">no VXLAN: the wire did not see these flows on an underlay</p>`}` +
      (meshed?.mesh ? meshHops(meshed) : "") +
      `<h3>Recent flows</h3><table class="mini"><thead><tr><th>start</th><th>client</th><th>port</th><th>outcome</th><th>bytes →/←</th><th>seen by</th></tr></thead><tbody>` +
      flows.slice(0, 12).map((f) => `<tr class="${f.outcome === "ok" ? "" : "fail"}"><td>${esc(when(f.start).slice(11, 19))}</td>` +
        `<td>${esc(f.client.ip)}:${f.client.port}</td><td>${f.server.port}</td><td class="outcome">${esc(outcomeText(f))}</td>` +
        `<td>${esc(int(f.bytes_c2s))} / ${esc(int(f.bytes_s2c))}</td><td>${esc(f.observed_by.join(","))}</td></tr>`).join("") +
      `</tbody></table><p class="mini"><button type="button" class="chip" id="edge-to-flows">all its flows in the Flows view</button></p>`;
    document.getElementById("edge-to-flows")!.onclick = () => {
      const own = [...p].filter(([k]) => k === "from_workload" || k === "to_workload" || k === "to_service");
      window.dispatchEvent(new CustomEvent("eastwest:flows", { detail: own.map(([k, v]) => `${k}=${v}`).join(" ") }));
    };
  } catch (err) {
    document.getElementById("edge-flows")!.innerHTML = `<p class="err">${esc((err as Error).message)}</p>`;
  }
}
