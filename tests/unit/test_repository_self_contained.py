"""The repository stands alone: a clone runs its tests and reads its docs without any folder
beside it or elsewhere on the machine that built it.

- No file of the repository (what `git ls-files --cached --others --exclude-standard` lists, or
  the same walk by .gitignore where there is no .git) names data or docs outside it: a folder
  named shared beside the clone (reached through the parent directory), a path joined from
  `REPO.parent` or from the parts "shared" and "pcaps", an environment variable that points the
  captures elsewhere, an absolute path under /work or a home directory, or the design pages that
  live only beside the repository.
- tests/captures/README.md lists every capture in that folder with the sha256 and size of the
  file as it is, an allowed licence (no GPL or LGPL in an Apache-2.0 project) whose text, when
  linked, is in the folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CAPTURES = REPO / "tests" / "captures"
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

# Each pattern: (what it catches, regex). The quote class and the word "shared" are kept apart
# in the source below only by the regex syntax; this file itself is not scanned (THIS).
Q = "[\"']"
OUTSIDE = [
    ("a sibling shared folder, through the parent directory", r"\.\.[/\\]+shared\b"),
    ("the shared pcaps folder, any spelling", r"shared[/\\]+pcaps\b"),
    ("a path joined from the parts shared and pcaps",
     rf"{Q}shared{Q}\s*[/,]\s*{Q}pcaps{Q}"),
    ("a path joined onto a parent, then shared", rf"\bparents?(\[\d+\])?\s*/\s*{Q}shared{Q}"),
    ("os.path.join(.., shared) or joinpath(shared)",
     rf"(\bpardir|{Q}\.\.{Q})\s*,\s*{Q}shared{Q}|joinpath\(\s*{Q}shared{Q}"),
    ("the folder above the repository root", r"\b(REPO|ROOT|REPO_ROOT|PROJECT_ROOT)\.parent\b"),
    ("an environment variable pointing the captures elsewhere", r"\bEASTWEST_PCAPS\b"),
    ("an absolute path under /work", r"(?<![\w.~/-])/work(/|\b)"),
    ("a home directory", r"(?<![\w.~/-])/(home|Users)/\w"),
    ("a page that lives only beside the repository",
     r"\b(DESIGN|HOUSE_STYLE|ENVIRONMENT|SOURCES)\.md\b"),
]
ALLOWED_LICENCES = ("Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "MIT", "ISC", "CC0-1.0")


def ignored(rel: str, patterns: list[str]) -> bool:
    """.gitignore matching, enough for this repository's file: `dir/`, `/anchored`, `*.glob`."""
    parts = rel.split("/")
    for pat in patterns:
        dir_only, anchored = pat.endswith("/"), pat.startswith("/")
        pat = pat.strip("/")
        if anchored:
            if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat + "/*"):
                return True
            continue
        names = parts[:-1] if dir_only else parts
        if "/" in pat:
            if fnmatch.fnmatch(rel, pat + "/*") or fnmatch.fnmatch(rel, "*/" + pat + "/*"):
                return True
        elif any(fnmatch.fnmatch(n, pat) for n in names):
            return True
    return False


