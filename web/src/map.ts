// The service map: the API's graph (GET /api/v1/graph) -> cytoscape elements, updated in place.
// Nodes are workloads (or namespaces, hosts), optionally boxed into namespace or host compound
// nodes; edges go client -> server, width by bytes or connections, colour by failure rate.
// Live updates never re-run the whole layout: existing nodes keep their positions, new nodes
// are placed by fcose with the old ones fixed (fixedNodeConstraint). fcose: Dogrusoz et al.,
// "fCoSE: a fast compound graph layout algorithm with constraint support", IEEE TVCG 2022.
import cytoscape from "cytoscape";
import fcose from "cytoscape-fcose";
import type { Diff, Graph, GraphEdge, Workload } from "./api";
import { mapStyle } from "./mapstyle";
import { bytes, int, type State } from "./state";

cytoscape.use(fcose);

export interface Rendered { nodes: number; edges: number; layoutMs: number | null; full: boolean }
export type Kind = "node" | "edge";

export function edgeId(source: string, target: string): string {
  return `${source}\u2192${target}`;
}

export function failRate(e: GraphEdge): number {
  return e.connections_opened ? (e.connections_failed + e.resets) / e.connections_opened
    : (e.connections_failed + e.resets) ? 1 : 0;
}

export function failing(e: GraphEdge): boolean {
  return e.connections_failed + e.resets > 0;
}

/** Nodes and edges the map shows for a graph under the state's client-side filters. */
export function visible(g: Graph, s: State): Graph {
  if (!s.failing) return g;
  const edges = g.edges.filter(failing);
  const ids = new Set(edges.flatMap((e) => [e.source, e.target]));
  return { ...g, nodes: g.nodes.filter((n) => ids.has(n.id)), edges };
}

export class ServiceMap {
  cy: cytoscape.Core;
  private structure = "";            // what a full layout was last made for
  onSelect: (kind: Kind, id: string) => void = () => {};
  onClear: () => void = () => {};
  onExpand: (id: string) => void = () => {};

  constructor(el: HTMLElement) {
    this.cy = cytoscape({
      container: el, style: mapStyle(), minZoom: 0.05, maxZoom: 4,
      boxSelectionEnabled: false, selectionType: "single",
    });
    this.cy.on("tap", "node, edge", (ev) => {
      const t = ev.target as cytoscape.SingularElementReturnValue;
      if (t.isNode() && t.isParent()) return;
      this.onSelect(t.isNode() ? "node" : "edge", t.id());
    });
    this.cy.on("tap", (ev) => { if (ev.target === this.cy) this.onClear(); });
    this.cy.on("dbltap", "node", (ev) => {
      const t = ev.target as cytoscape.NodeSingular;
      if (t.data("kind") === "Namespace" || t.isParent()) this.onExpand(t.data("ns") ?? t.id());
    });
    this.cy.on("mouseover", "edge", (ev) => ev.target.addClass("hover"));
    this.cy.on("mouseout", "edge", (ev) => ev.target.removeClass("hover"));
  }

  restyle(): void {
    this.cy.style(mapStyle());
  }

