"""What the docs and scripts point at exists: every `docs/*.md` a file cites, and every
`eastwest_*` metric that docs/, README.md and dashboards/ name is one the code defines (a doc
once named `eastwest_bpf_map_entries` for the collector's `eastwest_probe_map_entries`, and a
setup script cited an install page in docs/ that never existed)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
CODE = ("collector", "aggregator", "eastwest")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _files(*globs: str) -> list[Path]:
    return [p for g in globs for p in REPO.glob(g) if p.is_file() and ".venv" not in p.parts
            and "node_modules" not in p.parts]


def test_every_cited_doc_exists():
    cited: dict[str, list[str]] = {}
    for p in _files("*.md", "Makefile", "docs/*.md", "scripts/*", "deploy/**/*", "collector/**/*.py",
                    "aggregator/**/*.py", "eastwest/**/*.py", "web/src/**/*", "bench/*.py",
                    "tests/**/*.py"):
        for m in re.finditer(r"\bdocs/([a-z0-9_-]+\.md)\b", p.read_text(errors="replace")):
            cited.setdefault(m.group(1), []).append(str(p.relative_to(REPO)))
    missing = {d: sorted(set(w))[:3] for d, w in cited.items() if not (REPO / "docs" / d).exists()}
    assert not missing, f"cited but not in docs/: {missing}"
    assert len(cited) >= 10


def test_every_metric_the_docs_and_dashboards_name_is_defined_in_the_code():
    code = "\n".join(p.read_text(errors="replace") for d in CODE for p in _files(f"{d}/**/*.py"))
    defined = set(re.findall(r"[\"'](eastwest_[a-z0-9_]+)", code))
    named: dict[str, list[str]] = {}
    for p in _files("README.md", "docs/*.md", "dashboards/*.json"):
        for m in re.finditer(r"\beastwest_[a-z0-9_]*[a-z0-9]\b", p.read_text(errors="replace")):
            named.setdefault(m.group(0), []).append(p.name)

    def known(name: str) -> bool:
        if name in defined:
            return True
        base = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), name)
        # a name built in an f-string: f"eastwest_correlation_lag_{key}"
        return base in defined or any(base.startswith(d) for d in defined if d.endswith("_"))

    unknown = {n: sorted(set(w)) for n, w in named.items() if not known(n)}
    assert not unknown, f"metrics named in docs/dashboards that no code defines: {unknown}"
    assert len(named) >= 20


def test_a_scoped_collector_without_an_underlay_warns_that_it_gives_no_wire_records(caplog):
    """docs/lab.md: a lab host's collector needs --underlay NETNS/eth0 for `path` records; one
    scoped with --netns but without it says so at start (an unscoped one only at -v)."""
    import argparse
    import logging

    from collector.main import _say_no_underlay

    with caplog.at_level(logging.INFO, logger="eastwest.collector"):
        _say_no_underlay(argparse.Namespace(netns=["ewlab-h1"], underlay=[]))
        _say_no_underlay(argparse.Namespace(netns=[], underlay=[]))
    scoped, unscoped = caplog.records
    assert scoped.levelno == logging.WARNING and "--underlay NETNS/eth0" in scoped.getMessage()
    assert unscoped.levelno == logging.INFO and "no wire (path) records" in unscoped.getMessage()


# flags the docs name that belong to other programs, with the program
OTHER_PROGRAMS = {"--from-literal": "kubectl", "--patch-file": "kubectl", "--now": "systemctl",
                  "--web": "prometheus (--web.enable-remote-write-receiver)",
                  "--mode": "iptables (-m statistic --mode nth)",
                  "--probability": "iptables (-m statistic --probability)",
                  "--dst-type": "iptables (-m addrtype --dst-type LOCAL)",
                  "--network": "podman build (--network none)",
                  "--physdev-in": "iptables (-m physdev, docs/policy.md)",
                  "--physdev-out": "iptables (-m physdev, docs/policy.md)",
                  "--to-ports": "iptables (REDIRECT --to-ports, the mesh lab's rules)",
                  "--dport": "iptables (-p tcp --dport, the mesh lab's rules)",
                  "--uid-owner": "iptables (-m owner --uid-owner, the mesh lab's rules)"}


def test_every_flag_the_docs_name_is_a_flag_of_eastwest():
    """`--flag` in inline code of README.md and docs/ (benchmarks.md names its bench scripts'
    flags) is an option of some `eastwest` command, of scripts/build-image.sh, or of the other
    program named here: a flag renamed or removed in the CLI fails here, not in a reader's
    shell."""
    import argparse

    from eastwest.cli import build_parser

    options: set[str] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for a in p._actions:
            options.update(a.option_strings)
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    walk(sub)

    walk(build_parser())
    # the image build script's options, from its own --help (it answers without root)
    helptext = subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh"), "--help"],
                              capture_output=True, text=True, check=True).stdout
    options.update(re.findall(r"^  (--[a-z][a-z0-9-]*)", helptext, flags=re.M))
    unknown: dict[str, set[str]] = {}
    for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if p.name == "benchmarks.md":
            continue
        for code in re.findall(r"`([^`]*)`", p.read_text()):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code):
                if flag not in options and flag not in OTHER_PROGRAMS:
                    unknown.setdefault(flag, set()).add(p.name)
    assert not unknown, f"flags named in the docs that no eastwest command has: {unknown}"
