"""ClickHouse schema and SQL dialect, without a server: TTL only where the server has it (19.6+;
18.16 relies on the aggregator's retention pass), the location URL and its errors, and the
rewrite of the API's filter SQL into what 18.16 parses."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aggregator.store.clickhouse_derived import dialect
from aggregator.store.clickhouse_schema import TABLE, Location, local_ddl, parse_version
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


def test_filter_sql_is_rewritten_for_clickhouse():
    f = Filter.from_query([("observer", "server"), ("not_protocol", "udp")])
    where, params = f.to_sql({"observers": "observed_by", "protocol": "protocol"})
    sql, named = dialect(where + " AND start_ts < ?", [*params, datetime(1970, 1, 1, 0, 0, 1,
                                                                        tzinfo=UTC)])
    assert "position(observed_by, %(p0)s) > 0" in sql and " IN " not in sql
    assert "false" not in sql.lower() and "coalesce(" in sql
    assert named == {"p0": ",server,", "p1": "udp", "p2": 1_000_000}
    with pytest.raises(ValueError, match="placeholders"):
        dialect("a = ?", [])
