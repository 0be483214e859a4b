"""What the docs and scripts point at exists: every `docs/*.md` a file cites, and every
`eastwest_*` metric that docs/, README.md and dashboards/ name is one the code defines (a doc
once named `eastwest_bpf_map_entries` for the collector's `eastwest_probe_map_entries`, and a
setup script cited an install page in docs/ that never existed)."""

from __future__ import annotations

import re
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
