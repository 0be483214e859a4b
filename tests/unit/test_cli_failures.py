"""A failed query prints nothing on stdout, in every output format (issue 14): the error on
stderr and the exit status say it all, so `eastwest flows -o json | jq length` can never read
an empty list where the aggregator was unreachable.

Every query command x every output format (read from the commands' own FORMATS, so a new format
is covered when it is added) runs through `main()` against a real HTTP server on loopback that
fails in one way each: unreachable (a closed port), no answer (a listening socket that never
accepts), 400, 401, 403, 404, 500, a body that is not JSON, a body of the wrong shape, a body cut
short. Stdout must be exactly empty, stderr one line that names the problem, the exit status the
one docs/cli.md gives. The same server answering well proves each command line reaches it.

Streams (`--follow`, `--input-file -`) print each flow as it arrives: a failure after some
flows leaves those lines, each whole (a JSON object, a CSV row), then the error and exit 1.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from eastwest.cli import diff, flows, graph, main, top, workloads
from eastwest.cli._flowrow import CSV_HEADERS
from eastwest.codec import write_jsonl
from tests.unit.test_cli_commands import EDGES, FLOWS
from tests.unit.test_cli_filterflags import RECORDS

TOKEN = "read-token-0123456789"
DIFF_WINDOWS = ("--a", "1h..30m", "--b", "30m..now")
OK_BODIES: dict[str, Any] = {
    "/api/v1/graph": {"since": "x", "until": "y", "group_by": "workload", "folded_edges": 0,
                      "nodes": [], "edges": EDGES},
    "/api/v1/workloads": {"from": "x", "to": "y", "workloads": [
        {"id": "shop/db", "name": "db", "namespace": "shop", "kind": "service",
         "callers": ["shop/api"], "callees": []}]},
    "/api/v1/workloads/db": {"id": "shop/db", "name": "db", "namespace": "shop",
                             "kind": "service", "callers": [], "callees": [], "upstream": [],
                             "downstream": [], "impact": []},
    "/api/v1/diff": {"added": [{"source": "shop/api", "target": "shop/auth",
                                "connections_opened": 1}],
                     "removed": [], "changed": [], "nodes_added": [], "nodes_removed": []},
}
BAD_SHAPES: dict[str, Any] = {  # valid JSON, not what the route answers (docs/api.md)
    "/api/v1/flows": {"flows": "nope"},
    "/api/v1/graph": {"edges": "nope"},
    "/api/v1/workloads": {"workloads": "nope"},
    "/api/v1/workloads/db": ["db"],
    "/api/v1/diff": {"added": "nope", "removed": [], "changed": []},
}
TEXT_FORMATS = {"dot": "digraph eastwest {\n}\n", "mermaid": "graph LR\n"}
DETAIL = {400: "port=x: not a port", 401: "invalid token", 403: "this token is the ingest token",
          404: "Not Found", 500: "store unavailable: locked"}


def sse(*flows_: Any) -> bytes:
    return b"".join(b"event: flow\ndata: " + json.dumps(f).encode() + b"\n\n" for f in flows_)


class Handler(BaseHTTPRequestHandler):
    """Answers as `server.mode` says: `ok`, an HTTP status, `not-json`, `bad-shape`, `cut`
    (the headers promise more body than is sent), `page-2-fails`; or a live stream that
    misbehaves after two flows (`stream-*`)."""

    protocol_version = "HTTP/1.1"
    server: Aggregator

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        mode, path = self.server.mode, url.path
        self.server.paths.append(path)
        if mode.isdigit():
            return self.send(int(mode), json.dumps({"detail": DETAIL[int(mode)]}).encode())
        if path == "/api/v1/flows/stream":
            return self.stream(mode, int(q.get("limit", ["0"])[0]))
        fmt = q.get("format", ["json"])[0]
        if mode == "not-json":
            return self.send(200, b"<html><body>Sign in</body></html>", "text/html")
        if mode == "bad-shape" and fmt in TEXT_FORMATS:
            return self.send(200, json.dumps(BAD_SHAPES[path]).encode(), "text/plain")
        if mode == "bad-shape":
            return self.send(200, json.dumps(BAD_SHAPES[path]).encode())
        if mode == "cut":
            return self.send(200, b'{"edges": [', cut=True)
        if path == "/api/v1/flows":
            if "cursor" in q and mode == "page-2-fails":
                return self.send(500, json.dumps({"detail": DETAIL[500]}).encode())
            page = FLOWS[2:] if "cursor" in q else FLOWS[:2]
            nxt = None if "cursor" in q else "2"
            return self.send(200, json.dumps({"flows": page, "next_cursor": nxt}).encode())
        if fmt in TEXT_FORMATS:
            return self.send(200, TEXT_FORMATS[fmt].encode(), "text/plain")
        return self.send(200, json.dumps(OK_BODIES[path]).encode())

    def stream(self, mode: str, limit: int) -> None:
        ctype = "text/event-stream; charset=utf-8"
        if mode == "not-json":
            return self.send(200, b"<html><body>Sign in</body></html>", "text/html")
        if mode == "bad-shape":
            return self.send(200, b'event: flow\ndata: ["nope"]\n\n', ctype)
        if mode == "cut":
            return self.send(200, b'event: flow\ndata: {"id": "f1", ', ctype, cut=True)
        two = b": eastwest flow stream\n\n" + sse(*FLOWS[:2])
        if mode == "ok":
            return self.send(200, sse(*FLOWS[:limit or len(FLOWS)]), ctype)
        if mode == "stream-ends":  # a clean end of the stream before --limit (or with none)
            return self.send(200, two, ctype)
        if mode == "stream-cut":  # the connection drops in the middle of the third event
            return self.send(200, two + b'event: flow\ndata: {"id": "f3", ', ctype, cut=True)
        if mode == "stream-error":
            return self.send(200, two + b"event: error\ndata: the store went away\n\n", ctype)
        if mode == "stream-bad-event":
            return self.send(200, two + b"event: flow\ndata: {not json\n\n", ctype)
        raise AssertionError(mode)

    def send(self, status: int, body: bytes, ctype: str = "application/json",
             cut: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) + (4096 if cut else 0)))
        if cut:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if cut:
            self.close_connection = True


class Aggregator(ThreadingHTTPServer):
    daemon_threads = True
    mode = "ok"
    paths: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The CLI hangs up on purpose (a stream it refuses, a body it stops reading): the
        reset reaches this server's thread, maybe while the next test captures stderr. Only
        an error of the fake itself is worth printing."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server() -> Iterator[Aggregator]:
    srv = Aggregator(("127.0.0.1", 0), Handler)
    srv.paths = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def agg(server: Aggregator, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Aggregator:
    """The server, in mode `ok`, and no setting from the user's environment or config file."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("EASTWEST_SERVER", "EASTWEST_TOKEN", "EASTWEST_READ_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    server.mode, server.paths = "ok", []
    return server


