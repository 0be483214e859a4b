"""Edge deltas of connections whose names are final: what counters may count, on columns.

Stage: exporters, between the fan-out (aggregator/fanout.py) and the per-edge counters
(prometheus.py, otlp.py). In: each written step's `Changes` (aggregator/changes.py): per touched
connection the increase of its counters, whether the step opened it, its names, and when its
names are final (`names_until_us`, the correlator's settle deadline; 0: final). Out: `released`
tables, one row per connection: its final names (the edge's labels), the counters not told yet,
and whether it opened; the callers sum them per edge.

Why: a connection's names may change for a few seconds after it opened, when an observer that
knows more of an end reports (the server's own process, say). The store and the graph move the
volumes to the new names; a counter cannot move what it counted. So the rows of a connection
whose names may still change are held, by their deadline, and told together under the names of
the connection's latest row once the deadline has passed (on this module's wall clock): every
row of one connection carries the same deadline, and a name never changes after it. The delay
is the correlator's settle time (`--identity-settle`, 10 s by default), about a scrape interval.

Everything is columns: rows are held as small Arrow tables in buckets of 100 ms of deadline; a
due bucket is grouped by connection with numpy. No Python per connection, but for the rare one
whose counters went down (below).

Link-local and multicast connections (eastwest.filters.LINK_LOCAL_NETS) are not told unless
`link_local` (the aggregator's `--export-link-local`): the default views leave them out too.

A counter never goes down: a connection's deltas are negative where its first socket view
arrived behind a wire view (aggregator/correlate.py); what was told stays told, and the decrease
is kept as the connection's debt, paid by its next increases (at most `max_debts` kept, the oldest
forgotten). So a counter may exceed the graph by what the wire saw and the sockets did not count
(retransmitted payload), never fall short.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.changes import Changes
from eastwest.clock import Clock, SystemClock, unix_us
from eastwest.drops import Drops
from eastwest.filters import is_link_local

STAGE = "exporters"
BUCKET_US = 100_000
LABELS = ("client_name", "client_namespace", "server_name", "server_namespace", "server_port",
          "protocol")
COUNTERS = ("c2s", "s2c", "pc2s", "ps2c", "retrans", "resets")
# a released row: the connection, its edge's labels, its counters to tell, opened, moved
RELEASED = pa.schema([("conn_id", pa.string()), *((n, pa.string()) for n in LABELS[:4]),
                      ("server_port", pa.int32()), ("protocol", pa.string()),
                      *((n, pa.int64()) for n in COUNTERS), ("opened", pa.bool_()),
                      ("moved", pa.bool_())])


def link_local_mask(rows: pa.Table) -> np.ndarray:
    """Rows with a link-local or multicast address (one Python call per distinct address)."""
    if rows.num_rows == 0:
        return np.zeros(0, bool)
    out = np.zeros(rows.num_rows, bool)
    for col in ("client_ip", "server_ip"):
        ips = rows.column(col)
        hit = [ip for ip in pc.unique(ips).to_pylist() if ip is not None and is_link_local(ip)]
        if hit:
            out |= pc.is_in(ips, value_set=pa.array(hit, pa.string())).to_numpy(
                zero_copy_only=False)
    return out


def _held_table(ch: Changes, keep: np.ndarray) -> pa.Table:
    rows = ch.rows.filter(pa.array(keep))
    d = ch.deltas[keep]
    return pa.table({
        "conn_id": rows.column("conn_id"),
        **{n: rows.column(n) for n in LABELS},
        **{n: pa.array(d[:, i]) for i, n in enumerate(COUNTERS)},
        "opened": pa.array(ch.created[keep]),
        "moved": pa.array(d.any(axis=1)),
    }, schema=RELEASED)


def by_connection(t: pa.Table) -> pa.Table:
    """One row per connection: counters summed, opened and moved OR-ed, the labels of its
    latest row (rows are in arrival order)."""
    if t.num_rows == 0:
        return t
    enc = pc.dictionary_encode(t.column("conn_id")).combine_chunks()
    idx = enc.indices.to_numpy()
    n = len(enc.dictionary)
    if n == t.num_rows:
        return t
    last = np.zeros(n, np.int64)
    np.maximum.at(last, idx, np.arange(t.num_rows))
    out = t.take(pa.array(last))
    cols = {name: out.column(name) for name in out.column_names}
    for name in COUNTERS:
        v = np.zeros(n, np.int64)
        np.add.at(v, idx, t.column(name).to_numpy())
        cols[name] = pa.array(v)
    for name in ("opened", "moved"):
        v = np.zeros(n, bool)
        np.logical_or.at(v, idx, t.column(name).to_numpy(zero_copy_only=False))
        cols[name] = pa.array(v)
    # `out` is in the order of `last` (dictionary order): the summed columns are too
    return pa.table(cols, schema=RELEASED)


class NamedDeltas:
    def __init__(self, drops: Drops, *, link_local: bool = False, max_debts: int = 200_000,
                 clock: Clock | None = None) -> None:
        self.drops = drops
        self.link_local = link_local
        self.max_debts = max_debts
        self.clock: Clock = clock or SystemClock()
        self._buckets: dict[int, list[pa.Table]] = {}
        self._keys: list[int] = []  # heap of bucket keys
        self._debt: OrderedDict[str, np.ndarray] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def on_changes(self, ch: Changes) -> pa.Table | None:
        """The rows of connections whose names are final now (with every held bucket that is
        due); the rest is held."""
        if len(ch) == 0:
            return self.due()
        keep = ~link_local_mask(ch.rows) if not self.link_local else np.ones(len(ch), bool)
        now = unix_us(self.clock.now())
        out = [self._due(now)]  # held rows first: a connection's rows stay in arrival order
        until = ch.names_until_us
        final = keep & (until <= now)
        # a row without news for a counter is told only when it still may carry new names
        tell = final & (ch.created | ch.deltas.any(axis=1))
        if tell.any():
            out.append(_held_table(ch, tell))
        held = keep & ~final
        if held.any():
            t = _held_table(ch, held)
            keys = (until[held] + BUCKET_US - 1) // BUCKET_US
            with self._lock:
                for key in np.unique(keys):
                    part = t.filter(pa.array(keys == key))
                    bucket = self._buckets.get(int(key))
                    if bucket is None:
                        bucket = self._buckets[int(key)] = []
                        heapq.heappush(self._keys, int(key))
                    bucket.append(part)
                    self._held += part.num_rows
        parts = [t for t in out if t is not None]
        return self._pay(pa.concat_tables(parts)) if parts else None

    def due(self, *, everything: bool = False) -> pa.Table | None:
        """Held connections whose names are final by now (every one with `everything`, at
        shutdown), one row each."""
        got = self._due(None if everything else unix_us(self.clock.now()))
        return None if got is None else self._pay(got)

    def _due(self, now_us: int | None) -> pa.Table | None:
        parts: list[pa.Table] = []
        with self._lock:
            while self._keys and (now_us is None or self._keys[0] * BUCKET_US <= now_us):
                key = heapq.heappop(self._keys)
                got = self._buckets.pop(key)
                parts += got
                self._held -= sum(p.num_rows for p in got)
        if not parts:
            return None
        return by_connection(pa.concat_tables(parts))

    def _pay(self, t: pa.Table) -> pa.Table | None:
        """`t` grouped by connection, with negative counters (and earlier debts) taken from the
        connections' debts: a counter is never told a decrease."""
        if t.num_rows == 0:
            return None
        t = by_connection(t)
        counters = np.stack([t.column(n).to_numpy() for n in COUNTERS], axis=1)
        negative = (counters < 0).any(axis=1)
        if self._debt:
            ids = t.column("conn_id").to_pylist()
            owing = np.fromiter((cid in self._debt for cid in ids), bool, len(ids))
        else:
            owing = np.zeros(t.num_rows, bool)
        fix = np.flatnonzero(negative | owing)
        if len(fix):
            ids = t.column("conn_id").to_pylist()
            for i in fix:
                cid = ids[i]
                net = counters[i] - self._debt.pop(cid, 0)
                left = np.where(net < 0, -net, 0)
                if left.any():
                    if len(self._debt) >= self.max_debts:
                        self._debt.popitem(last=False)
                    self._debt[cid] = left
                counters[i] = np.where(net > 0, net, 0)
            cols = {n: t.column(n) for n in t.column_names}
            for j, n in enumerate(COUNTERS):
                cols[n] = pa.array(counters[:, j])
            t = pa.table(cols, schema=RELEASED)
        return t

    @property
    def pending(self) -> int:
        return self._held
