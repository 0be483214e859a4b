"""Drops join their connection (issue 21, part 4; docs/aggregator.md, "Drops").

A drop source's records (source `drops`) join the connection of their 5-tuple by the join rule
of every observer, or open a connection of their own (a SYN dropped before any socket saw it);
the connection then shows its dropped packets by reason, its outcome `dropped` when it never
got through. Whatever the order of arrival (drops before, between or after the other observers'
records, in one batch or many, across a restart), the reference correlator and the column
correlator (C core) hold the same connections, and the result is the same."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest

from aggregator.correlate import Correlator
from aggregator.identity import IdentityResolver
from aggregator.store.derived import Derived, connections_table
from eastwest.record import Drop
from tests.unit.correlate_workloads import Pair, assert_same_state, conns_of
from tests.unit.test_correlate import MAP, T0, rec


def drops(collector: str = "h1", *, final: bool = True, dur: float = 3.0, start=T0,
          reasons=(("NETFILTER_DROP", 3),), cport: int = 40000, **over):
    return rec("path", collector=collector, source="drops", start=start, dur=dur, final=final,
               c2s=0, s2c=0, connect=None, tunnel=None, cport=cport,
               drops=[Drop(r, n) for r, n in reasons], **over)


def blocked_client(final: bool = True):
    """The client's socket view of a connect that timed out (nothing else saw it)."""
    return rec("client", dur=3.0, final=final, c2s=0, s2c=0, connect="timeout")


def row(c: Correlator) -> dict:
    [conn] = conns_of(c)
    return connections_table([conn]).to_pylist()[0]


OBSERVERS = ("client", "server", "drops")
ORDERS = [o for n in (1, 2, 3) for s in itertools.combinations(OBSERVERS, n)
          for o in itertools.permutations(s) if "drops" in o]


def records_of(o: str) -> list:
    if o == "drops":  # an interim with one reason, the final with two
        return [drops(final=False, dur=1.0, reasons=[("NETFILTER_DROP", 2)]),
                drops(reasons=[("NETFILTER_DROP", 3), ("NO_SOCKET", 1)])]
    return [rec(o, final=False, dur=1.0, c2s=400, s2c=100), rec(o, dur=20)]


@pytest.mark.parametrize("restart", [False, True], ids=["", "restart"])
@pytest.mark.parametrize("order", ORDERS, ids=">".join)
def test_drops_join_the_connection_in_every_order_in_both_correlators(order, restart) -> None:
    """Each observer's interim then final record, one batch each, in this order (a restart of
    both correlators from their connections after each observer): one connection, its drops
    by reason, its counters those of the socket views alone."""
    with Pair(1, 10.0) as pair:
        for o in order:
            for r in records_of(o):
                pair.batch([r])
            if restart:
                pair.restart()
        assert_same_state(pair.ref, pair.col)
        got = row(pair.ref)
    assert got["dropped"] == 4 and got["drop_reasons"] == "NETFILTER_DROP=3,NO_SOCKET=1"
    sockets = [o for o in order if o != "drops"]
    assert got["observed_by"] == "," + ",".join(sorted([*sockets, "drops"])) + ","
    if sockets:  # the drops change no counter, no outcome of an established connection
        assert (got["bytes_c2s"], got["bytes_s2c"], got["outcome"]) == (1000, 5000, "ok")
        assert got["closed"] and got["closed_ts"] == T0 + timedelta(seconds=20)
    else:  # only the drop source saw it: a flow of its own, dropped, closed by its final
        assert (got["bytes_c2s"], got["outcome"], got["connect"]) == (0, "dropped", None)
        assert got["closed"] and got["closed_ts"] == T0 + timedelta(seconds=3)


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))), ids=str)
def test_a_blocked_connect_is_dropped_whatever_the_order_of_its_records(order) -> None:
    """A SYN dropped by policy: the client's socket says timeout, the drop source says
    NETFILTER_DROP; the four records in one batch in any order, or one batch each."""
    recs = [blocked_client(final=False), blocked_client(),
            drops(final=False, dur=1.0, reasons=[("NETFILTER_DROP", 2)]), drops()]
    recs[0] = recs[0].replace(end=T0 + timedelta(seconds=1))
    batch = [recs[i] for i in order]
    for batches in ([batch], [[r] for r in batch]):
        with Pair(1, 10.0) as pair:
            for b in batches:
                pair.batch(b)
            assert_same_state(pair.ref, pair.col)
            got = row(pair.ref)
        assert (got["outcome"], got["connect"], got["dropped"]) == ("dropped", "timeout", 3)
        assert got["drop_reasons"] == "NETFILTER_DROP=3"
        assert got["client_wid"] == "shop/frontend" and got["server_wid"] == "shop/api"


