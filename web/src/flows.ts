// The flows view: GET /api/v1/flows as a table (sorting, cursor paging) and a live tail over
// GET /api/v1/flows/stream. Its filter box takes the CLI's filters in either spelling,
// `to_workload=db not_outcome=ok` or `--to-workload db --not --outcome ok`
// (eastwest/filters.py is the one filter language; the API names a bad one in its 400).
import { ApiError, get, outcomeText, stream, type Flow, type Flows } from "./api";
import { esc, filterParams, int, when, windowParams, type State } from "./state";

const TAIL_MAX = 500;

/** The filter box's text -> API parameters. Throws an Error that names the bad word. */
export function parseFilter(text: string): URLSearchParams {
  const p = new URLSearchParams();
  const words = text.trim().split(/\s+/).filter(Boolean);
  let negate = false;
  for (let i = 0; i < words.length; i++) {
    const w = words[i];
    if (w === "--not" || w === "!") { negate = true; continue; }
    if (w === "--link-local") { p.set("link_local", "true"); continue; }  // a flag without a value
    let key: string, value: string;
    if (w.startsWith("--")) {
      const eq = w.indexOf("=");
      key = (eq > 0 ? w.slice(2, eq) : w.slice(2)).replace(/-/g, "_");
      value = eq > 0 ? w.slice(eq + 1) : words[++i];
      if (value === undefined) throw new Error(`${w}: give a value`);
    } else if (w.includes("=")) {
      [key, value] = [w.slice(0, w.indexOf("=")), w.slice(w.indexOf("=") + 1)];
    } else {
      throw new Error(`${w}: write key=value (to_workload=db) or a flag (--to-workload db)`);
    }
    if (negate && !key.startsWith("not_")) key = `not_${key}`;
    negate = false;
    for (const v of value.split(",")) p.append(key, v);
  }
  return p;
}

export class FlowsView {
  private sort = "-start";
  private cursors: (string | null)[] = [null];   // cursor of each page seen; last = current
  private next: string | null = null;
  private loads = 0;                               // loads started; the latest one is shown
  private tail: AbortController | null = null;
  onError: (e: ApiError) => boolean = () => false;  // true when the app handled it (auth, reachability)

  constructor(private state: () => State) {
    for (const b of document.querySelectorAll<HTMLButtonElement>("#flow-table th button[data-sort]")) {
      b.onclick = () => {
        const k = b.dataset.sort!;
        this.sort = this.sort === `-${k}` ? k : `-${k}`;
        this.cursors = [null];
        void this.load();
      };
    }
    document.getElementById("flow-run")!.onclick = () => { this.cursors = [null]; void this.load(); };
    document.getElementById("flow-filter")!.addEventListener("keydown", (e) => {
      if ((e as KeyboardEvent).key === "Enter") { this.cursors = [null]; void this.load(); }
    });
    document.getElementById("flow-limit")!.onchange = () => { this.cursors = [null]; void this.load(); };
    document.getElementById("flow-next")!.onclick = () => { if (this.next) { this.cursors.push(this.next); void this.load(); } };
    document.getElementById("flow-prev")!.onclick = () => { if (this.cursors.length > 1) { this.cursors.pop(); void this.load(); } };
    document.getElementById("flow-tail")!.onclick = () => this.tail ? this.stopTail() : this.startTail();
  }

  private params(): URLSearchParams {
    const p = filterParams(this.state());
    const extra = parseFilter((document.getElementById("flow-filter") as HTMLInputElement).value);
    for (const [k, v] of extra) p.append(k, v);
    return p;
  }

  private error(msg: string | null): void {
    const el = document.getElementById("flow-error")!;
    el.hidden = !msg;
    el.textContent = msg ?? "";
  }

