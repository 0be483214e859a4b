// The map's cytoscape stylesheet, built from the theme's CSS variables (src/styles.css), so one
// palette serves the page and the canvas. Edge colour = failure rate (Okabe-Ito: blue, orange,
// vermillion; failing edges are dashed too), edge width = bytes or connections (data.width).
import type cytoscape from "cytoscape";

function css(name: string): string {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

export function mapStyle(): cytoscape.StylesheetJson {
  const fg = css("--fg"), bg = css("--bg");
  return [
    { selector: "node", style: {
      "background-color": css("--node"), "border-color": css("--node-border"), "border-width": 1.5,
      shape: "round-rectangle", width: (n: cytoscape.NodeSingular) => 14 + 7 * String(n.data("label") ?? "").length,
      height: 22, padding: "6px",
      label: "data(label)", "font-size": 12, color: fg, "text-valign": "center", "text-halign": "center",
      "min-zoomed-font-size": 6,
    } },
    { selector: "node[kind = 'Namespace'], node[kind = 'Host']", style: {
      shape: "round-rectangle", "border-width": 2.5, "font-weight": "bold", height: 28 } },
    { selector: "node[kind = 'Service']", style: { shape: "round-tag", "border-style": "double",
      "border-width": 3 } },
    // a service-mesh sidecar (graph show_proxies): small, hexagonal, beside its app
    { selector: "node[kind = 'proxy']", style: { shape: "hexagon", "font-size": 10, height: 18,
      "border-style": "dotted" } },
    { selector: "node[?external]", style: { shape: "cut-rectangle", "border-style": "dashed" } },
    { selector: ":parent", style: {
      "background-color": css("--group"), "border-color": css("--group-border"), "border-width": 1,
      "border-style": "dashed", shape: "round-rectangle", padding: "14px",
      "text-valign": "top", "text-halign": "center", "text-margin-y": -4, "font-size": 13,
      "font-weight": "bold", color: css("--muted"),
    } },
    { selector: "edge", style: {
      width: "data(width)", "line-color": css("--ok"), "target-arrow-color": css("--ok"),
      "target-arrow-shape": "triangle", "arrow-scale": 0.9, "curve-style": "bezier", opacity: 0.85,
      "font-size": 10, color: fg, "text-background-color": bg, "text-background-opacity": 0.85,
      "text-background-padding": "1px", "text-rotation": "autorotate", "min-zoomed-font-size": 7,
    } },
    { selector: "edge.labelled", style: { label: "data(label)" } },
    { selector: "edge.some", style: { "line-color": css("--some"), "target-arrow-color": css("--some") } },
    { selector: "edge.bad", style: { "line-color": css("--bad"), "target-arrow-color": css("--bad"),
      "line-style": "dashed", "line-dash-pattern": [8, 4] } },
    // encrypted between hosts (IPsec ESP): dotted, the wire could not see inside
    // a service-mesh edge (connections folded from sidecars' sockets): a double line
    { selector: "edge.mesh", style: { "line-style": "solid", "line-outline-width": 1, "line-outline-color": "#7c8aa5" } },
    { selector: "edge.encrypted", style: { "line-style": "dotted", "line-dash-pattern": [2, 3] } },
    { selector: "edge.added", style: { "line-color": css("--added"), "target-arrow-color": css("--added"),
      width: 5, opacity: 1, label: "added", "line-style": "solid" } },
    { selector: "edge.removed", style: { "line-color": css("--removed"), "target-arrow-color": css("--removed"),
      width: 5, opacity: 0.9, label: "removed", "line-style": "dotted" } },
    { selector: "edge.changed", style: { "line-color": css("--changed"), "target-arrow-color": css("--changed"),
      label: "data(changed)" } },
    { selector: "edge.unchanged", style: { opacity: 0.3 } },
    { selector: ".dim", style: { opacity: 0.12, "text-opacity": 0.2 } },
    { selector: "node.match", style: { "border-color": css("--focus"), "border-width": 4 } },
    { selector: ":selected", style: { "border-color": css("--accent"), "border-width": 3,
      "line-color": css("--accent"), "target-arrow-color": css("--accent"), label: "data(label)",
      "z-index": 99 } },
    { selector: "edge.hover", style: { label: "data(label)", "z-index": 98 } },
  ];
}