def test_a_final_drop_record_does_not_close_a_live_connection() -> None:
    """A drop source's final means "no drop for a while": a connection its sockets still see
    stays open (and is kept in the index as an open one)."""
    with Pair(1, 10.0) as pair:
        pair.batch([rec("client", final=False, dur=30.0), drops(dur=1.0)])
        assert_same_state(pair.ref, pair.col)
        got = row(pair.ref)
    assert not got["closed"] and got["outcome"] == "ok" and got["dropped"] == 3


def test_drops_of_another_time_are_another_connection_and_sources_add_up() -> None:
    """The join rule holds for drops: a drops flow a minute after the connection is a reused
    port (its own connection); two drop sources of one connection add up."""
    with Pair(1, 10.0) as pair:
        pair.batch([rec("client", dur=2.0), drops("h1", start=T0 + timedelta(seconds=60)),
                    drops("h2", start=T0 + timedelta(seconds=60), reasons=[("NETFILTER_DROP", 1),
                                                                         ("TCP_CSUM", 2)])])
        assert_same_state(pair.ref, pair.col)
        rows = sorted(connections_table(conns_of(pair.ref)).to_pylist(),
                      key=lambda r: r["start_ts"])
    assert [r["dropped"] for r in rows] == [None, 6]
    assert rows[1]["drop_reasons"] == "NETFILTER_DROP=4,TCP_CSUM=2"
    assert rows[1]["outcome"] == "dropped" and rows[0]["outcome"] == "ok"


def test_a_late_interim_drop_record_changes_nothing() -> None:
    with Pair(1, 10.0) as pair:
        late = drops(final=False, dur=1.0, reasons=[("NETFILTER_DROP", 1)])
        pair.batch([drops(reasons=[("NETFILTER_DROP", 5)])])
        pair.batch([late])
        assert_same_state(pair.ref, pair.col)
        assert row(pair.ref)["dropped"] == 5


def test_the_stored_row_agrees_with_the_getters() -> None:
    """`Connection.summary()` (the hot path) and the per-column getters (the definition)."""
    c = Correlator(IdentityResolver(MAP))
    c.commit(c.plan([blocked_client(), drops(reasons=[("NETFILTER_DROP", 3), ("NO_SOCKET", 1)])]))
    rows = Derived(c.plan([])).connection_rows()
    assert rows is None
    want = connections_table(conns_of(c)).to_pylist()[0]
    [conn] = conns_of(c)
    from aggregator.store.derived import DUCKDB_CONN_NAMES, row_values
    got = dict(zip(DUCKDB_CONN_NAMES, row_values(conn, conn.summary()), strict=False))
    assert {k: got[k] for k in got if k != "views"} == {k: want[k] for k in got if k != "views"}


def test_otlp_calls_a_blocked_connect_dropped_an_error_with_no_server_span() -> None:
    """The OTLP spans name the outcome as the store does: `dropped`, an error; no SERVER span is
    made up for a server that never answered."""
    from aggregator.exporters.otlp_spans import FAILED, attributes, server_view

    c = Correlator(IdentityResolver(MAP))
    c.commit(c.plan([drops(cport=40001)]))
    c.commit(c.plan([blocked_client(), drops()]))
    by_port = {conn.client_port: conn for conn in conns_of(c)}
    for conn in by_port.values():
        assert attributes(conn)["eastwest.connection.outcome"] == "dropped" in FAILED
        assert server_view(conn) is None
    assert by_port[40001].outcome() == "dropped" and by_port[40001].dropped_only
