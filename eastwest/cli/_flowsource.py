"""Where `eastwest flows` gets its flows: a JSON-lines file, the stored-flows API, or the live
stream. Each yields `FlowRow`s that already passed the filter.

In:  a `FilterSpec` and a file (lines of flow records, eastwest/codec.py `from_json`) or an
     `ApiClient` (`GET /api/v1/flows` with cursor pagination, `GET /api/v1/flows/stream` SSE).
Out: `FlowRow`s; a file may hold flow records or the API's flow objects (as
     `eastwest flows -o jsonl` saved them), line by line; for a file, a `FileReport` of the lines that were not records (line number and
     the field at fault), skipped and counted, never fatal: one bad line spoils nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgspec

from eastwest.cli._filterflags import FilterSpec
from eastwest.cli._flowrow import FlowRow
from eastwest.client import ApiClient
from eastwest.codec import from_json
from eastwest.errors import RecordError, TransportError

FLOWS_PATH = "/api/v1/flows"
STREAM_PATH = "/api/v1/flows/stream"
PAGE_MAX = 1000


@dataclass
class FileReport:
    name: str
    lines: int = 0
    records: int = 0
    matched: int = 0
    bad: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)

    def messages(self, shown: int) -> list[str]:
        src = "stdin" if self.name == "-" else self.name
        out = [f"{src}:{n}: {err}" for n, err in self.errors[:shown]]
        if self.bad > shown:
            out.append(f"{src}: ... and {self.bad - shown} more bad lines")
        if self.bad:
            out.append(f"{src}: skipped {self.bad} of {self.lines} lines that are not flow "
                       "records (docs/flow-record.md)")
        return out


def file_rows(lines: Iterable[str], spec: FilterSpec, report: FileReport) -> Iterator[FlowRow]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.lines = n
        try:
            row = _row_of_line(line)
        except (RecordError, TransportError) as exc:
            report.bad += 1
            if len(report.errors) < 100:
                report.errors.append((n, str(exc)))
            continue
        report.records += 1
        if spec.in_window(row.start, row.end) and spec.filter.matches(row.view):
            report.matched += 1
            yield row


def _row_of_line(line: str) -> FlowRow:
    """A flow record, or a flow object of the API (what `eastwest flows -o jsonl` saved)."""
    try:
        return FlowRow.from_record(from_json(line))
    except RecordError as exc:
        try:
            obj = msgspec.json.decode(line)
        except msgspec.DecodeError:
            raise exc from None
        if isinstance(obj, dict) and "observed_by" in obj and "record_id" not in obj:
            return FlowRow.from_api(obj)
        raise


def api_flows(client: ApiClient, spec: FilterSpec, limit: int,
              sort: str = "-start") -> Iterator[FlowRow]:
    """Stored flows, following the API's cursor until `limit` rows (0: all) or the end."""
    params: list[tuple[str, str | int]] = [*spec.query_params(), ("sort", sort)]
    cursor: str | None = None
    got = 0
    while True:
        page = min(PAGE_MAX, limit - got) if limit else PAGE_MAX
        q = params + [("limit", page)] + ([("cursor", cursor)] if cursor else [])
        doc = client.get_json(FLOWS_PATH, q)
        if not isinstance(doc, dict) or not isinstance(doc.get("flows"), list):
            raise TransportError(f"{FLOWS_PATH} answered without a flows list")
        for obj in doc["flows"]:
            yield FlowRow.from_api(obj)
            got += 1
        cursor = doc.get("next_cursor")
        if not cursor or not doc["flows"] or (limit and got >= limit):
            return


def api_follow(client: ApiClient, spec: FilterSpec, limit: int = 0) -> Iterator[FlowRow]:
    """Live flows from the SSE stream, each as it arrives (one event per update of a
    connection); the server closes the stream after `limit` events when one is given."""
    params: list[tuple[str, str | int]] = list(spec.query_params())
    if limit:
        params.append(("limit", limit))
    for ev in client.stream(STREAM_PATH, params):
        if ev.event in ("message", "flow"):
            yield FlowRow.from_api(ev.json())
        elif ev.event == "error":
            raise TransportError(f"the aggregator ended the stream: {ev.data}")
