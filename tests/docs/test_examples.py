"""Every command of README.md and docs/*.md that can run on one machine, run as written (with the
fill-ins of tests/docs/fill.py), in document order, against what the docs assume is there: a
running aggregator with live lab traffic (an `eastwest demo` of the module, lab `ewdocs`), the lab
`ewlab` the docs name, real NATS and ClickHouse servers, a fake OTLP receiver for Tempo.

One test per command. A command passes when it exits as the doc says (0 unless its comment says
otherwise, e.g. "exit 0 or 1"), prints no traceback, and its output has the shape the doc shows
(a `console` block's output exactly; JSON lines where the doc says "JSON lines"; see SHAPES). A
command that runs until stopped (an aggregator, a collector with no --duration, `eastwest demo`,
`make run|demo`, a line ending in `&`) passes when it comes up (its port answers /readyz, its
metrics answer, or it is still running after a while) and then stops cleanly on Ctrl-C (SIGINT
to its process group, exit 0). Blocks marked `<!-- example: skip ... -->` are reported as
skipped with the marker's reason; a few commands are skipped for the reason in NOT_HERE.
A `synopsis` block's flags must each be in the command's --help. A JSON block marked
`response GET PATH` must have no key the real answer lacks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ARTIFACTS, CAPTURES, REPO, require_root
from tests.docs.examples import (
    Block,
    Command,
    all_blocks,
    comment,
    documented_json,
    strip_comment,
)
from tests.docs.fill import CAPTURES as CAPTURE_NAMES
from tests.docs.fill import Servers, fill
from tests.servers import free_port

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
WORLD_LAB = "ewdocs"          # the module's running demo (not a name the docs use)
DOC_LABS = ("ewlab", "ewdemo")  # the names the docs' own commands create
ENV = os.environ | {"PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
                    "PYTHONUNBUFFERED": "1"}
LOGS = ARTIFACTS / "docs-examples"

# commands that can run here but not inside this test, with the reason
NOT_HERE = {
    "make test": "it is this suite (make test runs tests/docs)",
    "make lint": "make test runs it before the suite (`test: setup lint`)",
    "make bench": "the benchmarks run for ~40 minutes; tests/unit/test_bench_smoke.py runs each "
                  "at a tiny size",
}

# what a command's standard output must look like (a regex searched in it), beyond exit 0
SHAPES: list[tuple[str, str]] = [
    (r"^eastwest --help$", r"usage: eastwest .*\n(.*\n)*.*collector"),
    (r"^eastwest lab status$", r"ewlab"),
    (r"^eastwest collector --pcap capture\.pcap --stdout$", r'"vni":'),
    (r"--pcap capture\.pcapng --stdout --decoder scapy", r'"vni":'),
    (r"--vxlan-port 8472 --pcap flannel\.pcap", r'"vni":'),
    (r"--pcap ovn\.pcap --stdout", r'"type":\s*"geneve"'),
    (r"^eastwest flows --to-workload db --not --outcome ok$", r"\bdb\b"),
    (r"^eastwest top --to-workload db", r"\bdb\b"),
    (r"^eastwest top --by bytes", r"\bdb\b"),
    (r"^eastwest graph -o mermaid$", r"^(graph|flowchart) "),
    (r"^eastwest workloads api$", r"\bdb\b"),
    (r"^eastwest workloads db$", r"\bapi\b"),
    (r"^eastwest diff ", r"\S"),
    (r"^eastwest flows --input-file capture\.pcap --protocol tcp$", r"\btcp\b.*\bpath\b"),
    (r"^eastwest collector --print-bpf$", r"TRACEPOINT_PROBE|RAW_TRACEPOINT_PROBE|SEC\("),
    (r"/api/v1/graph\?from=15m'$", r'"edges":\[\{"source"'),
    (r"/api/v1/graph\?group_by=namespace&format=mermaid'$", r"^(graph|flowchart) "),
    (r"/api/v1/flows\?to_workload=db&not_outcome=ok", r'"flows":\[\{.*"db"'),
    (r"/api/v1/workloads/db'$", r'"callers":\[\{"source":"[^"]*\bapi"'),
    (r"/api/v1/diff\?", r'"added":'),
    (r"/api/v1/records\?since=5m", r'"records":\[\{'),
]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- the world the docs assume ---------------------------------------------------------------------
@dataclass
class World:
    root: Path
    servers: Servers
    env: dict[str, str]
    tokens: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    block_bg: dict[str, list[Running]] = field(default_factory=dict)
    ran: dict[str, str] = field(default_factory=dict)   # filled daemon command -> where it ran
    lab_up: bool = False

    def workdir(self, block: Block) -> Path:
        d = self.root / re.sub(r"[^A-Za-z0-9]+", "_", block.id)
        if d.exists():
            return d
        (d / "data").mkdir(parents=True)
        (d / "bash_completion.d").mkdir()
        (d / "site-functions").mkdir()
        shutil.copy(self.root / "demo" / "data" / "tokens.env", d / "data" / "tokens.env")
        for name, src in CAPTURE_NAMES.items():
            if name.endswith(".pcapng"):
                _as_pcapng(CAPTURES / src, d / name)
            else:
                shutil.copy(CAPTURES / src, d / name)
        return d

    def ensure_doc_lab(self) -> None:
        """The lab `ewlab` the docs' scoped examples name (docs/lab.md's default lab)."""
        from eastwest.lab import Lab

        if self.lab_up and "ewlab" in Lab.names():
            return
        Lab.down_by_name("ewlab")
        Lab.up(name="ewlab", hosts=3, pods_per_host=2)
        self.lab_up = True


def _as_pcapng(src: Path, dst: Path) -> None:
    from scapy.utils import PcapNgWriter, rdpcap

    w = PcapNgWriter(str(dst))
    for p in rdpcap(str(src)):
        w.write(p)
    w.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_root()
    from eastwest.lab import Lab
    from tests.servers import NatsServer, shared_clickhouse

    for name in (WORLD_LAB, *DOC_LABS):
        Lab.down_by_name(name)
    root = tmp_path_factory.mktemp("docs-examples")
    LOGS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    demo_log = LOGS / "world-demo.log"
    # Ctrl-C must reach the examples: a signal the test process ignores (as a background job of a
    # non-interactive shell does SIGINT) stays ignored in its children; one it handles is reset
    # to the default by exec. No preexec_fn: no Python runs in a forked child.
    sigint = signal.getsignal(signal.SIGINT)
    if sigint is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    demo = subprocess.Popen(
        # with Services: the docs' Service examples (`--to-service shop/api`) need them
        ["eastwest", "demo", "--name", WORLD_LAB, "--services", "--listen", f"127.0.0.1:{port}",
         "--data", str(root / "demo" / "data")], env=ENV, cwd=root, stdin=subprocess.DEVNULL,
        stdout=demo_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    receivers = subprocess.Popen([sys.executable, "-m", "tests.docs.otlp_receivers"], cwd=REPO,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    nats = NatsServer().start()
    clickhouse = shared_clickhouse()
    ca = root / "tempo-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(root / "tempo-ca.key"),
                    "-out", str(ca)], check=True, capture_output=True)
    w: World | None = None
    try:
        assert receivers.stdout is not None
        grpc_port, http_port = receivers.stdout.readline().split()
        tokens = _await_demo(demo, port, root / "demo" / "data" / "tokens.env", demo_log)
        servers = Servers(
            aggregator=f"127.0.0.1:{port}", otlp_http=f"127.0.0.1:{http_port}",
            otlp_grpc=f"127.0.0.1:{grpc_port}",
            clickhouse_url=clickhouse.url("ewdocs"), nats_url=nats.url, ca_file=str(ca),
            free_port=free_port)
        env = ENV | tokens | {
            "EASTWEST_SERVER": f"http://127.0.0.1:{port}",
            "EASTWEST_TOKEN": tokens["EASTWEST_READ_TOKEN"],
            "TOKEN": "docs-example-token",
            "EW_FILL_EASTWEST_INGEST_TOKEN": tokens["EASTWEST_INGEST_TOKEN"],
            "EW_FILL_EASTWEST_READ_TOKEN": tokens["EASTWEST_READ_TOKEN"]}
        _await_traffic(env)
        w = World(root, servers, env, tokens)
        yield w
    finally:
        for runs in (w.block_bg.values() if w else []):
            for r in runs:
                r.stop()
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
        nats.stop()
        if receivers.stdin is not None:
            receivers.stdin.close()
        receivers.wait(30)
        signal.signal(signal.SIGINT, sigint)
        for name in (WORLD_LAB, *DOC_LABS):
            Lab.down_by_name(name)


def _await_demo(proc: subprocess.Popen, port: int, tokens: Path, log: Path) -> dict[str, str]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"eastwest demo exited: {log.read_text()[-3000:]}"
        if tokens.exists() and "eastwest is running" in log.read_text() and _ready(
                f"http://127.0.0.1:{port}/readyz"):
            return dict(x.split("=", 1) for x in tokens.read_text().split())
        time.sleep(1)
    pytest.fail(f"eastwest demo not up after 300 s: {log.read_text()[-3000:]}")


def _await_traffic(env: dict[str, str]) -> None:
    """Until the demo's calls to db, and its failed ones, are stored (the docs query them)."""
    deadline = time.monotonic() + 120
    url = env["EASTWEST_SERVER"] + "/api/v1/flows"
    headers = {"Authorization": f"Bearer {env['EASTWEST_TOKEN']}"}
    while time.monotonic() < deadline:
        r = httpx.get(url, params={"to_workload": "db", "not_outcome": "ok", "limit": 1},
                      headers=headers, timeout=30)
        if r.status_code == 200 and r.json()["flows"]:
            return
        time.sleep(2)
    pytest.fail("the demo stored no failed call to db in 120 s")