def url(srv: ThreadingHTTPServer) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host!s}:{port}"


# -- the matrix -------------------------------------------------------------------------------
QUERIES = [
    *(("flows", "-o", f) for f in flows.FORMATS),
    *(("flows", "--follow", "--limit", "2", "-o", f) for f in flows.FORMATS if f != "json"),
    *(("graph", "-o", f) for f in graph.FORMATS),
    *(("top", "-o", f) for f in top.FORMATS),
    *(("workloads", "-o", f) for f in workloads.FORMATS),
    *(("workloads", "db", "-o", f) for f in workloads.FORMATS if f != "names"),
    *(("diff", *DIFF_WINDOWS, "-o", f) for f in diff.FORMATS),
]
FAILURES = ("unreachable", "no-answer", "400", "401", "403", "404", "500", "not-json",
            "bad-shape", "cut")


def qid(argv: tuple[str, ...]) -> str:
    return " ".join(a for a in argv if a not in DIFF_WINDOWS[1::2] and a != "2")


def route(argv: tuple[str, ...]) -> str:
    if "--follow" in argv:
        return "/api/v1/flows/stream"
    if argv[0] == "top":
        return "/api/v1/graph"
    return "/api/v1/" + argv[0] + ("/db" if argv[1] == "db" else "")


def expected(failure: str, argv: tuple[str, ...], server: str) -> tuple[int, str]:
    """(exit status, what stderr must say) of one failure of one command line."""
    path, fmt = route(argv), argv[-1]
    if failure == "not-json" or failure == "bad-shape":
        if path.endswith("/stream"):
            return 1, (f"the aggregator at {server} answered /api/v1/flows/stream with "
                       "text/html, not Server-Sent Events" if failure == "not-json" else
                       "the aggregator sent a flow that is not an object")
        if fmt in TEXT_FORMATS:
            return 1, (f"the aggregator at {server} answered /api/v1/graph with something "
                       f"that is not {'DOT' if fmt == 'dot' else 'Mermaid'}")
        if failure == "not-json":
            return 1, f"the aggregator at {server} answered {path} with something that is not JSON"
        return 1, {
            "/api/v1/flows": "/api/v1/flows answered without a flows list",
            "/api/v1/graph": "the aggregator's graph has no edges list",
            "/api/v1/workloads": "/api/v1/workloads answered without a workloads list",
            "/api/v1/workloads/db": "/api/v1/workloads/db answered with something that is not "
                                    "an object",
            "/api/v1/diff": "/api/v1/diff answered without added, removed and changed lists",
        }[path]
    return {
        "unreachable": (1, f"cannot reach the aggregator at {server}: "),
        "no-answer": (1, f"the aggregator at {server} did not answer within 0.3s"),
        "400": (2, f"the aggregator rejected {path}: port=x: not a port"),
        "401": (1, f"the aggregator at {server} refused the token from --token (401: invalid "
                   "token)"),
        "403": (1, f"the aggregator at {server} refused the token from --token (403: this "
                   "token is the ingest token); use the read token"),
        "404": (1, f"the aggregator at {server} has no {path} (404: Not Found)"),
        "500": (1, f"the aggregator at {server} failed on {path} (500: store unavailable: "
                   "locked)"),
        "cut": (1, f"talking to the aggregator at {server} failed: "),
    }[failure]


