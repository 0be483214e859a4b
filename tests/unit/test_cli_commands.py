"""The API commands (flows, --follow, graph, workloads, top, diff) against a fake aggregator at
the HTTP boundary (httpx.MockTransport). The fake filters flows with `Filter.from_query` on the
query the CLI sent, as the API does, so a parameter the CLI spells wrong selects the wrong flows
here too. Shapes of the API objects: docs/api.md."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import httpx
import pytest

from eastwest.cli import main
from eastwest.client import ApiClient, ClientSettings
from eastwest.filters import Filter

TOKEN = "read-token-0123456789"


def flow(n: int, client: str, cip: str, server: str, sip: str, sport: int, outcome: str = "ok",
         observed_by: tuple[str, ...] = ("client", "server"), c2s: int = 10, s2c: int = 20,
         vni: int | None = None) -> dict[str, Any]:
    """A flow as aggregator/api/views.py `flow_json` writes it (docs/api.md)."""
    def side(name: str, ip: str, port: int, comm: str | None) -> dict[str, Any]:
        return {"ip": ip, "port": port,
                "workload": {"id": f"shop/{name}", "name": name, "namespace": "shop",
                             "kind": "service", "host": None, "resolved_by": "static"},
                "process": None if comm is None else {"pid": 100 + n, "comm": comm, "netns": 1,
                                                      "container": None, "collector": "h1"}}
    return {
        "id": f"f{n}", "protocol": "tcp", "family": 4,
        "client": side(client, cip, 40000 + n, f"ew-{client}"),
        "server": side(server, sip, sport, None),
        "start": f"2026-11-28T04:00:{n:02d}Z", "last_seen": f"2026-11-28T04:00:{n + 1:02d}Z",
        "closed": True, "closed_at": f"2026-11-28T04:00:{n + 1:02d}Z", "connect": outcome,
        "outcome": outcome, "observed_by": list(observed_by), "bytes_c2s": c2s, "bytes_s2c": s2c,
        "packets_c2s": None, "packets_s2c": None, "by_observer": {}, "byte_mismatch": False,
        "retransmits": 0, "resets": int(outcome == "reset"),
        "rtt_us": {"min": 100, "avg": 200, "max": 300},
        "tunnel": None if vni is None else {"type": "vxlan", "vni": vni, "vtep_src": "10.213.0.2",
                                            "vtep_dst": "10.213.0.3", "vtep_src_host": "h2",
                                            "vtep_dst_host": "h3"},
        "complete": True,
    }


FLOWS = [
    flow(1, "frontend", "10.244.1.11", "api", "10.244.2.11", 9090),
    flow(2, "api", "10.244.2.11", "db", "10.244.3.11", 5432, c2s=500, s2c=7000, vni=42),
    flow(3, "api", "10.244.2.11", "db", "10.244.3.11", 5433, "refused", ("client",), 0, 0),
    flow(4, "api", "10.244.2.11", "auth", "10.244.2.12", 7000, "reset"),
    flow(5, "api", "10.244.2.11", "db", "10.244.3.11", 5432, c2s=600, s2c=8000, vni=42),
]

def edge(src: str, dst: str, opened: int, failed: int, c2s: int, s2c: int, ports: list[int],
         observed: dict[str, int], resets: int = 0, retx: int = 0, complete: bool = True
         ) -> dict[str, Any]:
    """An edge as aggregator/graph.py `to_json` writes it (docs/api.md)."""
    return {"source": src, "target": dst, "connections_opened": opened, "connections_active": 0,
            "connections_closed": opened, "connections_failed": failed, "resets": resets,
            "byte_mismatches": 0, "bytes_c2s": c2s, "bytes_s2c": s2c, "packets_c2s": 0,
            "packets_s2c": 0, "retransmits": retx, "rtt_us": {"min": 1, "avg": 2000, "max": 3},
            "ports": ports, "protocols": ["tcp"], "first_seen": "2026-11-28T04:00:00Z",
            "last_seen": "2026-11-28T04:01:00Z", "complete": complete, "observed_by": observed,
            "folded": 1}


EDGES = [  # observed_by: connections per set of observers, as the API counts them
    edge("shop/frontend", "shop/api", 1, 0, 10, 20, [9090], {"client,server": 1}),
    edge("shop/api", "shop/db", 3, 1, 1100, 15000, [5432, 5433],
         {"client,path": 1, "client,path,server": 2}, retx=2),
    edge("shop/api", "shop/auth", 1, 1, 10, 20, [7000], {"client": 1}, resets=1, complete=False),
]
PICK = ("connections_opened", "connections_failed", "resets", "bytes_c2s", "bytes_s2c")


def pick(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e[k] for k in PICK}


def view(f: dict[str, Any]) -> dict[str, Any]:
    c, s = f["client"], f["server"]
    return {"client_ip": c["ip"], "server_ip": s["ip"], "client_port": c["port"],
            "server_port": s["port"], "protocol": f["protocol"], "outcome": f["outcome"],
            "observers": set(f["observed_by"]), "vni": (f["tunnel"] or {}).get("vni"),
            "client_workload": c["workload"]["name"], "server_workload": s["workload"]["name"],
            "client_namespace": "shop", "server_namespace": "shop"}


FLOW_SORT_KEYS: dict[str, Any] = {  # the API's sort keys (docs/api.md)
    "last_seen": lambda f: f["last_seen"], "bytes": lambda f: f["bytes_c2s"] + f["bytes_s2c"],
    "client_workload": lambda f: f["client"]["workload"]["name"],
    "server_workload": lambda f: f["server"]["workload"]["name"]}


class FakeApi:
    """The read API of docs/api.md over canned data; records every request it served."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        if req.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx.Response(401, json={"detail": "invalid token"})
        params = list(req.url.params.multi_items())
        path = req.url.path
        if path == "/api/v1/flows":
            flt = Filter.from_query(params)
            hits = [f for f in FLOWS if flt.matches(view(f))]
            sort = req.url.params.get("sort", "-start")  # `start` keeps the canned order
            if sort.lstrip("-") != "start":
                hits.sort(key=FLOW_SORT_KEYS[sort.lstrip("-")], reverse=sort.startswith("-"))
            start = int(req.url.params.get("cursor") or 0)
            limit = int(req.url.params.get("limit", 100))
            page = hits[start:start + limit]
            nxt = str(start + limit) if start + limit < len(hits) else None
            return httpx.Response(200, json={"flows": page, "next_cursor": nxt})
        if path == "/api/v1/flows/stream":  # closes after `limit` events, or all of them
            flt = Filter.from_query([(k, v) for k, v in params if k != "limit"])
            hits = [f for f in FLOWS if flt.matches(view(f))]
            body = "".join(f"event: flow\ndata: {json.dumps(f)}\n\n: keep-alive\n\n"
                           for f in hits[:int(req.url.params.get("limit") or len(hits))])
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        if path == "/api/v1/graph":
            fmt = req.url.params.get("format")
            if fmt == "dot":
                return httpx.Response(200, text='digraph {\n  "api" -> "db\x1b[31m";\n}\n')
            q = req.url.params
            edges = [e for e in EDGES  # enough of the filter for these tests
                     if all(e["target"].endswith("/" + w) for w in q.get_list("to_workload")[:1])
                     and all(e["source"].endswith("/" + w) for w in q.get_list("from_workload")[:1])]
            return httpx.Response(200, json={"since": "x", "until": "y", "group_by": "workload",
                                             "folded_edges": 0, "nodes": [], "edges": edges})
        if path == "/api/v1/workloads":
            return httpx.Response(200, json={"from": "x", "to": "y", "workloads": [
                {"id": "shop/db", "name": "db", "namespace": "shop", "kind": "service",
                 "callers": ["shop/api"], "callees": []},
                {"id": "shop/api", "name": "api", "namespace": "shop", "kind": "service",
                 "callers": ["shop/frontend"], "callees": ["shop/auth", "shop/db"]}]})
        if path == "/api/v1/workloads/db":
            return httpx.Response(200, json={
                "id": "shop/db", "name": "db", "namespace": "shop", "kind": "service",
                "callers": [{**pick(EDGES[1]), "source": "shop/api", "target": "shop/db",
                             "ports": [5432, 5433]}],
                "callees": [], "upstream": ["shop/api", "shop/frontend"], "downstream": [],
                "impact": [{"workload": "shop/api", "distance": 1},
                           {"workload": "shop/frontend", "distance": 2}]})
        if path == "/api/v1/diff":
            b = {**pick(EDGES[1]), "connections_opened": 9}
            return httpx.Response(200, json={
                "added": [{"source": "shop/api", "target": "shop/auth", **pick(EDGES[2])}],
                "removed": [{"source": "shop/frontend", "target": "shop/api", **pick(EDGES[0])}],
                "changed": [{"source": "shop/api", "target": "shop/db",
                             "changed": ["connections_opened"], "a": pick(EDGES[1]), "b": b}],
                "nodes_added": [], "nodes_removed": []})
        return httpx.Response(404, json={"detail": "Not Found"})


