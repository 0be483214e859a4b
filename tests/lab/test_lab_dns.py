"""The lab's resolver is a real DNS server and the demo resolves through it: every query is in
the truth with its name, type, rcode and answers, and the truth agrees with the zone, with the
resolver's own ledger and with the connections api made afterwards."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from eastwest.lab import dns as labdns

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "dual"])
def test_demo_resolves_service_names_and_the_truth_records_every_query(lab_factory, tmp_path,
                                                                       family):
    lab = lab_factory(name=f"ewnd1{family[-1]}", hosts=2, pods_per_host=4, ip_family=family)
    truth = lab.traffic(duration=5.0, truth_path=tmp_path / "t.jsonl", seed=11, rate=25)
    zone = labdns.zone_of(lab.inventory)
    queries = [t for t in truth if t["server_port"] == 53]
    assert queries and all(t["protocol"] == "udp" and "dns" in t for t in queries)
    assert not any("dns" in t for t in truth if t["server_port"] != 53)
    # only api resolves: the call graph keeps its edges
    assert {t["client_pod"].rsplit("-", 1)[0] for t in queries} == {"api"}
    names = Counter(t["dns"]["name"] for t in queries)
    for t in queries:
        d = t["dns"]
        assert t["outcome"] == "ok", t  # the slow answer comes well within the client's timeout
        assert d["type"] == ("AAAA" if t["family"] == 6 else "A")
        if d["name"].endswith(labdns.MISSING_SUFFIX):
            assert (d["rcode"], d["answers"], d["cnames"]) == ("NXDOMAIN", [], []), t
            continue
        assert d["rcode"] == "NOERROR", t
        target = labdns.CNAME_TARGET if d["name"] == labdns.CNAME_NAME else d["name"]
        assert d["cnames"] == ([labdns.CNAME_TARGET] if d["name"] == labdns.CNAME_NAME else [])
        assert sorted(d["answers"]) == sorted(zone[target][t["family"]]), t
        assert d["ttl"] == labdns.TTL
        # the bytes on the wire are those of a DNS message of that name (header + question)
        assert t["bytes_c2s"] == 12 + len(d["name"]) + 1 + 4
    if family == "dual":  # both families resolved, each with its own type
        assert {t["dns"]["type"] for t in queries} == {"A", "AAAA"}
    # the services api calls were resolved, and the names asked on purpose were asked
    for svc in ("db", "cache", "auth"):
        assert names[labdns.service_name(svc, "shop")] >= 1, names
    assert all(names[n] >= 1 for n in labdns.PURPOSE_NAMES), names  # ~40 draws of 4 names
    # the answer was held back for the slow name, and only for it
    from datetime import datetime

    def took(t):
        return (datetime.fromisoformat(t["end"]) - datetime.fromisoformat(t["start"])).total_seconds()
    slow = [took(t) for t in queries if t["dns"]["name"] == labdns.SLOW_NAME]
    assert slow and all(s >= labdns.SLOW_ANSWER_S for s in slow)
    assert sorted(took(t) for t in queries)[len(queries) // 2] < labdns.SLOW_ANSWER_S
    # every TCP connection api made to a service went to an address its name resolved to
    resolved = {ipaddress.ip_address(a) for t in queries for a in t["dns"]["answers"]}
    api_calls = [t for t in truth if t["client_pod"].startswith("api-") and t["protocol"] == "tcp"]
    assert api_calls and all(ipaddress.ip_address(t["server_ip"]) in resolved for t in api_calls)
    # the resolver's ledger holds one answer per query, byte for byte
    ledger = Counter((x["client_ip"], x["client_port"], x["bytes_in"], x["bytes_out"])
                     for x in lab.ledger() if x["server_port"] == 53)
    assert ledger == Counter((t["client_ip"], t["client_port"], t["bytes_c2s"], t["bytes_s2c"])
                             for t in queries)