def run(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], server: str,
        timeout: str = "5") -> tuple[int, str, str]:
    rc = main([*argv, "--server", server, "--token", TOKEN, "--timeout", timeout])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A loopback port that listens but never accepts: the connection is made (the kernel's
    backlog), no answer ever comes."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("argv", QUERIES, ids=qid)
def test_each_query_prints_its_results_when_the_aggregator_answers(agg, capsys, argv):
    rc, out, err = run(capsys, argv, url(agg))
    assert rc == 0, err
    assert out and err == ""
    assert agg.paths and agg.paths[0] == route(argv)


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("argv", QUERIES, ids=qid)
def test_a_failed_query_prints_nothing_on_stdout_in_every_format(agg, capsys, monkeypatch,
                                                                 closed_port, silent_port, argv,
                                                                 failure):
    server = {"unreachable": f"http://127.0.0.1:{closed_port}",
              "no-answer": f"http://127.0.0.1:{silent_port}"}.get(failure, url(agg))
    agg.mode = failure
    monkeypatch.setattr("eastwest.client.STREAM_SILENCE_S", 0.0, raising=False)  # no 45 s wait
    rc, out, err = run(capsys, argv, server, timeout="0.3" if failure == "no-answer" else "5")
    status, says = expected(failure, argv, server)
    assert out == ""
    assert (rc, err.count("\n")) == (status, 1), err
    assert err.startswith(f"eastwest {argv[0]}: {says}"), err


