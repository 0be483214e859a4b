"""ClickHouse schema and SQL dialect, without a server: TTL only where the server has it (19.6+;
18.16 relies on the aggregator's retention pass), the location URL and its errors, and the
rewrite of the API's filter SQL into what 18.16 parses."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aggregator.store.clickhouse_schema import TABLE, Location, local_ddl, parse_version
from aggregator.store.sql import ClickParams, compile_filter
from eastwest.errors import ConfigError
from eastwest.filters import Filter


def test_ttl_is_declared_only_on_servers_that_have_it():
    old = local_ddl(TABLE["flows"], "db.flows", parse_version("18.16.1"), 7)
    new = local_ddl(TABLE["flows"], "db.flows", parse_version("23.8.2.7"), 7)
    assert " TTL " not in old
    assert new.endswith("TTL day + toIntervalDay(8)")
    # tables whose rows stay while a connection lives get no TTL anywhere
    assert " TTL " not in local_ddl(TABLE["connections"], "db.c", parse_version("24.1"), 7)
    assert "PARTITION BY toYYYYMMDD(day)" in old and "ReplacingMergeTree()" in old


def test_location_url_is_parsed_and_bad_values_are_named():
    loc = Location.parse("clickhouse://ew:s3cret@ch-1:9440/eastwest?cluster=ew&secure=1&ttl_days=30",
                         env={})
    assert (loc.host, loc.port, loc.database, loc.user, loc.password, loc.cluster, loc.secure,
            loc.ttl_days) == ("ch-1", 9440, "eastwest", "ew", "s3cret", "ew", True, 30)
    assert "s3cret" not in str(loc)
    assert Location.parse("clickhouse://ch/x", env={"EASTWEST_CLICKHOUSE_PASSWORD": "p"}).password == "p"
    for bad, word in (("http://ch:9000/x", "clickhouse://"), ("clickhouse://ch/x-y", "x-y"),
                      ("clickhouse://ch/x?ttl_days=week", "week")):
        with pytest.raises(ConfigError, match=word):
            Location.parse(bad, env={})


def test_a_filter_compiles_to_clickhouse_sql():
    """ClickHouse 18.16's dialect: `position(col, x)`, 1/0 for booleans, named parameters, times
    as µs since the epoch (aggregator/store/sql.py `ClickParams`)."""
    f = Filter.from_query([("observer", "server"), ("not_protocol", "udp")])
    p = ClickParams()
    sql = compile_filter(f, {"observers": "observed_by", "protocol": "protocol"}, p)
    sql += f" AND start_ts < {p.add(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC))}"
    assert "position(observed_by, %(p0)s) > 0" in sql and " IN " not in sql
    assert "false" not in sql.lower() and "coalesce(" in sql and ", 0)" in sql
    assert p.named == {"p0": ",server,", "p1": "udp", "p2": 1_000_000}


def test_replicated_engines_keep_their_arguments_after_the_replication_log_and_name():
    from aggregator.store.clickhouse_schema import replica_of, replicated_engine

    rep = replica_of("ewr", "db_connections", 2, "ch-2b.example", 9000)
    assert rep.zk_path == "/clickhouse/eastwest/ewr/db_connections/shard2"
    assert rep.name == "ch-2b.example_9000"
    assert replicated_engine("ReplacingMergeTree(version)", rep) == (
        "ReplicatedReplacingMergeTree('/clickhouse/eastwest/ewr/db_connections/shard2', "
        "'ch-2b.example_9000', version)")
    assert replicated_engine("ReplacingMergeTree()", rep).endswith("'ch-2b.example_9000')")


def test_alt_hosts_and_insert_quorum_are_parsed_and_bad_ones_named():
    loc = Location.parse("clickhouse://ch-1:9000/ew?cluster=c&alt_hosts=ch-2:9000,ch-3:9000"
                         "&insert_quorum=2")
    assert (loc.alt_hosts, loc.insert_quorum) == ("ch-2:9000,ch-3:9000", 2)
    assert loc.client_kwargs()["alt_hosts"] == "ch-2:9000,ch-3:9000"
    assert "alt_hosts" not in loc.client_kwargs("ch-2", 9000)  # a connection to one replica
    with pytest.raises(ConfigError, match="alt_hosts='ch-2': HOST:PORT"):
        Location.parse("clickhouse://ch-1/ew?alt_hosts=ch-2")
    with pytest.raises(ConfigError, match="insert_quorum='0'"):
        Location.parse("clickhouse://ch-1/ew?insert_quorum=0")
