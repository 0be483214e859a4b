// The dashboard's wiring: state <-> controls, the refresh loop (live: every 5 s), folding past
// the budget, diff mode, the panels, the flows view, themes, and the states that tell a user
// what to do (no token, token refused, aggregator unreachable, nothing collected yet).
// Talks to nothing but the aggregator's read API (docs/api.md), same origin.
import "./styles.css";
import { ApiError, get, setToken, token, tokenFromFragment, type Diff, type Graph, type Workload } from "./api";
import { FlowsView } from "./flows";
import { edgeId, ServiceMap, type Rendered } from "./map";
import { close as closePanel, edgePanel, nodePanel, type PanelContext } from "./panels";
import { apiGroup, byWorkload, filterParams, int, load, save, windowParams, type Group, type State } from "./state";
import { notice, showEmpty, showError } from "./notices";

const LIVE_MS = 5000;
export const NODE_BUDGET = 400;    // past this many workloads, or
export const EDGE_BUDGET = 2500;   // this many edges, workloads fold into their namespaces

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const st: State = load();
const map = new ServiceMap($("map"));
const flows = new FlowsView(() => st);
let graph: Graph | null = null;
let workloads: Map<string, Workload> | null = null;
let diff: Diff | null = null;
let inflight: AbortController | null = null;
let seq = 0;
let last: Rendered | null = null;
let folded: { nodes: number; edges: number } | null = null;
const namespaces = new Set<string>();

declare global { interface Window { eastwest: Record<string, unknown> } }
window.eastwest = { cy: map.cy, state: st, seq: 0 };

function status(text: string): void { $("status").textContent = text; }

