"""The filter language, table-driven: flags in, filter out, which records match; and the SQL
compilation agrees with the in-memory predicate on every case (checked in DuckDB)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from aggregator.store.sql import DuckParams, compile_filter
from eastwest.errors import ConfigError
from eastwest.filters import Filter, ip_hex, outcome_of, parse_time, view_of_record
from eastwest.record import Endpoint, FlowRecord, Nat, Tunnel, Workload

T0 = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)


def rec(n, cip, cport, sip, sport, proto="tcp", connect="ok", resets=0, observer="client",
        cw=None, sw=None, ns="shop", vni=None, nat=None):
    fam = 6 if ":" in cip else 4
    return FlowRecord(
        record_id=f"c:{n}", collector="c", source="socket", start=T0, end=T0, final=True,
        protocol=proto, family=fam, client=Endpoint(cip, cport), server=Endpoint(sip, sport),
        observer=observer, connect=connect, resets=resets,
        client_workload=Workload(cw, ns) if cw else None, server_workload=Workload(sw, ns) if sw else None,
        tunnel=Tunnel("vxlan", vni, "10.213.0.1", "10.213.0.2", 4789) if vni is not None else None,
        nat=nat,
    )


def dnat(vip: str, port: int, sip: str, sport: int) -> list[Nat]:
    return [Nat("dnat", Endpoint(vip, port), Endpoint(sip, sport))]


RECORDS = [
    rec(1, "10.244.1.11", 40000, "10.244.2.11", 9090, cw="frontend", sw="api",
        nat=dnat("10.96.0.11", 9090, "10.244.2.11", 9090)),
    rec(2, "10.244.2.11", 40001, "10.244.3.11", 5432, cw="api", sw="db", vni=42, observer="path"),
    rec(3, "10.244.2.11", 40002, "10.244.3.11", 5433, connect="refused", cw="api", sw="db"),
    rec(4, "10.244.2.11", 40003, "10.244.2.12", 7000, resets=1, cw="api", sw="auth", observer="server"),
    rec(5, "10.244.2.11", 40004, "10.244.3.12", 53, proto="udp", connect=None, cw="api", sw="resolver", ns="platform",
        nat=dnat("10.96.0.15", 53, "10.244.3.12", 53)),
    rec(6, "fd00::1", 50000, "fd00::2", 443, cw="web", sw="edge", ns="ext"),
    # link-local and multicast chatter: hidden unless the filter asks for it
    rec(7, "fe80::a8c1:abff:fe00:1", 5353, "ff02::fb", 5353, proto="udp", connect=None,
        observer="path"),
    rec(8, "0.0.0.0", 68, "255.255.255.255", 67, proto="udp", connect=None, observer="path"),
    rec(9, "10.244.1.12", 5353, "224.0.0.251", 5353, proto="udp", connect=None, observer="path"),
    rec(10, "fe80::1", 40000, "fe80::2", 22),
]

CASES = [  # (flags as (dim, value, negated), ids of matching records)
    ([], [1, 2, 3, 4, 5, 6]),
    ([("to_workload", "db", False)], [2, 3]),
    ([("to_workload", "db", False), ("to_workload", "auth", False)], [2, 3, 4]),  # same flag: OR
    ([("from_workload", "api", False), ("port", "5432", False)], [2]),  # different flags: AND
    ([("workload", "api", False)], [1, 2, 3, 4, 5]),
    ([("to_workload", "db", True)], [1, 4, 5, 6]),
    ([("from_workload", "api", False), ("protocol", "udp", True)], [2, 3, 4]),
    ([("ip", "10.244.3.0/24", False)], [2, 3, 5]),
    ([("from_ip", "10.244.1.11", False)], [1]),
    ([("to_ip", "fd00::/64", False)], [6]),
    ([("ip", "10.0.0.0/8", True)], [6]),
    ([("port", "53", False), ("port", "443", False)], [5, 6]),
    ([("to_port", "40000", False)], []),
    ([("port", "40000", False)], [1]),
    ([("outcome", "refused", False)], [3]),
    ([("outcome", "reset", False)], [4]),
    ([("outcome", "ok", True)], [3, 4]),
    ([("observer", "path", False)], [2]),
    ([("observer", "client", True)], [2, 4]),
    ([("vni", "42", False)], [2]),
    ([("vni", "42", True)], [1, 3, 4, 5, 6]),
    ([("namespace", "platform", False)], [5]),
    ([("protocol", "TCP", False)], [1, 2, 3, 4, 6]),
    ([("to_service", "10.96.0.11", False)], [1]),
    ([("to_service", "10.96.0.0/16", False)], [1, 5]),  # every ClusterIP call
    ([("to_service", "10.96.0.0/16", True)], [2, 3, 4, 6]),  # calls not made to a Service
]


@pytest.mark.parametrize(("flags", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_filter_matches_records(flags, expected):
    f = Filter.build(flags)
    assert [int(r.record_id.split(":")[1]) for r in RECORDS if f.matches_record(r)] == expected


def duck_sql(flt: Filter, columns: dict[str, str]) -> tuple[str, list]:
    """The filter as the DuckDB store compiles it (aggregator/store/sql.py)."""
    p = DuckParams()
    return compile_filter(flt, columns, p), p.values


@pytest.fixture(scope="module")
def db():
    con = duckdb.connect()
    con.execute("""CREATE TABLE flows (id INT, client_ipx TEXT, server_ipx TEXT, client_port INT,
        server_port INT, protocol TEXT, outcome TEXT, observers TEXT, vni INT, cw TEXT, sw TEXT,
        cns TEXT, sns TEXT, svcx TEXT)""")
    for r in RECORDS:
        v = view_of_record(r)
        con.execute("INSERT INTO flows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
            int(r.record_id.split(":")[1]), ip_hex(v["client_ip"]), ip_hex(v["server_ip"]),
            v["client_port"], v["server_port"], v["protocol"], v["outcome"],
            "," + ",".join(sorted(v["observers"])) + ",", v["vni"], v["client_workload"],
            v["server_workload"], v["client_namespace"], v["server_namespace"],
            ip_hex(v["service_ip"]) if v["service_ip"] else None])
    return con


COLUMNS = {"client_ip": "client_ipx", "server_ip": "server_ipx", "client_port": "client_port",
           "server_port": "server_port", "protocol": "protocol", "outcome": "outcome",
           "observers": "observers", "vni": "vni", "client_workload": "cw",
           "server_workload": "sw", "client_namespace": "cns", "server_namespace": "sns",
           "service_ip": "svcx"}


@pytest.mark.parametrize(("flags", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_sql_compilation_agrees_with_memory(db, flags, expected):
    where, params = duck_sql(Filter.build(flags), COLUMNS)
    rows = db.execute(f"SELECT id FROM flows WHERE {where} ORDER BY id", params).fetchall()
    assert [r[0] for r in rows] == expected


@pytest.mark.parametrize(("dim", "value", "flag"), [
    ("port", "http", "--port"), ("port", "70000", "--port"), ("ip", "10.0.0.0/33", "--ip"),
    ("protocol", "tcpp", "--protocol"), ("outcome", "broken", "--outcome"),
    ("observer", "wire", "--observer"), ("vni", "-1", "--vni"), ("to_workload", "", "--to-workload"),
])
def test_bad_values_name_the_flag_and_value(dim, value, flag):
    with pytest.raises(ConfigError) as err:
        Filter.build([(dim, value, False)])
    assert err.value.key == flag and err.value.value == value
    with pytest.raises(ConfigError) as err:
        Filter.build([(dim, value, True)])
    assert err.value.key == "--not " + flag


@pytest.mark.parametrize(("flags", "hidden", "shown"), [
    ([], [1, 2, 3, 4, 5, 6], list(range(1, 11))),
    ([("protocol", "udp", False)], [5], [5, 7, 8, 9]),
    ([("port", "5353", False)], [], [7, 9]),
    ([("observer", "client", True)], [2, 4], [2, 4, 7, 8, 9]),
])
def test_link_local_and_multicast_are_hidden_unless_asked_for(db, flags, hidden, shown):
    """The default view leaves out fe80::/10, ff00::/8, 224.0.0.0/4, 255.255.255.255 and the
    unspecified addresses (in memory and in SQL alike); `link_local` adds them to any filter."""
    for include, expected in ((False, hidden), (True, shown)):
        f = Filter.build(flags, link_local=include)
        assert [int(r.record_id.split(":")[1]) for r in RECORDS if f.matches_record(r)] == expected
        where, params = duck_sql(f, COLUMNS)
        assert [r[0] for r in db.execute(f"SELECT id FROM flows WHERE {where} ORDER BY id",
                                         params).fetchall()] == expected


def test_link_local_compiles_to_a_column_where_a_table_has_one():
    where, params = duck_sql(Filter(), {"link_local": "ll", "protocol": "protocol"})
    assert (where, params) == ("NOT coalesce(ll, false)", [])
    assert duck_sql(Filter(link_local=True), {"link_local": "ll"}) == ("true", [])


def test_link_local_query_parameter():
    assert Filter.from_query([("link_local", "true"), ("port", "53")]) == Filter.build(
        [("port", "53", False)], link_local=True)
    assert not Filter.from_query([("link_local", "0")]).link_local
    with pytest.raises(ConfigError) as err:
        Filter.from_query([("link_local", "maybe")])
    assert (err.value.key, err.value.value) == ("link_local", "maybe")
    f = Filter.build([("port", "53", False)], link_local=True)
    assert Filter.from_query(f.query_params()) == f
    assert str(f) == "port=53 [link-local included]" and str(Filter()) == "(everything)"


def test_query_parameters_build_the_same_filter():
    a = Filter.from_query([("to_workload", "db"), ("not_port", "5433"), ("limit", "10")])
    b = Filter.build([("to_workload", "db", False), ("port", "5433", True)])
    assert a == b
    assert str(a) == "to_workload=db AND NOT port=5433"


def test_outcome_words():
    assert [outcome_of(c, r) for c, r in [("ok", 0), ("ok", 2), ("refused", 0), ("timeout", 0),
                                          ("reset", 0), (None, 0)]] == \
        ["ok", "reset", "refused", "timeout", "reset", "ok"]


def test_times():
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_time("--since", "5m", now) == now - timedelta(minutes=5)
    assert parse_time("--since", "now", now) == now
    assert parse_time("--since", "2026-11-28T10:00:00Z", now) == datetime(2026, 11, 28, 10, tzinfo=UTC)
    with pytest.raises(ConfigError, match="--since"):
        parse_time("--since", "yesterday", now)
