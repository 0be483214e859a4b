"""Prints `FlowRow`s in the format asked for, as they arrive.

In:  `FlowRow`s (eastwest/cli/_flowrow.py), a format, a stream, colour on or off.
Out: text. `jsonl`, `compact` and `csv` write each flow at once (flushed when following, so a
pipe sees a live flow within the second it arrived); `table` aligns columns over all flows,
except when following, where columns have fixed widths (a long cell pushes its line, never the
others); `json` writes one array at the end (never with --follow).

What comes only at the end (the JSON array, the aligned table, a CSV header with no rows) is
written only when the flows ended without an error: a source that fails never leaves `[]` or a
lone header behind. What was written before the failure (a stream's lines) stays, whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from eastwest.cli._flowrow import (
    CSV_HEADERS,
    TABLE_HEADERS,
    FlowRow,
    compact_line,
    csv_cells,
    table_cells,
)
from eastwest.output import (
    Cell,
    escape,
    paint,
    to_json_text,
    width,
    write_csv,
    write_json,
    write_table,
)

STREAM_WIDTHS = (24, 30, 30, 5, 8, 9, 9, 4, 8, 13, 3)


class FlowPrinter:
    def __init__(self, fmt: str, out: TextIO, color: bool = False, *, streaming: bool = False):
        self.fmt, self.out, self.color, self.streaming = fmt, out, color, streaming
        self.count = 0
        self._buffer: list[FlowRow] = []
        self._header_done = False

    def print_all(self, rows: Iterable[FlowRow]) -> None:
        """Every row, then the end; an exception from `rows` skips the end."""
        for row in rows:
            self.add(row)
        self.close()

    def add(self, row: FlowRow) -> None:
        self.count += 1
        if self.fmt == "jsonl":
            self.out.write(to_json_text(row.obj) + "\n")
        elif self.fmt == "compact":
            self.out.write("".join(paint(escape(t), s, self.color)
                                   for t, s in compact_line(row)) + "\n")
        elif self.fmt == "csv":
            write_csv(self.out, CSV_HEADERS, [csv_cells(row)], header=not self._header_done)
            self._header_done = True
        elif self.fmt == "table" and self.streaming:
            self._stream_table_row(row)
        else:
            self._buffer.append(row)
            return
        if self.streaming:
            self.out.flush()

    def close(self) -> None:
        if self.fmt == "json":
            write_json(self.out, (r.obj for r in self._buffer))
        elif self.fmt == "table" and not self.streaming:
            write_table(self.out, TABLE_HEADERS, (table_cells(r) for r in self._buffer),
                        color=self.color)
        elif self.fmt == "csv" and not self._header_done:
            write_csv(self.out, CSV_HEADERS, [])
        self._buffer.clear()
        self.out.flush()

    def _stream_table_row(self, row: FlowRow) -> None:
        if not self._header_done:
            self.out.write(_fixed([Cell(h) for h in TABLE_HEADERS], "bold", self.color) + "\n")
            self._header_done = True
        cells = [c if isinstance(c, Cell) else Cell("" if c is None else str(c))
                 for c in table_cells(row)]
        self.out.write(_fixed(cells, None, self.color) + "\n")


def _fixed(cells: list[Cell], style: str | None, color: bool) -> str:
    parts = []
    for c, w in zip(cells, STREAM_WIDTHS, strict=True):
        t = escape(c.text)
        pad = " " * max(0, w - width(t))
        t = paint(t, style or c.style, color)
        parts.append(pad + t if c.right else t + pad)
    return "  ".join(parts).rstrip()