// ---- theme -----------------------------------------------------------------------------------
function theme(t?: string): void {
  const chosen = t ?? localStorage.getItem("eastwest.theme") ??
    (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  document.documentElement.dataset.theme = chosen;
  localStorage.setItem("eastwest.theme", chosen);
  map.restyle();
}
$("theme").onclick = () => theme(document.documentElement.dataset.theme === "dark" ? "light" : "dark");

// ---- errors ----------------------------------------------------------------------------------
/** Handle the failures that are about the whole page; true when handled. */
function pageError(e: ApiError): boolean {
  if (e.kind === "unauthorized" || e.kind === "forbidden") {
    const why = e.kind === "forbidden"
      ? "This is the aggregator's ingest token: the dashboard needs the read token."
      : token() ? `The aggregator refused this token (${e.message}).` : "The aggregator asks for its read token.";
    $("login-why").textContent = why;
    $("map").dataset.state = "login";
    const d = $<HTMLDialogElement>("login");
    if (!d.open) d.showModal();
    status("waiting for the read token");
    return true;
  }
  if (e.kind === "unreachable" || e.kind === "unavailable") {
    showError(e);
    $("map").dataset.state = "error";
    status(`retrying every ${LIVE_MS / 1000} s`);
    return true;
  }
  return false;
}

$("login-form").addEventListener("submit", () => {
  setToken($<HTMLInputElement>("login-token").value);
  $<HTMLInputElement>("login-token").value = "";
  void refresh(true);
});

// ---- the map ---------------------------------------------------------------------------------
function ctx(): PanelContext {
  return { graph: graph!, state: effective(), workloads, select };
}

function effective(): State {
  return folded ? { ...st, group: "namespace" as Group } : st;
}

function select(kind: "node" | "edge", id: string): void {
  if (!graph) return;
  map.focus(id);
  $("panel").dataset.selected = id;
  void (kind === "node" ? nodePanel(ctx(), id) : edgePanel(ctx(), id));
  const exp = document.getElementById("expand");
  if (exp) exp.onclick = () => expand(id);
}
map.onSelect = select;
map.onClear = () => { closePanel(); map.cy.elements().unselect(); };
map.onExpand = (ns) => expand(ns);

function expand(ns: string): void {
  st.namespace = ns;
  if (st.group === "namespace") st.group = "namespace-box";
  controlsFromState();
  changed();
}

async function refresh(force = false): Promise<void> {
  if (st.view !== "map") return;
  inflight?.abort();
  const ac = new AbortController();
  inflight = ac;
  status("loading…");
  try {
    const p = windowParams(st, filterParams(st));
    p.set("group_by", apiGroup(st.group, st.services));
    if (st.proxies) p.set("show_proxies", "true");
    let g = await get<Graph>("/api/v1/graph", p, ac.signal);
    folded = null;
    if (st.fold && byWorkload(g.group_by) && (g.nodes.length > NODE_BUDGET || g.edges.length > EDGE_BUDGET)) {
      folded = { nodes: g.nodes.length, edges: g.edges.length };
      p.set("group_by", "namespace");
      g = await get<Graph>("/api/v1/graph", p, ac.signal);
    }
    workloads = null;
    if (st.group === "host-box" && !folded) {
      const wp = windowParams(st, filterParams(st));
      const res = await get<{ workloads: Workload[] }>("/api/v1/workloads", wp, ac.signal);
      workloads = new Map(res.workloads.map((w) => [w.id, w]));
    }
    diff = null;
    if (st.diff) {
      const dp = filterParams(st);
      dp.set("a_from", st.aFrom); dp.set("a_to", st.aTo);
      dp.set("b_from", g.since); dp.set("b_to", g.until);
      dp.set("group_by", g.group_by);
      diff = await get<Diff>("/api/v1/diff", dp, ac.signal);
    }
    if (ac.signal.aborted) return;
    graph = g;
    for (const n of g.nodes) if (n.namespace) namespaces.add(n.namespace);
    namespaceOptions();
    last = await map.render(g, effective(), workloads, diff, force);
    // the empty notice asks /readyz whether the store or the window is empty; it is settled
    // before the render counts as done, and a newer refresh (aborted signal) wins
    if (last.nodes === 0) await showEmpty(st, g, ac.signal);
    if (ac.signal.aborted) return;
    afterRender(g);
  } catch (e) {
    if ((e as Error).name === "AbortError") return;
    if (e instanceof ApiError && pageError(e)) return;
    showError(e as Error);
    $("map").dataset.state = "error";
    status("error");
  } finally {
    if (inflight === ac) inflight = null;
  }
}

function afterRender(g: Graph): void {
  const banner = $("banner");
  banner.hidden = !folded && !g.folded_edges;
  banner.textContent = folded
    ? `${int(folded.nodes)} workloads and ${int(folded.edges)} edges are more than this map shows well ` +
      `(budget ${NODE_BUDGET} workloads / ${int(EDGE_BUDGET)} edges): folded into their namespaces. ` +
      `Double-click a namespace, or pick one in the filter, to see its workloads.`
    : g.folded_edges ? `${int(g.folded_edges)} light edges are folded into "other → other" by the aggregator's edge budget.` : "";
  const n = last!.nodes, m = last!.edges;
  $("counts").textContent = `${int(n)} nodes · ${int(m)} edges · ${g.since.slice(11, 19)}–${g.until.slice(11, 19)} UTC` +
    (st.live ? " · live" : "");
  if (diff) {
    $("diff-summary").innerHTML = `<b>${diff.added.length}</b> added, <b>${diff.removed.length}</b> removed, <b>${diff.changed.length}</b> changed`;
  }
  if (n > 0) notice(null);
  $("map").dataset.state = n === 0 ? "empty" : "ready";
  elementList();
  seq++;
  Object.assign(window.eastwest, { seq, graph: g, diff, folded, rendered: last, group: effective().group });
  $("map").dataset.seq = String(seq);
  status(`${st.live ? "live, " : ""}updated ${new Date().toLocaleTimeString()}` +
    (last!.layoutMs !== null ? ` · layout ${Math.round(last!.layoutMs)} ms` : ""));
  const sel = $("panel").hidden ? null : $("panel").dataset.id;
  if (sel && map.cy.getElementById(sel).nonempty() && st.live) {
    map.cy.getElementById(sel).select();
  }
}

/** A keyboard way into the map: every edge as a focusable item; Enter opens its panel. */
function elementList(): void {
  const ul = $("edge-items");
  if (!($("element-list") as HTMLDetailsElement).open || !graph) { ul.innerHTML = ""; return; }
  ul.innerHTML = "";
  const items: [string, string, string][] = [
    ...graph.nodes.map((n) => ["node", n.id, `node ${n.id}`] as [string, string, string]),
    ...graph.edges.map((e) => ["edge", edgeId(e.source, e.target),
      `edge ${e.source} → ${e.target}: ${int(e.connections_opened)} connections`] as [string, string, string])];
  for (const [kind, id, text] of items.slice(0, 2000)) {
    const li = document.createElement("li");
    li.tabIndex = 0; li.setAttribute("role", "option"); li.textContent = text;
    li.onclick = () => select(kind as "node" | "edge", id);
    li.onkeydown = (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); select(kind as "node" | "edge", id); } };
    ul.appendChild(li);
  }
}
$("element-list").addEventListener("toggle", elementList);

