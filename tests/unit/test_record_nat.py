"""`nat: [{type, original, translated, netns}]` in the flow record (issue 16): optional, a chain
in the order applied, validated field by field, and `dialled` gives what the client dialled."""

from __future__ import annotations

import pytest

from eastwest import codec
from eastwest.errors import RecordError
from eastwest.record import Endpoint, FlowRecord, Nat

BASE = {"record_id": "h1:1", "collector": "h1", "source": "socket", "start": "2026-12-07T08:00:00Z",
        "end": "2026-12-07T08:00:03Z", "final": True, "protocol": "tcp", "family": 4,
        "client": {"ip": "10.244.1.11", "port": 40000}, "server": {"ip": "10.244.3.11", "port": 8080},
        "observer": "client"}
DNAT = {"type": "dnat", "original": {"ip": "10.96.0.10", "port": 80},
        "translated": {"ip": "10.244.3.11", "port": 8080}, "netns": 4026532001}


def test_nat_decodes_and_encodes_as_the_contract_says() -> None:
    r = FlowRecord.from_builtins({**BASE, "nat": [DNAT]})
    assert r.nat == [Nat("dnat", Endpoint("10.96.0.10", 80), Endpoint("10.244.3.11", 8080),
                         4026532001)]
    assert r.dialled == Endpoint("10.96.0.10", 80)
    assert codec.from_json(codec.to_json(r)) == r
    plain = FlowRecord.from_builtins(BASE)  # optional: a v1 record without it reads as before
    assert plain.nat is None and plain.dialled is None
    assert b'"nat":null' in codec.to_json(plain)


def test_a_chain_keeps_its_order_and_dialled_is_the_first_server_translation() -> None:
    chain = [{"type": "snat", "original": {"ip": "10.244.1.11", "port": 40000},
              "translated": {"ip": "10.244.2.1", "port": 61000}},
             {"type": "redirect", "original": {"ip": "10.96.0.10", "port": 80},
              "translated": {"ip": "127.0.0.1", "port": 15001}},
             DNAT]
    r = FlowRecord.from_builtins({**BASE, "nat": chain})
    assert [n.type for n in r.nat or []] == ["snat", "redirect", "dnat"]
    assert r.dialled == Endpoint("10.96.0.10", 80)  # the first non-snat entry's original
    assert codec.from_json(codec.to_json(r)).nat == r.nat


@pytest.mark.parametrize(("nat", "field"), [
    ([{**DNAT, "type": "masquerade"}], "nat.0.type"),
    ([{**DNAT, "original": {"ip": "10.96.0.010", "port": 80}}], "nat.original.ip"),
    ([{**DNAT, "translated": {"ip": "fd00::1", "port": 80}}], "nat.translated.ip"),
    ([{**DNAT, "translated": {"ip": "10.244.3.11", "port": 70000}}], "nat.0.translated.port"),
    ([{**DNAT, "where": "h1"}], "nat.0.where"),
    ([{"type": "dnat", "original": {"ip": "10.96.0.10", "port": 80}}], "nat.0"),
])
def test_a_bad_translation_is_an_error_naming_the_field(nat, field) -> None:
    with pytest.raises(RecordError) as exc:
        FlowRecord.from_builtins({**BASE, "nat": nat})
    assert exc.value.field == field, exc.value
