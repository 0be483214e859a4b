"""Flow store backends behind one interface (`FlowStore`, aggregator/store/base.py).

`open_store("duckdb", data_dir)` or `open_store("clickhouse", "clickhouse://host:9000/db")` is the
only place that picks a backend; the API and ingest never contain backend SQL.
"""

from __future__ import annotations

from pathlib import Path

from aggregator.store.base import FlowStore, IngestResult, StoreError

BACKENDS = ("duckdb", "clickhouse")


def open_store(backend: str, data_dir: str | Path) -> FlowStore:
    if backend == "duckdb":
        from aggregator.store.duckdb import DuckDBStore

        return DuckDBStore(data_dir)
    if backend == "clickhouse":
        from aggregator.store.clickhouse import ClickHouseStore

        return ClickHouseStore(str(data_dir))
    from eastwest.errors import ConfigError

    raise ConfigError("store", backend, f"unknown backend, choose one of {list(BACKENDS)}")


__all__ = ["BACKENDS", "FlowStore", "IngestResult", "StoreError", "open_store"]
