"""Output of `eastwest flows`: every format parses back to what went in, untrusted strings
never reach the terminal raw, colour only when asked or on a TTY, and the file errors of
--input-file (exit codes, one line each, bad lines named and skipped)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from eastwest.cli import main
from eastwest.cli._flowprint import FlowPrinter
from eastwest.cli._flowrow import CSV_HEADERS, FlowRow
from eastwest.codec import from_json, to_json, write_jsonl
from eastwest.output import color_enabled, escape, human_bytes, json_safe, width
from eastwest.record import Process, Workload
from tests.unit.test_cli_filterflags import RECORDS, rec

EVIL_COMM = "ew-\x1b]0;owned\x07\x1b[2J\x9b31m"  # OSC title, clear screen, C1 CSI
EVIL_NAME = "db\u202egnp.exe\u200b"  # right-to-left override, zero-width space
EVIL = rec(99, "10.244.9.9", 41000, "10.244.3.11", 5432, cw="api", sw="db").replace(
    process=Process(1, EVIL_COMM), server_workload=Workload(EVIL_NAME, "shop\nx"))
RAW_CONTROL = ("\x1b", "\x07", "\x9b", "\u202e", "\u200b", "\n")


@pytest.fixture()
def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(write_jsonl(RECORDS))
    return path


def run(capsys, *argv):
    rc = main(["flows", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- every format parses back -----------------------------------------------------------------
def test_jsonl_parses_back_to_the_same_records(records_file, capsys):
    rc, out, _ = run(capsys, "--input-file", str(records_file), "-o", "jsonl")
    assert rc == 0
    assert [from_json(line) for line in out.splitlines()] == RECORDS


def test_json_is_one_array_of_the_same_records(records_file, capsys):
    rc, out, _ = run(capsys, "--input-file", str(records_file), "-o", "json")
    assert rc == 0
    assert [from_json(json.dumps(o)) for o in json.loads(out)] == RECORDS


def test_json_of_nothing_is_an_empty_array(records_file, capsys):
    rc, out, _ = run(capsys, "--input-file", str(records_file), "-o", "json", "--vni", "7")
    assert (rc, json.loads(out)) == (0, [])


def test_csv_parses_back_with_every_column(records_file, capsys):
    rc, out, _ = run(capsys, "--input-file", str(records_file), "-o", "csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0].keys()) == CSV_HEADERS
    assert len(rows) == len(RECORDS)
    for row, r in zip(rows, RECORDS, strict=True):
        assert row["start"] == r.start.isoformat().replace("+00:00", "Z")
        assert (row["client_ip"], int(row["client_port"])) == (r.client.ip, r.client.port)
        assert (row["server_ip"], int(row["server_port"])) == (r.server.ip, r.server.port)
        assert (int(row["bytes_c2s"]), int(row["bytes_s2c"])) == (r.bytes_c2s, r.bytes_s2c)
        assert row["server_workload"] == r.server_workload.name
        assert row["observed_by"] == r.observer
        assert row["vni"] == (str(r.tunnel.vni) if r.tunnel else "")
        assert int(row["rtt_avg_us"]) == r.rtt_us.avg
    assert [r["outcome"] for r in rows] == ["ok", "ok", "refused", "reset", "ok", "ok", "timeout"]


def test_csv_of_nothing_is_just_the_header(records_file, capsys):
    _, out, _ = run(capsys, "--input-file", str(records_file), "-o", "csv", "--vni", "7")
    assert out.splitlines() == [",".join(CSV_HEADERS)]


def test_table_has_a_header_and_one_row_per_flow(records_file, capsys):
    rc, out, err = run(capsys, "--input-file", str(records_file), "--to-workload", "db")
    lines = out.splitlines()
    assert rc == 0 and err == ""
    assert lines[0].split() == ["START", "CLIENT", "SERVER", "PROTO", "OUTCOME", "C->S", "S->C",
                                "RETX", "RTT", "SEEN", "BY", "VNI"]
    assert len(lines) == 4
    assert "api 10.244.2.11:40002" in lines[2] and "refused" in lines[2]
    assert lines[1].index("db 10.244.3.11:5432") == lines[0].index("SERVER")  # aligned


def test_compact_is_one_line_per_flow(records_file, capsys):
    _, out, _ = run(capsys, "--input-file", str(records_file), "-o", "compact", "--outcome", "reset")
    assert out == ("2026-11-28T04:30:00.000Z api 10.244.2.11:40003 -> auth 10.244.2.12:7000 tcp "
                   "reset 100B/2000B retx=3 [server]\n")


def test_limit_stops_after_n_flows(records_file, capsys):
    _, out, _ = run(capsys, "--input-file", str(records_file), "-o", "jsonl", "--limit", "2")
    assert [from_json(x) for x in out.splitlines()] == RECORDS[:2]


def test_stdin_is_read_with_a_dash(records_file, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(records_file.read_text()))
    _, out, _ = run(capsys, "--input-file", "-", "-o", "jsonl", "--observer", "path")
    assert [from_json(x) for x in out.splitlines()] == [RECORDS[1]]


# -- untrusted strings ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["table", "compact", "csv"])
def test_control_and_bidi_characters_never_reach_the_terminal(fmt, tmp_path, capsys):
    path = tmp_path / "evil.jsonl"
    path.write_bytes(to_json(EVIL) + b"\n")
    rc, out, _ = run(capsys, "--input-file", str(path), "-o", fmt, "--color", "never")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == (1 if fmt == "compact" else 2)  # the namespace's newline split nothing
    assert all(escape(line) == line for line in lines)  # nothing left to escape
    assert "db\\u202egnp.exe\\u200b" in out
    if fmt == "csv":
        assert "ew-\\x1b]0;owned\\x07\\x1b[2J\\x9b31m" in out
        assert "shop\\x0ax" in out


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_escapes_control_and_bidi_yet_parses_back_to_the_same_strings(fmt, tmp_path, capsys):
    path = tmp_path / "evil.jsonl"
    path.write_bytes(to_json(EVIL) + b"\n")
    _, out, _ = run(capsys, "--input-file", str(path), "-o", fmt)
    for ch in RAW_CONTROL[:-1]:
        assert ch not in out, repr(ch)
    if fmt == "jsonl":
        assert out.count("\n") == 1
    doc = json.loads(out)
    obj = doc[0] if fmt == "json" else doc
    assert from_json(json.dumps(obj)) == EVIL


def test_escape_keeps_printable_unicode_and_marks_the_rest():
    assert escape("frontend-ß-服务") == "frontend-ß-服务"
    assert escape("a\tb\x00c\x7f\u2028") == "a\\x09b\\x00c\\x7f\\u2028"
    assert escape(None) == ""
    assert width("服务") == 4
    assert json_safe('"\u0085\u202e"') == '"\\u0085\\u202e"'


# -- colour -----------------------------------------------------------------------------------
class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "mode", "env", "expected"), [
    (Tty(), "auto", {}, True),
    (io.StringIO(), "auto", {}, False),
    (Tty(), "auto", {"NO_COLOR": "1"}, False),
    (Tty(), "auto", {"TERM": "dumb"}, False),
    (Tty(), "never", {}, False),
    (io.StringIO(), "always", {"NO_COLOR": "1"}, True),
])
def test_colour_only_on_a_tty_unless_asked(stream, mode, env, expected):
    assert color_enabled(stream, mode, env) is expected


def test_coloured_table_marks_failures_red_and_plain_output_has_no_escapes(records_file, capsys):
    _, plain, _ = run(capsys, "--input-file", str(records_file))
    assert "\x1b" not in plain  # capsys is not a TTY: auto means no colour
    _, coloured, _ = run(capsys, "--input-file", str(records_file), "--color", "always")
    assert "\x1b[31mrefused\x1b[0m" in coloured and "\x1b[1mSTART" in coloured


def test_following_table_prints_each_row_at_once_with_fixed_columns():
    out = io.StringIO()
    p = FlowPrinter("table", out, streaming=True)
    p.add(FlowRow.from_record(RECORDS[0]))
    first = out.getvalue()
    assert first.splitlines()[0].startswith("START") and len(first.splitlines()) == 2
    p.add(FlowRow.from_record(RECORDS[2]))
    lines = out.getvalue().splitlines()
    assert lines[1].index("api 10.244.2.11:9090") == lines[2].index("db 10.244.3.11:5433")


def test_human_bytes_uses_iec_units():
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 1024**3)] == ["0B", "1023B", "1.5KiB",
                                                                       "5.0GiB"]


# -- file errors ------------------------------------------------------------------------------
def test_missing_input_file_is_one_line_and_exit_1(tmp_path, capsys):
    rc, out, err = run(capsys, "--input-file", str(tmp_path / "nope.jsonl"))
    assert rc == 1 and out == ""
    assert err == f"eastwest flows: --input-file {tmp_path / 'nope.jsonl'}: No such file or directory\n"


def test_bad_lines_are_named_skipped_and_make_exit_1(tmp_path, capsys):
    good = write_jsonl(RECORDS[:2]).decode().splitlines()
    bad_port = json.loads(good[0])
    bad_port["client"]["port"] = 70000
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good[0], "not json", json.dumps(bad_port), "", good[1]]) + "\n")
    rc, out, err = run(capsys, "--input-file", str(path), "-o", "jsonl")
    assert rc == 1
    assert [from_json(x) for x in out.splitlines()] == RECORDS[:2]
    lines = err.splitlines()
    assert lines[0].startswith(f"eastwest flows: {path}:2: record=") and "not valid JSON" in lines[0]
    assert lines[1].startswith(f"eastwest flows: {path}:3: client.port=70000")
    assert lines[2] == (f"eastwest flows: {path}: skipped 2 of 5 lines that are not flow records "
                        "(docs/flow-record.md)")