# -- running one command ---------------------------------------------------------------------------
@dataclass
class Running:
    cmd: str
    where: str
    proc: subprocess.Popen
    out: Path
    err: Path
    started: float = field(default_factory=time.monotonic)

    def text(self) -> tuple[str, str]:
        return (self.out.read_text(errors="replace"), self.err.read_text(errors="replace"))

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
                return -9
        return int(self.proc.returncode)


ZSH_PRELUDE = 'fpath=("$PWD/site-functions" $fpath)'  # zsh's first fpath dir: the example's own


def start(cmd: str, prelude: list[str], cwd: Path, env: dict[str, str], where: str,
          shell: str = "bash") -> Running:
    first = ["set -o pipefail"] if shell == "bash" else [ZSH_PRELUDE]
    script = "\n".join([*first, *prelude, cmd])
    tag = re.sub(r"[^A-Za-z0-9]+", "_", where)
    out, err = LOGS / f"{tag}.out", LOGS / f"{tag}.err"
    proc = subprocess.Popen([shell, "-fc" if shell == "zsh" else "-c", script], cwd=cwd,
                            env=env, stdin=subprocess.DEVNULL, stdout=out.open("wb"),
                            stderr=err.open("wb"), start_new_session=True)
    return Running(cmd, where, proc, out, err)


