"""The mesh annotation for the C correlator: a Python pass over the few meshed records and rows.

Stage: correlation on columns (aggregator/correlate_core.py `NativeCore`), after the C plan.
In:  the batch (its `extra` blobs: only those long enough to hold `mesh`, columns.extra_lengths,
     are decoded) and the plan's rows (`views` blobs: the C core's per-observer views).
Out: the rows' `mesh` column (aggregator/mesh.py `stored`) and, for meshed rows, their
     `byte_mismatch` recomputed as the reference's (a meshed connection's wire carries the
     proxies' framing: only its socket views are compared).

The rule is the reference's (aggregator/mesh.py): an observer's hops are those of the record
that made its view. The C core does not say which record made a view, so the pass matches: a
touched row's view of observer `o` whose (start, end, final, bytes_c2s, bytes_s2c) equals a
batch record's of the same key and observer with a `mesh` takes that record's hops; a view
equal to the one the hops were kept with keeps them; any other view (replaced by a record
without `mesh`) drops them. The C core holds no mesh: `MeshShadow` keeps, per meshed
connection, each side with the view it came with, changed at `commit` only, and forgets the
connections the core settles.

Cost: one numpy pass over the batch's `extra` headers and one Arrow `is_in` of the plan's
connection ids against the meshed ones; Python only per meshed record and per touched meshed
connection (a msgpack decode of its views, and a `Connection` rebuilt for `byte_mismatch`).
A batch without mesh pays the two vectorised passes only.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator import mesh
from aggregator.connection import Connection, MeshSide
from aggregator.store.columns import MESH_FIELD, extra_lengths
from aggregator.store.derived import _views_dec, connection_of
from eastwest.record import Mesh

Sig = tuple[int, int, bool, int, int]  # start, end (µs since the epoch), final, bytes
Key = tuple[str, str, int, str, int, int]
_elements = msgspec.msgpack.Decoder(list[msgspec.Raw])  # an `extra` array, undecoded
_mesh_dec = msgspec.msgpack.Decoder(Mesh | None)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_ROW_COLUMNS = ["conn_id", "views", "protocol", "client_ip", "client_port", "server_ip",
                "server_port", "scope", "byte_mismatch"]


def sig_of(v: Any) -> Sig:
    """What identifies the record a view came from (a View or a decoded view row)."""
    return ((v.start - _EPOCH) // _US, (v.end - _EPOCH) // _US, bool(v.final), v.bytes_c2s,
            v.bytes_s2c)


def batch_sides(table: pa.Table) -> dict[tuple[Key, str, Sig], MeshSide]:
    """The batch's socket records with a `mesh`: (key, observer, view signature) -> side."""
    i = table.schema.get_field_index("extra")
    if i < 0:
        return {}
    extra = table.column(i).combine_chunks()
    rows = np.nonzero(extra_lengths(extra) > MESH_FIELD)[0]
    if not len(rows):
        return {}
    take = pa.array(rows)
    names = ["source", "observer", "protocol", "client_ip", "client_port", "server_ip",
             "server_port", "loopback", "netns", "start_ts", "end_ts", "final", "bytes_c2s",
             "bytes_s2c"]
    cols = {n: (c.cast(pa.int64()) if n.endswith("_ts") else c).to_pylist()
            for n in names for c in [table.column(n).take(take)]}
    blobs = extra.take(take).to_pylist()
    out: dict[tuple[Key, str, Sig], MeshSide] = {}
    for j, blob in enumerate(blobs):
        if cols["source"][j] == "drops":
            continue
        side = mesh.side_from(cols["observer"][j],
                              _mesh_dec.decode(_elements.decode(blob)[MESH_FIELD]))
        if side is None:
            continue
        key = (cols["protocol"][j], cols["client_ip"][j], cols["client_port"][j],
               cols["server_ip"][j], cols["server_port"][j],
               (cols["netns"][j] or 0) if cols["loopback"][j] else 0)
        sig = (cols["start_ts"][j], cols["end_ts"][j], bool(cols["final"][j]),
               cols["bytes_c2s"][j], cols["bytes_s2c"][j])
        out[(key, side.observer, sig)] = side
    return out


class MeshShadow:
    """Per meshed connection held by the C core: observer -> (the view's signature, side)."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, tuple[Sig, MeshSide]]] = {}
        self.pending: dict[str, dict[str, tuple[Sig, MeshSide]]] | None = None

    def plan(self, rows: pa.Table, table: pa.Table) -> pa.Table:
        """The plan's rows with `mesh` (and the meshed rows' `byte_mismatch`) set."""
        self.pending = {}
        batch = batch_sides(table)
        if not len(rows) or (not batch and not self.held):
            return rows
        cand = np.zeros(len(rows), dtype=bool)
        if self.held:
            cand |= pc.is_in(rows.column("conn_id"),
                             value_set=pa.array(list(self.held), pa.string())).to_numpy(
                                 zero_copy_only=False)
        if batch:  # the rows whose (client port, server port) a meshed record has
            pairs = np.array(sorted({k[0][2] * 65536 + k[0][4] for k in batch}), dtype=np.int64)
            pair = (rows.column("client_port").to_numpy().astype(np.int64) * 65536
                    + rows.column("server_port").to_numpy())
            cand |= np.isin(pair, pairs)
        idx = np.nonzero(cand)[0]
        if not len(idx):
            return rows
        texts: list[str | None] = []
        mism: list[bool] = []
        recheck: list[int] = []  # meshed rows the C core found a byte mismatch in
        for j, row in enumerate(rows.select(_ROW_COLUMNS).take(pa.array(idx)).to_pylist()):
            cid = row["conn_id"]
            views = {v.observer: v for v in _views_dec.decode(row["views"]).views}
            key = (row["protocol"], row["client_ip"], row["client_port"], row["server_ip"],
                   row["server_port"], row["scope"])
            old = self.held.get(cid, {})
            new: dict[str, tuple[Sig, MeshSide]] = {}
            for obs in mesh.SIDES:
                v = views.get(obs)
                if v is None:
                    continue
                s = sig_of(v)
                got = batch.get((key, obs, s))
                if got is not None:
                    new[obs] = (s, got)
                elif obs in old and old[obs][0] == s:
                    new[obs] = old[obs]
            if new or cid in self.held:
                self.pending[cid] = new
            text = mesh.stored(_sides(new))
            texts.append(text)
            mism.append(row["byte_mismatch"])
            if text is not None and row["byte_mismatch"]:
                recheck.append(j)
        # the C core compared the wire's bytes too: without them a mismatch can only go
        for j in recheck:
            full = rows.slice(int(idx[j]), 1).to_pylist()[0]
            full["mesh"] = texts[j]
            mism[j] = connection_of(full).summary().byte_mismatch
        mask = np.zeros(len(rows), dtype=bool)
        mask[idx] = True
        out = rows.set_column(rows.schema.get_field_index("mesh"), "mesh", pc.replace_with_mask(
            rows.column("mesh").combine_chunks(), pa.array(mask), pa.array(texts, pa.string())))
        b = out.schema.get_field_index("byte_mismatch")
        return out.set_column(b, "byte_mismatch", pc.replace_with_mask(
            out.column(b).combine_chunks(), pa.array(mask), pa.array(mism, pa.bool_())))

    def held_rows(self, rows: pa.Table) -> pa.Table:
        """Rows of held connections (not a plan's) with their committed `mesh`."""
        if not self.held or not len(rows):
            return rows
        ids = rows.column("conn_id").to_pylist()
        texts = [mesh.stored(_sides(self.held[c])) if c in self.held else None for c in ids]
        return rows.set_column(rows.schema.get_field_index("mesh"), "mesh",
                               pa.array(texts, pa.string()))

    def commit(self) -> None:
        for cid, sides in (self.pending or {}).items():
            if sides:
                self.held[cid] = sides
            else:
                self.held.pop(cid, None)
        self.pending = None

    def rollback(self) -> None:
        self.pending = None

    def forget(self, conn_ids: Iterable[str]) -> None:
        for cid in conn_ids:
            self.held.pop(cid, None)

    def reset(self) -> None:
        self.held.clear()
        self.pending = None

    def load(self, conns: Iterable[Connection]) -> None:
        """Connections loaded into the C core (a restart, a refresh): their stored sides, each
        with the view it came with."""
        for c in conns:
            kept = {s.observer: (sig_of(c.views[s.observer]), s) for s in c.mesh or ()
                    if s.observer in c.views}
            if kept:
                self.held[c.conn_id] = kept
            else:
                self.held.pop(c.conn_id, None)


def _sides(new: dict[str, tuple[Sig, MeshSide]]) -> tuple[MeshSide, ...] | None:
    return tuple(new[o][1] for o in mesh.SIDES if o in new) or None
