"""A pipeline (aggregator/pipeline.py) driven by hand, for tests of correlation and the stores:
batches go straight to the correlation stage (as intake hands them over), reads through the
pipeline's read path. Not a fake: the real stages, without HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from aggregator.identity import IdentityResolver
from aggregator.pipeline import Pipeline, build
from aggregator.settings import AggregatorSettings
from aggregator.store import Store
from aggregator.store.base import IngestResult, ReadStore
from aggregator.store.query import ConnectionQuery
from aggregator.store.wire_columns import ColumnBatch
from aggregator.worker import Accepted, JournaledCorrelation, WorkerSettings
from eastwest.clock import Clock, FakeClock
from eastwest.record import FlowRecord

__all__ = ["Driven", "FakeClock", "driven"]


class Driven:
    """The pipeline, with the conveniences tests use."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    # -- in -------------------------------------------------------------------------------------
    def ingest(self, collector: str, batch_seq: int, records: Sequence[FlowRecord]) -> IngestResult:
        recs = list(records)
        return self.pipeline.correlation.accept(Accepted(collector, batch_seq, len(recs),
                                                         records=recs))

    def ingest_columns(self, batch: ColumnBatch, body: bytes | None) -> IngestResult:
        return self.pipeline.correlation.accept(Accepted(
            batch.collector, batch.batch_seq, batch.table.num_rows,
            [i for i, _, _ in batch.rejected], body=body, table=batch.table,
            decode=batch.records))

    # -- state ----------------------------------------------------------------------------------
    @property
    def correlator(self) -> Any:
        return self.pipeline.correlator

    @property
    def correlation(self) -> Any:
        return self.pipeline.correlation

    @property
    def store(self) -> Store:
        return self.pipeline.store

    @property
    def hub(self) -> Any:
        return self.pipeline.fanout.hub

    @property
    def journal(self) -> Any:
        c = self.pipeline.correlation
        return c.journal if isinstance(c, JournaledCorrelation) else None

    @property
    def loaded(self) -> int:
        return int(self.pipeline.correlation.loaded)  # type: ignore[attr-defined]

    def add_listener(self, fn: Any) -> None:
        self.pipeline.fanout.add_listener(fn)

    def flush(self, timeout: float | None = None) -> bool:
        return self.pipeline.correlation.applied(timeout)

    def batch_applied(self, collector: str, batch_seq: int) -> bool:
        return self.pipeline.correlation.batch_applied(collector, batch_seq)

    def lag(self) -> dict[str, float]:
        return self.pipeline.correlation.lag()

    def count(self) -> int:
        return self.pipeline.correlation.count()

    def apply_retention(self, now: Any) -> dict[str, int]:
        self.flush(30)
        with self.pipeline.correlator.lock:
            return self.pipeline.retention.maybe_run(now)

    # -- reads ----------------------------------------------------------------------------------
    def read(self) -> ReadStore:
        return self.pipeline.read()

    def connection_count(self) -> int:
        return self.pipeline.read().connection_count()

    def rows(self, *columns: str) -> list[dict[str, Any]]:
        return self.pipeline.read().connections(ConnectionQuery(
            limit=100_000, columns=columns or ("conn_id",)))

    def close(self) -> None:
        self.pipeline.stop()  # owns its store (`driven`): the worker stops, the store closes


def driven(store: Store, resolver: IdentityResolver, *, retention: timedelta | None = None,
           clock: Clock | None = None, settle_s: float = 10.0, worker: WorkerSettings | None = None,
           data_dir: Path | None = None, exporter_kwargs: dict[str, Any] | None = None,
           **settings: Any) -> Driven:
    s = AggregatorSettings(data_dir=data_dir or Path("/nonexistent"), insecure_open=True,
                           retention=retention, identity_settle_s=settle_s, **settings)
    return Driven(build(s, store=store, own_store=True, resolver=resolver, clock=clock, env={},
                        worker=worker, exporter_kwargs=exporter_kwargs))
