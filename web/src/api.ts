// The dashboard's only way out: the aggregator's read API (docs/api.md), same origin.
// The read token is sent as `Authorization: Bearer` (RFC 6750). It comes from the login dialog
// or from a `#token=...` fragment (never sent to a server, removed from the address bar at once)
// and is kept in sessionStorage: this tab only, gone when the tab closes.

const KEY = "eastwest.readToken";

export type Failure = "unauthorized" | "forbidden" | "unreachable" | "unavailable" | "bad" | "notfound";

export class ApiError extends Error {
  constructor(public kind: Failure, public status: number, message: string,
              public parameter?: string) {
    super(message);
  }
}

export function token(): string | null {
  return sessionStorage.getItem(KEY);
}

export function setToken(t: string | null): void {
  if (t) sessionStorage.setItem(KEY, t.trim());
  else sessionStorage.removeItem(KEY);
}

/** Take a token from the URL fragment (#token=...), then drop it from the address bar. */
export function tokenFromFragment(): void {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!m) return;
  setToken(decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname + location.search);
}

function headers(): Record<string, string> {
  const t = token();
  return t ? { Authorization: `Bearer ${t}`, Accept: "application/json" } : { Accept: "application/json" };
}

async function failure(r: Response): Promise<ApiError> {
  let detail = r.statusText;
  let parameter: string | undefined;
  try {
    const body = await r.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    parameter = body.parameter;
  } catch { /* not JSON: keep the status text */ }
  const kind: Failure = r.status === 401 ? "unauthorized" : r.status === 403 ? "forbidden"
    : r.status === 404 ? "notfound" : r.status >= 500 ? "unavailable" : "bad";
  return new ApiError(kind, r.status, detail, parameter);
}

export async function get<T>(path: string, params?: URLSearchParams, signal?: AbortSignal): Promise<T> {
  const url = params && [...params.keys()].length ? `${path}?${params}` : path;
  let r: Response;
  try {
    r = await fetch(url, { headers: headers(), signal });
  } catch (e) {
    if ((e as Error).name === "AbortError") throw e;
    throw new ApiError("unreachable", 0, `the aggregator at ${location.origin} is unreachable`);
  }
  if (!r.ok) throw await failure(r);
  return (await r.json()) as T;
}

/** Server-Sent Events over fetch (EventSource cannot send an Authorization header).
 *  Calls onEvent for each `event: flow` until the signal aborts; rejects on a failure. */
export async function stream(path: string, params: URLSearchParams, signal: AbortSignal,
                             onEvent: (data: string) => void, onOpen: () => void = () => {}): Promise<void> {
  let r: Response;
  try {
    r = await fetch(`${path}?${params}`, { headers: { ...headers(), Accept: "text/event-stream" }, signal });
  } catch (e) {
    if ((e as Error).name === "AbortError") return;
    throw new ApiError("unreachable", 0, `the aggregator at ${location.origin} is unreachable`);
  }
  if (!r.ok || !r.body) throw await failure(r);
  onOpen();
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      let cut: number;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        if (data && /(^|\n)event: flow/.test(block)) onEvent(data);
      }
    }
  } catch (e) {
    if ((e as Error).name !== "AbortError") throw e;
  }
}

// ---- response shapes (docs/api.md) -----------------------------------------------------------
export interface GraphNode { id: string; name: string; namespace: string | null; kind: string | null;
  in_degree: number; out_degree: number }
export interface GraphEdge {
  source: string; target: string; connections_opened: number; connections_active: number;
  connections_closed: number; connections_failed: number; resets: number; retransmits: number;
  bytes_c2s: number; bytes_s2c: number; packets_c2s: number | null; packets_s2c: number | null;
  byte_mismatches: number; rtt_us: { min: number; avg: number; max: number } | null;
  ports: number[]; protocols: string[]; first_seen: string | null; last_seen: string | null;
  complete: boolean; observed_by: Record<string, number>; folded: number;
  // an edge to a resolver: the DNS its clients sent (docs/api.md); absent on other edges
  dns?: EdgeDns;
  // a target named by DNS answers: connections named within the answer's TTL, and after it
  dns_named?: { ttl: number; hint: number };
  // packets the kernel dropped, by drop reason (collector --drops); null: none (absent: older server)
  drops?: Drops | null;
  // an edge that carries IPsec ESP: the wire's record of encrypted traffic between two hosts
  encrypted?: "esp"; wire_sees_inside?: boolean;
  // a service-mesh edge: how many of its connections were folded from sidecars' sockets, and
  // what the wire carried (the app's bytes plus the proxies' framing); null: no mesh
  mesh?: EdgeMesh | null;
}
export interface EdgeMesh { proxy: string; connections: number; wire_bytes_c2s: number | null;
  wire_bytes_s2c: number | null }
