"""`eastwest demo`: an aggregator, collectors pointed at it, and (unless `--no-lab`) a lab with
live cross-host traffic; Ctrl-C stops everything cleanly. `make run` is `--no-lab` (this host
only), `make demo` the full lab.

In:  flags.  Out: running processes (the aggregator, one collector per host) until Ctrl-C or
`--duration`; the ingest and read tokens in `DATA/tokens.env` (mode 0600).

The processes are started as `eastwest aggregator` / `eastwest collector` subprocesses (the same
commands a user runs), by `Stack`, which the transport lab tests reuse. With the lab, the
aggregator is given the lab's workload map (`--workload-map`), as a user with an inventory would
give theirs: the map shows the pods by service name (the banner says so). The aggregator runs in the
root namespace on loopback; each lab host's collector runs in the root namespace too, scoped with
`--netns` to the host's and its pods' namespaces (docs/lab.md, ENVIRONMENT: bcc needs the root
namespace's tracefs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  sudo eastwest demo                      lab of 3 hosts with Kubernetes-style Services (ClusterIPs,
                                          a NodePort) + aggregator + 3 collectors, until Ctrl-C
  sudo eastwest demo --no-services        pods call pods directly (no Services)
  sudo eastwest demo --mesh               ... and a service-mesh sidecar in every pod
  sudo eastwest demo --no-lab             aggregator + a collector for this host (= make run)
  sudo eastwest demo --duration 60        stop by itself after a minute

Tokens are generated into DATA/tokens.env (mode 0600) on the first run and reused afterwards:
  set -a; . ./data/tokens.env; set +a
  curl -H "Authorization: Bearer $EASTWEST_READ_TOKEN" http://127.0.0.1:8470/api/v1/records"""


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="lab + collectors + aggregator with live traffic",
                       description="Start an aggregator and collectors pointed at it, and a lab "
                       "of hosts in network namespaces with a demo application, so you see live "
                       "cross-host traffic within a minute. Ctrl-C tears everything down.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-lab", action="store_true",
                   help="no lab: one collector for this whole host (what `make run` starts)")
    p.add_argument("--name", default="ewdemo", help="lab name (default ewdemo)")
    p.add_argument("--hosts", type=int, default=3, help="lab hosts (default 3)")
    p.add_argument("--pods-per-host", type=int, default=None,
                   help="pods per lab host (default 3 with Services, else 2)")
    p.add_argument("--services", action=argparse.BooleanOptionalAction, default=None,
                   help="the lab's Kubernetes-style Services: ClusterIPs and a NodePort programmed "
                   "as kube-proxy does, the application calling them; each call is one connection "
                   "to its backend, the ClusterIP kept as service_ip (docs/lab.md, "
                   "docs/collector.md \"NAT\"); a NodePort call's halves are joined into one "
                   "once the middle host's record arrives, and the map holds them back until then "
                   "(the aggregator's --nodeport-hold). On by default where the lab can have them "
                   "(IPv4, 3 or more hosts); --no-services: pods call pods directly"),
    p.add_argument("--mesh", action="store_true",
                   help="a service-mesh sidecar (ew-sidecar, a transparent proxy behind Istio's "
                   "iptables) in every pod: each call is four sockets, which the collectors fold "
                   "into one app -> app connection with its hops (docs/lab.md \"mesh\", "
                   "docs/collector.md \"Service mesh\"); the dashboard's \"sidecars\" switch "
                   "shows the proxies; IPv4")
    p.add_argument("--ip-family", choices=("ipv4", "ipv6", "dual"), default="ipv4",
                   help="the lab's pod addresses (default ipv4; see `eastwest lab up --help`)")
    p.add_argument("--listen", default="127.0.0.1:8470", metavar="HOST:PORT",
                   help="aggregator address (default 127.0.0.1:8470)")
    p.add_argument("--data", default="./data", metavar="DIR",
                   help="DuckDB store, spools and tokens.env (default ./data)")
    p.add_argument("--rate", type=float, default=20.0, help="lab connections per second (default 20)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.set_defaults(func=_run)


# -- processes ---------------------------------------------------------------------------------
def ensure_tokens(path: Path) -> dict[str, str]:
    """Read DATA/tokens.env, or create it (mode 0600) with two fresh random tokens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"EASTWEST_INGEST_TOKEN={secrets.token_hex(24)}\n"
                     f"EASTWEST_READ_TOKEN={secrets.token_hex(24)}\n")
    os.chmod(path, 0o600)
    out = {}
    for line in path.read_text().splitlines():
        k, eq, v = line.partition("=")
        if eq:
            out[k.strip()] = v.strip()
    return out


def vxlan_live_available() -> bool:
    return importlib.util.find_spec("collector.vxlan.live") is not None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _term_with_parent(parent: int) -> Any:
    """A `preexec_fn`: the child gets SIGTERM when the process that started it dies, also by
    kill -9 (prctl PR_SET_PDEATHSIG), so a killed `eastwest demo` leaves no aggregator holding
    its port nor collector holding its probes; SIGTERM lets them flush and stop as usual. A
    parent already gone by then (the race the man page warns of) stops the child at once. The
    signal comes when the starting THREAD ends: the demo starts its children from its main
    thread."""
    import ctypes

    # looked up here, in the parent: between fork and exec of a threaded process the child
    # must not load libraries (a lock held by another thread at the fork is never released)
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class Stack:
    """An aggregator and collectors as subprocesses of `eastwest`, on one data directory. Each
    child is stopped (SIGTERM) when the process that started it dies, even by kill -9."""

    def __init__(self, data: Path, listen: str = "127.0.0.1:8470",
                 log_dir: Path | None = None) -> None:
        self.data = Path(data)
        self.listen = listen
        self.url = f"http://{listen}"
        self.tokens = ensure_tokens(self.data / "tokens.env")
        self.log_dir = log_dir or self.data / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.collectors: dict[str, subprocess.Popen[bytes]] = {}

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.tokens}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        return subprocess.Popen([sys.executable, "-m", "eastwest", *args], env=self._env(),
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_term_with_parent(os.getpid()))

    def start_aggregator(self, timeout: float = 60.0, extra: list[str] | None = None) -> None:
        self.aggregator = self._spawn("aggregator", ["aggregator", "--listen", self.listen,
                                                     "--data", str(self.data / "store"),
                                                     *(extra or [])])
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.aggregator is not None and self.aggregator.poll() is not None:
                raise RuntimeError(f"aggregator exited ({self.aggregator.returncode}); see "
                                   f"{self.log_dir / 'aggregator.log'}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"aggregator not ready at {self.url} after {timeout:g} s")

    def kill_aggregator(self) -> None:
        """kill -9: no shutdown, no flush; what was acknowledged must survive."""
        assert self.aggregator is not None
        self.aggregator.send_signal(signal.SIGKILL)
        self.aggregator.wait()

    def start_collector(self, cid: str, netns: list[str] | None = None,
                        underlay: list[str] | None = None, extra: list[str] | None = None) -> None:
        args = ["collector", "--aggregator", self.url, "--collector-id", cid,
                "--spool-dir", str(self.data / "spool" / cid), "--batch-age", "0.5",
                "--shutdown-timeout", "10"]
        for ns in netns or []:
            args += ["--netns", ns]
        if underlay and vxlan_live_available():
            for u in underlay:
                args += ["--underlay", u]
        elif netns is not None or not vxlan_live_available():
            args.append("--no-vxlan")
        self.collectors[cid] = self._spawn(cid, args + list(extra or []))

    def wait_collectors(self, timeout: float = 180.0) -> None:
        """Until every collector says it is running (its probes attached, its captures open:
        `eastwest collector: running`), so that no call of the traffic started next is missed
        (a NodePort call seen in part would stay two halves)."""
        deadline = time.monotonic() + timeout
        waiting = dict(self.collectors)
        while waiting:
            for cid, proc in list(waiting.items()):
                log = self.log_dir / f"{cid}.log"
                if proc.poll() is not None:
                    raise RuntimeError(f"collector {cid} exited ({proc.returncode}); see {log}")
                if b"eastwest collector: running" in log.read_bytes():
                    del waiting[cid]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"collectors {', '.join(sorted(waiting))} not running after "
                                   f"{timeout:g} s; see their logs in {self.log_dir}")
            time.sleep(0.2)

    def stop_collector(self, cid: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        proc = self.collectors.pop(cid)
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def read(self, path: str, **params: Any) -> Any:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        req = urllib.request.Request(f"{self.url}{path}?{query}", headers={
            "Authorization": f"Bearer {self.tokens['EASTWEST_READ_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        for cid in list(self.collectors):
            self.stop_collector(cid)
        if self.aggregator is not None and self.aggregator.poll() is None:
            self.aggregator.send_signal(signal.SIGTERM)
            try:
                self.aggregator.wait(30)
            except subprocess.TimeoutExpired:
                self.aggregator.kill()
                self.aggregator.wait()


# -- the command -------------------------------------------------------------------------------
def _services(args: argparse.Namespace) -> bool:
    """Services unless `--no-services`; by default only where the lab can have them (its plan
    with Services is not refused: IPv4, 3 or more hosts, enough pods, no pattern that excludes
    them: eastwest/lab/plan.py `check`), so `--ip-family ipv6` or `--hosts 2` alone still
    starts; an explicit `--services` where it cannot is refused by `Lab.up`, naming why. A
    NodePort call's halves are joined once the middle host's record arrives; the aggregator's
    graph holds them back until then (docs/aggregator.md, "NodePort calls with masquerade")."""
    if args.services is not None:
        return bool(args.services)
    from eastwest.errors import ConfigError
    from eastwest.lab.plan import make_plan

    try:
        make_plan(args.name, args.hosts, _pods(args, True), 4789, args.ip_family, True,
                  tuple(_patterns(args)))
    except ConfigError:
        return False
    return True


def _pods(args: argparse.Namespace, services: bool) -> int:
    """Pods per host: `--pods-per-host`, else 3 with Services (each service on two hosts), 2."""
    return int(args.pods_per_host) if args.pods_per_host is not None else 3 if services else 2


def _patterns(args: argparse.Namespace) -> list[str]:
    """The lab's network patterns the flags ask for (`Lab.up` refuses what cannot be built)."""
    return ["mesh"] if args.mesh else []


def _run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("eastwest demo: needs root (eBPF probes, network namespaces): use sudo",
              file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    data = Path(args.data).resolve()
    stack = Stack(data, args.listen)
    lab = None
    rc = 0
    try:
        if args.no_lab:
            stack.start_aggregator()
            stack.start_collector(os.uname().nodename)
        else:
            from eastwest.lab import Lab

            Lab.down_by_name(args.name)
            services = _services(args)
            lab = Lab.up(name=args.name, hosts=args.hosts, pods_per_host=_pods(args, services),
                         ip_family=args.ip_family, services=services,
                         patterns=_patterns(args),
                         progress=lambda m: print(f"eastwest demo: {m}", file=sys.stderr))
            # the lab's inventory, as a user with one would hand it over: pods by name
            stack.start_aggregator(extra=["--workload-map", str(lab.inventory["workload_map"])])
            for h in lab.inventory["hosts"]:
                stack.start_collector(f"{args.name}-{h['name'].split('-')[-1]}",
                                      netns=lab.host_netns(h["name"]),
                                      underlay=[f"{h['netns']}/{h['underlay_if']}"])
            print("eastwest demo: waiting for the collectors' probes to attach",
                  file=sys.stderr, flush=True)
            stack.wait_collectors()
            threading.Thread(target=_drive, args=(lab, args.rate, stop), daemon=True).start()
        _banner(stack, args, None if lab is None else str(lab.inventory["workload_map"]))
        _watch(stack, stop, args.duration)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"eastwest demo: {exc}", file=sys.stderr)
        rc = 1
    finally:
        stop.set()
        print("eastwest demo: stopping collectors (they flush), the aggregator, the lab",
              file=sys.stderr)
        stack.stop()
        if lab is not None:
            lab.down()
        print("eastwest demo: stopped", file=sys.stderr, flush=True)
    return rc


def _drive(lab: Any, rate: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            lab.traffic(duration=10.0, rate=rate)
        except Exception as exc:  # noqa: BLE001 - the lab is going down under us
            if not stop.is_set():
                print(f"eastwest demo: traffic stopped: {exc}", file=sys.stderr)
            return


def _banner(stack: Stack, args: argparse.Namespace, workload_map: str | None = None) -> None:
    names = (f"  workload names   from the lab's inventory, {workload_map}\n"
             "                   (--workload-map: pods named as your inventory would name them)\n"
             if workload_map else "")
    print(f"""
eastwest is running{'' if args.no_lab else f' with lab {args.name!r}'}:
{names}  dashboard        {stack.url}/#token={stack.tokens.get('EASTWEST_READ_TOKEN', '')}
  API reference    {stack.url}/docs   (Prometheus: {stack.url}/metrics)
  tokens           {stack.data / 'tokens.env'}  (mode 0600)
  from a shell     set -a; . {stack.data / 'tokens.env'}; set +a
                   eastwest graph --since 5m; eastwest flows --follow; eastwest top
  logs             {stack.log_dir}
Ctrl-C stops everything.
""", file=sys.stderr, flush=True)


def _watch(stack: Stack, stop: threading.Event, duration: float | None) -> None:
    end = None if duration is None else time.monotonic() + duration
    last = -1
    while not stop.is_set() and (end is None or time.monotonic() < end):
        stop.wait(5.0)
        for cid, proc in stack.collectors.items():
            if proc.poll() is not None:
                raise RuntimeError(f"collector {cid} exited ({proc.returncode}); see "
                                   f"{stack.log_dir / (cid + '.log')}")
        try:
            n = int(stack.read("/readyz")["records"])
        except OSError:
            continue
        if n != last:
            print(f"eastwest demo: {n} flow records stored", file=sys.stderr, flush=True)
            last = n
