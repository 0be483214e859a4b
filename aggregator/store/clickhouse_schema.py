"""ClickHouse tables of the flow store: location URL, column types, DDL, sharding.

Stage: store (schema). In: the column lists every backend shares (aggregator/store/columns.py
for raw records, aggregator/store/derived.py for connections, rollups, workloads) and the
server's version. Out: `CREATE TABLE` statements for the local (per-shard) tables and the
`Distributed` tables over them.

The SQL is what ClickHouse 18.16 (Debian 12) and current servers both accept:
- times are `Int64` microseconds since the epoch (18.16 has no DateTime64), plus a `Date`
  column `day` that partitions each table (`PARTITION BY toYYYYMMDD(day)`, custom partitioning
  keys: ClickHouse >= 1.1.54310);
- idempotency without transactions: `ReplacingMergeTree`, read with `FINAL` (docs/scale-out.md):
  a raw record is keyed by (collector, batch_seq, record_id), a rollup delta by its minute and
  edge plus the (collector, batch_seq) that produced it, a connection by its id with the highest
  `version` winning. A batch written twice (an aggregator killed between two inserts, the batch
  redelivered) therefore reads as once. A connection removed (a NodePort half merged into its
  real connection, aggregator/nodeport.py) is a newer version of its key with `deleted = 1` (a
  *tombstone*, `TOMBSTONE_VERSION`): every read filters `deleted = 0` after FINAL;
- the sharding key keeps every row that must be de-duplicated together on one shard
  (`FINAL` works per shard): records and rollups by (collector, batch_seq), connections by
  conn_id, workloads by wid;
- replicated local tables (`ReplicatedReplacingMergeTree`, ZooKeeper) when the cluster has more
  than one replica in a shard (`replicated_engine`): each shard's replicas share one ZooKeeper
  path, named from the cluster, the local table and the shard number; a replica is named by its
  host and port. Plain local tables otherwise;
- `TTL` (ClickHouse >= 19.6, https://clickhouse.com/docs/en/engines/table-engines/mergetree-family/mergetree#table_engine-mergetree-ttl)
  only when the server has it; the fallback on older servers is the aggregator's retention pass
  (drop whole day partitions, then `ALTER TABLE ... DELETE` mutations for the boundary day).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa

from aggregator.store.columns import COLUMNS
from aggregator.store.derived import (
    CONN_SCHEMA,
    ROLLUP_ATTRS,
    ROLLUP_COUNTERS,
    ROLLUP_KEY,
    ROLLUP_SCHEMA,
    WORKLOAD_SCHEMA,
)
from eastwest.errors import ConfigError

PASSWORD_ENV = "EASTWEST_CLICKHOUSE_PASSWORD"
TTL_SINCE = (19, 6)

# DuckDB DDL word -> ClickHouse type (raw records; columns.py declares DuckDB types)
_RAW_TYPES = {"VARCHAR": "String", "BIGINT": "Int64", "INTEGER": "Int32", "TINYINT": "Int8",
              "BOOLEAN": "UInt8", "TIMESTAMPTZ": "Int64", "BLOB": "String"}
_ARROW_TYPES = {pa.string(): "String", pa.int32(): "Int32", pa.int64(): "Int64",
                pa.bool_(): "UInt8", pa.timestamp("us", tz="UTC"): "Int64", pa.binary(): "String"}

# connection columns that are never NULL (the rest are Nullable)
CONN_NOT_NULL = {"conn_id", "protocol", "family", "client_ip", "client_ip_hex", "client_port",
                 "server_ip", "server_ip_hex", "server_port", "scope", "start_ts", "last_seen",
                 "closed", "observed_by", "bytes_c2s", "bytes_s2c", "retransmits", "resets",
                 "byte_mismatch", "incomplete", "client_wid", "server_wid", "state"}
ROLLUP_NOT_NULL = set(ROLLUP_KEY) | {"bytes_c2s", "bytes_s2c", "retransmits", "resets"}
WORKLOAD_NOT_NULL = {"wid", "first_seen", "last_seen"}

# a removed connection's tombstone (`deleted = 1`): above every version the clock rule gives
# (µs since 1970, aggregator/store/clickhouse.py `_next_version`) and the same for every write
# of it, so it outranks every row of the connection written before or after it, and a redo
# writes the identical row
TOMBSTONE_VERSION = 2**63

TIME_COLUMNS = {"start_ts", "end_ts", "last_seen", "closed_ts", "ingested_at", "minute",
                "first_seen"}
BOOL_COLUMNS = {"final", "loopback", "incomplete", "closed", "byte_mismatch", "link_local"}


@dataclass(frozen=True)
class Location:
    """`clickhouse://[user[:password]@]host[:port]/database[?cluster=NAME&secure=1&ca=FILE&ttl_days=N&alt_hosts=H:P,H:P&insert_quorum=N]`

    `cluster`: a cluster of the server's `remote_servers`: tables are created on every shard
    (every replica of it) and read and written through `Distributed` tables. `alt_hosts`: other
    servers of the cluster to connect to when `host` is down (each holds the same Distributed
    tables). `insert_quorum`: with replicas, how many of a shard's replicas hold an insert before
    it is acknowledged (default 2). The password may also come from $EASTWEST_CLICKHOUSE_PASSWORD (so it stays out of
    process listings)."""

    host: str
    port: int
    database: str
    user: str = "default"
    password: str = ""
    cluster: str | None = None
    secure: bool = False
    ca_certs: str | None = None
    ttl_days: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    alt_hosts: str | None = None
    insert_quorum: int | None = None  # replicated: replicas that hold an insert before its ack

    @classmethod
    def parse(cls, url: str, env: dict[str, str] | None = None) -> Location:
        env = dict(os.environ) if env is None else env
        parts = urlsplit(str(url))
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise ConfigError("--clickhouse", url, "expected clickhouse://host:9000/database")
        db = parts.path.strip("/") or "eastwest"
        if not db.replace("_", "").isalnum():
            raise ConfigError("--clickhouse", url, f"database {db!r}: letters, digits and _ only")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        secure = parts.scheme == "clickhouses" or q.pop("secure", "0") in ("1", "true", "yes")
        try:
            port = parts.port or (9440 if secure else 9000)
        except ValueError:
            raise ConfigError("--clickhouse", url, "the port is not a number") from None
        ttl = q.pop("ttl_days", None)
        if ttl is not None and not ttl.isdigit():
            raise ConfigError("--clickhouse", url, f"ttl_days={ttl!r}: a whole number of days")
        return cls(host=parts.hostname or "127.0.0.1", port=port, database=db,
                   user=unquote(parts.username or "default"),
                   password=unquote(parts.password or "") or env.get(PASSWORD_ENV, ""),
                   cluster=q.pop("cluster", None) or None, secure=secure,
                   ca_certs=q.pop("ca", None), ttl_days=int(ttl) if ttl else None,
                   alt_hosts=_alt_hosts(url, q.pop("alt_hosts", None)),
                   insert_quorum=_quorum(url, q.pop("insert_quorum", None)), extra=q)

    def client_kwargs(self, host: str | None = None, port: int | None = None) -> dict[str, object]:
        kw: dict[str, object] = {"host": host or self.host, "port": port or self.port,
                                 "user": self.user, "password": self.password,
                                 "secure": self.secure, "connect_timeout": 5,
                                 "send_receive_timeout": 120}
        if self.ca_certs:
            kw["ca_certs"] = self.ca_certs
            kw["verify"] = True
        if self.alt_hosts and host is None:  # the store's own connection, not one to a replica
            kw["alt_hosts"] = self.alt_hosts
        return kw

    def __str__(self) -> str:  # never print the password
        c = f"?cluster={self.cluster}" if self.cluster else ""
        return f"clickhouse://{self.user}@{self.host}:{self.port}/{self.database}{c}"


def _alt_hosts(url: str, value: str | None) -> str | None:
    if not value:
        return None
    for hp in value.split(","):
        host, _, port = hp.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("--clickhouse", url, f"alt_hosts={value!r}: HOST:PORT, comma-separated")
    return value


def _quorum(url: str, value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError("--clickhouse", url, f"insert_quorum={value!r}: a number of replicas "
                          "(1 or more)")
    return int(value)


def _col(name: str, typ: str, not_null: bool) -> str:
    return f"{name} {typ if not_null else f'Nullable({typ})'}"


def _raw_columns() -> list[str]:
    out = []
    for name, _, ddl in COLUMNS:
        word = ddl.split()[0]
        out.append(_col(name, _RAW_TYPES[word], "NOT NULL" in ddl))
    return out


def _arrow_columns(schema: pa.Schema, not_null: set[str]) -> list[str]:
    return [_col(f.name, _ARROW_TYPES[f.type], f.name in not_null) for f in schema]


@dataclass(frozen=True)
class Table:
    name: str
    columns: list[str]       # "name Type"
    engine: str              # MergeTree family engine of the local table
    order_by: str
    shard_key: str
    ttl_time: str | None     # µs column the TTL counts from (flows, rollups)

    @property
    def column_names(self) -> list[str]:
        return [c.split()[0] for c in self.columns]


TABLES = [
    Table("flows", ["day Date", *_raw_columns()], "ReplacingMergeTree()",
          "(collector, end_ts, batch_seq, record_id)", "cityHash64(collector, batch_seq)",
          "end_ts"),
    Table("ingested_batches", ["day Date", "collector String", "batch_seq Int64",
                               "records Int32", "ingested_at Int64"],
          "ReplacingMergeTree()", "(collector, batch_seq)", "cityHash64(collector, batch_seq)",
          None),
    Table("connections", ["day Date", "version UInt64", "deleted UInt8 DEFAULT 0",
                          *_arrow_columns(CONN_SCHEMA, CONN_NOT_NULL)],
          "ReplacingMergeTree(version)",
          "(server_port, server_ip, client_ip, client_port, protocol, conn_id)",
          "cityHash64(conn_id)", None),
    Table("rollups", ["day Date", "collector String", "batch_seq Int64",
                      *_arrow_columns(ROLLUP_SCHEMA, ROLLUP_NOT_NULL)],
          "ReplacingMergeTree()", "(" + ", ".join(ROLLUP_KEY + ["collector", "batch_seq"]) + ")",
          "cityHash64(collector, batch_seq)", "minute"),
    Table("workloads", ["day Date", "version UInt64",
                        *_arrow_columns(WORKLOAD_SCHEMA, WORKLOAD_NOT_NULL)],
          "ReplacingMergeTree(version)", "(wid, first_seen, last_seen)", "cityHash64(wid)", None),
]
TABLE = {t.name: t for t in TABLES}
assert ROLLUP_ATTRS and ROLLUP_COUNTERS  # the rollup schema is derived.py's, unchanged here


def supports_ttl(version: tuple[int, ...]) -> bool:
    return version >= TTL_SINCE


@dataclass(frozen=True)
class Replica:
    """Where a replicated local table keeps its shard's replication log, and its own name."""

    zk_path: str
    name: str