  async load(): Promise<void> {
    // loads overlap (a filter, the page size and a sort click each start one); only the latest
    // one's answer is shown, whatever order the answers come back in
    const mine = ++this.loads;
    const s = this.state();
    let p: URLSearchParams;
    try {
      p = this.params();
    } catch (e) {
      this.error(`Filter: ${(e as Error).message}`);
      return;
    }
    const w = windowParams(s);
    p.set("since", w.get("from")!);
    if (w.has("to")) p.set("until", w.get("to")!);
    const sort = this.sort;
    p.set("sort", sort);
    p.set("limit", (document.getElementById("flow-limit") as HTMLSelectElement).value);
    const cur = this.cursors[this.cursors.length - 1];
    if (cur) p.set("cursor", cur);
    try {
      const res = await get<Flows>("/api/v1/flows", p);
      if (mine !== this.loads) return;
      this.error(null);
      this.next = res.next_cursor;
      this.rows(res.flows, false);
      document.getElementById("flow-page")!.textContent =
        `page ${this.cursors.length} · ${int(res.count)} flows${res.filter ? ` · filter ${res.filter}` : ""}`;
      (document.getElementById("flow-next") as HTMLButtonElement).disabled = !res.next_cursor;
      (document.getElementById("flow-prev") as HTMLButtonElement).disabled = this.cursors.length <= 1;
      for (const th of document.querySelectorAll<HTMLElement>("#flow-table th")) {
        const k = th.querySelector<HTMLButtonElement>("button[data-sort]")?.dataset.sort;
        if (k && sort.replace("-", "") === k) th.setAttribute("aria-sort", sort.startsWith("-") ? "descending" : "ascending");
        else th.removeAttribute("aria-sort");
      }
      document.getElementById("view-flows")!.dataset.loaded = String(Date.now());
    } catch (e) {
      if (mine !== this.loads) return;
      if (e instanceof ApiError && this.onError(e)) return;
      this.error((e as Error).message + (e instanceof ApiError && e.parameter ? ` (parameter ${e.parameter})` : ""));
    }
  }

  private rows(flows: Flow[], prepend: boolean): void {
    const body = document.querySelector<HTMLTableSectionElement>("#flow-table tbody")!;
    const html = flows.map((f) => {
      const t = f.tunnel ? `${f.tunnel.type !== "vxlan" ? `${esc(f.tunnel.type)} ` : ""}VNI ${f.tunnel.vni} ${esc(f.tunnel.vtep_src_host ?? f.tunnel.vtep_src)}→${esc(f.tunnel.vtep_dst_host ?? f.tunnel.vtep_dst)}` : "";
      return `<tr data-id="${esc(f.id)}" class="${f.outcome === "ok" ? "" : "fail"}${prepend ? " fresh" : ""}">` +
        `<td>${esc(when(f.start))}</td><td title="${esc(f.client.ip)}:${f.client.port}">${esc(f.client.workload.id)}</td>` +
        `<td title="${esc(f.server.ip)}">${esc(f.server.workload.id)}</td><td>${f.server.port}</td><td>${esc(f.protocol)}</td>` +
        `<td class="outcome">${esc(outcomeText(f))}</td><td>${esc(int(f.bytes_c2s))} / ${esc(int(f.bytes_s2c))}</td>` +
        `<td>${esc(f.observed_by.join(","))}</td><td>${t}</td><td>${esc(when(f.last_seen))}</td></tr>`;
    }).join("");
    if (prepend) {
      body.insertAdjacentHTML("afterbegin", html);
      while (body.rows.length > TAIL_MAX) body.deleteRow(-1);
    } else {
      body.innerHTML = html || `<tr><td colspan="10" class="muted">No flows match in this window. Widen the window or clear the filter.</td></tr>`;
    }
  }

  startTail(): void {
    let p: URLSearchParams;
    try { p = this.params(); } catch (e) { this.error(`Filter: ${(e as Error).message}`); return; }
    this.tail = new AbortController();
    document.getElementById("flow-tail")!.setAttribute("aria-pressed", "true");
    const body = document.querySelector<HTMLTableSectionElement>("#flow-table tbody")!;
    // the tail shows what arrives from now on, under the filter above
    body.innerHTML = `<tr class="waiting"><td colspan="10" class="muted">Live tail: waiting for new flows${p.toString() ? ` matching ${esc(p.toString())}` : ""}…</td></tr>`;
    document.getElementById("flow-page")!.textContent = "live tail";
    const seen = (id: string) => body.querySelector(`tr[data-id="${CSS.escape(id)}"]`);
    stream("/api/v1/flows/stream", p, this.tail.signal, (data) => {
      const f = JSON.parse(data) as Flow;
      body.querySelector("tr.waiting")?.remove();
      seen(f.id)?.remove();  // a connection updates as its observers report: show its latest
      this.rows([f], true);
    }, () => { document.getElementById("flow-tail")!.dataset.connected = "1"; }).catch((e) => {
      this.stopTail();
      if (!(e instanceof ApiError && this.onError(e))) this.error(`Live tail stopped: ${(e as Error).message}`);
    });
  }

  stopTail(): void {
    this.tail?.abort();
    this.tail = null;
    const b = document.getElementById("flow-tail")!;
    b.setAttribute("aria-pressed", "false");
    delete b.dataset.connected;
  }

  /** Show the flows of a filter (from an edge panel's link). */
  show(filter: string): void {
    (document.getElementById("flow-filter") as HTMLInputElement).value = filter;
    this.cursors = [null];
    void this.load();
  }
}
