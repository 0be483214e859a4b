"""`drops: [{reason, packets}]` in the flow record (issue 21): optional, validated, named."""

from __future__ import annotations

import pytest

from eastwest import codec
from eastwest.errors import RecordError
from eastwest.record import Drop, FlowRecord

BASE = {"record_id": "h1:1", "collector": "h1", "source": "drops", "start": "2026-12-07T08:00:00Z",
        "end": "2026-12-07T08:00:03Z", "final": True, "protocol": "tcp", "family": 4,
        "client": {"ip": "10.244.1.11", "port": 40000}, "server": {"ip": "10.244.3.11", "port": 5432},
        "observer": "path"}


def test_drops_decode_and_encode_as_the_contract_says() -> None:
    r = FlowRecord.from_builtins({**BASE, "drops": [{"reason": "NETFILTER_DROP", "packets": 3}]})
    assert r.drops == [Drop("NETFILTER_DROP", 3)]
    assert codec.from_json(codec.to_json(r)) == r
    # optional: records of other sources have none
    assert FlowRecord.from_builtins({**BASE, "source": "wire"}).drops is None


@pytest.mark.parametrize(("changes", "problem"), [
    ({}, "needs at least one reason"),
    ({"drops": []}, "needs at least one reason"),
    ({"drops": [{"reason": "NO_SOCKET", "packets": 1}, {"reason": "NO_SOCKET", "packets": 2}]},
     "names a reason twice"),
    ({"source": "socket", "drops": [{"reason": "NO_SOCKET", "packets": 1}]},
     "only records of source 'drops' carry drops"),
])
def test_drops_belong_to_drop_records_once_per_reason(changes, problem) -> None:
    """The aggregator keeps one view per drop source and reason (docs/aggregator.md, "Drops"):
    a drops record without reasons would be a connection without packets."""
    with pytest.raises(RecordError) as exc:
        FlowRecord.from_builtins({**BASE, **changes})
    assert exc.value.field == "drops" and problem in str(exc.value), exc.value


@pytest.mark.parametrize(("drops", "field"), [
    ([{"reason": "netfilter_drop", "packets": 1}], "drops.reason"),
    ([{"reason": "", "packets": 1}], "drops.reason"),
    ([{"reason": "NO_SOCKET", "packets": -1}], "drops.0.packets"),
    ([{"reason": "NO_SOCKET"}], "drops.0"),  # msgspec names the object missing `packets`
    ([{"reason": "NO_SOCKET", "packets": 1, "bytes": 2}], "drops.0.bytes"),
])
def test_a_bad_drop_is_an_error_naming_the_field(drops, field) -> None:
    with pytest.raises(RecordError) as exc:
        FlowRecord.from_builtins({**BASE, "drops": drops})
    assert exc.value.field == field, exc.value
