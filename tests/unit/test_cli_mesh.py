"""`eastwest flows` and `eastwest graph` on folded service-mesh calls (issue 20), against the real
aggregator app (DuckDB): a flow's table row is marked `[mesh ew-sidecar]`, its csv has the
`mesh` column and its JSON the API's `mesh`; the graph's MESH column counts an edge's meshed
calls, and `--show-proxies` draws the sidecars (`~ew-sidecar` nodes, each hop an edge)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from eastwest import codec
from eastwest.codec import Batch
from tests.unit.mesh_records import meshed
from tests.unit.test_api_query import MAP_YAML
from tests.unit.test_cli_dns import INGEST, READ, cli_against, run
from tests.unit.test_correlate import rec

FP, AP = "shop/frontend~ew-sidecar", "shop/api~ew-sidecar"


@pytest.fixture()
def api(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from aggregator.app import create_app
    from aggregator.settings import AggregatorSettings

    (tmp_path / "map.yaml").write_text(MAP_YAML)
    settings = AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST,
                                  read_token=READ, retention=None,
                                  workload_map=tmp_path / "map.yaml")
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    batches = [(coll, [meshed(o, 2, start=t0, cport=43000, collector=coll)])
               for o, coll in (("client", "h1"), ("server", "h2"), ("path", "h3"))]
    batches += [("h1", [rec("client", start=t0, cport=44000, c2s=7, s2c=9)])]
    with TestClient(create_app(settings)) as app:
        for seq, (coll, recs) in enumerate(batches, 1):
            r = app.post("/api/v1/ingest", content=codec.encode_batch(Batch(coll, seq, t0, recs)),
                         headers={"Authorization": f"Bearer {INGEST}",
                                  "content-type": codec.CONTENT_TYPE})
            assert r.status_code == 200, r.text
        cli_against(app, monkeypatch)
        yield app


def test_flows_mark_a_meshed_call_in_every_format(api, capsys) -> None:
    rc, out, err = run(capsys, "flows", "--since", "1h", "--color", "never")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    meshed_rows = [ln for ln in lines if "[mesh ew-sidecar]" in ln]
    assert len(meshed_rows) == 1 and ":43000" in meshed_rows[0]
    assert len(lines) == 3  # the header, the meshed call, the plain one
    _, out, _ = run(capsys, "flows", "--since", "1h", "-o", "csv")
    by = {r["client_port"]: r for r in csv.DictReader(io.StringIO(out))}
    assert (by["43000"]["mesh"], by["44000"]["mesh"]) == ("ew-sidecar", "")
    _, out, _ = run(capsys, "flows", "--since", "1h", "-o", "json")
    flows = {f["client"]["port"]: f for f in json.loads(out)}
    assert flows[43000]["mesh"]["proxy"] == "ew-sidecar"
    assert len(flows[43000]["mesh"]["hops"]) == 4 and flows[44000]["mesh"] is None


def test_graph_counts_meshed_calls_and_show_proxies_draws_the_sidecars(api, capsys) -> None:
    rc, out, err = run(capsys, "graph", "--color", "never")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].rstrip().endswith("MESH")
    [row] = lines[1:]
    assert row.split()[:3] == ["shop/frontend", "shop/api", "2"]
    assert row.rstrip().endswith("ew-sidecar 1")
    rc, out, err = run(capsys, "graph", "--show-proxies", "-o", "csv")
    assert (rc, err) == (0, "")
    by = {(r["client"], r["server"]): r for r in csv.DictReader(io.StringIO(out))}
    assert set(by) == {("shop/frontend", FP), (FP, AP), (AP, "shop/api"),
                       ("shop/frontend", "shop/api")}
    assert [by[k]["mesh_hop"] for k in (("shop/frontend", FP), (FP, AP), (AP, "shop/api"))] == [
        "app-proxy", "proxy-proxy", "proxy-app"]
    assert (by[(FP, AP)]["bytes_c2s"], by[(FP, AP)]["mesh_connections"]) == ("2040", "1")
    assert by[("shop/frontend", "shop/api")]["mesh_proxy"] == ""  # the plain call stays
    _, out, _ = run(capsys, "graph", "--show-proxies", "-o", "json")
    kinds = {n["id"]: n["kind"] for n in json.loads(out)["nodes"]}
    assert kinds[FP] == kinds[AP] == "proxy"
    _, out, _ = run(capsys, "graph", "--show-proxies", "-o", "dot")
    assert f'"{FP}" -> "{AP}"' in out