  /** Replace what the map shows with `g`, in place. Returns what was drawn and whether a full
   *  layout ran. `workloads` gives each workload's host for host boxes. */
  async render(g: Graph, s: State, workloads: Map<string, Workload> | null,
               diff: Diff | null = null, force = false): Promise<Rendered> {
    const els = elements(g, s, workloads, diff);
    const cy = this.cy;
    const wanted = new Set(els.map((e) => e.data.id as string));
    const before = new Set(cy.elements().map((e) => e.id()));
    const added: string[] = [];
    cy.batch(() => {
      cy.elements().filter((e) => !wanted.has(e.id())).remove();
      for (const def of els) {
        const id = def.data.id as string;
        const cur = cy.getElementById(id);
        if (cur.nonempty()) {
          const parent = cur.isNode() ? ((cur.parent() as unknown as cytoscape.NodeSingular).id?.() || undefined) : undefined;
          if (cur.isNode() && parent !== def.data.parent) {
            cur.move({ parent: (def.data.parent as string) ?? null });
          }
          cur.data(def.data);
          cur.classes(def.classes ?? "");
        } else {
          cy.add(def);
          added.push(id);
        }
      }
    });
    const structure = `${s.group}|${s.layout}`;
    const full = force || structure !== this.structure || before.size === 0;
    let layoutMs: number | null = null;
    const freshNodes = added.map((id) => cy.getElementById(id)).filter((e) => e.isNode() && !e.isParent()) as unknown as cytoscape.NodeSingular[];
    if (full) {
      layoutMs = await this.layout(cy.elements(), s.layout, null);
      this.structure = structure;
    } else if (freshNodes.length) {
      layoutMs = await this.placeNew(freshNodes, s.layout);
    }
    this.searchMark(s.search);
    return { nodes: cy.nodes().filter((n) => !n.isParent()).length, edges: cy.edges().length,
             layoutMs, full };
  }

  private placeNew(fresh: cytoscape.NodeSingular[], layout: string): Promise<number> {
    const cy = this.cy;
    for (const n of fresh) { // start beside a neighbour that already has a place
      const peer = n.neighborhood("node").filter((m) => !fresh.includes(m as cytoscape.NodeSingular))
        .first() as unknown as cytoscape.NodeSingular;
      const p = peer.nonempty() ? peer.position() : { x: 0, y: 0 };
      n.position({ x: p.x + 60 + Math.random() * 40, y: p.y + 60 + Math.random() * 40 });
    }
    const fixed = cy.nodes().filter((n) => !n.isParent() && !fresh.includes(n))
      .map((n) => ({ nodeId: n.id(), position: { ...(n as cytoscape.NodeSingular).position() } }));
    return this.layout(cy.elements(), layout, fixed);
  }

  private layout(eles: cytoscape.Collection, name: string,
                 fixed: { nodeId: string; position: { x: number; y: number } }[] | null): Promise<number> {
    const t0 = performance.now();
    const n = eles.nodes().length;
    const opts: Record<string, unknown> = name === "fcose" ? {
      name: "fcose", quality: n > 1500 ? "draft" : "default", animate: false, randomize: !fixed,
      nodeDimensionsIncludeLabels: true, idealEdgeLength: 90, nodeRepulsion: 6500,
      nestingFactor: 0.15, gravity: 0.3, numIter: n > 1500 ? 1200 : 2500, tile: true,
      packComponents: true, fit: !fixed, padding: 24,
      ...(fixed && fixed.length ? { fixedNodeConstraint: fixed } : {}),
    } : { name, animate: false, fit: !fixed, padding: 24, randomize: !fixed };
    return new Promise((resolve) => {
      const l = eles.layout(opts as unknown as cytoscape.LayoutOptions);
      l.one("layoutstop", () => {
        if (!fixed && this.cy.zoom() > 1.4) { this.cy.zoom(1.4); this.cy.center(); } // a small map stays readable
        resolve(performance.now() - t0);
      });
      try {
        l.run();
      } catch { // a constraint the layout refuses: keep the neighbour placement
        resolve(performance.now() - t0);
      }
    });
  }

  searchMark(text: string): cytoscape.NodeCollection {
    const cy = this.cy;
    const q = text.trim().toLowerCase();
    let hits = cy.collection() as cytoscape.NodeCollection;
    cy.batch(() => {
      cy.elements().removeClass("dim match");
      if (!q) return;
      hits = cy.nodes().filter((n) => !n.isParent() && n.id().toLowerCase().includes(q));
      const keep = hits.union(hits.connectedEdges()).union(hits.ancestors());
      cy.elements().not(keep).addClass("dim");
      hits.addClass("match");
    });
    return hits;
  }

