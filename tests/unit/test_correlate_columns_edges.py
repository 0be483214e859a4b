"""The columnar correlator at its edges: no Python call per record on the common path (the
resolver is asked per distinct facts, reported workloads are decoded only where a record has
one), loud failures for inputs the C core cannot represent (and the state left as it was),
stale plans refused, ids like the reference's, the switch that disables the C core."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta

import msgspec
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import correlate_registry
from aggregator.correlate_columns import ColumnCorrelator
from aggregator.correlate_core import StalePlan
from aggregator.correlate_input import InputError
from aggregator.identity import IdentityResolver, StaticMap
from aggregator.store.columns import flat_table
from eastwest.record import Endpoint, FlowRecord, Process, Workload
from tests.unit.correlate_workloads import Wall, counter
from tests.unit.test_correlate import T0, rec
from tests.unit.test_store_columns import records

pytestmark = pytest.mark.skipif(not ColumnCorrelator(IdentityResolver()).native,
                                reason="the native correlator is not built here")


def new_records(n: int, collectors: int = 2, comms: int = 7) -> list[FlowRecord]:
    """Every record a connection of its own (its own client port), as bench_store's `new`."""
    return [FlowRecord(
        record_id=f"c{i % collectors}:{i}", collector=f"c{i % collectors}", source="socket",
        start=T0 + timedelta(milliseconds=i), end=T0 + timedelta(milliseconds=i + 900),
        final=True, protocol="tcp", family=4, client=Endpoint(f"10.0.{i % 5}.1", 20000 + i),
        server=Endpoint(f"10.1.{i % 3}.1", 80), observer="client", bytes_c2s=i, bytes_s2c=1,
        process=Process(100 + i % comms, f"app-{i % comms}")) for i in range(n)]


def counted(resolver: IdentityResolver) -> list[int]:
    calls = [0]
    real = resolver.resolve

    def resolve(*a: object, **kw: object) -> object:
        calls[0] += 1
        return real(*a, **kw)  # type: ignore[arg-type]

    resolver.resolve = resolve  # type: ignore[method-assign]
    return calls


def test_the_resolver_is_asked_per_distinct_facts_never_per_record() -> None:
    resolver = IdentityResolver()
    calls = counted(resolver)
    col = ColumnCorrelator(resolver, clock=Wall())
    recs = new_records(5000)
    col.commit(col.plan_records(recs))
    client = {(r.client.ip, r.process.comm, r.collector) for r in recs}  # type: ignore[union-attr]
    server = {r.server.ip for r in recs}
    assert calls[0] == len(client) + len(server) == 70 + 3
    assert col.stats()["resolver_calls"] == calls[0]
    col.commit(col.plan_records(new_records(5000)))  # the same facts again: answered from before
    assert calls[0] == len(client) + len(server)
    static = IdentityResolver(StaticMap([{"match": "10.0.0.0/8", "name": "ten"}]))
    static_calls = counted(static)
    col = ColumnCorrelator(static, clock=Wall())
    col.commit(col.plan_records(new_records(5000)))
    assert static_calls[0] == 0  # the static map answers per address, vectorised


def test_reported_workloads_are_decoded_only_where_a_record_has_one(monkeypatch) -> None:
    decoded: list[bytes] = []
    real = correlate_registry.Workloads.id

    def spy(self: correlate_registry.Workloads, raw: bytes) -> int:
        decoded.append(raw)
        return real(self, raw)

    monkeypatch.setattr(correlate_registry.Workloads, "id", spy)
    recs = new_records(1000)
    web, db = Workload("web", "shop"), Workload("db", "shop", labels={"tier": "data"})
    recs[10] = recs[10].replace(client_workload=web)
    recs[500] = recs[500].replace(server_workload=db)
    recs[700] = recs[700].replace(client_workload=web, server_workload=db)
    col = ColumnCorrelator(IdentityResolver(), clock=Wall())
    cp = col.plan_records(recs)
    assert [msgspec.msgpack.decode(b, type=Workload) for b in decoded] == [web, db, web, db]
    rows = cp.rows.to_pylist()
    assert [rows[i]["client_wid"] for i in (10, 700)] == ["shop/web"] * 2
    assert [rows[i]["server_wid"] for i in (500, 700)] == ["shop/db"] * 2
    assert rows[11]["client_wid"] == "process:app-4"


SCAN = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SCAN
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=12).flatmap(
    lambda ns: st.tuples(*[records(n) for n in ns])))
def test_the_extra_scan_finds_exactly_the_reported_workloads(recs) -> None:
    col = ColumnCorrelator(IdentityResolver(), clock=Wall())
    core = col.core
    assert core is not None
    table = flat_table(list(recs))
    client, server = core.prep._reported(table)
    values = core.workloads.values
    for r, c, s in zip(recs, client.tolist(), server.tolist(), strict=True):
        assert (values[c] if c >= 0 else None) == r.client_workload
        assert (values[s] if s >= 0 else None) == r.server_workload


def table_of(recs: list[FlowRecord]) -> pa.Table:
    return flat_table(recs).append_column("collector", pa.array([r.collector for r in recs]))


def with_column(table: pa.Table, name: str, values: list[object]) -> pa.Table:
    i = table.column_names.index(name)
    return table.set_column(i, name, pa.array(values, table.schema.field(name).type))


