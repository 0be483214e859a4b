"""`eastwest flows --dns-name GLOB --dns-rcode CODE` (the graph's DNS filters, on flows), against
the real aggregator app (DuckDB) at the HTTP boundary and on a file of records: the API's
`dns_name`/`dns_rcode` keep exactly the flows to a resolver whose `dns` matches, page after page
(a cursor skips none and repeats none, however the matches are spread among flows that do not
match); the same flags on `--input-file` keep the same flows; a bad value, or DNS flags with
`--follow`, exit 2 naming the flag; `--print-filter` shows the query they become."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from eastwest import codec
from eastwest.codec import Batch
from eastwest.dns_filter import DnsEdgeFilter
from eastwest.record import DnsLatency, DnsName, DnsSummary, Endpoint, FlowRecord, Tunnel
from tests.unit.test_cli_dns import INGEST, READ, cli_against, run

RESOLVER = "10.244.0.53"
H = {"Authorization": f"Bearer {READ}"}
_ids = itertools.count(1)

# (client port, names asked: (name, rcode or "timeout"))
FLOWS = [
    (41001, [("api.example.com.", "NOERROR")]),
    (41002, [("gone.example.com.", "NXDOMAIN")]),
    (41003, [("db.shop.svc.cluster.local.", "NOERROR"), ("x.example.com.", "SERVFAIL")]),
    (41004, [("flaky.example.org.", "timeout")]),
    (41005, [("API.Example.COM.", "NXDOMAIN")]),
    (41006, [("db.shop.svc.cluster.local.", "NOERROR")]),
    (41007, [("gone.example.com.", "NXDOMAIN"), ("api.example.com.", "NOERROR")]),
    (41008, [("nope.svc.cluster.local.", "NXDOMAIN")]),
]


def summary(asked: list[tuple[str, str]]) -> DnsSummary:
    rcodes: dict[str, int] = {}
    names = []
    for name, code in asked:
        if code != "timeout":
            rcodes[code] = rcodes.get(code, 0) + 1
        names.append(DnsName(name.lower(), "A", 1, {} if code == "timeout" else {code: 1},
                             1 if code == "timeout" else 0))
    timeouts = sum(code == "timeout" for _, code in asked)
    return DnsSummary(queries=len(asked), responses=len(asked) - timeouts, timeouts=timeouts,
                      rcodes=rcodes, latency_us=DnsLatency(100, 200, 300), names=names)


def records(t0: datetime) -> list[FlowRecord]:
    """Each DNS flow as the wire saw it (with its summary) and as the client's probe did, and
    between them TCP flows that carry no DNS."""
    out = []
    for i, (port, asked) in enumerate(FLOWS):
        start = t0 + timedelta(seconds=i)
        for observer in ("client", "path"):
            out.append(FlowRecord(
                record_id=f"h1:{next(_ids)}", collector="h1",
                source="socket" if observer == "client" else "vxlan", start=start,
                end=start + timedelta(seconds=1), final=True, protocol="udp", family=4,
                client=Endpoint("10.244.1.11", port), server=Endpoint(RESOLVER, 53),
                observer=observer, bytes_c2s=40, bytes_s2c=80,
                tunnel=Tunnel("vxlan", 42, "10.213.0.1", "10.213.0.2", 4789)
                if observer == "path" else None,
                dns=summary(asked) if observer == "path" else None))
        out.append(FlowRecord(
            record_id=f"h1:{next(_ids)}", collector="h1", source="socket",
            start=start + timedelta(milliseconds=500), end=start + timedelta(seconds=2),
            final=True, protocol="tcp", family=4, client=Endpoint("10.244.1.11", 50000 + i),
            server=Endpoint("10.244.2.11", 8080), observer="client", bytes_c2s=1, bytes_s2c=1,
            connect="ok"))
    return out


T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
RECORDS = records(T0)


@pytest.fixture()
def api(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from aggregator.app import create_app
    from aggregator.settings import AggregatorSettings

    settings = AggregatorSettings(data_dir=tmp_path / "data", ingest_token=INGEST,
                                  read_token=READ, retention=None)
    with TestClient(create_app(settings)) as app:
        r = app.post("/api/v1/ingest", content=codec.encode_batch(Batch("h1", 1, T0, RECORDS)),
                     headers={"Authorization": f"Bearer {INGEST}",
                              "content-type": codec.CONTENT_TYPE})
        assert r.status_code == 200, r.text
        cli_against(app, monkeypatch)
        yield app


CASES = [
    ([], [], None),  # no DNS flag: every flow (the DNS filter is not applied)
    (["*.example.com"], [], [41001, 41002, 41003, 41005, 41007]),
    (["api.example.com"], [], [41001, 41005, 41007]),  # case-insensitive, trailing dot optional
    ([], ["nxdomain"], [41002, 41005, 41007, 41008]),
    ([], ["timeout"], [41004]),
    ([], ["servfail", "timeout"], [41003, 41004]),
    (["*.example.com"], ["nxdomain"], [41002, 41005, 41007]),  # a matching name got the code
    (["api.example.com"], ["nxdomain"], [41005]),
    (["db.*", "*.example.org"], [], [41003, 41004, 41006]),
    (["nothing.test"], [], []),
]


def expected(names: list[str], rcodes: list[str]) -> list[int]:
    """The client ports the graph's own matcher keeps, from the summaries as written."""
    f = DnsEdgeFilter.build(names, rcodes)
    return sorted(p for p, asked in FLOWS
                  if f.matches(msgspec.to_builtins(summary(asked))))


