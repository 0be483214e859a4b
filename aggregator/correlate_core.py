"""The C correlator's state behind a Python object: batches in, `ColumnPlan`s out.

Stage: correlation (the native engine of aggregator/correlate_columns.py `ColumnCorrelator`).
In:  tables in the flat layout (aggregator/correlate_input.py), connections to load.
Out: `ColumnPlan`s (aggregator/correlate_plan.py); the held connections as `Connection`s.

One C state (aggregator/correlate_native.c) per correlator, used under the correlator's lock;
every C call runs without the GIL. A plan changes the state at once; `commit` keeps it,
`rollback` undoes it exactly (a failed store write leaves memory as it was). A plan that is
neither committed nor rolled back is rolled back by the next `plan` (the reference simply drops
such a plan); committing it after that is refused (`StalePlan`).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, TypeVar

import numpy as np
import pyarrow as pa

from aggregator import correlate_native as native
from aggregator import service
from aggregator.connection import Connection
from aggregator.correlate_input import TIME_MAX, TIME_MIN, TUNNEL_TYPES, InputError, Preparer
from aggregator.correlate_mesh import MeshShadow
from aggregator.correlate_plan import EMPTY_ROWS, ColumnPlan, Columns
from aggregator.correlate_registry import Addresses, Identities, Strings, Workloads
from aggregator.identity import IdentityResolver
from aggregator.store.columns import FLAT_COLUMNS, flat_table
from aggregator.store.derived import connection_of
from eastwest.record import FlowRecord

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_OBS = {"client": 0, "server": 1, "path": 2, "drops": 3}
_CONNECT = {None: 0, "ok": 1, "refused": 2, "timeout": 3, "reset": 4}
_CHUNK = 100_000  # connections per `rows` call when materializing them all
# after a prune, the dictionaries are compacted once they hold more entries than this many
# per connection held (and more than COMPACT_MIN)
COMPACT_MIN, COMPACT_FACTOR = 200_000, 8
IdSource = Callable[[int], bytes]  # n -> 16 * n bytes: the next n connection ids
Key = tuple[str, str, int, str, int, int]  # protocol, client ip, port, server ip, port, scope
T = TypeVar("T")


_FLAT_EMPTY = pa.schema([(n, t) for n, t, _ in FLAT_COLUMNS] + [("extra", pa.binary()),
                                                                 ("collector", pa.string())])


class Counters(NamedTuple):
    held: int  # committed connections
    renames: int
    late_names: int
    high_water: datetime | None


class StalePlan(RuntimeError):
    """A plan that is no longer the pending one was committed or rolled back."""


class NativeError(RuntimeError):
    """The C core refused (out of memory, a broken invariant)."""


def us(t: datetime) -> int:
    return (t - EPOCH) // _US


def time_of(t_us: int) -> datetime:
    return EPOCH + timedelta(microseconds=t_us)


def random_ids(n: int) -> bytes:
    """n version-4 UUIDs (RFC 4122 section 4.4), 16 bytes each, from one `os.urandom` call."""
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    return raw.tobytes()


class NativeCore:
    def __init__(self, lib: ctypes.CDLL, layout: native.Layout, resolver: IdentityResolver, *,
                 slack: int, keep_closed: int, keep_open: int, settle: int,
                 ids: IdSource | None = None) -> None:
        self.lib, self.layout = lib, layout
        self.st = lib.ew_corr_new()
        if not self.st:
            raise MemoryError("the native correlator could not allocate its state")
        weakref.finalize(self, lib.ew_corr_free, self.st)
        lib.ew_corr_configure(self.st, slack, keep_closed, keep_open, settle)
        self.resolver = resolver
        self._dictionaries(Strings(), Identities())
        self.ids: IdSource = ids or random_ids
        self._pool = b""
        self.settled: list[str] = []
        self._token = 0
        self.pending = 0  # the token of the pending plan, 0: none
        self.mesh = MeshShadow()  # the meshed connections' sides (aggregator/correlate_mesh.py)

    def _dictionaries(self, strings: Strings, idents: Identities,
                      addrs: Addresses | None = None, resolver_calls: int = 0) -> None:
        self.strings, self.idents = strings, idents
        self.addrs = addrs or Addresses(self.resolver, idents, strings)
        self.workloads = Workloads()
        self.prep = Preparer(self.lib, self.resolver, strings, self.addrs, idents, self.workloads)
        self.prep.resolver_calls = resolver_calls
        self.columns = Columns(strings, self.addrs, idents)

    def compact(self) -> None:
        """Forget the dictionaries' entries no held connection refers to (a long-running
        aggregator keeps seeing new client addresses and containers): they are rebuilt from the
        used ones and the C core's ids remapped."""
        S, A, idn = self.strings, self.addrs, self.idents
        used = [np.zeros(n + 1, dtype=np.uint8) for n in (len(S), len(A), len(idn))]
        self._check(self.lib.ew_corr_used(self.st, *(u.ctypes.data for u in used)))
        strings, idents = Strings(), Identities()
        addrs = Addresses(self.resolver, idents, strings)
        ms = _id_map(S.values, used[0], strings.id)
        mi = _id_map(idn.values, used[2], idents.id)
        ma = _id_map(A.values, used[1], addrs.id)
        self._check(self.lib.ew_corr_remap(self.st, ms.ctypes.data, ma.ctypes.data,
                                           mi.ctypes.data))
        self._dictionaries(strings, idents, addrs, self.prep.resolver_calls)

    def _maybe_compact(self) -> None:
        held = len(self.strings) + len(self.addrs) + len(self.idents)
        if held > max(COMPACT_MIN, COMPACT_FACTOR * self.info()[0]):
            self.compact()

    # -- plumbing ---------------------------------------------------------------------------
    def _tables(self) -> native.Tables:
        idn, S = self.idents, self.strings
        self._keep = (idn.ordered(), idn.wh.view(), idn.wid.view(), idn.static.view(),
                      idn.labels.off.view(), idn.labels.data.a, S.mp.off.view(), S.mp.data.a)
        k = self._keep
        return native.Tables(
            n_idents=len(idn), id_order=k[0].ctypes.data, id_wh=k[1].ctypes.data,
            id_wid=k[2].ctypes.data, id_static=k[3].ctypes.data, id_labels=k[4].ctypes.data,
            labels=k[5].ctypes.data, n_strs=len(S), str_off=k[6].ctypes.data,
            str_mp=k[7].ctypes.data)

    def info(self) -> list[int]:
        out = (ctypes.c_int64 * 16)()
        self.lib.ew_corr_info(self.st, out)
        return list(out)

    def _check(self, rc: int) -> int:
        if rc < 0:
            why = self.lib.ew_corr_error(self.st).decode()
            if rc == native.E_OVERFLOW:
                raise OverflowError(why)
            if rc == native.E_INPUT:
                raise InputError(why)
            raise NativeError(why)
        return rc

    def _draw(self, n: int) -> bytes:
        """At least n connection ids: what is left of the last draw, then fresh ones."""
        missing = n - len(self._pool) // 16
        if missing > 0:
            fresh = self.ids(missing)
            if len(fresh) != 16 * missing:
                raise ValueError(f"the id source gave {len(fresh)} bytes for {missing} ids")
            self._pool += fresh
        return self._pool

    def _drain(self) -> None:
        n = self.lib.ew_corr_nsettled(self.st)
        if n:
            buf = np.empty(32 * n, dtype=np.uint8)
            got = self.lib.ew_corr_settled(self.st, buf.ctypes.data, n)
            offsets = pa.py_buffer(np.arange(got + 1, dtype=np.int32) * 32)
            gone = pa.Array.from_buffers(pa.string(), got, [
                None, offsets, pa.py_buffer(buf)]).to_pylist()
            self.settled.extend(gone)
            self.mesh.forget(gone)

    # -- a plan -----------------------------------------------------------------------------
    def plan(self, table: pa.Table, collector: str | None, at: datetime) -> ColumnPlan:
        if self.pending:
            self.rollback_pending()
        batch = self.prep.prepare(table, collector)
        tables = self._tables()
        pool = self._draw(batch.n)
        inp = batch.struct(pool, us(at))
        n = self._check(self.lib.ew_corr_plan(self.st, ctypes.byref(inp), ctypes.byref(tables)))
        self._token += 1
        self.pending = self._token
        info = self.info()
        self._pool = pool[16 * info[10]:]
        try:
            plan = self._outputs(n, info[9], at, tables)
            plan.rows = self.mesh.plan(plan.rows, table)
            return plan
        except BaseException:
            self.rollback_pending()
            raise

    def _rows(self, which: int, start: int, stop: int,
              tables: native.Tables) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        n = stop - start
        ncol = len(self.layout.out)
        out = np.empty((ncol, n), dtype=np.int64)
        ok = np.empty((ncol, n), dtype=np.uint8)
        hex_ids = np.empty(32 * n, dtype=np.uint8)
        blob_end = np.empty(n + 1, dtype=np.int32)
        size = self._check(self.lib.ew_corr_rows(
            self.st, which, start, stop, ctypes.byref(tables), out.ctypes.data, ok.ctypes.data,
            hex_ids.ctypes.data, blob_end.ctypes.data))
        blobs = pa.allocate_buffer(max(size, 1))
        self.lib.ew_corr_blob(self.st, blobs.address)
        rows = self.columns.rows(out, ok, hex_ids.tobytes(), blobs, blob_end, self.layout.out)
        if which == 1:  # held connections (a plan's rows get theirs in `plan`)
            rows = self.mesh.held_rows(rows)
        return rows, out, ok

    def _outputs(self, n: int, nru: int, at: datetime, tables: native.Tables) -> ColumnPlan:
        col = self.layout.out
        if n:
            rows, out, ok = self._rows(0, 0, n, tables)
        else:
            rows = EMPTY_ROWS
            out, ok = np.zeros((len(col), 0), np.int64), np.zeros((len(col), 0), np.uint8)
        until, named = out[col["UNTIL"]], ok[col["UNTIL"]] > 0
        final_in = np.where(named, (until - us(at)) / 1e6, 0.0)
        rollups = workloads = None
        if nru:
            ru = np.empty((len(self.layout.ru), nru), dtype=np.int64)
            k = self._check(self.lib.ew_corr_rollups(self.st, ru.ctypes.data, nru))
            if k:
                rollups = self.columns.rollups(ru[:, :k], self.layout.ru)
        if n:
            wl = np.empty((len(self.layout.wl), 2 * n), dtype=np.int64)
            k = self._check(self.lib.ew_corr_workloads(self.st, ctypes.byref(tables),
                                                       wl.ctypes.data, 2 * n))
            workloads = self.columns.workloads(wl[:, :k], self.layout.wl)
        d0 = col["D0"]
        return ColumnPlan(
            at=at, rows=rows, created=out[col["CREATED"]].astype(bool),
            renamed=out[col["RENAMED"]].astype(bool), has_delta=out[col["HAS_DELTA"]].astype(bool),
            deltas=np.ascontiguousarray(out[d0:d0 + 6].T), names_final_in_s=final_in,
            rollups=rollups, workloads=workloads, token=self.pending)

    def plan_records(self, records: Sequence[FlowRecord], at: datetime) -> ColumnPlan:
        """`plan` of `flat_table(records)` with each record's collector."""
        if not records:
            return self.plan(_FLAT_EMPTY.empty_table(), None, at)
        table = flat_table(records).append_column(
            "collector", pa.array([r.collector for r in records], pa.string()))
        return self.plan(table, None, at)

    def counters(self) -> Counters:
        info = self.info()
        return Counters(info[0] - info[13], info[11], info[12],
                        time_of(info[5]) if info[6] else None)

    def stats(self) -> dict[str, int]:
        info = self.info()
        return {"connections": info[0], "views": info[1], "volumes": info[2], "keys": info[3],
                "bytes": info[4], "resolver_calls": self.prep.resolver_calls}

    def _own(self, plan: ColumnPlan) -> None:
        if not self.pending or plan.token != self.pending:
            raise StalePlan("this plan is not the pending one (a later plan replaced it, or it "
                            "was committed or rolled back already)")

    def commit(self, plan: ColumnPlan) -> None:
        self._own(plan)
        self.pending = 0
        self.mesh.commit()
        if self._check(self.lib.ew_corr_commit(self.st)):
            self._drain()
            self._maybe_compact()

    def rollback(self, plan: ColumnPlan) -> None:
        self._own(plan)
        self.rollback_pending()

    def rollback_pending(self) -> None:
        if self.pending:
            self.pending = 0
            self.mesh.rollback()
            self._check(self.lib.ew_corr_rollback(self.st))

    def prune(self) -> int:
        if self.pending:
            raise RuntimeError("prune while a plan is pending: commit or roll it back first")
        gone = self._check(self.lib.ew_corr_prune(self.st))
        self._drain()
        self._maybe_compact()
        return gone

    def reset(self) -> None:
        self.pending = 0
        self.mesh.reset()
        self.lib.ew_corr_reset(self.st)
        del self.settled[:]

    # -- connections in and out ---------------------------------------------------------------
    def connections(self) -> list[Connection]:
        """Every held connection, in index order (keys as they entered, then bucket order)."""
        self.rollback_pending()
        n = self._check(self.lib.ew_corr_select_all(self.st))
        tables = self._tables()
        out: list[Connection] = []
        for start in range(0, n, _CHUNK):
            rows, _, _ = self._rows(1, start, min(n, start + _CHUNK), tables)
            out.extend(connection_of(row) for row in rows.to_pylist())
        return out

    def connections_of(self, key: Key) -> list[Connection]:
        """The held connections of one key, in bucket order (aggregator/nodeport.py)."""
        self.rollback_pending()
        protocol, cip, cport, sip, sport, scope = key
        if (protocol not in self.strings.index or cip not in self.addrs.index
                or sip not in self.addrs.index):
            return []
        k = np.array([self.strings.id(protocol), self.addrs.id(cip), cport,
                      self.addrs.id(sip), sport, scope], dtype=np.int64)
        n = self._check(self.lib.ew_corr_select_key(self.st, k.ctypes.data))
        if not n:
            return []
        rows, _, _ = self._rows(1, 0, n, self._tables())
        if self.mesh.held:  # a meshed half keeps its sides through the merge
            rows = self.mesh.held_rows(rows)
        return [connection_of(row) for row in rows.to_pylist()]

    def _key_ids(self, key: Key) -> np.ndarray:
        protocol, cip, cport, sip, sport, scope = key
        return np.array([self.strings.id(protocol), self.addrs.id(cip), cport,
                         self.addrs.id(sip), sport, scope], dtype=np.int64)

    def take_out(self, key: Key, conn_id: str) -> tuple[list[Connection], int]:
        """Forget one connection of a key (a merged NodePort half), the others keeping their
        order and the key its place; (the key's connections before, the key's seq) to put back."""
        conns = self.connections_of(key)
        k = self._key_ids(key)
        seq = self._check(self.lib.ew_corr_drop_key(self.st, k.ctypes.data))
        self.mesh.forget([conn_id])
        left = [c for c in conns if c.conn_id != conn_id]
        if left:
            self.load(left)
            if seq:
                self._check(self.lib.ew_corr_key_seq(self.st, k.ctypes.data, seq))
        return conns, seq

    def put_back(self, key: Key, conns: list[Connection], seq: int) -> None:
        """Undo `take_out`: the key's connections as they were, at the key's place."""
        self.rollback_pending()
        k = self._key_ids(key)
        self._check(self.lib.ew_corr_drop_key(self.st, k.ctypes.data))
        if conns:
            self.load(conns)
            if seq:
                self._check(self.lib.ew_corr_key_seq(self.st, k.ctypes.data, seq))

    def refresh(self, fresh: Mapping[Key, list[Connection]]) -> None:
        """Replace what is held of these keys by these connections (Correlator.refresh: a
        store shared by several aggregators); a key keeps its place in the index's order."""
        self.rollback_pending()
        for key, conns in fresh.items():
            if any(c.key != key for c in conns):
                raise InputError(f"refresh: a connection of another key under {key}")
            protocol, cip, cport, sip, sport, scope = key
            k = np.array([self.strings.id(protocol), self.addrs.id(cip), cport,
                          self.addrs.id(sip), sport, scope], dtype=np.int64)
            if self.mesh.held:  # the key's connections held before: replaced by `conns`
                self.mesh.forget(c.conn_id for c in self.connections_of(key))
            seq = self._check(self.lib.ew_corr_drop_key(self.st, k.ctypes.data))
            if conns:
                self.load(conns)
                if seq:
                    self._check(self.lib.ew_corr_key_seq(self.st, k.ctypes.data, seq))

    def load(self, connections: Iterable[Connection]) -> int:
        self.rollback_pending()
        conns = list(connections)
        if not conns:
            return 0
        self.mesh.load(conns)
        ld, lv, lm, ids = _load_matrices(self, conns)
        args = [np.ascontiguousarray(x) for x in (*ld, *lv, lm)]
        self._keep_load = args
        return self._check(self.lib.ew_corr_load(
            self.st, len(conns), ids, args[0].ctypes.data, args[1].ctypes.data, lv[0].shape[1],
            args[2].ctypes.data, args[3].ctypes.data, lm.shape[1], args[4].ctypes.data))


