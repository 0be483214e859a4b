"""Printers for the query commands: table, compact, json, jsonl, csv (and the text of dot/mermaid
that the API renders); terminal escaping of untrusted strings; colour only on a TTY.

In:  rows of cells (already chosen by a command) or JSON-able objects.  Out: text on a stream.

Untrusted strings (process names, workload names, labels, anything a monitored host can set)
can carry terminal control sequences: an ESC or a C1 CSI in a process name would let a
monitored machine repaint the operator's terminal (CVE-2021-25743 class; hubble escapes the same
way). `escape()` rewrites every control, format (bidi overrides, zero-width), separator and
surrogate code point as a visible `\\xNN`/`\\uNNNN` escape before a table, compact or csv cell
is written. JSON output stays valid JSON with the same values: the encoder escapes C0 controls
(RFC 8259 section 7), and `json_safe()` also writes C1 controls, bidi/format characters and
U+2028/U+2029 as `\\uNNNN`.

Colour: `color_enabled()` says yes only for a TTY, and never with NO_COLOR set
(https://no-color.org) or TERM=dumb; `--color always|never` overrides.
"""

from __future__ import annotations

import csv
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import msgspec

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_enc = msgspec.json.Encoder()


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES


def escape(value: Any) -> str:
    """A string safe to write to a terminal: unsafe code points become visible escapes."""
    text = "" if value is None else str(value)
    if text.isprintable() and text.isascii():
        return text
    out = []
    for ch in text:
        if not _unsafe(ch):
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


_JSON_UNSAFE = re.compile("[\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
                          "\u2060-\u206f\ufeff\ufff9-\ufffb]")


def json_safe(text: str) -> str:
    """JSON text with C1 controls and invisible/bidi characters written as `\\uNNNN` (they can only
    occur inside strings, where that escape means the same character)."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def to_json_text(obj: Any, *, indent: int | None = None) -> str:
    raw = _enc.encode(obj)
    if indent:
        raw = msgspec.json.format(raw, indent=indent)
    return json_safe(raw.decode())


# -- colour -----------------------------------------------------------------------------------
COLOR_MODES = ("auto", "always", "never")
_SGR = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "magenta": "35", "cyan": "36", "dim": "2"}


def color_enabled(stream: TextIO, mode: str = "auto", env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if mode == "always":
        return True
    if mode == "never" or env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@dataclass(frozen=True)
class Cell:
    """A table cell: its text (always escaped when written), an optional colour role
    (`red`, `bold+red`, ...) and right alignment (numbers)."""

    text: str
    style: str | None = None
    right: bool = False


CellLike = Cell | str | int | float | None


def _cell(v: CellLike) -> Cell:
    if isinstance(v, Cell):
        return v
    if isinstance(v, int | float) and not isinstance(v, bool):
        return Cell(str(v), right=True)
    return Cell("" if v is None else str(v))


def paint(text: str, style: str | None, color: bool) -> str:
    if not color or not style:
        return text
    codes = ";".join(_SGR[s] for s in style.split("+"))
    return f"\x1b[{codes}m{text}\x1b[0m"


def width(text: str) -> int:
    """Display width in terminal columns (East Asian wide characters take two)."""
    if text.isascii():
        return len(text)
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


# -- printers ---------------------------------------------------------------------------------
def write_table(out: TextIO, headers: Sequence[str], rows: Iterable[Sequence[CellLike]], *,
                color: bool = False, empty: str | None = None) -> int:
    """Aligned columns, a bold header; every cell escaped. Returns the number of rows."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        if empty:
            out.write(empty + "\n")
        return 0
    texts = [[escape(c.text) for c in row] for row in cells]
    widths = [width(h) for h in headers]
    for trow in texts:
        for i, t in enumerate(trow):
            widths[i] = max(widths[i], width(t))
    out.write("  ".join(paint(h.ljust(widths[i]), "bold", color)
                        for i, h in enumerate(headers)).rstrip() + "\n")
    for row, trow in zip(cells, texts, strict=True):
        parts = []
        for i, (c, t) in enumerate(zip(row, trow, strict=True)):
            pad = " " * (widths[i] - width(t))
            parts.append(pad + paint(t, c.style, color) if c.right
                         else paint(t, c.style, color) + pad)
        out.write("  ".join(parts).rstrip() + "\n")
    return len(cells)


def write_csv(out: TextIO, headers: Sequence[str], rows: Iterable[Sequence[Any]], *,
              header: bool = True) -> int:
    """RFC 4180 CSV with a header row; text cells escaped like a terminal cell (a spreadsheet or
    `column -t` is a terminal too); numbers stay numbers."""
    w = csv.writer(out, lineterminator="\n")
    if header:
        w.writerow(headers)
    n = 0
    for row in rows:
        w.writerow(["" if v is None else v if isinstance(v, int | float) else escape(v)
                    for v in row])
        n += 1
    return n


def write_json(out: TextIO, objs: Iterable[Any], *, key: str | None = None,
               extra: Mapping[str, Any] | None = None) -> int:
    """One JSON document: a list of the objects, or `{key: [...], **extra}`."""
    items = list(objs)
    doc: Any = items if key is None else {key: items, **(extra or {})}
    out.write(to_json_text(doc, indent=2) + "\n")
    return len(items)


def human_bytes(n: int | None) -> str:
    """1023 -> '1023B', 1536 -> '1.5KiB' (IEC units, so the number is exact in powers of two)."""
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # unreachable

