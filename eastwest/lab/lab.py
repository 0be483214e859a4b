"""The lab as an object: up, traffic, status, down. Root only.

In: a name and sizes.  Out: namespaces wired by `topology`, the demo application (`app`)
running in its pods (in a `mesh` lab each pod's `sidecar` too, behind `mesh`'s rules), an
inventory and a static workload map under the state directory (/run/eastwest/lab/<name>/),
and ground truth files from `traffic()` (with the sidecars' hops joined in a `mesh` lab).

Everything the lab makes carries its name: namespaces `<name>-...`, the state directory, the
processes (found again by their namespace). `down()` removes exactly that, also after a crash
of the process that built it. `up()` tears down what it built when it fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from eastwest.errors import LabError
from eastwest.lab import containers, ipsec, mesh, topology
from eastwest.lab import services as cluster
from eastwest.lab.app import server_fields
from eastwest.lab.plan import SERVICE_BY_NAME, LabPlan, PodPlan, make_plan
from eastwest.lab.topology import Progress

STATE_ROOT = Path(os.environ.get("EASTWEST_LAB_STATE", "/run/eastwest/lab"))
READY_TIMEOUT = 20.0
LEDGER_WAIT = 10.0  # seconds a Service call's truth waits for its server's ledger line


def _quiet(_msg: str) -> None:
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces); run it with sudo")


class Lab:
    def __init__(self, name: str, inventory: dict[str, Any]) -> None:
        self.name = name
        self.inventory = inventory
        self.state = Path(inventory["state_dir"])

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    def up(cls, name: str = "ewlab", hosts: int = 3, pods_per_host: int = 2,
           vxlan_port: int = 4789, ip_family: str = "ipv4", services: bool = False,
           progress: Progress = _quiet, patterns: Sequence[str] = ()) -> Lab:
        require_root()
        plan = make_plan(name, hosts, pods_per_host, vxlan_port, ip_family, services,
                         tuple(patterns))
        if "ipsec" in plan.patterns:
            ipsec.check_kernel()  # before anything is built
        state = STATE_ROOT / name
        if (state / "inventory.json").exists() or topology.lab_netns(name):
            raise LabError(f"lab {name!r} is already up (or was not torn down): "
                           f"`eastwest lab down --name {name}`")
        plan.state_dir = str(state)
        # SIGTERM during set-up must tear down like Ctrl-C does
        old = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
        try:
            state.mkdir(parents=True, exist_ok=True)
            topology.build(plan, progress)
            if services:
                cluster.program(plan, progress)
            if "ipsec" in plan.patterns:
                ipsec.program(plan, progress)
                plan.extra["ipsec"] = ipsec.inventory(plan)
            if "mesh" in plan.patterns:
                mesh.program(plan, progress)
                plan.extra["mesh"] = mesh.inventory(plan)
            inv = plan.inventory()
            mesh.mark_pods(inv)
            _make_containers(name, inv, progress)
            (state / "inventory.json").write_text(json.dumps(inv, indent=2))
            _write_workload_map(plan, state / "workloads.yaml")
            lab = cls(name, inv)
            lab._start_apps(plan, progress)
            family = "" if ip_family == "ipv4" else (
                f", pods {ip_family}, IPv{plan.underlay_family} underlay")
            svcs = (f", {len(cluster.cluster_services(plan))} Services (ClusterIPs in "
                    f"{cluster.SERVICE_CIDR})" if services else "")
            net = (f"VXLAN VNI {plan.vni} on UDP {plan.vxlan_port}" if plan.overlay else
                   f"MACVLAN pods on the underlay {plan.hosts[0].underlay_ip}/"
                   f"{plan.hosts[0].underlay_prefix}, no overlay")
            pats = f", patterns: {', '.join(plan.patterns)}" if plan.patterns else ""
            progress(f"lab {name} is up: {len(plan.hosts)} hosts, {len(plan.pods)} pods, "
                     f"{net}{family}{svcs}{pats}")
            return lab
        except BaseException:
            progress("set-up failed or was interrupted: tearing down what was built")
            cls.down_by_name(name, progress)
            raise
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    @classmethod
    def open(cls, name: str = "ewlab") -> Lab:
        path = STATE_ROOT / name / "inventory.json"
        if not path.exists():
            raise LabError(f"no lab named {name!r} is up (no {path}); start one with "
                           f"`eastwest lab up --name {name}`")
        return cls(name, json.loads(path.read_text()))

    def down(self, progress: Progress = _quiet) -> list[str]:
        return self.down_by_name(self.name, progress)

    @staticmethod
    def down_by_name(name: str, progress: Progress = _quiet) -> list[str]:
        require_root()
        state = STATE_ROOT / name
        _stop_pidfile_processes(state)
        gone = topology.remove(name, progress)
        containers.remove(name)
        if state.exists():
            subprocess.run(["rm", "-rf", str(state)], check=False)
        return gone

    @staticmethod
    def names() -> list[str]:
        """Labs that have state or namespaces on this machine."""
        found = {p.name for p in STATE_ROOT.iterdir()} if STATE_ROOT.exists() else set()
        for ns in topology.existing_netns():
            if ns.endswith("-fab"):
                found.add(ns[: -len("-fab")])
        return sorted(found)

    # -- the application --------------------------------------------------------------------
    def _pod(self, name: str) -> dict[str, Any]:
        return next(p for p in self.inventory["pods"] if p["name"] == name)

    def _start_apps(self, plan: LabPlan, progress: Progress) -> None:
        """The demo services in their pods and, in a mesh lab, every pod's sidecar (pids.json
        names a sidecar `<pod>.sidecar`); waits until each says it is ready."""
        (self.state / "logs").mkdir(exist_ok=True)
        pids: dict[str, int] = {}
        servers = [p for p in plan.pods if p.service != "loadgen"]
        # (pod, pids key, module, verb, cgroup)
        procs: list[tuple[PodPlan, str, str, list[str], str | None]] = [
            (p, f"{p.name}.sidecar", "eastwest.lab.sidecar", [],
             self._pod(p.name).get("sidecar_cgroup"))
            for p in plan.pods if self._pod(p.name).get("sidecar")]
        procs += [(p, p.name, "eastwest.lab.app", ["serve"], self._pod(p.name).get("cgroup"))
                  for p in servers]
        for p, key, module, verb, cgroup in procs:
            log = open(self.state / "logs" / f"{key}.log", "ab")  # noqa: SIM115
            proc = subprocess.Popen(
                ["ip", "netns", "exec", p.netns, sys.executable, "-m", module, *verb,
                 "--state", str(self.state), "--pod", p.name],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=containers.joining(cgroup))
            pids[key] = proc.pid
        (self.state / "pids.json").write_text(json.dumps(pids))
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = set(pids)
        while waiting:
            waiting = {n for n in waiting if not (self.state / "ready" / n).exists()}
            dead = [n for n in waiting if _exited(pids[n])]
            if dead or time.monotonic() > deadline:
                why = "exited" if dead else "did not become ready in time"
                names = dead or sorted(waiting)
                tail = (self.state / "logs" / f"{names[0]}.log").read_text()[-800:]
                raise LabError(f"demo service or sidecar {', '.join(names)} {why}; log:\n{tail}")
            time.sleep(0.05)
        sidecars = sum(1 for k in pids if k.endswith(".sidecar"))
        progress(f"demo application running in {len(servers)} pods"
                 + (f", {sidecars} {mesh.COMM} sidecars" if sidecars else ""))

    def traffic(self, duration: float, truth_path: str | Path | None = None, seed: int | None = None,
                rate: float = 20.0, workers: int = 4, progress: Progress = _quiet) -> list[dict[str, Any]]:
        """Drive the application for `duration` seconds; return (and write) the truth lines of
        every connection made in that time, sorted by start."""
        require_root()
        if duration <= 0:
            raise LabError(f"--duration must be > 0, got {duration}")
        truth_dir = self.state / "truth"
        truth_dir.mkdir(exist_ok=True)
        offsets = {f.name: f.stat().st_size for f in truth_dir.glob("*.jsonl")}
        hop_offsets = {f.name: f.stat().st_size for f in (self.state / "mesh").glob("*.jsonl")}
        lg = next(p for p in self.inventory["pods"] if p["service"] == "loadgen")
        cmd = ["ip", "netns", "exec", lg["netns"], sys.executable, "-m", "eastwest.lab.app",
               "loadgen", "--state", str(self.state), "--pod", lg["name"], "--duration",
               str(duration), "--rate", str(rate), "--workers", str(workers)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        progress(f"driving the demo application for {duration:g} s from {lg['name']}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120,
                              preexec_fn=containers.joining(lg.get("cgroup")))
        if proc.returncode != 0:
            how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exit status {proc.returncode}")
            raise LabError(f"load generator failed ({how}): {proc.stderr.strip()[-800:] or 'no output'}")
        lines: list[dict[str, Any]] = []
        for f in sorted(truth_dir.glob("*.jsonl")):
            with f.open("rb") as fh:
                fh.seek(offsets.get(f.name, 0))
                lines += [json.loads(x) for x in fh.read().splitlines() if x.strip()]
        lines.sort(key=lambda t: (t["start"], t["client_ip"], t["client_port"]))
        if self.inventory.get("cluster_services"):
            self.resolve_backends(lines)
        if self.inventory.get("mesh"):
            self.attach_mesh(lines, hop_offsets)
        if truth_path is not None:
            Path(truth_path).write_text("".join(json.dumps(t) + "\n" for t in lines))
        outcomes = Counter(t["outcome"] for t in lines)
        progress(f"{len(lines)} connections: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        return lines

    def resolve_backends(self, lines: list[dict[str, Any]]) -> None:
        """Behind a ClusterIP or NodePort only the server knows it served a call: fill each
        such truth line's `server_*` from the ledger line whose PROXY header names the same
        client and dialled address, and say whether the server saw the client's own address
        (`snat`: false) or a node's (`snat`: true, `server_saw_ip`/`server_saw_port`).
        A server writes its ledger line after the client's truth line: wait for stragglers."""
        pending = [t for t in lines if t.get("via") and t["outcome"] != "refused"]
        deadline = time.monotonic() + LEDGER_WAIT
        while True:
            by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
            for x in sorted(self.ledger(), key=lambda x: x["end"]):
                if "proxy" in x:
                    pr = x["proxy"]
                    key = (x["protocol"], pr["client_ip"], pr["client_port"], pr["dialled_ip"],
                           pr["dialled_port"])
                    by_key.setdefault(key, []).append(x)
            keys = [(t["protocol"], t["client_ip"], t["client_port"], t["dialled_ip"],
                     t["dialled_port"]) for t in pending]
            need = Counter(keys)
            if all(len(by_key.get(k, [])) >= n for k, n in need.items()):
                break
            if time.monotonic() > deadline:
                missing = [k for k, n in need.items() if len(by_key.get(k, [])) < n]
                raise LabError(f"{len(missing)} Service calls have no server ledger line "
                               f"(first: {missing[0]})")
            time.sleep(0.1)
        pods = {p["name"]: p for p in self.inventory["pods"]}
        for t, key in sorted(zip(pending, keys, strict=True), key=lambda tk: tk[0]["start"]):
            served = by_key[key].pop(0)
            t.update(server_fields(pods[served["pod"]], served["server_port"], t["family"]))
            t["snat"] = (served["client_ip"], served["client_port"]) != (t["client_ip"],
                                                                         t["client_port"])
            t["server_saw_ip"], t["server_saw_port"] = served["client_ip"], served["client_port"]

    def attach_mesh(self, lines: list[dict[str, Any]], hop_offsets: dict[str, int]) -> None:
        """Each meshed TCP truth line's `mesh` (eastwest/lab/mesh.py `annotate`), from the hop
        lines the sidecars wrote since `hop_offsets`; waits up to LEDGER_WAIT for hop lines
        still being written (a sidecar writes its hop once both its sockets are closed). With
        Services, `snat` then says whether the network translated the source of the sidecars'
        hop (the server app always sees its own sidecar, 127.0.0.6)."""
        meshed = set(self.inventory["mesh"]["pods"])
        deadline = time.monotonic() + LEDGER_WAIT
        while True:
            hops = mesh.read_hops((self.state / "mesh").glob("*.jsonl"), hop_offsets)
            missing = mesh.annotate(lines, hops, meshed)
            if not missing:
                break
            if time.monotonic() > deadline:
                t = missing[0]
                raise LabError(f"{len(missing)} meshed calls have no sidecar hop lines (first: "
                               f"{t['client_pod']} {t['client_ip']}:{t['client_port']} -> "
                               f"{t['server_port']}, {t['outcome']})")
            time.sleep(0.1)
        for t in lines:
            m = t.get("mesh")
            if m and "snat" in t and m["server_saw_ip"] is not None:
                t["snat"] = (m["server_saw_ip"], m["server_saw_port"]) != (m["client_ip"],
                                                                           m["client_port"])

    def mesh_hops(self) -> list[dict[str, Any]]:
        """Every hop line the sidecars wrote so far (one per proxied connection), by start."""
        hops = mesh.read_hops((self.state / "mesh").glob("*.jsonl"))
        return sorted(hops, key=lambda h: h["start"])

    def ledger(self) -> list[dict[str, Any]]:
        """Every server-side ledger line so far (what servers read and wrote per connection)."""
        out: list[dict[str, Any]] = []
        for f in sorted((self.state / "ledger").glob("*.jsonl")):
            out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        return out

    def status(self) -> dict[str, Any]:
        pids = _read_pids(self.state)
        present = set(topology.lab_netns(self.name))
        return {
            "name": self.name,
            "state_dir": str(self.state),
            "vni": self.inventory["vni"],
            "vxlan_port": self.inventory["vxlan_port"],
            "ip_family": self.inventory.get("ip_family", "ipv4"),
            "hosts": [{**h, "up": h["netns"] in present} for h in self.inventory["hosts"]],
            "pods": [{"name": p["name"], "host": p["host"], "ip": p["ip"],
                      "ips": p.get("ips", [p["ip"]]), "service": p["service"],
                      "netns": p["netns"], "up": p["netns"] in present,
                      "process": ("running" if p["name"] in pids and not _exited(pids[p["name"]])
                                  else "-" if p["service"] == "loadgen" else "stopped"),
                      **({"sidecar": _running(pids.get(f"{p['name']}.sidecar"))}
                         if p.get("sidecar") else {})}
                     for p in self.inventory["pods"]],
        }

    def host_netns(self, host: str) -> list[str]:
        """The namespaces a collector playing `host` scopes itself to: the host's and its pods'."""
        h = next(x for x in self.inventory["hosts"] if x["name"] == host)
        return [h["netns"], *h["pod_netns"]]