def _id_map(values: Sequence[T], used: np.ndarray, intern: Callable[[T], int]) -> np.ndarray:
    """old id -> new id (-1: dropped) of the used values, interned anew in id order."""
    m = np.full(len(values) + 1, -1, dtype=np.int32)
    for i in np.flatnonzero(used[:len(values)]).tolist():
        m[i] = intern(values[i])
    return m


def _checked_time(t: datetime, what: str) -> int:
    v = us(t)
    if not TIME_MIN <= v < TIME_MAX:
        raise InputError(f"{what} {t.isoformat()}: times must lie in 1900..2100")
    return v


def _tunnel_code(name: str) -> int:
    code = TUNNEL_TYPES.get(name)
    if code is None:
        raise InputError(f"tunnel type {name!r}: not one of {sorted(TUNNEL_TYPES)}")
    return code


def _matrix(rows: list[list[int | None]], ncol: int) -> tuple[np.ndarray, np.ndarray]:
    """Row lists with None -> (values, validity), both column-major (ncol x n)."""
    if not rows:
        return np.zeros((ncol, 0), np.int64), np.zeros((ncol, 0), np.uint8)
    ok = np.array([[x is not None for x in r] for r in rows], dtype=np.uint8).T
    values = np.array([[0 if x is None else x for x in r] for r in rows], dtype=np.int64).T
    return values, ok