@pytest.mark.parametrize("case", ["time", "observer", "null", "collector", "extra", "port"])
def test_inputs_the_c_core_cannot_represent_are_refused_loudly(case: str) -> None:
    col = ColumnCorrelator(IdentityResolver(), clock=Wall())
    col.commit(col.plan_records([rec("client")]))
    before = col.connections()
    table = table_of([rec("server"), rec("path")])
    if case == "time":
        old = T0.replace(year=1850)
        table = table_of([rec("server", start=old)])
    elif case == "observer":
        table = with_column(table, "observer", ["server", "wire"])
    elif case == "null":
        table = with_column(table, "bytes_c2s", [1, None])
    elif case == "collector":
        table = table.drop_columns(["collector"])
    elif case == "extra":
        table = with_column(table, "extra", [None, b"\x92\xc0"[:1]])
    else:
        table = with_column(table, "server_port", [80, 70000])
    with pytest.raises(InputError):
        col.plan(table)
    assert col.connections() == before and len(col) == 1
    col.commit(col.plan_records([rec("server")]))  # and it goes on
    assert len(col) == 1


def test_a_counter_beyond_int64_fails_the_plan_loudly_and_leaves_the_state_as_it_was() -> None:
    """The client's and the server's retransmits add up: their sum does not fit the store's
    BIGINT (the reference plans it and fails when the store builds its rows)."""
    col = ColumnCorrelator(IdentityResolver(), clock=Wall())
    col.commit(col.plan_records([rec("client", retransmits=2**62)]))
    before = col.connections()
    with pytest.raises(OverflowError):
        col.plan_records([rec("server", retransmits=2**62), rec("path", cport=1)])
    assert col.connections() == before
    assert col.stats()["connections"] == 1


def test_a_plan_replaced_or_finished_cannot_be_committed() -> None:
    col = ColumnCorrelator(IdentityResolver(), clock=Wall())
    first = col.plan_records([rec("client")])
    second = col.plan_records([rec("server")])  # the first is dropped, as the reference does
    with pytest.raises(StalePlan):
        col.commit(first)
    col.commit(second)
    with pytest.raises(StalePlan):
        col.rollback(second)
    assert [c.observed_by for c in col.connections()] == [["server"]]


def test_ids_are_random_version_4_uuids_and_load_refuses_others() -> None:
    col = ColumnCorrelator(IdentityResolver(), clock=Wall())
    ids = col.plan_records(new_records(300)).conn_ids.to_pylist()
    assert len(set(ids)) == 300
    assert {(uuid.UUID(hex=i).version, uuid.UUID(hex=i).variant) for i in ids} == {
        (4, uuid.RFC_4122)}
    other = ColumnCorrelator(IdentityResolver(), clock=Wall(), ids=counter(7))
    other.commit(other.plan_records([rec("client")]))
    (conn,) = other.connections()
    assert conn.conn_id == f"{7:032x}"
    with pytest.raises(InputError):
        col.load([msgspec.structs.replace(conn, conn_id="not-hex")])


def test_a_table_of_one_collector_plans_as_its_records() -> None:
    recs = [rec("client", collector="h1", cport=p) for p in (1, 2, 3)]
    a = ColumnCorrelator(IdentityResolver(), clock=Wall(), ids=counter(1))
    b = ColumnCorrelator(IdentityResolver(), clock=Wall(), ids=counter(1))
    pa_, pb = a.plan(flat_table(recs), collector="h1"), b.plan_records(recs)
    assert pa_.rows.equals(pb.rows)
    assert "connections" not in pa_.__dict__  # objects only when asked
    assert [c.client_port for c in pa_.connections.values()] == [1, 2, 3]


def test_dictionaries_forget_what_no_held_connection_refers_to() -> None:
    """5,000 client addresses, each its own `external:` identity; once their connections are
    pruned, compaction leaves the dictionaries with what the one held connection needs."""
    col = ColumnCorrelator(IdentityResolver(), clock=Wall(), keep_closed=timedelta(seconds=1))
    recs = [r.replace(client=Endpoint(f"10.{i // 250}.{i % 250}.9", 1000), observer="server")
            for i, r in enumerate(new_records(5000))]
    col.commit(col.plan_records(recs))
    col.commit(col.plan_records([rec("client", start=T0 + timedelta(hours=1))]))
    core = col.core
    assert core is not None and len(core.addrs) > 5000 and len(core.idents) > 5000
    assert col.prune() == 5000
    core.compact()
    (conn,) = col.connections()
    assert (len(core.addrs), len(core.idents)) == (2, 2)
    assert conn.client.name == "process:ew-frontend"
    col.commit(col.plan_records([rec("server", start=T0 + timedelta(hours=1))]))
    assert [c.observed_by for c in col.connections()] == [["client", "server"]]


def test_the_environment_switch_runs_the_reference_instead() -> None:
    code = ("from aggregator.correlate_columns import ColumnCorrelator\n"
            "from aggregator.identity import IdentityResolver\n"
            "from tests.unit.test_correlate import rec\n"
            "c = ColumnCorrelator(IdentityResolver())\n"
            "p = c.plan_records([rec('client'), rec('server')]); c.commit(p)\n"
            "print(c.native, len(c), p.rows.num_rows, c.why_not_native)\n")
    env = dict(os.environ, EASTWEST_CORRELATE_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.getcwd()).stdout.split()
    assert out[:3] == ["False", "1", "1"]
    assert "EASTWEST_CORRELATE_NATIVE=0" in " ".join(out[3:])
