"""The documentation's examples, as data: every fenced code block of README.md and docs/*.md,
split into the commands a reader would type, with what the Markdown says about each block.

A block is an example when its language is `sh`, `console` or `zsh`. The line just before a
block's opening fence may hold a marker, an HTML comment (invisible on GitHub):

    <!-- example: skip needs a Kubernetes API server and kubectl -->
        the block cannot run on one machine; the reason names the missing server or binary
    <!-- example: synopsis -->
        a usage line with [optional] parts, not a command: its flags are checked against the
        command's --help instead of being run
    <!-- example: response GET /api/v1/graph -->
        a JSON block that shows an answer of the read API: its keys are checked against a real one

Everything else in a runnable block is run by tests/docs/test_examples.py (a comment-only line is
skipped, `\\` continues a line). In a `console` block a line starting with `$ ` is a command and
the lines after it, up to the next `$ `, are its output as the doc shows it.

No root, no lab here: tests/unit/test_docs_examples_extract.py checks that every block is
classified and every placeholder of a runnable command has a fill-in (tests/docs/fill.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
SHELL_LANGS = ("sh", "console", "zsh")
MARK = re.compile(r"^<!--\s*example:\s*(skip|synopsis|response)\b\s*(.*?)\s*-->\s*$")


def documents() -> list[Path]:
    """README.md first, then docs/*.md by name: the order a reader meets them."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Command:
    line: int          # 1-based line in the document where the command starts
    text: str          # as written, continuations joined with a space, trailing comment kept
    output: tuple[str, ...] = ()  # console blocks: the output the doc shows


@dataclass(frozen=True)
class Block:
    doc: str           # path relative to the repository
    line: int          # the opening fence's line (1-based)
    lang: str
    text: str
    mark: str = ""     # "", "skip", "synopsis", "response"
    reason: str = ""   # the marker's argument
    commands: tuple[Command, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_example(self) -> bool:
        return self.lang in SHELL_LANGS


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with their markers and commands."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = lines[start + 1:j]
        mark, reason = "", ""
        if start > 0 and (mm := MARK.match(lines[start - 1].strip())):
            mark, reason = mm.group(1), mm.group(2)
        cmds = _commands(body, start + 2, lang) if lang in SHELL_LANGS else ()
        out.append(Block(str(path.relative_to(REPO)), start + 1, lang, "\n".join(body),
                         mark, reason, tuple(cmds)))
        i = j + 1
    return out


def all_blocks() -> list[Block]:
    return [b for p in documents() for b in blocks(p)]


def _commands(body: list[str], first_line: int, lang: str) -> list[Command]:
    if lang == "console":
        return _console(body, first_line)
    out: list[Command] = []
    buf: list[str] = []
    at = 0
    for k, raw in enumerate(body):
        line = raw.rstrip()
        if not buf:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            at = first_line + k
        if line.endswith("\\"):
            buf.append(line[:-1].rstrip())
            continue
        buf.append(line.strip() if buf else line)
        out.append(Command(at, " ".join(x.strip() for x in buf)))
        buf = []
    if buf:
        raise ValueError(f"line {at}: a continuation `\\` with nothing after it")
    return out


def _console(body: list[str], first_line: int) -> list[Command]:
    out: list[Command] = []
    cur: tuple[int, str] | None = None
    shown: list[str] = []
    for k, raw in enumerate(body):
        if raw.startswith("$ "):
            if cur:
                out.append(Command(cur[0], cur[1], tuple(shown)))
            cur, shown = (first_line + k, raw[2:].strip()), []
        elif cur:
            shown.append(raw.rstrip())
    if cur:
        out.append(Command(cur[0], cur[1], tuple(shown)))
    return out


def documented_json(block: Block) -> Any:
    """A `response` block's JSON, its `...` elisions dropped (`FLOW, ...` stands for objects)."""
    text = re.sub(r"\b[A-Z]+, \.\.\.", "{}", block.text)
    return json.loads(re.sub(r",\s*\.\.\.", "", text))


def strip_comment(cmd: str) -> str:
    """The command without its trailing `# comment` (a `#` after whitespace, outside quotes)."""
    quote = ""
    for k, ch in enumerate(cmd):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or cmd[k - 1].isspace()):
            return cmd[:k].rstrip()
    return cmd


def comment(cmd: str) -> str:
    bare = strip_comment(cmd)
    return cmd[len(bare):].lstrip().lstrip("#").strip()
