// Empty and error states that say what to do: nothing collected yet (start a collector), nothing
// in this window (widen it, clear filters), aggregator unreachable, store unavailable, a bad
// parameter (the API's 400 names it). /readyz (no token) tells an empty store from an empty window.
import { ApiError, type Graph } from "./api";
import { esc, int, type State } from "./state";

export function notice(html: string | null, error = false, state = ""): void {
  const el = document.getElementById("notice")!;
  el.hidden = !html;
  el.classList.toggle("error", error);
  el.dataset.state = state;
  el.innerHTML = html ?? "";
}

export function showError(e: Error): void {
  const origin = esc(location.origin);
  if (e instanceof ApiError && e.kind === "unreachable") {
    notice(`<h3>The aggregator is unreachable</h3><p>Nothing answers at <code>${origin}</code>. Is it running?
      Start it with <code>make run</code> or <code>eastwest aggregator --listen ${esc(location.host)}</code>.
      This page retries every 5 seconds.</p>`, true, "unreachable");
  } else if (e instanceof ApiError && e.kind === "unavailable") {
    notice(`<h3>The aggregator's store is not answering</h3><p>${esc(e.message)}</p>
      <p>Check the aggregator's log and its data directory's disk. This page retries every 5 seconds.</p>`, true, "unavailable");
  } else if (e instanceof ApiError && e.kind === "bad") {
    notice(`<h3>The aggregator did not accept this view</h3><p>${esc(e.message)}</p>
      <p>Fix ${e.parameter ? `<b>${esc(e.parameter)}</b>` : "the filter or the window"} above.</p>`, true, "bad");
  } else {
    notice(`<h3>Something went wrong</h3><p>${esc(e.message)}</p>`, true, "error");
  }
}

export async function showEmpty(s: State, g: Graph, signal?: AbortSignal): Promise<void> {
  let records: number | null = null;
  try {
    const r = await fetch("/readyz", { signal });
    if (r.ok) records = (await r.json()).records;
  } catch { /* aborted, or the graph answered a moment ago: treat as unknown */ }
  if (signal?.aborted) return;
  if (records === 0) {
    notice(`<h3>No collector has sent anything yet</h3>
      <p>The aggregator is up and its store is empty. On each host, start a collector pointed here:</p>
      <p><code>EASTWEST_INGEST_TOKEN=… eastwest collector --aggregator ${esc(location.origin)}</code></p>
      <p>or <code>make demo</code> for a lab with live traffic. The map fills in by itself.</p>`, false, "no-data");
    return;
  }
  const filtered = s.namespace || s.workload || s.port || s.protocol || s.failing;
  notice(`<h3>No traffic in this window</h3>
    <p>${records !== null ? `${esc(int(records))} records are stored, but none` : "Nothing"} between
    ${esc(g.since.replace("T", " "))} and ${esc(g.until.replace("T", " "))}${filtered ? " matches the filters" : ""}.</p>
    <p>${filtered ? "Clear the filters, or " : ""}pick a longer window (Last: 1 hour, 24 hours) or travel back with ◀.</p>`,
  false, "no-traffic");
}
