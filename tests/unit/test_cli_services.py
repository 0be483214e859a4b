"""Services in the CLI (issue 16) against the real aggregator app and DuckDB: `eastwest graph`
and `top` with `--group-by service` (one edge client -> Service, a BACKENDS column), `flows`
naming the Service a connection went through and `--to-service namespace/name`, also offline
with `--input-file` and a workload map's `services` section; bad values exit 2."""

from __future__ import annotations

import csv
import io
import json

import pytest

from eastwest.client import ApiClient, ClientSettings
from tests.unit.test_api_query import READ, A
from tests.unit.test_api_services import MAP_YAML
from tests.unit.test_api_services import client as client  # noqa: F401 (the fixture)
from tests.unit.test_cli_commands import run
from tests.unit.test_service_view import CACHE_VIP, CALLS

WINDOW = ("--since", A["from"], "--until", A["to"])


@pytest.fixture
def api(client, monkeypatch):  # noqa: F811
    monkeypatch.setattr("eastwest.cli._common.client_from_args", lambda args: ApiClient(
        ClientSettings(server="http://agg.test", token=READ), transport=client._transport))
    return client


def test_graph_and_top_group_by_service(api, capsys):
    rc, out, err = run(capsys, "graph", "--group-by", "service", *WINDOW, "-o", "csv")
    assert rc == 0, err
    rows = {(r["client"], r["server"]): r for r in csv.DictReader(io.StringIO(out))}
    assert {k: (r["connections"], r["backends"]) for k, r in rows.items()} == {
        ("jobs/batch", "svc:shop/api"): ("1", "shop/api 1"),
        ("shop/frontend", "shop/api"): ("1", ""),
        ("shop/frontend", "svc:shop/api"): ("3", "shop/api 2, shop/api-canary 1"),
        ("shop/frontend", f"svc:{CACHE_VIP}:6379"): ("1", "shop/cache 1")}
    rc, out, _ = run(capsys, "graph", "--group-by", "service", *WINDOW)
    assert rc == 0 and "BACKENDS" in out.splitlines()[0]
    assert any("svc:shop/api" in line and "shop/api 2, shop/api-canary 1" in line
               for line in out.splitlines())
    rc, out, _ = run(capsys, "graph", *WINDOW, "-o", "csv")  # the default view is unchanged
    assert rc == 0 and "backends" not in out.splitlines()[0]
    assert "shop/frontend,shop/api,3," in out
    rc, out, _ = run(capsys, "top", "--group-by", "service", "--by", "connections", *WINDOW,
                     "-o", "csv", "-n", "1")
    assert rc == 0
    [top] = list(csv.DictReader(io.StringIO(out)))
    assert (top["server"], top["connections"], top["backends"]) == (
        "svc:shop/api", "3", "shop/api 2, shop/api-canary 1")
    rc, out, _ = run(capsys, "graph", "--group-by", "service", "--to-service", "shop/api",
                     *WINDOW, "-o", "json")
    assert rc == 0
    assert {e["target"] for e in json.loads(out)["edges"]} == {"svc:shop/api"}


def test_flows_show_the_service_and_filter_by_its_name(api, capsys):
    rc, out, err = run(capsys, "flows", "--to-service", "shop/api", "--sort", "start",
                       "-o", "csv")
    assert rc == 0, err
    rows = sorted(csv.DictReader(io.StringIO(out)), key=lambda r: r["client_port"])
    assert [(r["client_port"], r["server_workload"], r["service"]) for r in rows] == [
        ("40001", "api", "shop/api"), ("40002", "api", "shop/api"),
        ("40003", "api-canary", "shop/api"), ("40005", "api", "shop/api")]
    rc, out, _ = run(capsys, "flows", "--not", "--to-service", "shop/api")
    lines = sorted(out.splitlines()[1:], key=lambda line: "10.244.3.13" in line)
    assert rc == 0 and len(lines) == 2
    assert "via svc:" not in lines[0] and f"via svc:{CACHE_VIP}:6379" in lines[1]
    rc, out, err = run(capsys, "flows", "--to-service", "shop/nope")
    assert (rc, out) == (1, "") or rc == 2
    assert "shop/nope" in err


def test_flows_input_file_resolves_service_names_from_the_workload_map(capsys, tmp_path):
    recs = tmp_path / "records.jsonl"
    recs.write_text("".join(json.dumps(r.to_builtins(), default=str) + "\n" for r in CALLS))
    wmap = tmp_path / "map.yaml"
    wmap.write_text(MAP_YAML)
    rc, out, err = run(capsys, "flows", "--input-file", str(recs), "--workload-map", str(wmap),
                       "--to-service", "shop/api", "-o", "csv")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    # the clients' records know the dialled address (the servers' do not)
    assert sorted(r["client_port"] for r in rows) == ["40001", "40002", "40003", "40005"]
    assert {r["service"] for r in rows} == {"10.96.0.11:80"}
    rc, out, err = run(capsys, "flows", "--input-file", str(recs), "--to-service", "shop/api")
    assert (rc, out) == (2, "") and "--to-service" in err and "--workload-map" in err
    rc, out, err = run(capsys, "flows", "--input-file", str(recs), "--workload-map", str(wmap),
                       "--to-service", "shop/nope")
    assert (rc, out) == (2, "") and "shop/nope" in err
    rc, out, err = run(capsys, "flows", "--input-file", str(recs), "--to-service", "1.2.3.4/99")
    assert (rc, out) == (2, "") and "--to-service" in err
    with pytest.raises(SystemExit) as exc:
        run(capsys, "graph", "--group-by", "pods")
    assert exc.value.code == 2 and "--group-by" in capsys.readouterr().err
