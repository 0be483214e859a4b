"""Partitions of the NATS transport (eastwest/partition.py): every observer of one connection
computes the same partition, whatever orientation it saw; marks hold the partition."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.connection import Connection, Identity
from aggregator.correlate import key_of
from eastwest.errors import ConfigError
from eastwest.partition import (
    MAX_BATCH_SEQ,
    PARTITION_SPACE,
    check_partitions,
    key_partition,
    mark_partition,
    mark_seq,
    record_partition,
    share_slot,
    split_mark,
    sub_shares,
)
from eastwest.record import Endpoint
from tests.unit.test_correlate import rec

# two addresses of one family (a record's family is its ends')
pairs = st.one_of(st.tuples(st.just(4), st.ip_addresses(v=4).map(str), st.ip_addresses(v=4).map(str)),
                  st.tuples(st.just(6), st.ip_addresses(v=6).map(str), st.ip_addresses(v=6).map(str)))
ports = st.integers(0, 65535)
parts = st.integers(1, PARTITION_SPACE)


@settings(max_examples=300, deadline=None)
@given(ips=pairs, cport=ports, sport=ports, protocol=st.sampled_from(["tcp", "udp"]),
       loopback=st.booleans(), netns=st.integers(1, 2**32), p=parts)
def test_every_observer_of_one_connection_lands_in_one_partition(ips, cport, sport, protocol,
                                                                 loopback, netns, p):
    family, cip, sip = ips
    ends = dict(client=Endpoint(cip, cport), server=Endpoint(sip, sport), protocol=protocol,
                family=family, loopback=loopback, netns=netns)
    client, server = rec("client", **ends), rec("server", **ends)
    wire = rec("path", **ends)
    # a wire view that missed the handshake may have the ends the other way round
    wire_reversed = rec("path", **{**ends, "client": Endpoint(sip, sport),
                                   "server": Endpoint(cip, cport)})
    ks = {record_partition(r, p) for r in (client, server, wire, wire_reversed)}
    assert len(ks) == 1
    (k,) = ks
    assert 0 <= k < p
    # the stored connection of these records (what a take-over reloads) is in the same one
    assert key_partition(key_of(client), p) == k


def test_loopback_connections_of_different_namespaces_are_told_apart_like_the_correlator():
    a = rec("client", client=Endpoint("127.0.0.1", 40000), server=Endpoint("127.0.0.1", 80),
            loopback=True, netns=4026531840)
    b = rec("client", client=Endpoint("127.0.0.1", 40000), server=Endpoint("127.0.0.1", 80),
            loopback=True, netns=4026532999)
    assert key_of(a) != key_of(b)
    hits = {record_partition(a, 1024), record_partition(b, 1024)}
    assert len(hits) == 2  # these two differ (the scope is in the key)
    # outside loopback the netns is not part of the key: two hosts' netns ids do not matter
    c = rec("client", netns=1)
    d = rec("server", netns=2)
    assert record_partition(c, 64) == record_partition(d, 64)


def test_a_stored_connection_hashes_like_its_records():
    r = rec("client", cport=41234)
    conn = Connection(conn_id="c1", protocol="tcp", family=4, client_ip=r.client.ip,
                      client_port=r.client.port, server_ip=r.server.ip,
                      server_port=r.server.port, scope=0, client=Identity("a"),
                      server=Identity("b"))
    for p in (1, 2, 6, 64, 1024):
        assert key_partition(conn.key, p) == record_partition(r, p)


def test_connections_spread_over_the_partitions():
    """Not a timing claim: the hash spreads a lab's ports evenly enough to balance replicas."""
    counts = Counter(record_partition(rec("client", cport=20000 + i), 6) for i in range(6000))
    assert set(counts) == set(range(6))
    assert max(counts.values()) < 1.2 * min(counts.values())


def test_the_partition_is_the_same_in_another_process():
    """Python's own hash() is salted per process; the partition must not be."""
    here = [record_partition(rec("client", cport=30000 + i), 6) for i in range(50)]
    code = ("from tests.unit.test_correlate import rec; from eastwest.partition import "
            "record_partition as f; print([f(rec('client', cport=30000 + i), 6) "
            "for i in range(50)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": ".", "PATH": "/usr/bin"})
    assert out.stdout.strip() == str(here)


@given(seq=st.integers(0, MAX_BATCH_SEQ), k=st.integers(0, PARTITION_SPACE - 1))
def test_a_mark_holds_batch_seq_and_partition(seq, k):
    m = mark_seq(seq, k)
    assert split_mark(m) == (seq, k)
    assert 0 <= m <= 2**63 - 1


@given(p=st.integers(1, PARTITION_SPACE), seq=st.integers(0, MAX_BATCH_SEQ), data=st.data())
def test_every_sub_share_of_a_batch_has_its_own_mark_naming_its_partition(p, seq, data):
    """Sub-share j of partition K: slot K + P*j, unique over the whole batch, slot mod P = K."""
    k = data.draw(st.integers(0, p - 1))
    n = sub_shares(k, p)
    assert n >= 1 and share_slot(k, n - 1, p) < PARTITION_SPACE
    with pytest.raises(ValueError, match="sub-share"):
        share_slot(k, n, p)
    j = data.draw(st.integers(0, n - 1))
    m = mark_seq(seq, share_slot(k, j, p))
    assert mark_partition(m, p) == k and split_mark(m)[0] == seq


def test_the_sub_share_slots_of_all_partitions_fill_the_mark_space_once():
    for p in (1, 2, 6, 512, 1000, PARTITION_SPACE):
        slots = [share_slot(k, j, p) for k in range(p) for j in range(sub_shares(k, p))]
        assert sorted(slots) == list(range(PARTITION_SPACE))
    assert (sub_shares(0, 6), sub_shares(5, 6), sub_shares(0, 512), sub_shares(0, 1024)) == (
        171, 170, 2, 1)


def test_marks_of_one_batch_differ_per_partition_and_bad_values_are_refused():
    assert len({mark_seq(7, k) for k in range(6)}) == 6
    with pytest.raises(ValueError, match="batch_seq"):
        mark_seq(MAX_BATCH_SEQ + 1, 0)
    with pytest.raises(ValueError, match="partition"):
        mark_seq(1, PARTITION_SPACE)
    for bad in (0, -1, PARTITION_SPACE + 1):
        with pytest.raises(ConfigError, match="--nats-partitions"):
            check_partitions(bad)