def replica_of(cluster: str, local_table: str, shard_num: int, host: str, port: int) -> Replica:
    return Replica(f"/clickhouse/eastwest/{cluster}/{local_table}/shard{shard_num}",
                   re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host}_{port}"))


def replicated_engine(engine: str, replica: Replica) -> str:
    """`ReplacingMergeTree(version)` -> `ReplicatedReplacingMergeTree('path', 'name', version)`."""
    name, _, args = engine.partition("(")
    args = args.rstrip(")").strip()
    pre = f"'{replica.zk_path}', '{replica.name}'"
    return f"Replicated{name}({pre}{', ' + args if args else ''})"


def local_ddl(t: Table, qualified: str, version: tuple[int, ...], ttl_days: int | None,
              replica: Replica | None = None) -> str:
    ttl = ""
    if ttl_days and t.ttl_time and supports_ttl(version):
        ttl = f" TTL day + toIntervalDay({int(ttl_days) + 1})"  # whole days: the boundary day stays
    engine = t.engine if replica is None else replicated_engine(t.engine, replica)
    return (f"CREATE TABLE IF NOT EXISTS {qualified} ({', '.join(t.columns)}) "
            f"ENGINE = {engine} PARTITION BY toYYYYMMDD(day) ORDER BY {t.order_by}{ttl}")


def distributed_ddl(t: Table, qualified: str, cluster: str, local_table: str) -> str:
    # database '' = each replica's <default_database> from remote_servers (or 'default')
    return (f"CREATE TABLE IF NOT EXISTS {qualified} ({', '.join(t.columns)}) "
            f"ENGINE = Distributed({cluster}, '', {local_table}, {t.shard_key})")


def parse_version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)