def runs_until_stopped(cmd: str) -> bool:
    if re.fullmatch(r"make (run|demo)", cmd) or re.match(r"eastwest demo\b", cmd):
        return True
    if re.match(r"eastwest aggregator\b", cmd) or re.search(r"\beastwest aggregator\b", cmd):
        return "--help" not in cmd
    if re.search(r"(^|\s)eastwest collector\b", cmd):
        return not re.search(r"--(duration|pcap|check|print-bpf|help)\b", cmd)
    return False


def await_up(r: Running) -> str:
    """'' when the daemon came up, else what is wrong."""
    cmd = r.cmd
    m = re.search(r"--listen (\S+)", cmd)
    if re.fullmatch(r"make (run|demo)", cmd) or re.match(r"eastwest demo\b", cmd):
        url, wait, needs = (f"http://{m.group(1) if m else '127.0.0.1:8470'}/readyz", 300,
                            "eastwest is running")
    elif re.search(r"\beastwest aggregator\b", cmd):
        url, wait, needs = f"http://{m.group(1)}/readyz", 120, ""
    else:  # a collector: it says when every source sees traffic
        mm = re.search(r"--metrics-listen (\S+)", cmd)
        url, wait, needs = ((f"http://{mm.group(1)}/metrics" if mm else ""), 60,
                            "eastwest collector: running")
    deadline = r.started + wait
    while time.monotonic() < deadline:
        if r.proc.poll() is not None:
            return f"exited {r.proc.returncode} before it was up"
        out, err = r.text()
        if needs and needs not in out + err:
            time.sleep(0.5)
            continue
        if not url or _ready(url):
            return ""
        time.sleep(1)
    return f"not up after {wait} s ({url or 'still running'})"


def allowed_exits(cmd_with_comment: str) -> set[int]:
    m = re.search(r"exit (\d+)((?:,? (?:or )?\d+)*)", comment(cmd_with_comment))
    if not m:
        return {0}
    return {int(x) for x in re.findall(r"\d+", m.group(0))}