@pytest.fixture()
def api(monkeypatch):
    fake = FakeApi()

    def make(args):
        return ApiClient(ClientSettings(server="http://agg.test", token=TOKEN),
                         transport=httpx.MockTransport(fake))

    monkeypatch.setattr("eastwest.cli._common.client_from_args", make)
    return fake


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize(("argv", "ids"), [
    ([], ["f1", "f2", "f3", "f4", "f5"]),
    (["--to-workload", "db"], ["f2", "f3", "f5"]),
    (["--to-workload", "db", "--not", "--outcome", "ok"], ["f3"]),
    (["--observer", "server", "--not", "--to-workload", "auth"], ["f1", "f2", "f5"]),
    (["--vni", "42", "--port", "5432"], ["f2", "f5"]),
    (["--from-ip", "10.244.1.0/24"], ["f1"]),
])
def test_stored_flows_are_queried_with_the_filter_as_api_parameters(api, capsys, argv, ids):
    rc, out, _ = run(capsys, "flows", *argv, "-o", "jsonl")
    assert rc == 0
    assert [json.loads(x)["id"] for x in out.splitlines()] == ids


def test_flows_follow_the_cursor_until_the_limit(api, capsys):
    rc, out, _ = run(capsys, "flows", "--limit", "4", "-o", "json")
    assert [f["id"] for f in json.loads(out)] == ["f1", "f2", "f3", "f4"]
    rc, out, _ = run(capsys, "flows", "--limit", "0", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["server_workload"] for r in rows] == ["api", "db", "db", "auth", "db"]
    assert rows[1]["observed_by"] == "client;server" and rows[1]["vni"] == "42"
    assert rows[0]["client_comm"] == "ew-frontend"