// ---- controls --------------------------------------------------------------------------------
function namespaceOptions(): void {
  const sel = $<HTMLSelectElement>("f-namespace");
  const have = new Set([...sel.options].map((o) => o.value));
  for (const ns of [...namespaces].sort()) if (!have.has(ns)) sel.add(new Option(ns, ns));
  if (st.namespace && !have.has(st.namespace) && !namespaces.has(st.namespace)) sel.add(new Option(st.namespace, st.namespace));
  sel.value = st.namespace;
  const dl = $("workload-names");
  if (graph && byWorkload(graph.group_by)) {
    dl.innerHTML = graph.nodes.map((n) => `<option value="${n.name.replace(/"/g, "&quot;")}">`).join("");
  }
}

function controlsFromState(): void {
  $<HTMLInputElement>("from").value = st.from;
  $<HTMLInputElement>("to").value = st.live ? "now" : st.to;
  $("live").setAttribute("aria-pressed", String(st.live));
  const preset = $<HTMLSelectElement>("preset");
  preset.value = st.live && [...preset.options].some((o) => o.value === st.from) ? st.from : "custom";
  $<HTMLSelectElement>("group").value = st.group;
  $<HTMLInputElement>("f-workload").value = st.workload;
  $<HTMLInputElement>("f-port").value = st.port;
  $<HTMLSelectElement>("f-protocol").value = st.protocol;
  $<HTMLInputElement>("f-failing").checked = st.failing;
  $<HTMLInputElement>("f-link-local").checked = st.linkLocal;
  $<HTMLSelectElement>("server-view").value = st.services ? "service" : "workload";
  $<HTMLInputElement>("f-proxies").checked = st.proxies;
  $<HTMLInputElement>("search").value = st.search;
  $<HTMLSelectElement>("width-by").value = st.widthBy;
  $("legend-width").textContent = st.widthBy;
  $("diff-toggle").setAttribute("aria-pressed", String(st.diff));
  $("diff-bar").hidden = !st.diff;
  $<HTMLInputElement>("a-from").value = st.aFrom;
  $<HTMLInputElement>("a-to").value = st.aTo;
  namespaceOptions();
  $("tab-map").setAttribute("aria-pressed", String(st.view === "map"));
  $("tab-flows").setAttribute("aria-pressed", String(st.view === "flows"));
  $("view-map").hidden = st.view !== "map";
  $("view-flows").hidden = st.view !== "flows";
  $("filters").querySelectorAll<HTMLElement>(".map-only").forEach((e) => { e.hidden = st.view !== "map"; });
}

function changed(force = false): void {
  save(st);
  controlsFromState();
  if (st.view === "map") void refresh(force); else void flows.load();
}