def repository_files() -> list[str]:
    """What a commit of the working tree would hold: tracked and new, not ignored."""
    if (REPO / ".git").exists():
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others",
                              "--exclude-standard", "-z"], capture_output=True, check=True)
        return [f for f in out.stdout.decode().split("\0") if f and (REPO / f).is_file()]
    gitignore = REPO / ".gitignore"
    patterns = [line.strip() for line in gitignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")] if gitignore.exists() else []
    patterns.append(".git/")
    return sorted(rel for p in REPO.rglob("*") if p.is_file()
                  and not ignored(rel := p.relative_to(REPO).as_posix(), patterns))


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # a capture, an image: not text
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def reaches_outside(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, line) for each line that names something outside the repository."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, rx in OUTSIDE:
            if re.search(rx, line):
                found.append((n, what, line.strip()[:120]))
    return found


# kept apart from the folder's name and its parent: this file's text names no such path itself
UP, SH = "..", "sha" + "red"
BAD = [f'PCAPS = REPO.parent / "{SH}" / "pcaps"', f"see {UP}/{SH}/pcaps/SOURCES.md",
       "os.environ.get('EASTWEST_PCAPS')", f"Where the code departs from /work/{SH}/DESIGN.md",
       f"os.path.join(os.pardir, '{SH}')", f"root.joinpath('{SH}', 'pcaps')",
       f"Path(__file__).parents[2] / '{SH}'", "the pages in DESIGN.md", "cp /work/main/x .",
       "data = ROOT.parent / 'captures'", "read /home/alice/pcaps/x.pcap",
       f"os.path.join('{UP}', '{SH}', 'pcaps')", f"{UP}\\{SH}\\pcaps"]
GOOD = ["REPO = Path(__file__).resolve().parent.parent", "CAPTURES = REPO / 'tests' / 'captures'",
        "the shared core: flow record", "a shared ClickHouse store", "mmap.MAP_SHARED",
        'cflags=("-O2", "-shared")', 'cd "$(dirname "$0")/../web"', "https://example.com/work/x",
        "tests/captures/README.md", "docs/architecture.md", "the machine is shared."]


@pytest.mark.parametrize("line", BAD)
def test_each_spelling_of_outside_is_caught(line: str) -> None:
    assert reaches_outside(line), line


@pytest.mark.parametrize("line", GOOD)
def test_ordinary_lines_are_not_caught(line: str) -> None:
    assert reaches_outside(line) == [], line


def test_the_walk_without_git_skips_what_gitignore_ignores() -> None:
    pats = [".venv/", "__pycache__/", "*.egg-info/", "/data/", "bench/out/", "*.pyc"]
    assert ignored(".venv/lib/x.py", pats) and ignored("a/__pycache__/m.pyc", pats)
    assert ignored("eastwest.egg-info/PKG-INFO", pats) and ignored("data/eastwest.duckdb", pats)
    assert ignored("bench/out/x.pcap", pats) and ignored("tests/x.pyc", pats)
    assert not ignored("tests/data/x.py", pats) and not ignored("bench/outline.py", pats)
    assert not ignored("tests/captures/README.md", pats)


def test_no_file_reaches_outside_the_repository() -> None:
    files = repository_files()
    assert "tests/captures/README.md" in files and "README.md" in files
    bad = []
    for rel in files:
        if rel == THIS:
            continue
        text = text_of(REPO / rel)
        if text is not None:
            bad += [f"{rel}:{n}: {what}: {line}" for n, what, line in reaches_outside(text)]
    assert bad == [], "\n".join(bad)


def readme_entries() -> dict[str, dict[str, str]]:
    """`## <file>` sections of tests/captures/README.md -> their `- Key: value` lines."""
    entries: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in (CAPTURES / "README.md").read_text().splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            current = entries.setdefault(name, {}) if "." in name else None
        elif current is not None and (m := re.match(r"- ([A-Za-z0-9 ]+): (.*)", line)):
            current[m.group(1)] = m.group(2)
    return entries


def capture_files() -> list[Path]:
    return sorted(p for p in CAPTURES.iterdir()
                  if p.is_file() and p.suffix in (".pcap", ".pcapng", ".cap"))


def test_the_captures_readme_lists_every_capture_with_its_sha256_and_size() -> None:
    entries = readme_entries()
    assert sorted(entries) == [p.name for p in capture_files()]
    for path in capture_files():
        m = re.fullmatch(r"`([0-9a-f]{64})`, (\d+) bytes", entries[path.name].get("sha256", ""))
        assert m, f"{path.name}: no '- sha256: `<hex>`, <n> bytes' line"
        data = path.read_bytes()
        assert (m.group(1), int(m.group(2))) == (hashlib.sha256(data).hexdigest(), len(data)), \
            path.name


def test_no_capture_is_under_a_licence_the_project_cannot_carry() -> None:
    entries = readme_entries()
    for name, entry in entries.items():
        licence = entry.get("Licence", "")
        assert not re.search(r"GPL", licence, re.I), f"{name}: {licence}"
        assert licence.startswith(ALLOWED_LICENCES), f"{name}: {licence!r}"
        for link in re.findall(r"\]\((LICENSES/[^)]+)\)", licence):
            assert (CAPTURES / link).is_file(), f"{name}: {link} is missing"
        if not licence.startswith("Apache-2.0"):   # a third party's: its text must come along
            assert "LICENSES/" in licence, f"{name}: no licence text linked"