def test_follow_prints_each_live_flow_as_it_arrives(api, capsys):
    rc, out, err = run(capsys, "flows", "--follow", "--to-workload", "db", "-o", "jsonl")
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["f2", "f3", "f5"]
    req = api.requests[-1]
    assert req.url.path == "/api/v1/flows/stream"
    assert list(req.url.params.multi_items()) == [("to_workload", "db")]
    # the fake's stream ends after its last flow; a live stream that ends is a disconnect
    assert (rc, err) == (1, "eastwest flows: the aggregator closed the live stream after 3 "
                            "flows\n")
    rc, out, err = run(capsys, "flows", "--follow", "--to-workload", "db", "--limit", "3")
    assert (rc, err, len(out.splitlines())) == (0, "", 4)  # a header and three flows


def test_follow_stops_after_limit(api, capsys):
    _, out, _ = run(capsys, "flows", "-f", "--limit", "1", "-o", "compact")
    assert ("limit", "1") in api.requests[-1].url.params.multi_items()  # the server stops too
    assert out.splitlines() == ["2026-11-28T04:00:01.000Z frontend 10.244.1.11:40001 -> "
                                "api 10.244.2.11:9090 tcp ok 10B/20B [client,server]"]


def test_graph_table_json_csv_and_dot(api, capsys):
    rc, out, _ = run(capsys, "graph", "--since", "2h", "--group-by", "namespace")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:4] == ["CLIENT", "SERVER", "CONNS", "FAILED"]
    assert [ln.split()[:3] for ln in lines[1:]] == [["shop/api", "shop/auth", "1"],
                                                     ["shop/api", "shop/db", "3"],
                                                     ["shop/frontend", "shop/api", "1"]]
    assert lines[2].split()[3:10] == ["1", "1.1KiB", "14.6KiB", "0", "2", "2.00ms",
                                      "5432,5433"]
    assert lines[2][lines[0].index("SEEN BY"):] == "client+path+server 2, client+path 1"
    assert lines[1][lines[0].index("SEEN BY"):] == "client 1 (incomplete)"
    q = dict(api.requests[-1].url.params.multi_items())
    assert q["group_by"] == "namespace" and q["from"].endswith("Z") and "to" not in q
    _, out, _ = run(capsys, "graph", "-o", "json")
    assert json.loads(out)["edges"] == EDGES
    _, out, _ = run(capsys, "graph", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[1]["ports"] == "5432;5433" and rows[1]["bytes_s2c"] == "15000"
    _, out, _ = run(capsys, "graph", "-o", "dot")
    assert out == 'digraph {\n  "api" -> "db\\x1b[31m";\n}\n'


@pytest.mark.parametrize(("argv", "expected"), [
    (["--by", "bytes"], [("api", "db"), ("api", "auth"), ("frontend", "api")]),  # ties by name
    (["--by", "failures"], [("api", "auth"), ("api", "db")]),
    (["--by", "connections", "-n", "1"], [("api", "db")]),
    (["--by", "retransmits"], [("api", "db")]),
    (["--to-workload", "auth", "--by", "connections"], [("api", "auth")]),
    (["--from-workload", "frontend"], [("frontend", "api")]),
])
def test_top_ranks_edges_by_the_metric(api, capsys, argv, expected):
    rc, out, _ = run(capsys, "top", *argv, "-o", "json")
    assert rc == 0
    assert [(e["source"], e["target"]) for e in json.loads(out)] == [
        (f"shop/{a}", f"shop/{b}") for a, b in expected]
    sent = list(api.requests[-1].url.params.multi_items())
    assert ("to_workload", "auth") in sent if "--to-workload" in argv else True


def test_top_table_is_numbered(api, capsys):
    _, out, _ = run(capsys, "top", "--to-workload", "db")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["#", "CLIENT", "SERVER"]
    assert lines[1].split()[:4] == ["1", "shop/api", "shop/db", "3"]


def test_workloads_list_detail_and_names(api, capsys):
    _, out, _ = run(capsys, "workloads")
    assert [ln.split() for ln in out.splitlines()] == [
        ["WORKLOAD", "NAMESPACE", "KIND", "CALLERS", "CALLEES"],
        ["shop/api", "shop", "service", "1", "2"], ["shop/db", "shop", "service", "1", "0"]]
    _, out, _ = run(capsys, "workloads", "-o", "names")
    assert out == "api\ndb\n"
    _, out, _ = run(capsys, "workloads", "db")
    lines = out.splitlines()
    assert lines[0] == "shop/db  namespace shop  kind service"
    assert [ln.split() for ln in lines[2:5]] == [
        ["called", "by", "(1):"], ["WORKLOAD", "CONNS", "FAILED", "C->S", "S->C", "PORTS"],
        ["shop/api", "3", "1", "1.1KiB", "14.6KiB", "5432,5433"]]
    assert "calls (0):" in lines
    assert "upstream, all who depend on it (2): shop/api, shop/frontend" in lines
    assert "impact, what breaks if it breaks (2): shop/api (1), shop/frontend (2)" in lines


def test_diff_marks_added_removed_changed(api, capsys):
    rc, out, _ = run(capsys, "diff", "--a", "1h..30m", "--b", "30m..now")
    lines = [ln.split() for ln in out.splitlines()]
    assert rc == 0
    assert [ln[:3] for ln in lines[1:]] == [["+", "shop/api", "shop/auth"],
                                            ["-", "shop/frontend", "shop/api"],
                                            ["~", "shop/api", "shop/db"]]
    assert lines[3][3:] == ["3", "9", "1", "1", "15.7KiB", "15.7KiB", "connections_opened"]
    q = dict(api.requests[-1].url.params.multi_items())
    assert set(q) == {"a_from", "a_to", "b_from", "b_to", "group_by", "threshold"}
    assert q["a_to"] == q["b_from"] and q["group_by"] == "workload"


@pytest.mark.parametrize(("argv", "message"), [
    (["diff", "--a", "30m..1h", "--b", "30m..now"], "--a='30m..1h': the end is not after the start"),
    (["diff", "--a", "1h..x", "--b", "30m..now"], "--a='x': not a time"),
    (["top", "-n", "-1"], "--limit=-1"),
    (["graph", "--since", "1h", "--until", "2h"], "--until='2h': is not after --since 1h"),
    (["workloads", "db", "-o", "names"], "--output='names'"),
    (["flows", "--follow", "--since", "5m"], "--since='5m': --follow shows flows as they happen"),
    (["diff", "--a", "1h..30m", "--b", "30m..now", "--threshold", "2"], "--threshold=2.0"),
    (["graph", "--port", "x"], "--port='x': not a port"),
])
def test_usage_errors_of_the_aggregate_commands(api, capsys, argv, message):
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_saved_api_flows_are_filtered_offline_like_records(api, capsys, tmp_path):
    _, saved, _ = run(capsys, "flows", "--limit", "0", "-o", "jsonl")
    path = tmp_path / "saved.jsonl"
    path.write_text(saved)
    rc, out, err = run(capsys, "flows", "--input-file", str(path), "--to-workload", "db",
                        "--not", "--observer", "server", "-o", "jsonl")
    assert (rc, err) == (0, "")
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["f3"]
    _, out, _ = run(capsys, "flows", "--input-file", str(path), "--since",
                    "2026-11-28T04:00:04.5Z", "-o", "jsonl")
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["f4", "f5"]


@pytest.mark.parametrize("argv, who", [
    (["flows", "--bogus", "x"], "eastwest flows"),
    (["lab", "up", "--nope"], "eastwest lab up"),
    (["--bogus"], "eastwest"),
])
def test_an_unknown_flag_is_reported_by_its_subcommand_and_exits_2(capsys, argv, who):
    from eastwest.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"{who}: error: unrecognized arguments: {' '.join(argv[len(who.split()) - 1:])}" in err
    assert err.startswith(f"usage: {who} ")


# -- issue 23 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--sort", "-bytes"], ["--sort=-bytes"], ["--so", "-bytes"]])
def test_sort_takes_a_descending_key_as_written(api, capsys, argv):
    """`--sort -bytes`, as --help writes it: argparse alone reads `-bytes` as a flag."""
    rc, out, err = run(capsys, "flows", *argv, "--limit", "2", "-o", "jsonl")
    assert (rc, err) == (0, "")
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["f5", "f2"]  # 8600 B, 7500 B
    assert ("sort", "-bytes") in api.requests[-1].url.params.multi_items()
    rc, out, _ = run(capsys, "flows", "--sort", "bytes", "--limit", "1", "-o", "jsonl")
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["f3"]  # 0 B


@pytest.mark.parametrize(("argv", "message"), [
    (["--sort", "-bogus"], "argument --sort: invalid choice: '-bogus' (choose from"),
    (["--sort", "--limit", "2"], "argument --sort: expected one argument"),
    (["--sort", "-o", "json"], "argument --sort: expected one argument"),
])
def test_sort_refuses_what_is_no_sort_key(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["flows", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("source", [["--follow"], ["--input-file", "x.jsonl"]])
def test_sort_is_refused_where_flows_come_as_they_come(api, capsys, source):
    rc, out, err = run(capsys, "flows", "--sort", "-bytes", *source)
    assert (rc, out) == (2, "")
    assert err == ("eastwest flows: --sort='-bytes': orders the aggregator's stored flows; "
                   "--follow and --input-file print flows as they come\n")


def test_every_flag_with_dashed_choices_takes_them_as_written():
    """Whatever command has a flag whose values start with `-` (flows --sort today), the value
    may follow it as a separate word."""
    import argparse

    from eastwest.cli import build_parser, parse

    parser = build_parser()
    found = []
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            for value in [str(c) for c in action.choices or () if str(c).startswith("-")]:
                if not action.option_strings:
                    continue
                args = parse(parser, [name, action.option_strings[-1], value])
                assert getattr(args, action.dest) == value
                found.append((name, action.option_strings[-1]))
    assert ("flows", "--sort") in found


def test_seen_by_shows_each_set_of_observers_with_its_count_in_graph_and_top(api, capsys,
                                                                               monkeypatch):
    """`{"client,path,server": 323, "client,path": 16}` reads `client+path+server 323,
    client+path 16` (largest first) in both tables; csv and json keep the structure."""
    one = [edge("shop/api", "shop/db", 339, 0, 1, 2, [5432],
                {"client,path": 16, "client,path,server": 323})]
    monkeypatch.setattr(f"{__name__}.EDGES", one)
    cells = []
    for cmd in ("graph", "top"):
        rc, out, _ = run(capsys, cmd)
        head, row = out.splitlines()
        assert rc == 0
        cells.append(row[head.index("SEEN BY"):])
    assert cells == ["client+path+server 323, client+path 16"] * 2
    _, out, _ = run(capsys, "top", "-o", "csv")
    assert next(csv.DictReader(io.StringIO(out)))["observed_by"] == "client,path;client,path,server"
    _, out, _ = run(capsys, "graph", "-o", "json")
    assert json.loads(out)["edges"][0]["observed_by"] == {"client,path": 16,
                                                         "client,path,server": 323}


def test_failed_column_and_top_by_failures_count_the_same(api, capsys, monkeypatch):
    """FAILED is the API's connections_failed (never established); --by failures ranks by that
    column, resets are their own column and their own --by."""
    edges = [edge("shop/a", "shop/x", 9, 0, 1, 1, [1], {"client": 9}, resets=5),
             edge("shop/b", "shop/x", 9, 2, 1, 1, [1], {"client": 9}, resets=0),
             edge("shop/c", "shop/x", 9, 1, 1, 1, [1], {"client": 9}, resets=4)]
    monkeypatch.setattr(f"{__name__}.EDGES", edges)

    def table(*argv: str) -> list[tuple[str, str, str]]:
        rc, out, _ = run(capsys, "top", *argv)
        head, *rows = out.splitlines()
        cols = head.split()
        return [(r.split()[1], r.split()[cols.index("FAILED")], r.split()[cols.index("RESETS")])
                for r in rows]

    assert table("--by", "failures") == [("shop/b", "2", "0"), ("shop/c", "1", "4")]
    assert table("--by", "resets") == [("shop/a", "0", "5"), ("shop/c", "1", "4")]


@pytest.fixture()
def real_api(tmp_path, monkeypatch):
    """The real aggregator app (empty DuckDB store) at the CLI's HTTP boundary: its own 404s."""
    from fastapi.testclient import TestClient

    from aggregator.app import create_app
    from aggregator.settings import AggregatorSettings

    settings = AggregatorSettings(data_dir=tmp_path / "data", ingest_token="i" * 24,
                                  read_token=TOKEN, retention=None)
    with TestClient(create_app(settings)) as app:
        monkeypatch.setattr("eastwest.cli._common.client_from_args", lambda args: ApiClient(
            ClientSettings(server="http://agg.test", token=TOKEN), transport=app._transport))
        yield app


@pytest.mark.parametrize(("argv", "window"), [
    ([], "the last 15 minutes, the default; --since widens it"),
    (["--since", "1h"], "1h..now"),
    (["--since", "2h", "--until", "1h"], "2h..1h"),
])
def test_workloads_of_an_unknown_name_says_it_was_not_seen_in_the_window(real_api, capsys,
                                                                         argv, window):
    """A name the aggregator did not see is no question of versions (issue 23, item 4)."""
    for fmt in ("table", "json"):
        rc, out, err = run(capsys, "workloads", "nosuch", *argv, "-o", fmt)
        assert (rc, out) == (1, "")
        assert err == (f"eastwest workloads: workload 'nosuch' was not seen in this window "
                       f"({window}); `eastwest workloads` lists the known ones\n")


def test_workloads_of_an_ambiguous_bare_name_lists_the_candidates(capsys, monkeypatch):
    detail = "workload='web': not seen in this window (ambiguous: blue/web, green/web\x1b[2J)"
    monkeypatch.setattr("eastwest.cli._common.client_from_args", lambda args: ApiClient(
        ClientSettings(server="http://agg.test", token=TOKEN), transport=httpx.MockTransport(
            lambda req: httpx.Response(404, json={"detail": detail}))))
    rc, out, err = run(capsys, "workloads", "web")
    assert (rc, out) == (1, "")
    assert err == ("eastwest workloads: workload 'web' is ambiguous in this window (the last 15 "
                   "minutes, the default; --since widens it): blue/web, green/web\\x1b[2J; name "
                   "one as namespace/name\n")


def test_an_unknown_route_still_asks_about_versions(real_api):
    from eastwest.errors import TransportError

    with ApiClient(ClientSettings(server="http://agg.test", token=TOKEN),
                   transport=real_api._transport) as c, pytest.raises(TransportError) as info:
        c.get_json("/api/v1/nosuch")
    assert str(info.value) == ("the aggregator at http://agg.test has no /api/v1/nosuch (404: Not "
                               "Found); is it an older version than this CLI?")