  focus(id: string): void {
    const el = this.cy.getElementById(id);
    if (el.empty()) return;
    this.cy.elements().unselect();
    el.select();
    this.cy.animate({ center: { eles: el }, duration: 200 });
  }

  clear(): void {
    this.cy.elements().remove();
    this.structure = "";
  }
}

function elements(g: Graph, s: State, workloads: Map<string, Workload> | null,
                  diff: Diff | null): cytoscape.ElementDefinition[] {
  const v = visible(g, s);
  const out: cytoscape.ElementDefinition[] = [];
  const parents = new Set<string>();
  const nodes = new Map(v.nodes.map((n) => [n.id, n]));
  const removed = diff ? diff.removed : [];
  for (const e of removed) for (const id of [e.source, e.target]) if (!nodes.has(id)) {
    const ns = id.includes("/") ? id.split("/")[0] : null;
    nodes.set(id, { id, name: id.split("/").pop()!, namespace: ns, kind: null, in_degree: 0, out_degree: 0 });
  }
  for (const n of nodes.values()) {
    let parent: string | undefined;
    if (s.group === "namespace-box") parent = n.namespace ? `ns:${n.namespace}` : n.id.startsWith("external:") ? "ext:" : undefined;
    if (s.group === "host-box") {
      const h = workloads?.get(n.id)?.host;
      if (h) parent = `host:${h}`;
    }
    if (parent) parents.add(parent);
    out.push({ group: "nodes", data: { id: n.id, label: n.name, kind: n.kind, ns: n.namespace,
      parent, external: n.id.startsWith("external:") || undefined } });
  }
  for (const p of [...parents].reverse()) { // parents before their children
    const [kind, name] = [p.slice(0, p.indexOf(":")), p.slice(p.indexOf(":") + 1)];
    const label = kind === "ns" ? `namespace ${name}` : kind === "ext" ? "outside the known workloads" : `host ${name}`;
    out.unshift({ group: "nodes", data: { id: p, label,
      ns: kind === "ns" ? name : undefined } });
  }
  const weight = (e: GraphEdge) => s.widthBy === "bytes" ? e.bytes_c2s + e.bytes_s2c : e.connections_opened;
  const max = Math.max(1, ...v.edges.map(weight));
  const labelled = v.edges.length <= 60;
  const status = new Map<string, string>();
  if (diff) {
    for (const e of diff.added) status.set(edgeId(e.source, e.target), "added");
    for (const e of diff.changed) status.set(edgeId(e.source, e.target), "changed");
  }
  const changedWhy = new Map(diff?.changed.map((c) => [edgeId(c.source, c.target), c.changed.join(", ")]) ?? []);
  for (const e of v.edges) {
    const id = edgeId(e.source, e.target);
    const rate = failRate(e);
    const cls = [rate === 0 ? "ok" : rate < 0.1 ? "some" : "bad"];
    if (labelled) cls.push("labelled");
    if (e.encrypted) cls.push("encrypted");
    if (e.mesh) cls.push("mesh");
    if (diff) cls.push(status.get(id) ?? "unchanged");
    out.push({ group: "edges", classes: cls.join(" "), data: {
      id, source: e.source, target: e.target,
      width: 1.2 + 7 * Math.log1p(weight(e)) / Math.log1p(max),
      label: `${e.encrypted ? "🔒 ESP · " : ""}${e.mesh ? "⬡ mesh · " : ""}${int(e.connections_opened)} conn · ${bytes(e.bytes_c2s + e.bytes_s2c)}` +
        (failing(e) ? ` · ${int(e.connections_failed + e.resets)} failed` : ""),
      changed: changedWhy.get(id) ?? "",
    } });
  }
  for (const e of removed) {
    out.push({ group: "edges", classes: "removed", data: { id: edgeId(e.source, e.target),
      source: e.source, target: e.target, width: 4, label: "removed", changed: "" } });
  }
  return out;
}