def check_output(cmd: str, out: str, command: Command) -> str:
    if command.output:
        shown = [x for x in command.output if x.strip()]
        got = [x.rstrip() for x in out.splitlines() if x.strip()]
        if got != shown:
            return f"output differs from the doc:\n{chr(10).join(got)}\nvs\n{chr(10).join(shown)}"
    for pat, want in SHAPES:
        if re.search(pat, cmd) and not re.search(want, out, re.M):
            return f"output lacks /{want}/: {out[:1500]!r}"
    if re.search(r"--stdout\b", cmd) and "|" not in cmd and ">" not in cmd:
        for line in out.splitlines():
            rec = json.loads(line)
            if not {"start", "end", "observer"} <= rec.keys():
                return f"not a flow record: {line[:300]}"
    return ""


# -- the tests ---------------------------------------------------------------------------------------
BLOCKS = [b for b in all_blocks() if b.is_example]
CASES = [pytest.param(b, k, id=f"{b.doc}:{c.line}") for b in BLOCKS for k, c in enumerate(b.commands)]


def _block_prelude(block: Block, upto: int, s: Servers) -> list[str]:
    return [strip_comment(fill(c.text, s)) for c in block.commands[:upto]
            if re.match(r"(export |set -a|source |\. )", strip_comment(c.text))]


@pytest.mark.parametrize("block,k", CASES)
def test_doc_example(world: World, block: Block, k: int) -> None:
    command = block.commands[k]
    where = f"{block.doc}:{command.line}"
    if block.mark == "skip":
        pytest.skip(f"{where}: {block.reason}")
    bare_written = strip_comment(command.text)
    if bare_written in NOT_HERE:
        pytest.skip(f"{where}: `{bare_written}`: {NOT_HERE[bare_written]}")
    if block.mark == "synopsis":
        _check_synopsis(bare_written, world.env)
        return
    cmd = strip_comment(fill(command.text, world.servers))
    if re.search(r"\bewlab-h", cmd):
        world.ensure_doc_lab()
    cwd = world.workdir(block)
    prelude = _block_prelude(block, k, world.servers)
    try:
        background = cmd.endswith("&")
        if background or runs_until_stopped(cmd):
            _run_daemon(world, block, cmd.rstrip("& "), prelude, cwd, where, background,
                        defer=background and _next_is_background(block, k, world.servers))
        else:
            _run_once(cmd, command, prelude, cwd, world.env, where,
                      "zsh" if block.lang == "zsh" else "bash")
    finally:
        if k == len(block.commands) - 1:
            _stop_background(world, block)


