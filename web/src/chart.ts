// A small SVG chart of an edge over its window: connections started per bucket (bars, failed
// ones stacked in the failure colour) and bytes per bucket (line). Built from the edge's flows
// (GET /api/v1/flows), so it needs nothing the API does not already serve.
import type { Flow } from "./api";
import { bytes, esc } from "./state";

export interface Bucket { t0: number; conns: number; failed: number; bytes: number }

export function buckets(flows: Flow[], since: number, until: number, n = 24): Bucket[] {
  const step = Math.max(1, (until - since) / n);
  const out: Bucket[] = Array.from({ length: n }, (_, i) => ({ t0: since + i * step, conns: 0, failed: 0, bytes: 0 }));
  for (const f of flows) {
    const t = Date.parse(f.start);
    const i = Math.min(n - 1, Math.max(0, Math.floor((t - since) / step)));
    out[i].conns++;
    if (f.outcome !== "ok") out[i].failed++;
    out[i].bytes += f.bytes_c2s + f.bytes_s2c;
  }
  return out;
}

export function chart(b: Bucket[]): string {
  const W = 340, H = 90, top = 12, base = H - 14;
  const maxC = Math.max(1, ...b.map((x) => x.conns));
  const maxB = Math.max(1, ...b.map((x) => x.bytes));
  const bw = W / b.length;
  const bars = b.map((x, i) => {
    const h = (x.conns / maxC) * (base - top), hf = (x.failed / maxC) * (base - top);
    return `<rect class="bar-c" x="${i * bw + 1}" y="${base - h}" width="${bw - 2}" height="${h}"><title>${x.conns} connections, ${x.failed} failed, ${esc(bytes(x.bytes))}</title></rect>` +
      (hf ? `<rect class="bar-f" x="${i * bw + 1}" y="${base - hf}" width="${bw - 2}" height="${hf}"/>` : "");
  }).join("");
  const pts = b.map((x, i) => `${i * bw + bw / 2},${base - (x.bytes / maxB) * (base - top)}`).join(" ");
  const t = (ms: number) => new Date(ms).toISOString().slice(11, 19);
  return `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="Connections and bytes over the window">
    ${bars}<polyline class="line-b" points="${pts}"/>
    <text x="0" y="9">max ${maxC} conn / bucket</text><text x="${W}" y="9" text-anchor="end">bytes: max ${esc(bytes(maxB))}</text>
    <text x="0" y="${H - 2}">${t(b[0].t0)}</text><text x="${W}" y="${H - 2}" text-anchor="end">${t(b[b.length - 1].t0)}</text>
  </svg>`;
}
