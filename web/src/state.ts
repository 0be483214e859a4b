// What the user chose (view, window, filters, grouping), kept in the address bar so a view can
// be shared and reloaded, and turned into the API's query parameters (docs/api.md: filters are
// eastwest/filters.py's names, repeatable, `not_` negates).

export type Group = "namespace-box" | "host-box" | "workload" | "namespace" | "host";

export interface State {
  view: "map" | "flows";
  live: boolean;
  from: string;          // API time: 15m, now, RFC 3339
  to: string;
  diff: boolean;
  aFrom: string;
  aTo: string;
  group: Group;
  namespace: string;
  workload: string;
  port: string;
  protocol: string;
  failing: boolean;
  linkLocal: boolean;    // include link-local and multicast traffic (hidden by default)
  search: string;
  widthBy: "bytes" | "connections";
  layout: string;        // fcose (default); cose for the benchmark's peer run
  fold: boolean;         // fold into namespaces past the budget (on unless ?fold=off)
  services: boolean;     // the Service view: calls to a Service end at it, backends listed (?services=1)
  proxies: boolean;      // service-mesh sidecars drawn as nodes of their own (?proxies=1)
}

export const DEFAULTS: State = {
  view: "map", live: true, from: "15m", to: "now", diff: false, aFrom: "", aTo: "",
  group: "namespace-box", namespace: "", workload: "", port: "", protocol: "", failing: false,
  linkLocal: false,
  search: "", widthBy: "bytes", layout: "fcose", fold: true, services: false,
  proxies: false,
};

const GROUPS: Group[] = ["namespace-box", "host-box", "workload", "namespace", "host"];

export function load(): State {
  const q = new URLSearchParams(location.search);
  const s: State = { ...DEFAULTS };
  const str = (k: keyof State, name = k as string) => { const v = q.get(name); if (v !== null) (s as any)[k] = v; };
  str("view"); str("from"); str("to"); str("aFrom", "a_from"); str("aTo", "a_to");
  str("namespace"); str("workload"); str("port"); str("protocol"); str("search"); str("layout");
  const g = q.get("group");
  if (g && GROUPS.includes(g as Group)) s.group = g as Group;
  if (q.get("width") === "connections") s.widthBy = "connections";
  s.failing = q.get("failing") === "1";
  s.linkLocal = q.get("link_local") === "1";
  s.diff = q.get("diff") === "1";
  s.fold = q.get("fold") !== "off";
  s.services = q.get("services") === "1";
  s.proxies = q.get("proxies") === "1";
  s.live = !q.has("to") || q.get("to") === "now";
  if (s.view !== "flows") s.view = "map";
  return s;
}

export function save(s: State): void {
  const q = new URLSearchParams();
  if (s.view !== "map") q.set("view", s.view);
  if (s.from !== DEFAULTS.from) q.set("from", s.from);
  if (!s.live) q.set("to", s.to);
  if (s.diff) { q.set("diff", "1"); q.set("a_from", s.aFrom); q.set("a_to", s.aTo); }
  if (s.group !== DEFAULTS.group) q.set("group", s.group);
  for (const k of ["namespace", "workload", "port", "protocol", "search"] as const) if (s[k]) q.set(k, s[k]);
  if (s.failing) q.set("failing", "1");
  if (s.linkLocal) q.set("link_local", "1");
  if (s.widthBy !== "bytes") q.set("width", s.widthBy);
  if (s.layout !== "fcose") q.set("layout", s.layout);
  if (!s.fold) q.set("fold", "off");
  if (s.services) q.set("services", "1");
  if (s.proxies) q.set("proxies", "1");
  const qs = q.toString();
  history.replaceState(null, "", location.pathname + (qs ? `?${qs}` : ""));
}

/** The API's group_by for a grouping choice: boxes are drawn around workload nodes; with the
 * Service view on, workload groupings ask for `service` (docs/api.md, "The Service view"). */
export function apiGroup(g: Group, services = false): "workload" | "namespace" | "host" | "service" {
  return g === "namespace" || g === "host" ? g : services ? "service" : "workload";
}

/** Whether a graph's nodes are workloads (the workload view, or the Service view's clients). */
export function byWorkload(groupBy: string): boolean {
  return groupBy === "workload" || groupBy === "service";
}

/** Filter parameters shared by the map, the diff and the flows table. */
export function filterParams(s: State): URLSearchParams {
  const p = new URLSearchParams();
  if (s.namespace) p.append("namespace", s.namespace);
  if (s.workload) p.append("workload", s.workload);
  if (s.port) p.append("port", s.port);
  if (s.protocol) p.append("protocol", s.protocol);
  if (s.linkLocal) p.set("link_local", "true");  // neighbour discovery, MLD, mDNS, ...
  return p;
}

export function windowParams(s: State, p = new URLSearchParams()): URLSearchParams {
  p.set("from", s.from);
  if (!s.live) p.set("to", s.to);
  return p;
}

// ---- formatting ------------------------------------------------------------------------------
export function bytes(n: number): string {
  if (n < 1000) return `${n} B`;
  const u = ["kB", "MB", "GB", "TB"];
  let v = n, i = -1;
  while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${u[i]}`;
}

export function int(n: number): string {
  return n.toLocaleString("en-US");
}

export function when(iso: string | null): string {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z").replace(/Z$/, " UTC");
}

export function esc(s: unknown): string {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]!));
}