const onChange = (id: string, f: (v: string, el: HTMLInputElement) => void) => {
  const el = $<HTMLInputElement>(id);
  el.addEventListener("change", () => { f(el.value, el); changed(); });
};
onChange("f-namespace", (v) => { st.namespace = v; });
onChange("f-workload", (v) => { st.workload = v.trim(); });
onChange("f-port", (v) => { st.port = v.trim(); });
onChange("f-protocol", (v) => { st.protocol = v; });
onChange("f-failing", (_v, el) => { st.failing = el.checked; });
onChange("f-link-local", (_v, el) => { st.linkLocal = el.checked; });
onChange("group", (v) => { st.group = v as Group; closePanel(); });
onChange("server-view", (v) => { st.services = v === "service"; closePanel(); });
onChange("f-proxies", (_v, el) => { st.proxies = el.checked; closePanel(); });
onChange("width-by", (v) => { st.widthBy = v as State["widthBy"]; });
onChange("preset", (v) => {
  if (v === "custom") { st.live = false; st.from = graph?.since ?? st.from; st.to = graph?.until ?? "now"; $("from").focus(); return; }
  st.from = v; st.to = "now"; st.live = true;
});
$("apply").onclick = () => {
  st.from = $<HTMLInputElement>("from").value.trim() || "15m";
  const to = $<HTMLInputElement>("to").value.trim();
  st.live = !to || to === "now";
  st.to = st.live ? "now" : to;
  st.aFrom = $<HTMLInputElement>("a-from").value.trim() || st.aFrom;
  st.aTo = $<HTMLInputElement>("a-to").value.trim() || st.aTo;
  changed();
};
for (const id of ["from", "to", "a-from", "a-to"]) {
  $(id).addEventListener("keydown", (e) => { if ((e as KeyboardEvent).key === "Enter") $("apply").click(); });
}
function travel(dir: -1 | 1): void {
  if (!graph) return;
  const s = Date.parse(graph.since), u = Date.parse(graph.until), len = u - s;
  const ns = s + dir * len, nu = u + dir * len;
  if (nu >= Date.now()) { st.live = true; st.from = `${Math.round(len / 1000)}s`; st.to = "now"; }
  else { st.live = false; st.from = new Date(ns).toISOString(); st.to = new Date(nu).toISOString(); }
  changed();
}
$("back").onclick = () => travel(-1);
$("fwd").onclick = () => travel(1);
$("live").onclick = () => {
  if (st.live && graph) { st.live = false; st.from = graph.since; st.to = graph.until; }
  else { st.live = true; st.from = "15m"; st.to = "now"; }
  changed();
};
$("diff-toggle").onclick = () => {
  st.diff = !st.diff;
  if (st.diff && graph && (!st.aFrom || !st.aTo)) {
    const s = Date.parse(graph.since), len = Date.parse(graph.until) - s;
    st.aFrom = new Date(s - len).toISOString(); st.aTo = graph.since;
  }
  changed(true);
};
$("relayout").onclick = () => void refresh(true);
$("search").addEventListener("input", () => { st.search = $<HTMLInputElement>("search").value; save(st); map.searchMark(st.search); });
$("search").addEventListener("keydown", (e) => {
  if ((e as KeyboardEvent).key !== "Enter") return;
  const hit = map.searchMark(st.search).first();
  if (hit.nonempty()) select("node", hit.id());
});
$("tab-map").onclick = () => { st.view = "map"; flows.stopTail(); changed(); };
$("tab-flows").onclick = () => { st.view = "flows"; closePanel(); changed(); };
$("panel-close").onclick = () => map.onClear();
flows.onError = pageError;
window.addEventListener("eastwest:flows", (e) => { st.view = "flows"; save(st); controlsFromState(); flows.show((e as CustomEvent).detail); });
document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes((e.target as HTMLElement).tagName);
  if (e.key === "Escape" && !$("panel").hidden) { map.onClear(); return; }
  if (e.key === "/" && !typing) { e.preventDefault(); $("search").focus(); }
});

// ---- start -----------------------------------------------------------------------------------
tokenFromFragment();
theme();
controlsFromState();
setInterval(() => {
  if (st.live && st.view === "map" && !document.hidden && !inflight && !$<HTMLDialogElement>("login").open) void refresh();
}, LIVE_MS);
// an unreachable aggregator is retried even outside live mode
setInterval(() => { if ($("map").dataset.state === "error" && !inflight) void refresh(); }, LIVE_MS);
if (st.view === "flows") void flows.load(); else void refresh();
