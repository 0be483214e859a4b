"""Filter flags, table-driven: flags in, filter out, which records match, through the real
command line (`eastwest flows --input-file ... -o jsonl`), and the same filter reaching the API
as query parameters that `Filter.from_query` (the code the API runs) parses back to it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from eastwest.cli import build_parser, main
from eastwest.cli._filterflags import filter_spec
from eastwest.codec import write_jsonl
from eastwest.filters import Filter
from eastwest.record import Endpoint, FlowRecord, Process, Rtt, Tunnel, Workload

T0 = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)


def rec(n: int, cip: str, cport: int, sip: str, sport: int, *, proto: str = "tcp",
        connect: str | None = "ok", resets: int = 0, observer: str = "client",
        cw: str | None = None, sw: str | None = None, ns: str = "shop", vni: int | None = None,
        minute: int = 0, comm: str = "ew-api", c2s: int = 100, s2c: int = 2000,
        retx: int = 0) -> FlowRecord:
    fam = 6 if ":" in cip else 4
    start = T0 + timedelta(minutes=minute)
    return FlowRecord(
        record_id=f"c:{n}", collector="c", source="socket", start=start,
        end=start + timedelta(seconds=30), final=True, protocol=proto, family=fam,
        client=Endpoint(cip, cport), server=Endpoint(sip, sport), observer=observer,
        connect=connect, resets=resets, bytes_c2s=c2s, bytes_s2c=s2c, retransmits=retx,
        rtt_us=Rtt(100, 250, 900), process=Process(4000 + n, comm),
        client_workload=Workload(cw, ns) if cw else None,
        server_workload=Workload(sw, ns) if sw else None,
        tunnel=Tunnel("vxlan", vni, "10.213.0.1", "10.213.0.2", 4789) if vni is not None else None,
    )


RECORDS = [
    rec(1, "10.244.1.11", 40000, "10.244.2.11", 9090, cw="frontend", sw="api", comm="ew-frontend"),
    rec(2, "10.244.2.11", 40001, "10.244.3.11", 5432, cw="api", sw="db", vni=42, observer="path",
        minute=10),
    rec(3, "10.244.2.11", 40002, "10.244.3.11", 5433, connect="refused", cw="api", sw="db",
        minute=20, c2s=0, s2c=0),
    rec(4, "10.244.2.11", 40003, "10.244.2.12", 7000, resets=1, cw="api", sw="auth",
        observer="server", minute=30, retx=3),
    rec(5, "10.244.2.11", 40004, "10.244.3.12", 53, proto="udp", connect=None, cw="api",
        sw="resolver", ns="platform", minute=40),
    rec(6, "fd00::1", 50000, "fd00::2", 443, cw="web", sw="edge", ns="ext", minute=50),
    rec(7, "10.244.1.12", 40100, "10.244.3.11", 5432, cw="frontend", sw="db", vni=42,
        minute=55, connect="timeout", c2s=0, s2c=0),
]
ALL = [r.record_id for r in RECORDS]

CASES = [  # (argv after `flows`, str(filter), matching record numbers)
    ([], "(everything)", [1, 2, 3, 4, 5, 6, 7]),
    (["--to-workload", "db"], "to_workload=db", [2, 3, 7]),
    (["--to-workload", "db", "--to-workload", "auth"], "(to_workload=db OR to_workload=auth)",
     [2, 3, 4, 7]),
    (["--from-workload", "api", "--port", "5432"], "from_workload=api AND port=5432", [2]),
    (["--workload", "frontend"], "workload=frontend", [1, 7]),
    (["--not", "--to-workload", "db"], "NOT to_workload=db", [1, 4, 5, 6]),
    (["--to-workload", "db", "--not", "--outcome", "ok"], "to_workload=db AND NOT outcome=ok",
     [3, 7]),
    (["--not", "--outcome", "ok", "--not", "--outcome", "timeout"],
     "NOT (outcome=ok OR outcome=timeout)", [3, 4]),
    (["--from-workload", "api", "--not", "--protocol", "udp"],
     "from_workload=api AND NOT protocol=udp", [2, 3, 4]),
    (["--ip", "10.244.3.0/24"], "ip=10.244.3.0/24", [2, 3, 5, 7]),
    (["--from-ip", "10.244.1.11"], "from_ip=10.244.1.11/32", [1]),
    (["--to-ip", "fd00::/64"], "to_ip=fd00::/64", [6]),
    (["--not", "--ip", "10.0.0.0/8"], "NOT ip=10.0.0.0/8", [6]),
    (["--port", "53", "--port", "443"], "(port=53 OR port=443)", [5, 6]),
    (["--to-port", "40000"], "to_port=40000", []),
    (["--port", "40000"], "port=40000", [1]),
    (["--protocol", "UDP"], "protocol=udp", [5]),
    (["--outcome", "refused"], "outcome=refused", [3]),
    (["--outcome", "reset"], "outcome=reset", [4]),
    (["--outcome", "timeout"], "outcome=timeout", [7]),
    (["--observer", "path"], "observer=path", [2]),
    (["--not", "--observer", "client"], "NOT observer=client", [2, 4]),
    (["--vni", "42"], "vni=42", [2, 7]),
    (["--not", "--vni", "42"], "NOT vni=42", [1, 3, 4, 5, 6]),
    (["--namespace", "platform"], "namespace=platform", [5]),
    (["--namespace", "shop", "--to-workload", "db", "--from-ip", "10.244.1.0/24"],
     "namespace=shop AND to_workload=db AND from_ip=10.244.1.0/24", [7]),
    # the time window: a connection is in it when it overlaps it
    (["--since", "2026-11-28T04:30:00Z"], "(everything)", [4, 5, 6, 7]),
    (["--until", "2026-11-28T04:20:00Z"], "(everything)", [1, 2]),
    (["--since", "2026-11-28T04:10:15Z", "--until", "2026-11-28T04:20:00.000001Z"],
     "(everything)", [2, 3]),
    (["--since", "2026-11-28T04:00:00Z", "--to-workload", "db", "--not", "--vni", "42"],
     "to_workload=db AND NOT vni=42", [3]),
]


@pytest.fixture()
def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(write_jsonl(RECORDS))
    return path


def _numbers(jsonl: str) -> list[int]:
    return [int(json.loads(line)["record_id"].split(":")[1]) for line in jsonl.splitlines()]


@pytest.mark.parametrize(("argv", "text", "expected"), CASES, ids=[" ".join(c[0]) or "none" for c in CASES])
def test_flags_compile_to_the_filter_and_select_exactly_the_matching_records(
        argv, text, expected, records_file, capsys):
    args = build_parser().parse_args(["flows", *argv])
    assert str(filter_spec(args).filter) == text
    assert main(["flows", "--input-file", str(records_file), "-o", "jsonl", *argv]) == 0
    assert _numbers(capsys.readouterr().out) == expected


@pytest.mark.parametrize(("argv", "text", "expected"), CASES, ids=[" ".join(c[0]) or "none" for c in CASES])
def test_api_query_parameters_parse_back_to_the_same_filter(argv, text, expected):
    spec = filter_spec(build_parser().parse_args(["flows", *argv]))
    params = spec.query_params()
    again = Filter.from_query(params)
    assert str(again) == text
    for r in RECORDS:  # same predicate, record by record
        assert again.matches_record(r) == spec.filter.matches_record(r)
    since = [v for k, v in params if k == "since"]
    assert (since[0] if since else None) == (
        spec.since.isoformat().replace("+00:00", "Z") if spec.since else None)


def test_print_filter_shows_the_compiled_filter_and_the_api_query(capsys):
    rc = main(["flows", "--to-workload", "db", "--not", "--outcome", "ok", "--port", "5432",
               "--port", "5433", "--print-filter"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "filter: to_workload=db AND NOT outcome=ok AND (port=5432 OR port=5433)" in out
    assert "api:    GET /api/v1/flows?to_workload=db&not_outcome=ok&port=5432&port=5433" in out


def test_print_filter_as_json(capsys):
    assert main(["flows", "--not", "--ip", "10.244.0.0/16", "--print-filter", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["clauses"] == [{"dimension": "ip", "values": ["10.244.0.0/16"], "negate": True}]
    assert doc["query"] == [["not_ip", "10.244.0.0/16"]]


def test_relative_since_is_a_duration_ago():
    now = datetime(2026, 11, 28, 5, 0, tzinfo=UTC)
    spec = filter_spec(build_parser().parse_args(["flows", "--since", "5m", "--until", "now"]),
                       now=now)
    assert (spec.since, spec.until) == (now - timedelta(minutes=5), now)


USAGE_ERRORS = [  # argv, text the one error line must contain
    (["--port", "http"], "--port='http': not a port"),
    (["--port", "70000"], "--port='70000'"),
    (["--not", "--port", "-1"], "--not --port='-1'"),
    (["--from-ip", "10.0.0.300"], "--from-ip='10.0.0.300': not an IP address or CIDR"),
    (["--outcome", "slow"], "--outcome='slow': must be one of ok, refused, reset, timeout"),
    (["--observer", "me"], "--observer='me'"),
    (["--protocol", "http"], "--protocol='http'"),
    (["--vni", "16777216"], "--vni='16777216'"),
    (["--from-workload", ""], "--from-workload='': must not be empty"),
    (["--since", "yesterday"], "--since='yesterday': not a time"),
    (["--since", "1h", "--until", "2h"], "--until='2h': is not after --since 1h"),
    (["--port", "80", "--not"], "--not="),
    (["--limit", "-1"], "--limit=-1"),
    (["--follow", "--input-file", "x.jsonl"], "--follow='--input-file'"),
    (["--follow", "-o", "json"], "--output='json'"),
    (["--server", "ftp://x"], "--server='ftp://x': not an http(s) URL"),
    (["--timeout", "0"], "--timeout=0.0: must be > 0"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_a_usage_error_names_the_flag_and_exits_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no user config file in play
    assert main(["flows", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eastwest flows: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


ARGPARSE_ERRORS = [
    (["--not", "--not", "--port", "1"], "--not: given twice in a row"),
    (["-o", "yaml"], "argument -o/--output: invalid choice: 'yaml'"),
    (["--port"], "argument --port: expected one argument"),
    (["--limit", "many"], "argument --limit: invalid int value: 'many'"),
]


@pytest.mark.parametrize(("argv", "message"), ARGPARSE_ERRORS, ids=[" ".join(a) for a, _ in ARGPARSE_ERRORS])
def test_argparse_level_usage_errors_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["flows", *argv])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("eastwest flows: error: ") and message in last, last


def test_help_says_how_flags_combine(capsys):
    with pytest.raises(SystemExit):
        main(["flows", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "a flag given twice is OR-ed" in out
    assert "different flags are AND-ed" in out
    assert "--not negates the one filter flag after it" in out


@pytest.mark.parametrize("command", ["flows", "graph", "diff"])
def test_link_local_flag_reaches_the_api_as_link_local_true(command):
    argv = [command, "--link-local", "--port", "53"]
    if command == "diff":
        argv += ["--a", "1h..30m", "--b", "30m..now"]
    spec = filter_spec(build_parser().parse_args(argv))
    assert spec.filter.link_local and ("link_local", "true") in spec.query_params()
    assert Filter.from_query(spec.query_params()) == spec.filter
    plain = filter_spec(build_parser().parse_args([command, "--port", "53", *argv[4:]]))
    assert not plain.filter.link_local and all(k != "link_local" for k, _ in plain.query_params())


# -- offline workload names (issue 23, item 8) ------------------------------------------------
WORKLOAD_MAP = """\
workloads:  # as the lab writes it for `eastwest aggregator --workload-map`
- {match: 10.244.1.11/32, name: frontend, namespace: shop, kind: Deployment}
- {match: 10.244.1.12/32, name: frontend, namespace: shop}
- {match: 10.244.2.0/24, name: api, namespace: shop}
- {match: 10.244.2.12/32, name: auth, namespace: shop}
- {match: 10.244.3.11/32, name: db, namespace: shop}
- {match: 10.244.3.12:53, name: resolver, namespace: platform}
"""


@pytest.fixture()
def collector_file(tmp_path):
    """RECORDS as a collector writes them: no workload names."""
    import msgspec

    path = tmp_path / "collector.jsonl"
    path.write_bytes(write_jsonl([msgspec.structs.replace(r, client_workload=None,
                                                          server_workload=None)
                                  for r in RECORDS]))
    (tmp_path / "workloads.yaml").write_text(WORKLOAD_MAP)
    return path


@pytest.mark.parametrize(("argv", "expected"), [
    (["--to-workload", "db"], [2, 3, 7]),
    (["--workload", "frontend"], [1, 7]),
    (["--namespace", "platform"], [5]),
    (["--to-workload", "auth", "--from-workload", "api"], [4]),
    (["--not", "--to-workload", "db"], [1, 4, 5, 6]),
])
def test_workload_map_names_a_collectors_records_offline(collector_file, capsys, argv,
                                                         expected):
    wmap = str(collector_file.parent / "workloads.yaml")
    rc = main(["flows", "--input-file", str(collector_file), "--workload-map", wmap, *argv,
               "-o", "jsonl"])
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    assert _numbers(out) == expected
    for line in out.splitlines():  # printed with the names the map gave (fd00:: it lacks)
        r = json.loads(line)
        assert (r["server_workload"] is None) == (r["server"]["ip"] == "fd00::2")


def test_the_maps_name_wins_over_the_records_own(records_file, tmp_path, capsys):
    (tmp_path / "m.yaml").write_text("workloads:\n- {match: 10.244.3.11/32, name: postgres}\n")
    rc = main(["flows", "--input-file", str(records_file), "--workload-map",
               str(tmp_path / "m.yaml"), "--to-workload", "postgres", "-o", "jsonl"])
    assert (rc, _numbers(capsys.readouterr().out)) == (0, [2, 3, 7])


@pytest.mark.parametrize(("argv", "printed"), [
    (["--to-workload", "db"], []),
    (["--not", "--namespace", "shop", "--to-port", "443"], [6]),
])
def test_a_workload_filter_on_records_without_names_says_so_and_exits_1(collector_file, capsys,
                                                                        argv, printed):
    rc = main(["flows", "--input-file", str(collector_file), *argv, "-o", "jsonl"])
    out, err = capsys.readouterr()
    assert (rc, _numbers(out)) == (1, printed)
    flag = argv[1] if argv[0] == "--not" else argv[0]
    assert err == (f"eastwest flows: {collector_file}: none of the 7 records read carries "
                   "workload names (a collector's records have none: the aggregator, or "
                   f"--workload-map FILE, names them), so {flag} had no name to match\n")


def test_a_map_that_names_no_record_says_so(collector_file, tmp_path, capsys):
    (tmp_path / "other.yaml").write_text("workloads:\n- {match: 192.0.2.0/24, name: x}\n")
    rc = main(["flows", "--input-file", str(collector_file), "--workload-map",
               str(tmp_path / "other.yaml"), "--to-workload", "db", "--from-workload", "api"])
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert err == (f"eastwest flows: {collector_file}: none of the 7 records read has an address "
                   f"in --workload-map {tmp_path / 'other.yaml'}, so --from-workload "
                   "--to-workload had no name to match\n")


def test_no_warning_without_a_workload_filter_or_with_named_records(collector_file,
                                                                    records_file, capsys):
    assert main(["flows", "--input-file", str(collector_file), "--to-port", "5432"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["flows", "--input-file", str(records_file), "--to-workload", "nosuch"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("argv", "message"), [
    (["--workload-map", "m.yaml"], "--workload-map='m.yaml': names the records of "
     "--input-file; the aggregator names what it stores with its own"),
    (["--input-file", "x", "--workload-map", "missing.yaml"],
     "--workload-map='missing.yaml': cannot be read: No such file or directory"),
    (["--input-file", "x", "--workload-map", "bad.yaml"],
     "--workload-map='bad.yaml': expected a mapping with a `workloads` list"),
])
def test_workload_map_usage_errors_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("- just a list\n")
    assert main(["flows", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"eastwest flows: {message}\n"


def test_stdin_without_names_says_so_when_it_ends(collector_file, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(collector_file.read_text()))
    rc = main(["flows", "--input-file", "-", "--to-workload", "db", "-o", "jsonl"])
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert err.startswith("eastwest flows: stdin: none of the 7 records read carries workload "
                          "names") and err.count("\n") == 1