@pytest.mark.parametrize("fmt", flows.FORMATS)
def test_stored_flows_print_nothing_when_a_later_page_fails(agg, capsys, fmt):
    """Page 1 arrived (two flows), page 2 failed: none of page 1 is printed."""
    agg.mode = "page-2-fails"
    rc, out, err = run(capsys, ("flows", "--limit", "0", "-o", fmt), url(agg))
    assert (rc, out) == (1, "")
    assert err == (f"eastwest flows: the aggregator at {url(agg)} failed on /api/v1/flows "
                   "(500: store unavailable: locked)\n")
    assert agg.paths == ["/api/v1/flows", "/api/v1/flows"]
    agg.mode = "ok"
    rc, out, _ = run(capsys, ("flows", "--limit", "0", "-o", "jsonl"), url(agg))
    assert rc == 0 and [json.loads(x)["id"] for x in out.splitlines()] == [
        f["id"] for f in FLOWS]


# -- a live stream that fails after two flows -------------------------------------------------
def parse(fmt: str, out: str) -> list[str]:
    """The flows ids (or client ports) a stream printed, every line parsed whole."""
    lines = out.splitlines()
    if fmt == "jsonl":
        return [json.loads(x)["id"] for x in lines]
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert tuple(rows[0]) == CSV_HEADERS and all(None not in r for r in rows)
        return [r["client_port"] for r in rows]
    if fmt == "table":
        assert lines[0].split()[0] == "START"
        lines = lines[1:]
    return [x.split()[2].rsplit(":", 1)[1] for x in lines]


STREAM_FAILURES = {
    "stream-ends": "the aggregator closed the live stream after 2 flows",
    "stream-cut": "talking to the aggregator at {server} failed: ",
    "stream-error": "the aggregator ended the stream: the store went away",
    "stream-bad-event": "the aggregator sent an event that is not JSON",
}


@pytest.mark.parametrize("failure", STREAM_FAILURES)
@pytest.mark.parametrize("fmt", [f for f in flows.FORMATS if f != "json"])
def test_follow_keeps_the_flows_it_printed_whole_and_exits_1_when_the_stream_fails(
        agg, capsys, fmt, failure):
    agg.mode = failure
    rc, out, err = run(capsys, ("flows", "--follow", "-o", fmt), url(agg))
    assert rc == 1
    assert out.endswith("\n")
    assert parse(fmt, out) in (["f1", "f2"], ["40001", "40002"])
    assert err.count("\n") == 1
    assert err.startswith("eastwest flows: " + STREAM_FAILURES[failure].format(server=url(agg)))


def test_follow_that_ends_before_its_limit_says_how_many_arrived(agg, capsys):
    agg.mode = "stream-ends"
    rc, out, err = run(capsys, ("flows", "--follow", "--limit", "5", "-o", "jsonl"), url(agg))
    assert (rc, len(out.splitlines())) == (1, 2)
    assert err == ("eastwest flows: the aggregator closed the live stream after 2 of --limit 5 "
                   "flows\n")


def test_follow_with_json_is_a_usage_error_that_prints_nothing(agg, capsys):
    rc, out, err = run(capsys, ("flows", "--follow", "-o", "json"), url(agg))
    assert (rc, out, agg.paths) == (2, "", [])
    assert err.startswith("eastwest flows: --output='json': a JSON document never ends")


# -- --input-file -----------------------------------------------------------------------------
GOOD = write_jsonl(RECORDS[:2])


@pytest.fixture()
def bad_files(tmp_path: Any) -> dict[str, tuple[Any, str]]:
    """Input files that fail whole, and what stderr's last line says."""
    (tmp_path / "binary.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\n\x00\x00\x9c\n")
    (tmp_path / "dir").mkdir()
    f = tmp_path
    return {
        "missing": (f / "nope.jsonl", f"--input-file {f / 'nope.jsonl'}: No such file or "
                    "directory"),
        "directory": (f / "dir", f"--input-file {f / 'dir'}: Is a directory"),
        "not records": (f / "binary.jsonl.gz", f"{f / 'binary.jsonl.gz'}: none of its 2 lines "
                        "is a flow record"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "not records"])