def _run_once(cmd: str, command: Command, prelude: list[str], cwd: Path, env: dict[str, str],
              where: str, shell: str) -> None:
    r = start(cmd, prelude, cwd, env, where, shell)
    try:
        rc = r.proc.wait(240)
    except subprocess.TimeoutExpired:
        r.stop(10)
        pytest.fail(f"{where}: `{cmd}` still running after 240 s")
    out, err = r.text()
    assert rc in allowed_exits(command.text), f"{where}: `{cmd}` exited {rc}: {err[-3000:]}"
    assert "Traceback" not in err, f"{where}: `{cmd}` printed a traceback: {err[-3000:]}"
    bad = check_output(cmd, out, command)
    assert not bad, f"{where}: `{cmd}`: {bad}"
    if "eastwest completion zsh >" in cmd:  # zsh's compinit finds and binds it
        got = subprocess.run(["zsh", "-fc", f"{ZSH_PRELUDE}; autoload -U compinit && "
                              'compinit -u -D && print -- "${_comps[eastwest]}"'],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == "_eastwest", f"{where}: zsh did not load it: {got}"


def _next_is_background(block: Block, k: int, servers: Servers) -> bool:
    return (k + 1 < len(block.commands)
            and strip_comment(fill(block.commands[k + 1].text, servers)).endswith("&"))


def _run_daemon(world: World, block: Block, cmd: str, prelude: list[str], cwd: Path, where: str,
                background: bool, defer: bool = False) -> None:
    """Start a command that runs until stopped and check that it comes up. A background one
    followed by another (`a & b & c &`) is checked with the last of the run: they come up side
    by side, as in a shell, and each is still checked from its own start."""
    if re.fullmatch(r"make (run|demo)", cmd):
        if cmd in world.ran:
            return  # the same command, run and checked at world.ran[cmd]
        cwd = REPO
    r = start(cmd, prelude, cwd, world.env, where)
    if background:
        world.block_bg.setdefault(block.id, []).append(r)
        if defer:
            return
        pending = [x for x in world.block_bg[block.id] if x.where not in world.ran.values()]
        failures = []
        for x in pending:
            bad = await_up(x)
            if bad:
                out, err = x.text()
                failures.append(f"{x.where}: `{x.cmd}` {bad}:\n{out[-2000:]}\n{err[-3000:]}")
            else:
                world.ran[x.cmd] = x.where
        if failures:
            for x in world.block_bg.pop(block.id):
                x.stop(30)
            pytest.fail("\n".join(failures))
        return
    bad = await_up(r)
    if bad:
        r.stop(30)
        out, err = r.text()
        pytest.fail(f"{where}: `{cmd}` {bad}:\n{out[-2000:]}\n{err[-3000:]}")
    _stop_clean(r, where)
    world.ran[cmd] = where


def _stop_clean(r: Running, where: str) -> None:
    """Ctrl-C: exit 0, or 130 (the shell's "stopped by SIGINT") for a pipeline whose reader got
    the signal too; make itself answers an interrupt with 2 (its child is what is checked)."""
    rc = r.stop()
    out, err = r.text()
    ok = {0, 130} if "|" in r.cmd else {0}
    if r.cmd.startswith("make "):  # make dies of the signal; eastwest demo cleans up behind it
        ok = {0, 2, 130, -int(signal.SIGINT)}
        deadline = time.monotonic() + 180
        while "eastwest demo: stopped" not in r.text()[1] and time.monotonic() < deadline:
            time.sleep(1)
        out, err = r.text()
        assert "eastwest demo: stopped" in err, f"{where}: `{r.cmd}` did not stop cleanly: {err}"
    assert rc in ok, f"{where}: `{r.cmd}` exited {rc} on Ctrl-C:\n{out[-1500:]}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{where}: `{r.cmd}` printed a traceback: {err[-3000:]}"


def _stop_background(world: World, block: Block) -> None:
    runs = world.block_bg.pop(block.id, [])
    failures = []
    for r in runs:
        if r.proc.poll() is not None:
            failures.append(f"{r.where}: `{r.cmd}` ended by itself ({r.proc.returncode}) "
                            f"before the block's end: {r.text()[1][-2000:]}")
            continue
        try:
            _stop_clean(r, r.where)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def _check_synopsis(line: str, env: dict[str, str]) -> None:
    """Each --flag of a usage synopsis is an option of that command (its --help says so)."""
    cmd = []  # the command words: up to the first argument (FILE..., a flag, an option group)
    for w in line.split():
        if w.startswith(("[", "-")) or not w.islower() or len(cmd) == 4:
            break
        cmd.append(w)
    helptext = subprocess.run([*cmd, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert helptext.returncode == 0, helptext.stderr
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", line))
    missing = {f for f in flags if f not in helptext.stdout}
    assert not missing, f"`{line}`: {sorted(missing)} not in `{' '.join(cmd)} --help`"


RESPONSES = [pytest.param(b, id=b.id) for b in all_blocks() if b.mark == "response"]


@pytest.mark.parametrize("block", RESPONSES)
def test_doc_response_shape(world: World, block: Block) -> None:
    """A documented answer has no key the real answer lacks (nested: the first list element)."""
    method, _, path = block.reason.partition(" ")
    documented = documented_json(block)
    headers = {"Authorization": f"Bearer {world.env['EASTWEST_TOKEN']}"}
    r = httpx.request(method, world.env["EASTWEST_SERVER"] + path, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    missing = _missing_keys(documented, r.json(), "")
    assert not missing, f"{block.id}: the doc shows keys the answer of {block.reason} lacks: {missing}"


# maps whose keys are data, not shape (a workload's labels): present, but not compared inside
FREE_FORM = {"labels", "annotations"}


def _missing_keys(doc: Any, real: Any, at: str) -> list[str]:
    if isinstance(doc, dict):
        if not isinstance(real, dict):
            return [at or "."]
        out = []
        for k, v in doc.items():
            if k not in real:
                out.append(f"{at}.{k}")
            elif k not in FREE_FORM:
                out += _missing_keys(v, real[k], f"{at}.{k}")
        return out
    if isinstance(doc, list) and doc and isinstance(real, list) and real:
        return _missing_keys(doc[0], real[0], f"{at}[0]")
    return []