def _load_matrices(core: NativeCore, conns: list[Connection]) -> tuple[
        tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray, bytes]:
    S, A, idn = core.strings, core.addrs, core.idents
    ll = A.link_local
    rows: list[list[int | None]] = []
    views: list[list[int | None]] = []
    vols: list[list[int]] = []
    ids = bytearray()
    for c in conns:
        try:
            raw = bytes.fromhex(c.conn_id)
        except ValueError:
            raw = b""
        if len(raw) != 16:
            raise InputError(f"conn_id {c.conn_id!r}: not 32 hex digits")
        ids += raw
        cip, sip = A.id(c.client_ip), A.id(c.server_ip)
        row: list[int | None] = [
            S.id(c.protocol), c.family, cip, c.client_port, sip, c.server_port, c.scope,
            idn.id(c.client), idn.id(c.server), int(ll.view()[cip] | ll.view()[sip]),
            us(c.naming.until) if c.naming is not None else None]
        for p in (c.client_proc, c.server_proc):
            row += [None] * 6 if p is None else [
                1, p.pid, S.opt(p.comm), p.netns, S.opt(p.container), S.opt(p.collector)]
        t = c.tunnel
        row += [None] * 6 if t is None else [
            t.vni, A.id(t.vtep_src), A.id(t.vtep_dst), S.opt(t.vtep_src_host),
            S.opt(t.vtep_dst_host), _tunnel_code(t.type)]
        vol = c.naming.volumes if c.naming is not None else ()
        row += [len(c.views), len(vol)]
        row += [None] * 3 if c.service_ip is None else [
            A.id(c.service_ip), c.service_port, service.rank(c.service_ip, c.service_port or 0)]
        rows.append(row)
        for v in c.views.values():
            rtt = v.rtt or (None, None, None)
            views.append([_OBS[v.observer], S.id(v.collector), _checked_time(v.start, "start"),
                          _checked_time(v.end, "end"), int(v.final), v.bytes_c2s, v.bytes_s2c,
                          v.packets_c2s, v.packets_s2c, v.retransmits, v.resets,
                          _CONNECT[v.connect], *rtt, int(v.incomplete),
                          S.id(v.reason) if v.reason is not None else None])
        for minute, counters in vol:
            vols.append([us(minute), *counters])
    lm = np.array(vols, dtype=np.int64).reshape(-1, native.LM_NCOL).T
    return (_matrix(rows, len(core.layout.ld)), _matrix(views, len(core.layout.lv)),
            np.ascontiguousarray(lm), bytes(ids))