@pytest.mark.parametrize("fmt", flows.FORMATS)
def test_an_input_file_that_is_no_flow_file_prints_nothing_on_stdout(bad_files, capsys, fmt,
                                                                      case):
    path, says = bad_files[case]
    rc = main(["flows", "--input-file", str(path), "-o", fmt])
    cap = capsys.readouterr()
    assert (rc, cap.out) == (1, "")
    assert cap.err.splitlines()[-1].startswith(f"eastwest flows: {says}"), cap.err


@pytest.mark.parametrize("case", ["a bad line", "cut short"])
@pytest.mark.parametrize("fmt", flows.FORMATS)
def test_bad_lines_of_a_file_are_named_and_skipped_the_good_records_printed_exit_1(
        tmp_path, capsys, fmt, case):
    """One bad line spoils nothing else: the good records are printed, each bad line named on
    stderr, and the exit status says that something was skipped."""
    lines = GOOD.decode().splitlines()
    path = tmp_path / "f.jsonl"
    path.write_text(f"{lines[0]}\n{{not a record\n{lines[1]}\n" if case == "a bad line"
                    else f"{lines[0]}\n{lines[1]}\n{lines[0][:40]}")
    rc = main(["flows", "--input-file", str(path), "-o", fmt])
    cap = capsys.readouterr()
    assert rc == 1
    bad_line = 2 if case == "a bad line" else 3
    assert f"eastwest flows: {path}:{bad_line}: " in cap.err
    assert cap.err.splitlines()[-1] == (f"eastwest flows: {path}: skipped 1 of 3 lines that "
                                        "are not flow records (docs/flow-record.md)")
    out = cap.out.splitlines()
    if fmt == "json":
        assert len(json.loads(cap.out)) == 2
    elif fmt == "jsonl":
        assert [json.loads(x) for x in out] == [json.loads(x) for x in GOOD.splitlines()]
    else:
        assert len(out) == 2 + (fmt in ("table", "csv"))  # a header, two records


@pytest.mark.parametrize("fmt", flows.FORMATS)
def test_a_good_input_file_prints_every_format(tmp_path, capsys, fmt):
    path = tmp_path / "good.jsonl"
    path.write_bytes(GOOD)
    rc = main(["flows", "--input-file", str(path), "-o", fmt])
    cap = capsys.readouterr()
    assert (rc, cap.err) == (0, "") and cap.out


@pytest.mark.parametrize("fmt", flows.FORMATS)
def test_stdin_is_a_stream_good_records_printed_as_read_bad_lines_make_exit_1(
        capsys, monkeypatch, fmt):
    """`--input-file -` is read as a stream (a collector's pipe never ends): each record is
    printed when it is read, as with --follow; bad lines are named, skipped and make exit 1.
    `-o json` prints one document at the end."""
    lines = GOOD.decode().splitlines()
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{lines[0]}\nnot json\n{lines[1]}\n"))
    rc = main(["flows", "--input-file", "-", "-o", fmt])
    cap = capsys.readouterr()
    assert rc == 1
    assert cap.err.splitlines()[-1] == ("eastwest flows: stdin: skipped 1 of 3 lines that are "
                                        "not flow records (docs/flow-record.md)")
    lines = cap.out.splitlines()
    if fmt == "json":
        assert len(json.loads(cap.out)) == 2
    elif fmt == "jsonl":
        assert [json.loads(x) for x in lines] == [json.loads(x) for x in GOOD.splitlines()]
    else:
        assert len(lines) == 2 + (fmt in ("table", "csv"))  # a header, two records
