"""A UDP datagram to a port where nobody listens makes its connection `refused` (issue 17,
section 1; docs/aggregator.md, "Drops"), also for an unconnected client socket, which learns
nothing of the ICMP port unreachable: the server host's drop source saw the datagram dropped as
`NO_SOCKET`, and that drops view gives the connection connect `refused`.

Checked in both correlators (the reference and the C core, `assert_same_state`), in every
order of the client's records and the drop source's, one batch each and across restarts; and
what the rule must not touch: a TCP segment no socket wanted (a closed socket's stragglers), a
UDP datagram dropped for another reason, a connection another view already gave a connect."""

from __future__ import annotations

import itertools

import pytest

from aggregator.connection import refused_by_drop
from aggregator.correlate import Correlator
from aggregator.identity import IdentityResolver
from aggregator.store.derived import DUCKDB_CONN_NAMES, connections_table, row_values
from eastwest.record import Drop
from tests.unit.correlate_workloads import Pair, assert_same_state, conns_of
from tests.unit.test_correlate import MAP, rec


def udp_client(final: bool = True, connect: str | None = None):
    """An unconnected client socket's view: 3 datagrams sent, none answered."""
    return rec("client", protocol="udp", dur=3.0 if final else 1.0, final=final, c2s=99, s2c=0,
               packets_c2s=3 if final else 1, packets_s2c=0, connect=connect)


def udp_drops(final: bool = True, reasons=(("NO_SOCKET", 3),), protocol: str = "udp"):
    """The server host's drop source: the datagrams no socket wanted."""
    return rec("path", collector="h2", source="drops", protocol=protocol, dur=3.0, final=final,
               c2s=0, s2c=0, connect=None, tunnel=None,
               drops=[Drop(r, n if final else 1) for r, n in reasons])


def row(c: Correlator) -> dict:
    [conn] = conns_of(c)
    return connections_table([conn]).to_pylist()[0]


def test_the_rule_is_udp_and_no_socket_only() -> None:
    assert refused_by_drop("udp", "NO_SOCKET")
    assert not refused_by_drop("tcp", "NO_SOCKET")
    assert not refused_by_drop("udp", "NETFILTER_DROP")
    assert not refused_by_drop("udp", None)


RECORDS = {"client": [udp_client(final=False), udp_client()],
           "drops": [udp_drops(final=False), udp_drops()]}
ORDERS = [o for n in (1, 2) for s in itertools.combinations(RECORDS, n)
          for o in itertools.permutations(s) if "drops" in o]


@pytest.mark.parametrize("restart", [False, True], ids=["", "restart"])
@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_an_unanswered_datagram_no_socket_wanted_is_refused_in_every_order(order, restart) -> None:
    """The client's interim and final, the drop source's interim and final, one batch each in
    this order (restarting both correlators after each observer); without a client collector
    the drop source alone still says refused, never `dropped`."""
    with Pair(1, 10.0) as pair:
        for o in order:
            for r in RECORDS[o]:
                pair.batch([r])
            if restart:
                pair.restart()
        assert_same_state(pair.ref, pair.col)
        got = row(pair.ref)
        [conn] = conns_of(pair.ref)
    assert (got["protocol"], got["connect"], got["outcome"]) == ("udp", "refused", "refused")
    assert conn.connect == "refused" and conn.outcome() == "refused"
    assert got["dropped"] == 3 and got["drop_reasons"] == "NO_SOCKET=3"
    if "client" in order:  # the client's counters; the drops add none
        assert (got["bytes_c2s"], got["packets_c2s"], got["packets_s2c"]) == (99, 3, 0)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=str)
def test_refused_whatever_the_order_inside_one_batch(order) -> None:
    recs = [*RECORDS["client"], *RECORDS["drops"]]
    with Pair(1, 10.0) as pair:
        pair.batch([recs[i] for i in order])
        assert_same_state(pair.ref, pair.col)
        assert (row(pair.ref)["connect"], row(pair.ref)["outcome"]) == ("refused", "refused")


@pytest.mark.parametrize(("protocol", "reason", "client_connect", "want"), [
    ("tcp", "NO_SOCKET", "ok", ("ok", "ok")),        # a closed TCP socket's stragglers
    ("udp", "NETFILTER_DROP", None, (None, "ok")),    # dropped by policy, not refused
    ("udp", "NO_SOCKET", "refused", ("refused", "refused")),  # a connected socket knew already
], ids=["tcp-no-socket", "udp-policy", "udp-connected"])
def test_what_the_rule_leaves_alone(protocol, reason, client_connect, want) -> None:
    client = udp_client(connect=client_connect).replace(protocol=protocol) if protocol == "tcp" \
        else udp_client(connect=client_connect)
    if protocol == "tcp":
        client = client.replace(packets_c2s=None, packets_s2c=None)
    with Pair(1, 10.0) as pair:
        pair.batch([client, udp_drops(reasons=[(reason, 3)], protocol=protocol)])
        assert_same_state(pair.ref, pair.col)
        got = row(pair.ref)
    assert (got["connect"], got["outcome"]) == want


def test_the_stored_row_agrees_with_the_getters() -> None:
    """`Connection.summary()` (the hot path) and the per-column getters (the definition)."""
    for recs in ([udp_client(), udp_drops()], [udp_drops()]):
        c = Correlator(IdentityResolver(MAP))
        c.commit(c.plan(recs))
        [conn] = conns_of(c)
        want = connections_table([conn]).to_pylist()[0]
        got = dict(zip(DUCKDB_CONN_NAMES, row_values(conn, conn.summary()), strict=False))
        assert {k: got[k] for k in got if k != "views"} == {k: want[k] for k in got if k != "views"}
        assert got["connect"] == "refused"
