"""The collector's DNS capture against the lab's truth: the demo resolves through the lab's DNS
server; every query of the truth is found, once, on the flow of its 5-tuple, with its name,
type, rcode, answers and CNAMEs, and the bytes the client wrote and read."""

from __future__ import annotations

import threading
import time

import pytest

from collector.dns import DnsSource
from collector.pipeline import CollectorContext

pytestmark = pytest.mark.lab


def run_source(source: DnsSource, records: list, stop: threading.Event,
               errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            source.run(records.extend, stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_every_dns_query_of_the_truth_found_with_name_type_rcode_answers(lab_factory, tmp_path,
                                                                        family):
    lab = lab_factory(name=f"ewnd2{family[-1]}", hosts=3, pods_per_host=2, ip_family=family)
    # every namespace of every host: the host namespaces only bridge their pods' DNS and must
    # add nothing; a query is reported once, by its client's namespace
    specs = [ns for h in lab.inventory["hosts"] for ns in lab.host_netns(h["name"])]
    ctx = CollectorContext(collector_id="dnstest")
    source = DnsSource(ctx, specs, interval=0.5, idle_timeout=1.0, query_timeout=2.0)
    records: list = []
    errors: list[BaseException] = []
    stop = threading.Event()
    thread = run_source(source, records, stop, errors)
    try:
        truth = lab.traffic(duration=4.0, truth_path=tmp_path / "t.jsonl", seed=5, rate=25)
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    queries = [t for t in truth if "dns" in t]
    assert len(queries) >= 10, "too few DNS queries to prove anything"
    finals = [r for r in records if r.final]
    by_key = {}
    for r in finals:
        assert r.key not in by_key, f"a DNS flow reported twice: {r.key}"
        by_key[r.key] = r
    assert len(finals) == len(queries)  # nothing but the truth's exchanges
    for t in queries:
        r = by_key[("udp", t["client_ip"], t["client_port"], t["server_ip"], t["server_port"])]
        d, want = r.dns, t["dns"]
        assert (r.bytes_c2s, r.bytes_s2c, r.packets_c2s, r.packets_s2c) == (
            t["bytes_c2s"], t["bytes_s2c"], 1, 1), t
        assert (d.queries, d.responses, d.timeouts) == (1, 1, 0)
        assert [(n.name, n.type, n.count, n.rcodes) for n in d.names] == [
            (want["name"], want["type"], 1, {want["rcode"]: 1})]
        assert d.rcodes == {want["rcode"]: 1}
        got = {(a.type, a.value) for a in d.answers}
        assert got == ({(want["type"], a) for a in want["answers"]}
                       | {("CNAME", c) for c in want["cnames"]})
        assert all(a.name == want["name"] and a.ttl == want["ttl"] for a in d.answers)
        assert d.latency_us is not None and d.latency_us.min == d.latency_us.max
    # the late answer's latency is measured as late, the others are quick
    assert {r.family for r in finals} == {6 if family == "ipv6" else 4}
    slow = [by_key[("udp", t["client_ip"], t["client_port"], t["server_ip"], 53)]
            for t in queries if t["dns"]["name"] == "slow.platform.svc.cluster.local."]
    assert slow and all(r.dns.latency_us.min >= 250_000 for r in slow)
    assert {t["dns"]["rcode"] for t in queries} == {"NOERROR", "NXDOMAIN"}
    assert ctx.drops.snapshot() == {}


def test_dns_records_reach_the_aggregator_store_through_the_http_batch(lab_factory, tmp_path):
    """Collector DNS source -> the real export (binary batches over HTTP) -> the aggregator under
    uvicorn: every DNS flow of the truth stored with its dns summary, as the collector sent it."""
    from collector.export import AggregatorSink, ExportSettings
    from collector.pipeline import run_pipeline
    from tests.lab.harness import INGEST, Aggregator

    lab = lab_factory(name="ewnd5", hosts=2, pods_per_host=4)
    specs = [p["netns"] for p in lab.inventory["pods"]]
    ctx = CollectorContext(collector_id="dnse2e")
    source = DnsSource(ctx, specs, interval=0.5, idle_timeout=1.0, query_timeout=2.0)
    with Aggregator(tmp_path / "data", lab.inventory["workload_map"]) as agg:
        sink = AggregatorSink(ctx, settings=ExportSettings(
            url=agg.url, token=INGEST, spool_dir=tmp_path / "spool", batch_age=0.2))
        sent: list = []

        class Keep:
            def write(self, records: list) -> None:
                sent.extend(records)
                sink.write(records)

            def close(self) -> None:
                sink.close()

        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                run_pipeline([source], Keep(), stop=stop, handle_signals=False)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        truth = lab.traffic(duration=3.0, truth_path=tmp_path / "t.jsonl", seed=4, rate=25)
        time.sleep(1.5)
        stop.set()
        thread.join(60)
        assert not errors, errors
        store = agg.app.state.pipeline.read()
        stored = {r.record_id: r for r in store.records() if r.collector == "dnse2e"}
    queries = [t for t in truth if "dns" in t]
    assert queries and len(sent) >= len(queries)
    assert stored == {r.record_id: r for r in sent}  # every record, dns summary and all
    finals = {r.key: r for r in stored.values() if r.final}
    for t in queries:
        r = finals[("udp", t["client_ip"], t["client_port"], t["server_ip"], 53)]
        assert r.dns is not None and r.dns.names[0].name == t["dns"]["name"]