def _host_route(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def workload_map(plan: LabPlan) -> dict[str, list[dict[str, object]]]:
    """The static workload map of the lab: every address of every pod (IPv4 /32, IPv6 /128) to
    its service, every underlay address to its node; with Services (`--services`), each host's
    gateway on the pod network (its `br0` address, the source its NodePort masquerades calls
    with) to its node too, unless a pod holds it (a `host-network` lab's api), and the
    `services` section: each ClusterIP, and the NodePort's node address and port, to its
    Service (what names a Service in the graph's Service view, docs/aggregator.md)."""
    entries: list[dict[str, object]] = []
    for p in plan.pods:
        svc = SERVICE_BY_NAME[p.service]
        for addr in p.ips:
            entries.append({"match": _host_route(addr), "name": p.service,
                            "namespace": svc.namespace, "kind": svc.kind, "host": p.host,
                            "labels": {"app": p.service, "pod": p.name, "lab": plan.name}})
    pod_ips = {a for p in plan.pods for a in p.ips}
    for h in plan.hosts:
        node = {"name": f"node-{h.name}", "namespace": None, "kind": "Node", "host": h.name,
                "labels": {"lab": plan.name}}
        entries.append({"match": _host_route(h.underlay_ip), **node})
        if plan.services and cluster.gateway(h.index) not in pod_ips:
            entries.append({"match": _host_route(cluster.gateway(h.index)), **node})
    if not plan.services:
        return {"workloads": entries}
    services: list[dict[str, object]] = []
    for cs in cluster.cluster_services(plan):
        services.append({"match": cs["cluster_ip"], "name": cs["name"],
                         "namespace": cs["namespace"]})
        if cs["node_port"]:
            np = cs["node_port"]
            services.append({"match": f"{np['ip']}:{np['port']}", "name": cs["name"],
                             "namespace": cs["namespace"]})
    return {"workloads": entries, "services": services}


def _make_containers(name: str, inv: dict[str, Any], progress: Progress) -> None:
    """Each pod's container id and cgroup (eastwest/lab/containers.py) into the inventory, and
    a meshed pod's sidecar container's (`sidecar_container_id`, `sidecar_cgroup`)."""
    made = {p["name"]: containers.container_of(name, p["name"], i)
            for i, p in enumerate(inv["pods"])}
    cars = {p["name"]: containers.sibling(name, p["name"], "sidecar", made[p["name"]])
            for p in inv["pods"] if p.get("sidecar")}
    root = containers.create(name, [path for _, path in (*made.values(), *cars.values())])
    for p in inv["pods"]:
        cid, path = made[p["name"]]
        p["container_id"], p["cgroup"] = (cid, path) if root is not None else (None, None)
        if p["name"] in cars:
            cid, path = cars[p["name"]]
            p["sidecar_container_id"], p["sidecar_cgroup"] = ((cid, path) if root is not None
                                                              else (None, None))
    progress(f"pods in containerd, CRI-O and Docker style cgroups under {root}"
             f"{containers.lab_group(name)}" if root is not None
             else "no cgroup2 mount: pods run without container cgroups")


def _write_workload_map(plan: LabPlan, path: Path) -> None:
    path.write_text(yaml.safe_dump(workload_map(plan), sort_keys=False))


def _read_pids(state: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads((state / "pids.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def _stop_pidfile_processes(state: Path) -> None:
    for pid in _read_pids(state).values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    # stragglers are SIGKILLed by namespace in topology.remove


def _running(pid: int | None) -> str:
    return "running" if pid is not None and not _exited(pid) else "stopped"


def _exited(pid: int) -> bool:
    try:
        wpid, _ = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            return True
    except ChildProcessError:
        pass  # not our child (another process started the lab): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state == "Z"
    except OSError:
        return True


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt
