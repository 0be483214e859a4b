"""Drops records as the C correlator reads them: one row per drop reason.

Stage: correlation, in the preparation of a batch for the C plan (aggregator/correlate_input.py
`Preparer.prepare` calls `drop_rows`, then `Expansion.apply` on its arrays).
In:  a batch in the flat layout (aggregator/store/columns.py), whose records of source `drops`
     keep their `drops: [{reason, packets}]` in the `extra` blob only.
Out: `Expansion`: each drops record becomes one row per reason, in the record's order, with
     observer `drops` (the C core's OBS_DROPS), the reason's packets in `packets_c2s` (the C core
     keeps nothing else of such a row but its connect: aggregator/correlate_native_join.c
     `set_view`), its reason, and connect `refused` for a UDP datagram no socket wanted
     (`NO_SOCKET`: aggregator/connection.py `refused_by_drop`), else none. The rows of one
     record are adjacent copies and share its `end`, so the stable order by `end` keeps them
     together; each joins the connection the record joins in the
     reference (aggregator/correlate.py `Correlator._drops`): the join rule looks at the drop
     source's view of any reason, which the first row leaves at the record's start.

The expansion is applied to the prepared numpy arrays (a `take` each), not to the Arrow table:
a batch without drops records costs one `equal` over its `source` column.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.connection import refused_by_drop
from aggregator.store.columns import Extra

OBS_DROPS = 3  # correlate_native.h
CONNECT_REFUSED = 2  # correlate_input.CONNECTS
_extra = msgspec.msgpack.Decoder(Extra)


class DropsInputError(ValueError):
    """A drops record whose drops cannot be read (the message names the row)."""


@dataclass
class Expansion:
    idx: np.ndarray           # the batch's row of each expanded row
    drop: np.ndarray          # bool: the expanded row is a reason of a drops record
    packets: np.ndarray       # its packets (0 elsewhere)
    reasons: list[str | None]  # its reason (None elsewhere)
    refused: np.ndarray       # bool: a drops row that makes its connection refused

    def apply(self, arrays: dict[str, np.ndarray], skip: tuple[str, ...]) -> None:
        """Every array but `skip` taken row by row; the drops rows' observer and packets."""
        idx = self.idx
        for name, values in arrays.items():
            if name not in skip:
                arrays[name] = values[idx]
        arrays["observer"] = np.where(self.drop, OBS_DROPS, arrays["observer"]).astype(np.uint8)
        arrays["p_c2s"] = np.where(self.drop, self.packets, arrays["p_c2s"]).astype(np.int64)
        arrays["has_p_c2s"] = np.where(self.drop, 1, arrays["has_p_c2s"]).astype(np.uint8)
        arrays["connect"] = np.where(self.drop, np.where(self.refused, CONNECT_REFUSED, 0),
                                     arrays["connect"]).astype(np.uint8)


def drop_rows(table: pa.Table) -> Expansion | None:
    """The expansion of the batch's drops records; None without any."""
    names = table.schema.names
    if table.num_rows == 0 or "source" not in names:
        return None
    is_drop = pc.equal(table.column("source"), "drops").to_numpy(zero_copy_only=False)
    if not is_drop.any():
        return None
    n = table.num_rows
    rows = np.nonzero(is_drop)[0]
    # only the drops records' blobs are read (a batch is mostly other records)
    blobs = (table.column("extra").take(pa.array(rows)).to_pylist() if "extra" in names
             else [None] * len(rows))
    protocols = table.column("protocol").take(pa.array(rows)).to_pylist()
    counts = np.ones(n, dtype=np.int64)
    per_row: list[list[tuple[str, int]]] = []
    for r, blob in zip(rows.tolist(), blobs, strict=True):
        try:
            drops = _extra.decode(blob).drops if blob is not None else None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DropsInputError(f"row {r}: extra: {exc}") from None
        if not drops:
            raise DropsInputError(f"row {r}: a record of source 'drops' without drops")
        per_row.append([(d.reason, d.packets) for d in drops])
        counts[r] = len(drops)
    idx = np.repeat(np.arange(n), counts)
    m = len(idx)
    first = np.cumsum(counts) - counts  # where each record's rows start
    reasons: list[str | None] = [None] * m
    packets = np.zeros(m, dtype=np.int64)
    refused = np.zeros(m, dtype=bool)
    for r, got, proto in zip(rows.tolist(), per_row, protocols, strict=True):
        at = int(first[r])
        for k, (reason, n_packets) in enumerate(got):
            reasons[at + k] = reason
            packets[at + k] = n_packets
            refused[at + k] = refused_by_drop(proto, reason)
    return Expansion(idx, np.repeat(is_drop, counts), packets, reasons, refused)
