"""Drops records as the C correlator reads them: one row per drop reason.

Stage: correlation, before the C plan (aggregator/correlate_input.py calls `expand_drops`).
In:  a batch in the flat layout (aggregator/store/columns.py), whose records of source `drops`
     keep their `drops: [{reason, packets}]` in the `extra` blob only.
Out: the same batch where each drops record is one row per reason, in the record's order, with
     observer `drops`, the reason's packets in `packets_c2s` and no other counter, and the
     rows' reasons (None for every other record). The rows of one record are adjacent and share
     its `end`, so the stable order by `end` keeps them together; each joins the connection the
     record joins in the reference (aggregator/correlate.py `Correlator._drops`): the join rule
     looks at the drop source's view of any reason, which the first row leaves at the record's
     start.

A batch without drops records is returned as it is (one `equal` over the `source` column).
"""

from __future__ import annotations

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.store.columns import Extra

_extra = msgspec.msgpack.Decoder(Extra)
_ZEROED = ("bytes_c2s", "bytes_s2c", "retransmits", "resets")
_NULLED = ("packets_s2c", "connect", "rtt_min_us", "rtt_avg_us", "rtt_max_us")


class DropsInputError(ValueError):
    """A drops record whose drops cannot be read (the message names the row)."""


def expand_drops(table: pa.Table) -> tuple[pa.Table, list[str | None] | None]:
    """(the batch with one row per drop reason, each row's reason); (table, None) without
    drops records."""
    names = table.schema.names
    if table.num_rows == 0 or "source" not in names:
        return table, None
    is_drop = pc.equal(table.column("source"), "drops").to_numpy(zero_copy_only=False)
    if not is_drop.any():
        return table, None
    n = table.num_rows
    extra = table.column("extra").to_pylist() if "extra" in names else [None] * n
    counts = np.ones(n, dtype=np.int64)
    per_row: dict[int, list[tuple[str, int]]] = {}
    for r in np.nonzero(is_drop)[0].tolist():
        blob = extra[r]
        try:
            drops = _extra.decode(blob).drops if blob is not None else None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DropsInputError(f"row {r}: extra: {exc}") from None
        if not drops:
            raise DropsInputError(f"row {r}: a record of source 'drops' without drops")
        per_row[r] = [(d.reason, d.packets) for d in drops]
        counts[r] = len(drops)
    idx = np.repeat(np.arange(n), counts)
    out = table.take(pa.array(idx))
    reasons: list[str | None] = []
    packets: list[int | None] = []
    old_packets = table.column("packets_c2s").to_pylist()
    for r in range(n):
        got = per_row.get(r)
        if got is None:
            reasons.append(None)
            packets.append(old_packets[r])
        else:
            for reason, k in got:
                reasons.append(reason)
                packets.append(k)
    drop_rows = pa.array(np.repeat(is_drop, counts))
    cols = {"observer": pc.if_else(drop_rows, "drops", out.column("observer")),
            "packets_c2s": pa.array(packets, pa.int64())}
    for name in _ZEROED:
        cols[name] = pc.if_else(drop_rows, pa.scalar(0, pa.int64()), out.column(name))
    for name in _NULLED:
        typ = out.schema.field(name).type
        cols[name] = pc.if_else(drop_rows, pa.scalar(None, typ), out.column(name))
    for name, values in cols.items():
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(name), values)
    return out, reasons
