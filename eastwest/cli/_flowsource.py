"""Where `eastwest flows` gets its flows: a JSON-lines file, a capture file, the stored-flows
API, or the live stream. Each yields `FlowRow`s that already passed the filter.

In:  a `FilterSpec` and a file (lines of flow records, eastwest/codec.py `from_json`; or a pcap /
     pcapng capture, known by its magic bytes, decoded by the collector's own capture source,
     `collector.vxlan.PcapSource`, into the final record of each flow) or an
     `ApiClient` (`GET /api/v1/flows` with cursor pagination, `GET /api/v1/flows/stream` SSE).
Out: `FlowRow`s; a file may hold flow records or the API's flow objects (as
     `eastwest flows -o jsonl` saved them), line by line; for a file, a `FileReport` of the lines
     that were not records (line number and the field at fault), skipped and counted, never
     fatal to the rest: one bad line spoils nothing else (the command names them on stderr and
     exits 1, after printing the good records).
     The live stream ends only by `limit`: a stream the aggregator closes earlier, an `error`
     event or a body that is not a flow is an error, after the flows it already gave.
     A collector's records carry no workload names (the aggregator names both ends): a static
     workload map (`--workload-map`, the aggregator's own loader, aggregator/identity.py) names
     them offline as the aggregator would, its names winning over a record's own; and
     `FileReport.unnamed` says when a workload filter met not one named record.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from eastwest.cli._filterflags import FilterSpec
from eastwest.cli._flowrow import FlowRow
from eastwest.client import ApiClient
from eastwest.codec import from_json
from eastwest.errors import EastwestError, RecordError, TransportError
from eastwest.filters import DIMENSIONS
from eastwest.record import FlowRecord, Workload

if TYPE_CHECKING:
    from aggregator.connection import Identity

Namer = Callable[[FlowRecord], FlowRecord]
# the filter dimensions that only a workload name can match (a record's namespace is its
# workload's)
NAME_DIMENSIONS = ("from_workload", "to_workload", "workload", "namespace")

FLOWS_PATH = "/api/v1/flows"
STREAM_PATH = "/api/v1/flows/stream"
PAGE_MAX = 1000


@dataclass
class FileReport:
    name: str
    lines: int = 0
    records: int = 0
    named: int = 0  # records with a workload name on either side (after the map, if any)
    bad: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)  # a capture's packets

    @property
    def source(self) -> str:
        return "stdin" if self.name == "-" else self.name

    def messages(self, shown: int) -> list[str]:
        """The first `shown` bad lines, each with its number and the field at fault."""
        src = self.source
        out = [f"{src}:{n}: {err}" for n, err in self.errors[:shown]]
        if self.bad > shown:
            out.append(f"{src}: ... and {self.bad - shown} more bad lines")
        return out

    def records_or_fail(self, rows: Iterable[FlowRow]) -> Iterator[FlowRow]:
        """`rows`; then, when not one line read was a record, an error: that is no flow file
        (a binary file, the wrong file), and nothing of it is printed."""
        yield from rows
        if self.lines and self.bad == self.lines:
            raise EastwestError(f"{self.source}: none of its {self.lines} lines is a flow record "
                                "(docs/flow-record.md)")

    def drops(self) -> str | None:
        """One line naming a capture's packets that did not decode, per reason (None: none);
        the collector's own exit line, and like it not an error."""
        if not self.dropped:
            return None
        counts = ", ".join(f"{s}/{r}={n}" for (s, r), n in sorted(self.dropped.items()))
        return f"{self.source}: packets not decoded: {counts} (docs/vxlan.md)"

    def summary(self) -> str | None:
        """One line for the end of the read when lines were skipped (None when none were)."""
        if not self.bad:
            return None
        return (f"{self.source}: skipped {self.bad} of {self.lines} lines that are not flow "
                "records (docs/flow-record.md)")

    def unnamed(self, spec: FilterSpec, workload_map: str | None) -> str | None:
        """One line when the filter has a workload or namespace flag and not one record read
        carried a workload name, so that flag had nothing to match (None otherwise)."""
        flags = sorted({DIMENSIONS[c.dim].flag for c in spec.filter.clauses
                        if c.dim in NAME_DIMENSIONS})
        if not flags or not self.records or self.named:
            return None
        what = (f"has an address in --workload-map {workload_map}" if workload_map else
                "carries workload names (a collector's records have none: the aggregator, or "
                "--workload-map FILE, names them)")
        return (f"{self.source}: none of the {self.records} records read {what}, so "
                f"{' '.join(flags)} had no name to match")