def ports(flows: list[dict]) -> list[int]:
    return sorted(f["client"]["port"] for f in flows)


@pytest.mark.parametrize(("names", "rcodes", "want"), CASES)
@pytest.mark.parametrize("page", [1, 2, 3, 100])
def test_the_api_keeps_the_matching_flows_page_after_page(api, names, rcodes, want, page):
    params = [("since", "1h"), ("limit", str(page)), *(("dns_name", n) for n in names),
              *(("dns_rcode", c) for c in rcodes)]
    got: list[dict] = []
    cursor = None
    for _ in range(50):
        doc = api.get("/api/v1/flows", params=params + ([("cursor", cursor)] if cursor else []),
                      headers=H).json()
        assert len(doc["flows"]) <= page
        got += doc["flows"]
        cursor = doc["next_cursor"]
        if not cursor:
            break
    ids = [f["id"] for f in got]
    assert len(ids) == len(set(ids)), "a flow on two pages"
    assert doc["filter"] == str(DnsEdgeFilter.build(names, rcodes))  # the answer says its filter
    if want is None:
        assert len(got) == 2 * len(FLOWS)  # the DNS flows (client + path: one each) and TCP
        return
    assert ports(got) == want == expected(names, rcodes)
    assert all(f["dns"] is not None and f["server"]["port"] == 53 for f in got)
    starts = [f["start"] for f in got]
    assert starts == sorted(starts, reverse=True)  # the API's order (-start) kept


@pytest.mark.parametrize(("names", "rcodes", "want"), [c for c in CASES if c[2] is not None])
def test_the_cli_flags_keep_the_same_flows_from_the_api_and_from_a_file(
        api, capsys, tmp_path, names, rcodes, want):
    flags = [*(a for n in names for a in ("--dns-name", n)),
             *(a for c in rcodes for a in ("--dns-rcode", c))]
    rc, out, err = run(capsys, "flows", "--since", "1h", *flags, "-o", "jsonl")
    assert rc == 0, err
    assert ports([json.loads(x) for x in out.splitlines()]) == want
    # a collector's records in a file: the path records carry the summaries
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"".join(codec.to_json(r) + b"\n" for r in RECORDS))
    rc, out, err = run(capsys, "flows", "--input-file", str(path), *flags, "-o", "jsonl")
    assert rc == 0, err
    assert ports([json.loads(x) for x in out.splitlines()]) == want
    # and the API's flows saved by `eastwest flows -o jsonl`, read back
    saved = tmp_path / "flows.jsonl"
    rc, out, _ = run(capsys, "flows", "--since", "1h", "--limit", "0", "-o", "jsonl")
    saved.write_text(out)
    rc, out, err = run(capsys, "flows", "--input-file", str(saved), *flags, "-o", "jsonl")
    assert rc == 0, err
    assert ports([json.loads(x) for x in out.splitlines()]) == want


def test_the_cli_limit_counts_matching_flows(api, capsys):
    rc, out, _ = run(capsys, "flows", "--since", "1h", "--dns-rcode", "nxdomain", "--limit", "3",
                     "-o", "jsonl")
    assert rc == 0 and len(out.splitlines()) == 3


@pytest.mark.parametrize(("argv", "flag"), [
    (["--dns-rcode", "nxdomian"], "--dns-rcode"),
    (["--dns-name", ""], "--dns-name"),
    (["--follow", "--dns-name", "*.example.com"], "--dns-name"),
    (["--follow", "--dns-rcode", "servfail"], "--dns-rcode"),
])
def test_a_bad_dns_flag_exits_2_naming_it(api, capsys, argv, flag):
    rc, out, err = run(capsys, "flows", *argv)
    assert (rc, out) == (2, "")
    assert flag in err


def test_the_api_names_a_bad_dns_parameter(api):
    r = api.get("/api/v1/flows", params={"dns_rcode": "nxdomian"}, headers=H)
    assert r.status_code == 400 and "dns_rcode" in r.text
    r = api.get("/api/v1/flows/stream", params={"dns_name": "x"}, headers=H)
    assert r.status_code == 400 and "dns_name" in r.text  # the stream carries no DNS


def test_print_filter_shows_the_dns_parameters(capsys):
    rc, out, _ = run(capsys, "flows", "--to-port", "53", "--dns-name", "*.example.com",
                     "--dns-rcode", "nxdomain", "--dns-rcode", "timeout", "--print-filter")
    assert rc == 0
    assert "dns:    dns_name=*.example.com AND dns_rcode=nxdomain OR dns_rcode=timeout" in out
    assert "to_port=53&dns_name=*.example.com&dns_rcode=nxdomain&dns_rcode=timeout" in out
    rc, out, _ = run(capsys, "flows", "--dns-rcode", "nxdomain", "--print-filter", "-o", "json")
    doc = json.loads(out)
    assert ["dns_rcode", "nxdomain"] in doc["query"]
