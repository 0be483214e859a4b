"""The lab's service mesh (`eastwest lab up --pattern mesh`): every pod's iptables, and the truth of
a meshed call joined from its two sidecars' hop lines.

In: a `LabPlan` with `mesh` among its patterns; after traffic, the app's truth lines and the
sidecars' hop lines (DIR/mesh/<pod>.jsonl, eastwest/lab/sidecar.py).
Out: `ruleset()`, the `nat` table every pod gets (as `iptables-restore` reads it); `program(plan)`,
which installs it in every pod namespace (the load generator's too); `inventory(plan)`, the
inventory's `mesh`; `annotate(lines, hops)`, which gives each meshed TCP truth line its `mesh`
object (docs/lab.md, "mesh").

The rules are Istio's init container's (istio-iptables, tools/istio-iptables), TCP only (DNS and
every UDP datagram pass untouched), in chains of their own:
- `PREROUTING -p tcp -j EW_MESH_INBOUND`: every inbound TCP connection but one to the sidecar's
  own ports is REDIRECTed to INBOUND_PORT (15006);
- `OUTPUT -p tcp -j EW_MESH_OUTPUT`: RETURN for the inbound sidecar's hand-over (from 127.0.0.6
  on `lo`), for the sidecar's own traffic (`-m owner --uid-owner 1337`: it runs as that uid, so
  its connections out are never redirected back to itself) and for 127.0.0.1; every other TCP
  connection is REDIRECTed to OUTBOUND_PORT (15001).
A REDIRECT is a DNAT to the pod's own address (127.0.0.1 in OUTPUT, the receiving interface's
address in PREROUTING): the sidecar reads where the connection was going with SO_ORIGINAL_DST.

Truth: the app's truth lines stay the app's connections (its bytes, its outcome). A meshed TCP
line gets `mesh`: the proxy, the proxy-to-proxy hop's key as the network has it (the client
sidecar's address and port, the server app's address and port the server's inbound REDIRECT
found: what the inbound sidecar's SO_ORIGINAL_DST said), the wire's payload bytes each way (the
app's plus the framing lines), and the hop's id, which names the two hop lines it was joined
from (outbound: the client pod's, matched by the app's own address and port; inbound: the server
pod's, matched by the id the framing line carried).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from eastwest.errors import LabError
from eastwest.lab.plan import LabPlan
from eastwest.lab.sidecar import COMM, INBOUND_PORT, INBOUND_SOURCE, OUTBOUND_PORT, PROXY_UID
from eastwest.lab.topology import Progress

CHAINS = ("EW_MESH_INBOUND", "EW_MESH_IN_REDIRECT", "EW_MESH_OUTPUT", "EW_MESH_REDIRECT")


def ruleset() -> str:
    """The `nat` table of a meshed pod (every pod's is the same)."""
    return "\n".join([
        "*nat",
        *(f":{c} - [0:0]" for c in CHAINS),
        "-A PREROUTING -p tcp -j EW_MESH_INBOUND",
        "-A OUTPUT -p tcp -j EW_MESH_OUTPUT",
        f"-A EW_MESH_INBOUND -p tcp --dport {OUTBOUND_PORT} -j RETURN",
        f"-A EW_MESH_INBOUND -p tcp --dport {INBOUND_PORT} -j RETURN",
        "-A EW_MESH_INBOUND -p tcp -j EW_MESH_IN_REDIRECT",
        f"-A EW_MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_PORT}",
        f"-A EW_MESH_OUTPUT -s {INBOUND_SOURCE}/32 -o lo -j RETURN",
        f"-A EW_MESH_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN",
        "-A EW_MESH_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A EW_MESH_OUTPUT -j EW_MESH_REDIRECT",
        f"-A EW_MESH_REDIRECT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
        "COMMIT", ""])


def meshed_pods(plan: LabPlan) -> list[str]:
    """The pods that get a sidecar: every pod with a namespace of its own."""
    return [p.name for p in plan.pods if p.attach != "host"]


def program(plan: LabPlan, progress: Progress = lambda _m: None) -> None:
    """Install the rules in every meshed pod's namespace (never anywhere else)."""
    rules = ruleset()
    for name in meshed_pods(plan):
        args = ["ip", "netns", "exec", plan.pod(name).netns, "iptables-restore", "-w", "--noflush"]
        try:
            proc = subprocess.run(args, input=rules, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as exc:
            raise LabError("iptables-restore is not installed (make setup installs iptables)") \
                from exc
        if proc.returncode != 0:
            raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    progress(f"mesh: iptables REDIRECT to {COMM} (:{OUTBOUND_PORT} out, :{INBOUND_PORT} in) in "
             f"{len(meshed_pods(plan))} pods")


def inventory(plan: LabPlan) -> dict[str, Any]:
    """The inventory's `mesh`: the sidecar's name, ports, uid, and which pods have one."""
    return {"proxy": COMM, "outbound_port": OUTBOUND_PORT, "inbound_port": INBOUND_PORT,
            "uid": PROXY_UID, "inbound_source": INBOUND_SOURCE, "pods": meshed_pods(plan)}


def mark_pods(inv: dict[str, Any]) -> None:
    """Each pod of a mesh lab's inventory says whether it has a sidecar (`sidecar`: its name)."""
    for p in inv["pods"]:
        if p["name"] in inv.get("mesh", {}).get("pods", ()):
            p["sidecar"] = COMM


def read_hops(files: Iterable[Path], offsets: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Hop lines of the sidecars' files (from `offsets[file name]` on, if given)."""
    out: list[dict[str, Any]] = []
    for f in sorted(files):
        with f.open("rb") as fh:
            fh.seek((offsets or {}).get(f.name, 0))
            out += [json.loads(x) for x in fh.read().splitlines() if x.strip()]
    return out


def annotate(lines: list[dict[str, Any]], hops: list[dict[str, Any]],
             meshed: set[str]) -> list[dict[str, Any]]:
    """Give each TCP truth line of a pod in `meshed` its `mesh` (from `hops`); return the lines
    that could not be given one yet (a hop line not written yet: the caller waits and retries).
    Lines are matched to outbound hops in order of start, so a port the kernel handed out twice
    still pairs each call with its own hop."""
    outbound: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    inbound: dict[str, dict[str, Any]] = {}
    for h in sorted(hops, key=lambda h: h["start"]):
        if h["direction"] == "outbound":
            if h.get("app_client"):  # else it failed before it knew its caller
                app = h["app_client"]
                outbound.setdefault((h["pod"], app["ip"], app["port"]), []).append(h)
        elif h.get("id"):  # an inbound hop of a framed call
            inbound[h["id"]] = h
    missing = []
    for t in sorted(lines, key=lambda t: t["start"]):
        if t["protocol"] != "tcp" or t["client_pod"] not in meshed:
            continue
        found = outbound.get((t["client_pod"], t["client_ip"], t["client_port"]))
        out = found.pop(0) if found else None
        inb = inbound.get(out["id"]) if out and out.get("upstream") else None
        if out is None or (out.get("upstream") and inb is None):
            missing.append(t)
            continue
        t["mesh"] = mesh_of(out, inb)
    return missing


def mesh_of(out: dict[str, Any], inb: dict[str, Any] | None) -> dict[str, Any]:
    """A truth line's `mesh` from its outbound hop and (if it got that far) its inbound one."""
    up = out.get("upstream") or {}
    dst = inb["original_dst"] if inb else out["original_dst"]
    saw = inb["downstream"] if inb else {}
    return {
        "proxy": COMM,
        "hop_id": out["id"],
        "client_sidecar": out["pod"], "server_sidecar": inb["pod"] if inb else None,
        # the proxy-to-proxy hop as the network has it
        "client_ip": up.get("local_ip"), "client_port": up.get("local_port"),
        "server_ip": dst["ip"], "server_port": dst["port"],
        # what each sidecar put on the wire: the app's bytes and the framing lines
        "wire_bytes_c2s": out["upstream_bytes_out"],
        "wire_bytes_s2c": inb["downstream_bytes_out"] if inb else out["upstream_bytes_in"],
        "framing_c2s": out["framing_c2s"], "framing_s2c": inb["framing_s2c"] if inb else 0,
        # who the server's sidecar saw calling (differs from client_* behind a NodePort's SNAT)
        "server_saw_ip": saw.get("client_ip"), "server_saw_port": saw.get("client_port"),
        "outcome": inb["outcome"] if inb and inb["outcome"] != "ok" else out["outcome"],
    }
