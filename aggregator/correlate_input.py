"""A batch of flow records as columns -> the C core's input (`ew_input`), with numpy, per batch.

Stage: correlation, before the C plan (aggregator/correlate_columns.py).
In:  a `pyarrow.Table` in the flat layout (aggregator/store/columns.py `FLAT_NAMES` + `extra`),
     plus the records' collectors (a `collector` column, or one for the whole batch).
Out: `Batch`: numpy arrays the C core reads without the GIL (kept alive by the batch), and the
     candidate identity of each end of each record: exactly `Correlator._identity(rec, ip,
     port, side)` (the static map first; the side's own facts only when the record's observer
     is that side), resolved once per DISTINCT fact combination of the batch (numpy `unique`),
     never per record; without pluggable resolver sources, the answers are kept across batches.

Workloads reported in `extra` (columns.Extra, a msgpack array) are found by a C scan of the
blobs (elements 7 and 8 not nil); only those records' workloads are decoded here.

Inputs the C core cannot represent are refused loudly (`InputError`), never approximated:
record times outside 1900..2100 (the join rule's distances must be exact doubles), nulls in
NOT NULL columns, an observer or connect outcome that is not one of the record model's literals,
ports beyond 0..65535, an RTT with only some of its three values, a tunnel without addresses.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from aggregator import service
from aggregator.correlate_drops import DropsInputError, drop_rows
from aggregator.correlate_native import INPUT_ARRAYS, Input
from aggregator.correlate_registry import (
    Addresses,
    Identities,
    Strings,
    Workloads,
    bits,
    fixed,
)
from aggregator.identity import Facts, IdentityResolver
from aggregator.store.columns import NAT_FIELD, extra_lengths
from eastwest.record import Nat, dialled_of

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MIN = (datetime(1900, 1, 1, tzinfo=UTC) - EPOCH).days * 86_400_000_000
TIME_MAX = (datetime(2100, 1, 1, tzinfo=UTC) - EPOCH).days * 86_400_000_000
OBSERVERS = {"client": 0, "server": 1, "path": 2}  # 3: drops rows (aggregator/correlate_drops.py)
CONNECTS = {"ok": 1, "refused": 2, "timeout": 3, "reset": 4}
TUNNEL_TYPES = {"vxlan": 1, "geneve": 2, "vxlan-gpe": 3}  # the C core's codes (0: no tunnel)
KNOWS_OWN_SIDE, KNOWS_CLIENT_WL, KNOWS_SERVER_WL = 1, 2, 4
_CACHE_MAX = 1_000_000
_elements = msgspec.msgpack.Decoder(list[msgspec.Raw])  # an `extra` array, undecoded
_nat_dec = msgspec.msgpack.Decoder(list[Nat] | None)


class InputError(ValueError):
    """A batch the C core cannot represent (the message names the column and the value)."""


@dataclass
class Batch:
    n: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def struct(self, ids: bytes, at_us: int) -> Input:
        s = Input(n=self.n, n_ids=len(ids) // 16, at=at_us)
        for name in INPUT_ARRAYS:
            setattr(s, name, self.arrays[name].ctypes.data)
        self._ids = ids  # alive for the call
        s.ids = ctypes.cast(ctypes.c_char_p(ids), ctypes.c_void_p).value
        return s


def _col(table: pa.Table, name: str) -> pa.Array:
    i = table.schema.get_field_index(name)
    if i < 0:
        raise InputError(f"column {name!r} is missing")
    col = table.column(i)
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _required(table: pa.Table, name: str, dtype: Any) -> np.ndarray:
    values, valid = fixed(_col(table, name))
    if valid is not None:
        raise InputError(f"column {name!r}: null in a NOT NULL column")
    return np.ascontiguousarray(values, dtype=dtype)


def _optional(table: pa.Table, name: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    values, valid = fixed(_col(table, name))
    if valid is None:
        return np.ascontiguousarray(values, dtype=dtype), np.ones(len(values), dtype=np.uint8)
    return np.ascontiguousarray(np.where(valid > 0, values, 0), dtype=dtype), valid


def _codes(table: pa.Table, name: str, codes: dict[str, int], null: int | None) -> np.ndarray:
    d = _col(table, name).cast(pa.string()).dictionary_encode()
    values = d.dictionary.to_pylist()
    bad = [v for v in values if v not in codes]
    if bad:
        raise InputError(f"column {name!r}: {bad[0]!r} is not one of {sorted(codes)}")
    table_ = np.array([codes[v] for v in values] + [null if null is not None else 0],
                      dtype=np.uint8)
    idx, valid = fixed(d.indices)
    if valid is not None:
        if null is None:
            raise InputError(f"column {name!r}: null in a NOT NULL column")
        idx = np.where(valid > 0, idx, len(values))
    return np.ascontiguousarray(table_[idx])


class Preparer:
    """Turns batches into `Batch`es against one correlator's dictionaries."""

    def __init__(self, lib: ctypes.CDLL, resolver: IdentityResolver, strings: Strings,
                 addrs: Addresses, idents: Identities, workloads: Workloads) -> None:
        self.lib, self.resolver = lib, resolver
        self.strings, self.addrs, self.idents, self.workloads = strings, addrs, idents, workloads
        self._cache: dict[tuple[int, ...], int] = {}
        self.resolver_calls = 0  # resolutions asked of the resolver (tests: per distinct facts)

    def prepare(self, table: pa.Table, collector: str | None) -> Batch:
        try:
            expansion = drop_rows(table)  # drops records: one row per reason, applied below
        except DropsInputError as exc:
            raise InputError(f"column 'extra': {exc}") from None
        n = table.num_rows
        b = Batch(n)
        a = b.arrays
        S, A = self.strings, self.addrs
        start = _required(table, "start_ts", np.int64)
        end = _required(table, "end_ts", np.int64)
        if n and (min(start.min(), end.min()) < TIME_MIN or max(start.max(), end.max()) >= TIME_MAX):
            raise InputError("start_ts/end_ts: record times must lie in 1900..2100 (the join "
                             "rule's distances are exact only there)")
        a["start"], a["end"] = start, end
        a["order"] = np.ascontiguousarray(np.argsort(end, kind="stable"), dtype=np.int64)
        for name in ("final", "loopback", "incomplete"):
            a[name] = _required(table, name, np.uint8)
        a["observer"] = obs = _codes(table, "observer", OBSERVERS, None)
        a["connect"] = _codes(table, "connect", CONNECTS, 0)
        a["family"] = _required(table, "family", np.int8)
        a["protocol"] = np.ascontiguousarray(S.ids(_col(table, "protocol")))
        if table.schema.get_field_index("collector") >= 0:
            coll = S.ids(_col(table, "collector"))
            if (coll < 0).any():
                raise InputError("column 'collector': null in a NOT NULL column")
        elif collector is not None:
            coll = np.full(n, S.id(collector), dtype=np.int32)
        else:
            raise InputError("no 'collector' column and no collector given for the batch")
        a["collector"] = coll
        for side in ("client", "server"):
            ip = A.ids(_col(table, f"{side}_ip"))
            if (ip < 0).any():
                raise InputError(f"column '{side}_ip': null in a NOT NULL column")
            port = _required(table, f"{side}_port", np.int32)
            if n and (port.min() < 0 or port.max() > 65535):
                raise InputError(f"column '{side}_port': ports are 0..65535")
            a["cip" if side == "client" else "sip"] = ip
            a["cport" if side == "client" else "sport"] = port
        for name, src in (("b_c2s", "bytes_c2s"), ("b_s2c", "bytes_s2c"),
                          ("retrans", "retransmits"), ("resets", "resets")):
            a[name] = _required(table, src, np.int64)
        a["p_c2s"], a["has_p_c2s"] = _optional(table, "packets_c2s", np.int64)
        a["p_s2c"], a["has_p_s2c"] = _optional(table, "packets_s2c", np.int64)
        rtt = [_optional(table, f"rtt_{k}_us", np.int64) for k in ("min", "avg", "max")]
        if not (np.array_equal(rtt[0][1], rtt[1][1]) and np.array_equal(rtt[0][1], rtt[2][1])):
            raise InputError("rtt_min_us/rtt_avg_us/rtt_max_us: all three or none")
        a["rtt_min"], a["rtt_avg"], a["rtt_max"] = (r[0] for r in rtt)
        a["has_rtt"] = rtt[0][1]
        a["pid"], a["has_pid"] = _optional(table, "pid", np.int64)
        a["netns"], a["has_netns"] = _optional(table, "netns", np.int64)
        a["comm"] = S.ids(_col(table, "comm"))
        a["container"] = cont = S.ids(_col(table, "container"))
        a["scope"] = np.where(a["loopback"].astype(bool), a["netns"], 0).astype(np.int64)
        vni, has_vni = _optional(table, "vni", np.int32)
        outer = [A.ids(_col(table, name)) for name in ("outer_src", "outer_dst")]
        has_vni = has_vni.astype(bool)
        if has_vni.any() and ((vni[has_vni] < 0).any() or (outer[0][has_vni] < 0).any()
                              or (outer[1][has_vni] < 0).any()):
            raise InputError("vni/outer_src/outer_dst: a tunnel needs a VNI >= 0 and both "
                             "outer addresses")
        a["vni"] = np.where(has_vni, vni, -1).astype(np.int32)
        # a tunnel's type; a row without one (stored before the column existed) is VXLAN
        ttype = (_codes(table, "tunnel_type", TUNNEL_TYPES, 0)
                 if table.schema.get_field_index("tunnel_type") >= 0 else np.zeros(n, np.uint8))
        a["tunnel_type"] = np.where(has_vni, np.maximum(ttype, 1), 0).astype(np.uint8)
        a["outer_src"], a["outer_dst"] = outer
        host = A.vtep_host.view()
        for name, ips in (("vtep_src_host", outer[0]), ("vtep_dst_host", outer[1])):
            a[name] = np.where(has_vni, host[np.maximum(ips, 0)], -1).astype(np.int32)
        ll = A.link_local.view()
        a["link_local"] = (ll[a["cip"]] | ll[a["sip"]]).astype(np.uint8)
        wl_c, wl_s = self._reported(table)
        empty = S.index.get("", -2)
        own = a["has_pid"].astype(bool) | ((cont >= 0) & (cont != empty))
        a["knows"] = (own * KNOWS_OWN_SIDE + (wl_c >= 0) * KNOWS_CLIENT_WL
                      + (wl_s >= 0) * KNOWS_SERVER_WL).astype(np.uint8)
        for side, code, wl in (("client", 0, wl_c), ("server", 1, wl_s)):
            ip, port = (a["cip"], a["cport"]) if side == "client" else (a["sip"], a["sport"])
            a[f"cand_{side}"] = self._candidates(ip, port, obs == code, a["has_pid"].astype(bool),
                                                 a["comm"], cont, coll, wl, start)
        a["svc_ip"], a["svc_port"], a["svc_rank"] = self._dialled(table)
        if expansion is None:
            a["reason"] = np.full(n, -1, dtype=np.int32)
        else:
            expansion.apply(a, skip=("order",))
            a["reason"] = S.ids(pa.array(expansion.reasons, pa.string()))
            a["order"] = np.argsort(a["end"], kind="stable").astype(np.int64)
            b.n = len(expansion.idx)
        for name in INPUT_ARRAYS:
            a[name] = np.ascontiguousarray(a[name])
        return b

    # -- the dialled Service address (`nat` in `extra`) ---------------------------------------
    def _dialled(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per record: the dialled address's id (-1: none), port and rank (aggregator/service.py).
        Only an `extra` of more than 14 elements holds `nat` (trailing Nones are left off,
        columns.Extra; its header says: columns.extra_lengths): just those blobs are decoded."""
        n = table.num_rows
        ip = np.full(n, -1, dtype=np.int32)
        port = np.zeros(n, dtype=np.int32)
        rnk = np.zeros(n, dtype=np.int64)
        extra = _col(table, "extra")
        if extra.null_count == n:
            return ip, port, rnk
        if extra.type != pa.binary():
            extra = extra.cast(pa.binary())
        _, offsets, data = extra.buffers()
        if data is None:
            return ip, port, rnk
        off = np.frombuffer(offsets, dtype=np.int32)[extra.offset:extra.offset + n + 1]
        for r in np.nonzero(extra_lengths(extra) > NAT_FIELD)[0].tolist():
            try:  # only `nat` is decoded (a record's `mesh` after it is left as it is)
                nat = _nat_dec.decode(_elements.decode(memoryview(data)[off[r]:off[r + 1]])[
                    NAT_FIELD])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise InputError(f"column 'extra': row {r}: {exc}") from None
            d = dialled_of(nat)
            if d is not None:
                ip[r], port[r], rnk[r] = self.addrs.id(d.ip), d.port, service.rank(d.ip, d.port)
        return ip, port, rnk

    # -- workloads reported in `extra` ------------------------------------------------------
    def _reported(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        n = table.num_rows
        wl = np.full((2, n), -1, dtype=np.int32)
        extra = _col(table, "extra")
        if extra.null_count == n:
            return wl[0], wl[1]
        if extra.type != pa.binary():
            extra = extra.cast(pa.binary())
        vbuf, offsets, data = extra.buffers()
        valid = np.ascontiguousarray(bits(vbuf, extra.offset, n))
        out = np.empty((n, 4), dtype=np.int64)
        bad = ctypes.c_int64(-1)
        found = self.lib.ew_corr_scan_extra(
            n, valid.ctypes.data, offsets.address + 4 * extra.offset,
            data.address if data is not None else 0, out.ctypes.data, ctypes.byref(bad))
        if found < 0:
            raise InputError(f"column 'extra': row {bad.value} is not a msgpack array")
        if found:
            assert data is not None  # a workload was found in it
            raw = memoryview(data)
            for r in np.nonzero((out[:, 0] >= 0) | (out[:, 2] >= 0))[0].tolist():
                for k in (0, 1):
                    off, size = int(out[r, 2 * k]), int(out[r, 2 * k + 1])
                    if off < 0:
                        continue
                    try:
                        wl[k, r] = self.workloads.id(bytes(raw[off:off + size]))
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        raise InputError(f"column 'extra': row {r}: workload: {exc}") from None
        return wl[0], wl[1]

    # -- what each record's observer knows of an end ------------------------------------------
    def _candidates(self, ip: np.ndarray, port: np.ndarray, is_side: np.ndarray,
                    has_pid: np.ndarray, comm: np.ndarray, cont: np.ndarray, coll: np.ndarray,
                    wl: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Per record, the identity `Correlator._identity` gives for this end: by address alone
        where the static map answers whatever the port, else per distinct facts. With pluggable
        sources (Kubernetes: an address's owner depends on the time, pod IPs are reused) the
        record's start is one of the facts: one resolution per distinct (facts, start), about
        one per connection of the batch, as the reference correlator does."""
        A = self.addrs
        cand = A.static.view()[ip]
        need = np.nonzero(cand < 0)[0]
        if not len(need):
            return np.ascontiguousarray(cand, dtype=np.int32)
        cand = cand.astype(np.int32, copy=True)
        ipn, side = ip[need], is_side[need]
        keys = np.stack([ipn, np.where(A.port_matters.view()[ipn] > 0, port[need], -1),
                         wl[need], np.where(side & has_pid[need], comm[need], -1),
                         np.where(side, cont[need], -1), np.where(side, coll[need], -1),
                         start[need] if self.resolver.sources else np.zeros(len(need), np.int64)],
                        axis=1).astype(np.int64)
        uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        cache = self._cache if not self.resolver.sources else {}
        if len(cache) > _CACHE_MAX:
            cache.clear()
        ids = np.empty(len(uniq), dtype=np.int32)
        for j, key in enumerate(map(tuple, uniq.tolist())):
            got = cache.get(key)
            if got is None:
                got = cache[key] = self._resolve(key, int(port[need[first[j]]]))
            ids[j] = got
        cand[need] = ids[inverse.reshape(-1)]
        return cand

    def _resolve(self, key: tuple[int, ...], port: int) -> int:
        ip_id, _, wl, comm, cont, coll, start_us = key
        S, ip = self.strings.values, self.addrs.values[ip_id]
        static = self.resolver.static
        hit = static.lookup(ip, port) if static is not None else None
        if hit is not None:
            return self.idents.id(hit)
        workload = self.workloads.values[wl] if wl >= 0 else None
        facts = Facts(workload, S[comm] if comm >= 0 else None, S[cont] if cont >= 0 else None,
                      S[coll]) if coll >= 0 else Facts(workload)
        self.resolver_calls += 1
        at = EPOCH + timedelta(microseconds=start_us) if self.resolver.sources else None
        return self.idents.id(self.resolver.resolve(ip, port, facts, at))