def file_rows(lines: Iterable[str], spec: FilterSpec, report: FileReport,
              name: Namer | None = None) -> Iterator[FlowRow]:
    """The matching rows of `lines`; `name` gives a flow record its workloads first."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.lines = n
        try:
            row = _row_of_line(line, name)
        except (RecordError, TransportError) as exc:
            report.bad += 1
            if len(report.errors) < 100:
                report.errors.append((n, str(exc)))
            continue
        report.records += 1
        report.named += bool(row.client.workload or row.server.workload)
        if spec.in_window(row.start, row.end) and spec.filter.matches(row.view):
            yield row


# pcap (µs and ns, both byte orders) and pcapng (Section Header Block) magic numbers
CAPTURE_MAGICS = (b"\xa1\xb2\xc3\xd4", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\x3c\x4d",
                  b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a")


def is_capture(path: str) -> bool:
    """A pcap or pcapng file, by its first four bytes (False when it cannot be read: the
    record-file path then names the error)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in CAPTURE_MAGICS
    except OSError:
        return False


def capture_rows(path: str, spec: FilterSpec, report: FileReport,
                 name: Namer | None = None) -> Iterator[FlowRow]:
    """The matching rows of a capture: `eastwest collector --pcap FILE`'s final records (one
    per flow, tunnels decapsulated, plain traffic too), with its defaults; the packets it could
    not decode are counted in `report.dropped`. A corrupt capture raises `CaptureError`."""
    from collector.pipeline import CollectorContext
    from collector.vxlan.source import PcapSource

    ctx = CollectorContext(collector_id="eastwest-flows")
    args = argparse.Namespace(vxlan_port=[], geneve_port=[], gpe_port=[], decoder="bulk",
                              interval=5.0, idle_timeout=30.0)
    records: list[FlowRecord] = []
    PcapSource(ctx, path, args).run(records.extend, threading.Event())
    report.dropped = ctx.drops.snapshot()
    for rec in records:
        if not rec.final:
            continue
        report.lines += 1
        report.records += 1
        row = FlowRow.from_record(name(rec) if name else rec)
        report.named += bool(row.client.workload or row.server.workload)
        if spec.in_window(row.start, row.end) and spec.filter.matches(row.view):
            yield row


def static_namer(path: str) -> Namer:
    """Names a record's two ends from a static workload map (YAML `workloads: [{match: CIDR |
    ip:port, name, namespace, kind, host, labels}]`), loaded and matched by the aggregator's
    own `StaticMap` (most specific match wins); as in the aggregator, the map's name beats the
    one a record carries, and an address the map lacks keeps the record's. A map that cannot
    be read or is not one is a ConfigError naming --workload-map."""
    from aggregator.identity import StaticMap

    static = StaticMap.load(path)

    def name(rec: FlowRecord) -> FlowRecord:
        c = static.lookup(rec.client.ip, rec.client.port)
        s = static.lookup(rec.server.ip, rec.server.port)
        if c is None and s is None:
            return rec
        return msgspec.structs.replace(
            rec, client_workload=_workload(c) if c else rec.client_workload,
            server_workload=_workload(s) if s else rec.server_workload)

    return name


def _workload(ident: Identity) -> Workload:
    return Workload(name=ident.name, namespace=ident.namespace, kind=ident.kind,
                    host=ident.host, labels=dict(ident.labels))


def _row_of_line(line: str, name: Namer | None = None) -> FlowRow:
    """A flow record (named by `name`), or a flow object of the API (what `eastwest flows -o
    jsonl` saved: named by the aggregator already)."""
    raw = line.encode("utf-8", "surrogateescape")  # the file's bytes: not UTF-8 is a bad line
    try:
        rec = from_json(raw)
        return FlowRow.from_record(name(rec) if name else rec)
    except RecordError as exc:
        try:
            obj = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise exc from None
        if isinstance(obj, dict) and "observed_by" in obj and "record_id" not in obj:
            return FlowRow.from_api(obj)
        raise


def api_flows(client: ApiClient, spec: FilterSpec, limit: int, sort: str = "-start",
              extra: Iterable[tuple[str, str]] = ()) -> Iterator[FlowRow]:
    """Stored flows, following the API's cursor until `limit` rows (0: all) or the end;
    `extra`: more query parameters (the DNS filters' `dns_name`, `dns_rcode`)."""
    params: list[tuple[str, str | int]] = [*spec.query_params(), *extra, ("sort", sort)]
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
    connection), until the caller stops at `limit` (the server closes the stream there too).
    The stream ending any other way is an error: the aggregator went away."""
    params: list[tuple[str, str | int]] = list(spec.query_params())
    if limit:
        params.append(("limit", limit))
    got = 0
    for ev in client.stream(STREAM_PATH, params):
        if ev.event in ("message", "flow"):
            yield FlowRow.from_api(ev.json())
            got += 1
        elif ev.event == "error":
            raise TransportError(f"the aggregator ended the stream: {ev.data}")
    # the caller stops pulling at `limit`: the aggregator closed the stream before it
    raise TransportError(f"the aggregator closed the live stream after {got}"
                         + (f" of --limit {limit}" if limit else "") + " flows")
