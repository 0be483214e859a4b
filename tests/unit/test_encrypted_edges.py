"""An edge carrying ESP says so (`encrypted`, `wire_sees_inside`); every other edge is the
string it was."""

from __future__ import annotations

import msgspec

from aggregator.encrypted_edges import mark, mark_all

enc = msgspec.json.Encoder()


def edge(**kw) -> str:
    return enc.encode({"source": "node-h1", "target": "node-h2", **kw, "folded": 1}).decode()


def test_an_esp_edge_is_marked_and_stays_json():
    got = msgspec.json.decode(mark(edge(protocols=["esp"], observed_by={"path": 1})))
    assert got["encrypted"] == "esp" and got["wire_sees_inside"] is False
    assert got["protocols"] == ["esp"] and got["folded"] == 1
    both = msgspec.json.decode(mark(edge(protocols=["esp", "tcp"])))
    assert both["encrypted"] == "esp"


def test_other_edges_are_unchanged_even_when_a_name_says_esp():
    for j in (edge(protocols=["tcp", "udp"]), edge(protocols=[]),
              enc.encode({"source": "esp", "target": "shop/esp", "protocols": ["tcp"]}).decode()):
        assert mark(j) is j
    plain = edge(protocols=["tcp"])
    assert mark_all([plain, edge(protocols=["esp"])])[0] is plain