export interface MeshHop { hop: "app-proxy" | "proxy-proxy" | "proxy-app"; observer: string;
  client: { ip: string; port: number }; server: { ip: string; port: number };
  bytes_c2s: number; bytes_s2c: number; process: string | null; pid: number | null }
export interface FlowMesh { proxy: string; hops: MeshHop[]; wire_bytes_c2s: number | null;
  wire_bytes_s2c: number | null }
export interface EdgeDns { queries: number; responses: number; timeouts: number; nxdomain: number;
  servfail: number; errors: number; rcodes: Record<string, number>;
  latency_us: { min: number; avg: number; max: number } | null;
  names: { name: string; type: string; count: number; rcodes: Record<string, number>; timeouts: number }[];
  other_names: number }
export interface Drops { packets: number; reasons: Record<string, number> }
// the Service view's fields of an edge (declaration merging)
export interface GraphEdge {
  // the Service view only (group_by=service, docs/api.md): the Service this edge ends at, and
  // the backend workloads that served its connections
  service?: { id: string; name: string | null; namespace: string | null; addresses: string[] } | null;
  backends?: Backend[];
}
export interface Backend { id: string; name: string; namespace: string | null; kind: string | null;
  connections: number; connections_opened: number }
export interface Graph { since: string; until: string; group_by: string; volume_source: string;
  // the whole minutes whose byte volumes were summed (docs/api.md "Resolution of volumes");
  // null when the volumes come from the connections themselves
  volume_since: string | null; volume_until: string | null;
  filter: string; folded_edges: number; nodes: GraphNode[]; edges: GraphEdge[] }
export interface Workload { id: string; name: string; namespace: string | null; kind: string | null;
  host: string | null; resolved_by: string | null; callers: string[]; callees: string[] }
export interface WorkloadDetail { id: string; name: string; namespace: string | null; kind: string | null;
  upstream: string[]; downstream: string[]; impact: { workload: string; distance: number }[];
  callers: DiffEdge[]; callees: DiffEdge[] }
export interface Side { ip: string; port: number; workload: { id: string; name: string;
  namespace: string | null; host: string | null };
  process: { pid: number | null; comm: string | null; collector: string } | null }
export interface Flow {
  id: string; protocol: string; client: Side; server: Side; start: string; last_seen: string;
  closed: boolean; closed_at: string | null; outcome: string; observed_by: string[];
  bytes_c2s: number; bytes_s2c: number; retransmits: number; resets: number;
  tunnel: { type: "vxlan" | "geneve" | "vxlan-gpe"; vni: number; vtep_src: string; vtep_dst: string; vtep_src_host: string | null;
            vtep_dst_host: string | null } | null;
  service_ip?: string | null; service_port?: number | null;
  service?: { namespace: string | null; name: string } | null;
  drops?: Drops | null;
  // a service-mesh call folded from its sidecars' sockets (docs/api.md); null: none
  mesh?: FlowMesh | null;
}
/** A flow's outcome, with its drop reasons when the kernel dropped some of its packets. */
export function outcomeText(f: Flow): string {
  const r = f.drops ? Object.entries(f.drops.reasons).map(([k, n]) => `${k} ${n}`).join(", ") : "";
  return r ? `${f.outcome} (${r})` : f.outcome;
}
export interface Flows { flows: Flow[]; count: number; next_cursor: string | null; sort: string; filter: string }
export interface DiffEdge { source: string; target: string; connections_opened: number;
  connections_failed: number; resets?: number; bytes_c2s: number; bytes_s2c: number }
export interface Diff { a: { from: string; to: string }; b: { from: string; to: string };
  added: DiffEdge[]; removed: DiffEdge[]; changed: { source: string; target: string; changed: string[] }[];
  nodes_added: string[]; nodes_removed: string[] }
