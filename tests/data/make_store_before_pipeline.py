"""Writes tests/data/store-before-pipeline.tar.gz's data folder. Runs only from a checkout of
commit 3159b35 (the version before aggregator/pipeline.py; it imports that version's
`aggregator.correlating`), as tests/data/README.md says:

    git worktree add /tmp/v 3159b35 && cd /tmp/v
    PYTHONPATH=. python /path/to/tests/data/make_store_before_pipeline.py DIR
    tar -czf store-before-pipeline.tar.gz -C DIR .
"""

from __future__ import annotations

import itertools
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aggregator.correlate import Correlator
from aggregator.identity import IdentityResolver, StaticMap
from aggregator.store.duckdb import DuckDBStore
from eastwest.drops import Drops
from eastwest.record import Endpoint, FlowRecord, Process, Tunnel

T0 = datetime(2026, 11, 28, 4, 0, 10, tzinfo=UTC)
MAP = StaticMap([{"match": "10.244.1.11/32", "name": "frontend", "namespace": "shop", "host": "h1"},
                 {"match": "10.244.2.11/32", "name": "api", "namespace": "shop", "host": "h2"}])
_seq = itertools.count(1)


def rec(observer: str, cport: int, final: bool = True, dur: float = 2.0, c2s: int = 1000,
        s2c: int = 5000) -> FlowRecord:
    coll = {"client": "h1", "server": "h2", "path": "h1"}[observer]
    return FlowRecord(
        record_id=f"{coll}:{next(_seq)}", collector=coll,
        source="vxlan" if observer == "path" else "socket", start=T0,
        end=T0 + timedelta(seconds=dur), final=final, protocol="tcp", family=4,
        client=Endpoint("10.244.1.11", cport), server=Endpoint("10.244.2.11", 9090),
        observer=observer, bytes_c2s=c2s, bytes_s2c=s2c,  # type: ignore[arg-type]
        connect="ok" if observer != "path" else None,
        process=(Process(7, "ew-frontend" if observer == "client" else "ew-api")
                 if observer != "path" else None),
        tunnel=Tunnel("vxlan", 42, "10.213.0.1", "10.213.0.2", 4789) if observer == "path" else None)


def main(out: Path) -> None:
    # that version's module (gone since): this script runs from its checkout only
    from aggregator.correlating import CorrelatingStore

    shutil.rmtree(out, ignore_errors=True)
    s = CorrelatingStore(DuckDBStore(out), Correlator(IdentityResolver(MAP)), Drops(), retention=None)
    # 3 closed connections seen by client, server and wire; one still open (its client's interim)
    for i in range(3):
        s.ingest("h1", 1 + i, [rec("client", 41000 + i), rec("path", 41000 + i)])
        s.ingest("h2", 1 + i, [rec("server", 41000 + i)])
    s.ingest("h1", 10, [rec("client", 42000, final=False, dur=5, c2s=100, s2c=10)])
    s.flush(30)
    s.inner.checkpoint()
    s.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
