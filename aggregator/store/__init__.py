"""Flow store backends behind two declared interfaces (aggregator/store/base.py: `WriteStore`
for the pipeline's write path, `ReadStore` for the API; `Store` is both).

`open_store("duckdb", data_dir)` or `open_store("clickhouse", "clickhouse://host:9000/db")` is the
only place that picks a backend; the API and intake never contain backend SQL.
"""

from __future__ import annotations

from pathlib import Path

from aggregator.store.base import IngestResult, ReadStore, Store, StoreError, WriteStore

BACKENDS = ("duckdb", "clickhouse")


def open_store(backend: str, data_dir: str | Path) -> Store:
    if backend == "duckdb":
        from aggregator.store.duckdb import DuckDBStore

        return DuckDBStore(data_dir)
    if backend == "clickhouse":
        from aggregator.store.clickhouse import ClickHouseStore

        return ClickHouseStore(str(data_dir))
    from eastwest.errors import ConfigError

    raise ConfigError("store", backend, f"unknown backend, choose one of {list(BACKENDS)}")


__all__ = ["BACKENDS", "IngestResult", "ReadStore", "Store", "StoreError", "WriteStore",
           "open_store"]
