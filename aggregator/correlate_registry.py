"""The columnar correlator's dictionaries: strings, addresses, workloads and identities -> ids.

Stage: correlation (the Python half of aggregator/correlate_columns.py). Strings never enter the
C core: each distinct value gets a dense integer id here, once (a Python dict lookup per
DISTINCT value of a batch's column, never per record), and the outputs come back as ids that
`take` turns into Arrow columns. Ids are never forgotten (the tables hold what connections may
still refer to); `reset()` of the correlator keeps them.

- `Strings`: collectors, processes, containers, protocols, hosts; with each one's msgpack
  encoding (the C side copies it into the `views` blob).
- `Addresses`: IP addresses, with what correlation needs of each: `ip_hex`, link-local
  (eastwest.filters), the static map's answer when it does not depend on the port, whether the
  port matters (`ip:port` entries, or a resolver with pluggable sources), the VTEP host.
- `Workloads`: the collector-reported workloads, by their msgpack bytes.
- `Identities`: `Identity` values; per id: static or not, the rollup key's (wid, host) id, the
  wid id, the labels' msgpack, and `order`: a total order such that `identity.better(a, b)` is
  exactly `order[a] < order[b]` (rank of the layer, then (wid, host or "")), recomputed when
  new identities appear. No record needs a Python slow path for the tie-break.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from aggregator.connection import Identity
from aggregator.identity import LAYERS, IdentityResolver
from aggregator.store.derived import ip_hex
from eastwest.filters import is_link_local
from eastwest.record import Workload

_enc = msgspec.msgpack.Encoder()
_RANK = {name: i for i, name in enumerate(LAYERS)}
STATIC_NONE, STATIC_BY_PORT = -2, -1  # Addresses.static: no static answer / depends on the port


class _Grow:
    """A growable numpy array (amortised doubling); `view()` the filled part."""

    def __init__(self, dtype: Any, fill: int = 0) -> None:
        self.a = np.full(64, fill, dtype=dtype)
        self.n = 0
        self.fill = fill

    def append(self, values: Any) -> None:
        v = np.asarray(values, dtype=self.a.dtype)
        need = self.n + len(v)
        if need > len(self.a):
            cap = len(self.a)
            while cap < need:
                cap *= 2
            b = np.full(cap, self.fill, dtype=self.a.dtype)
            b[:self.n] = self.a[:self.n]
            self.a = b
        self.a[self.n:need] = v
        self.n = need

    def view(self) -> np.ndarray:
        return self.a[:self.n]


class _Blobs:
    """Byte strings in one buffer with int64 offsets (n + 1): what C reads by id."""

    def __init__(self) -> None:
        self.data = _Grow(np.uint8)
        self.off = _Grow(np.int64)
        self.off.append([0])

    def append(self, b: bytes) -> None:
        self.data.append(np.frombuffer(b, dtype=np.uint8))
        self.off.append([self.data.n])


class _Column:
    """An Arrow array of a per-id attribute, extended when ids are added (for `take`)."""

    def __init__(self, typ: pa.DataType, values: Callable[[int, int], list[Any]]) -> None:
        self.typ = typ
        self.values = values
        self.arrow = pa.array([], typ)

    def get(self, n: int) -> pa.Array:
        have = len(self.arrow)
        if have < n:
            self.arrow = pa.concat_arrays([self.arrow, pa.array(self.values(have, n), self.typ)])
        return self.arrow


def bits(buf: pa.Buffer | None, offset: int, n: int) -> np.ndarray:
    """An Arrow bitmap (validity or booleans) as uint8 0/1 (all 1 without a bitmap)."""
    if buf is None:
        return np.ones(n, dtype=np.uint8)
    return np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=offset + n,
                         bitorder="little")[offset:]


def fixed(col: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """A fixed-width Arrow array's values straight from its buffers (anything where null) and
    its validity (None without nulls): no compute kernel, no copy for numbers."""
    n, off = len(col), col.offset
    bufs = col.buffers()
    valid = bits(bufs[0], off, n) if col.null_count else None
    if pa.types.is_boolean(col.type):
        return bits(bufs[1], off, n), valid
    if pa.types.is_timestamp(col.type):
        if col.type.unit != "us":
            col = col.cast(pa.timestamp("us", tz=col.type.tz))
            return fixed(col)
        dtype = np.dtype(np.int64)
    else:
        dtype = np.dtype(col.type.to_pandas_dtype())
    if n == 0:
        return np.zeros(0, dtype=dtype), valid
    return np.frombuffer(bufs[1], dtype=dtype, count=off + n)[off:], valid


def take(column: pa.Array, ids: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """`column[ids]`, None where `valid` is 0 (or where ids < 0 without `valid`)."""
    mask = valid == 0 if valid is not None else ids < 0
    if not mask.any():
        return column.take(pa.array(ids, type=pa.int64()))
    return column.take(pa.array(np.where(mask, 0, ids), type=pa.int64(), mask=mask))


class Strings:
    """Distinct strings -> dense ids, with each one's msgpack encoding."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.index: dict[str, int] = {}
        self.mp = _Blobs()
        self.column = _Column(pa.string(), lambda a, b: self.values[a:b])

    def __len__(self) -> int:
        return len(self.values)

    def id(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.values)
            self.values.append(s)
            self._added(s)
        return i

    def _added(self, s: str) -> None:
        self.mp.append(_enc.encode(s))

    def opt(self, s: str | None) -> int:
        return -1 if s is None else self.id(s)

    def ids(self, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The ids of a string column (int32, -1 for null): a dict lookup per distinct value."""
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if col.type != pa.string():
            col = col.cast(pa.string())
        d = col.dictionary_encode()
        values = d.dictionary.to_pylist()
        get = self.index.get
        found = [get(v, -2) for v in values]
        if -2 in found:
            found = [self.id(v) for v in values]
        gids = np.array(found + [-1], dtype=np.int32)  # + None: -1
        idx, valid = fixed(d.indices)
        if valid is not None:
            idx = np.where(valid > 0, idx, len(values))
        return gids[idx]

    def arrow(self) -> pa.Array:
        return self.column.get(len(self.values))


class Addresses(Strings):
    """IP addresses -> ids, with their hex text, link-local flag, static answer, VTEP host."""

    def __init__(self, resolver: IdentityResolver, idents: Identities, strings: Strings) -> None:
        super().__init__()
        self.resolver, self.idents, self.strings = resolver, idents, strings
        static = resolver.static
        self._by_port = {ip for ip, _ in static.by_ip_port} if static is not None else set()
        self.link_local = _Grow(np.uint8)
        self.static = _Grow(np.int32)  # identity id, STATIC_BY_PORT or STATIC_NONE
        self.port_matters = _Grow(np.uint8)
        self.vtep_host = _Grow(np.int32)  # string id of `resolver.host_of`, -1: None
        self.hex = _Column(pa.string(), lambda a, b: [ip_hex(ip) for ip in self.values[a:b]])

    def _added(self, ip: str) -> None:
        r = self.resolver
        self.link_local.append([is_link_local(ip)])
        by_port = ip in self._by_port
        self.port_matters.append([by_port or bool(r.sources)])
        hit = r.static.lookup(ip, 0) if r.static is not None and not by_port else None
        self.static.append([STATIC_BY_PORT if by_port else
                            self.idents.id(hit) if hit is not None else STATIC_NONE])
        self.vtep_host.append([self.strings.opt(r.host_of(ip))])

    def hex_arrow(self) -> pa.Array:
        return self.hex.get(len(self.values))


class Workloads:
    """Collector-reported workloads, by their msgpack bytes -> ids."""

    def __init__(self) -> None:
        self.values: list[Workload] = []
        self.index: dict[bytes, int] = {}
        self._dec = msgspec.msgpack.Decoder(Workload)

    def id(self, raw: bytes) -> int:
        i = self.index.get(raw)
        if i is None:
            i = self.index[raw] = len(self.values)
            self.values.append(self._dec.decode(raw))
        return i


def _key(ident: Identity) -> Hashable:
    return (ident.name, ident.namespace, ident.kind, ident.host, ident.source,
            tuple(ident.labels.items()))


class Identities:
    """`Identity` values -> ids, with the per-id tables of `ew_tables`."""

    def __init__(self) -> None:
        self.values: list[Identity] = []
        self.index: dict[Hashable, int] = {}
        self.static = _Grow(np.uint8)
        self.wh = _Grow(np.int32)
        self.wid = _Grow(np.int32)
        self.labels = _Blobs()
        self.order = np.zeros(0, dtype=np.int32)
        self._wh: dict[tuple[str, str], int] = {}
        self._wid: dict[str, int] = {}
        self._sort_key: list[int] = []  # per id: its distinct (rank, wid, host) id
        self._distinct: dict[tuple[int, str, str], int] = {}
        self._sorted: list[tuple[int, str, str]] = []
        self._sorted_ids: list[int] = []
        self._ordered = 0
        self._struct: pa.StructArray | None = None
        get = self.values

        def attr(name: str) -> Callable[[int, int], list[Any]]:
            return lambda a, b: [getattr(i, name) for i in get[a:b]]

        self.columns = {
            "wid": _Column(pa.string(), lambda a, b: [i.wid for i in get[a:b]]),
            "host_or_empty": _Column(pa.string(), lambda a, b: [i.host or "" for i in get[a:b]]),
            "labels_json": _Column(pa.string(), lambda a, b: [
                msgspec.json.encode(i.labels).decode() for i in get[a:b]]),
            **{n: _Column(pa.string(), attr(n))
               for n in ("name", "namespace", "kind", "host", "source")}}

    def __len__(self) -> int:
        return len(self.values)

    def id(self, ident: Identity) -> int:
        k = _key(ident)
        i = self.index.get(k)
        if i is not None:
            return i
        i = self.index[k] = len(self.values)
        self.values.append(ident)
        wid, host = ident.wid, ident.host or ""
        self.static.append([ident.source == "static"])
        self.wh.append([self._wh.setdefault((wid, host), len(self._wh))])
        self.wid.append([self._wid.setdefault(wid, len(self._wid))])
        self.labels.append(_enc.encode(ident.labels or None))
        sk = (_RANK.get(ident.source, len(LAYERS)), wid, host)
        d = self._distinct.get(sk)
        if d is None:
            d = self._distinct[sk] = len(self._distinct)
            at = bisect.bisect_left(self._sorted, sk)
            self._sorted.insert(at, sk)
            self._sorted_ids.insert(at, d)
        self._sort_key.append(d)
        return i

    def ordered(self) -> np.ndarray:
        """`order` for every id (recomputed when identities were added since)."""
        if self._ordered != len(self.values):
            pos = np.empty(len(self._sorted_ids), dtype=np.int32)
            pos[np.asarray(self._sorted_ids, dtype=np.int64)] = np.arange(len(pos), dtype=np.int32)
            self.order = pos[np.asarray(self._sort_key, dtype=np.int64)]
            self._ordered = len(self.values)
        return self.order

    def column(self, name: str) -> pa.Array:
        return self.columns[name].get(len(self.values))

    def struct(self) -> pa.StructArray:
        """wid, name, namespace, kind, host, source of every id, as one array (one `take`)."""
        n = len(self.values)
        if self._struct is None or len(self._struct) != n:
            names = ["wid", "name", "namespace", "kind", "host", "source"]
            self._struct = pa.StructArray.from_arrays([self.column(k) for k in names], names)
        return self._struct
