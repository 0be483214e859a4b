"""NodePort joins on columns: which batches need them, and the rollup volumes a merge takes back.

Stage: correlation with the C core (aggregator/correlate_columns.py). In: a batch in the flat
layout (aggregator/store/columns.py), the aliases (aggregator/nodeport.py); the C core's rollup
rows and the half connections a plan merged. Out: whether the batch holds a NodePort piece
(a middle record, or a record of a known half: only such a batch takes the records path, like
the reference correlator); the plan's rollups with the halves' volumes taken back from their
names, keys summed as the reference's `Plan.rollups` are (a key summing to nothing is no row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.connection import Connection
from aggregator.correlate import Correlator, Plan, minute_of
from aggregator.nodeport import NodePortJoin, volumes_of
from aggregator.store.columns import NAT_FIELD, Extra, extra_lengths
from aggregator.store.derived import ROLLUP_COUNTERS, ROLLUP_KEY, ROLLUP_SCHEMA, Derived

_dec = msgspec.msgpack.Decoder(Extra)


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def table_wants(table: pa.Table, join: NodePortJoin) -> bool:
    """Whether the batch has a middle record (a DNAT then an SNAT in its `nat`) or a record
    whose key is a known half."""
    n = table.num_rows
    if not n:
        return False
    if "extra" in table.column_names:
        extra = _column(table, "extra")
        if extra.null_count < n:
            if extra.type != pa.binary():
                extra = extra.cast(pa.binary())
            # only an SNAT makes a middle record: its text is in the blob (a ClusterIP call's
            # client records, most of a cluster's, have a `nat` without one)
            nat = pc.and_kleene(_nat_rows(extra), pc.match_substring(extra, "snat"))
            for blob in extra.filter(pc.fill_null(nat, False)).to_pylist():
                nat = _dec.decode(blob).nat or ()
                types = [x.type for x in nat]
                if "snat" in types and any(t != "snat" for t in types[:types.index("snat")]):
                    return True
    if not join.aliases:
        return False
    cport = np.asarray(_column(table, "client_port").to_numpy(zero_copy_only=False), np.int64)
    sport = np.asarray(_column(table, "server_port").to_numpy(zero_copy_only=False), np.int64)
    pairs = np.fromiter((k[2] * 65536 + k[4] for k in join.aliases), np.int64)
    rows = np.nonzero(np.isin(cport * 65536 + sport, pairs))[0]
    if not len(rows):
        return False
    take = pa.array(rows)
    cols = [_column(table, c).take(take).to_pylist()
            for c in ("protocol", "client_ip", "client_port", "server_ip", "server_port")]
    return join.wants((p, ci, cp, si, sp, 0) for p, ci, cp, si, sp in zip(*cols, strict=True))


def _nat_rows(extra: pa.Array) -> pa.Array:
    """The rows whose `extra` array is long enough to hold `nat` (its header, as the C core's
    input does in aggregator/correlate_input.py; columns.extra_lengths)."""
    return pa.array(extra_lengths(extra) > NAT_FIELD)


def negative_rollups(removed: Sequence[Connection], rollups: pa.Table | None) -> pa.Table | None:
    """`rollups` (the C core's rows of the plan) with the removed halves' volumes taken back
    from their names first, as `Correlator._nodeport` adds them before the batch's records: a
    key's counters summed, its names those of the last rows added, keys summing to nothing
    left out."""
    plan = Plan()
    for h in removed:
        for minute, vol in volumes_of(h, minute_of):
            Correlator._add(plan, Correlator._rollup_key(h, minute), [-x for x in vol],
                            h.client, h.server)
    neg = Derived(plan).rollups
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for t in (neg, rollups):
        for r in t.to_pylist() if t is not None else ():
            k = tuple(r[n] for n in ROLLUP_KEY)
            acc = merged.get(k)
            if acc is None:
                merged[k] = r
                continue
            for n in ROLLUP_COUNTERS:
                r[n] += acc[n]
            merged[k] = r
    keep = [r for r in merged.values() if any(r[n] for n in ROLLUP_COUNTERS)]
    return pa.Table.from_pylist(keep, schema=ROLLUP_SCHEMA) if keep else None
