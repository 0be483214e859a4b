"""Partitions of the NATS transport: which partition a connection's records go to, and how a
partition is named in a batch mark.

In: a flow record (or a stored connection's key) and the stream's partition count P.
Out: K in 0..P-1, the same for every observer of one connection; the mark sequence of the
partition K's share of a collector's batch.

The key is orientation-free: the protocol, the UNORDERED pair of endpoints (ip, port) and the
scope that tells loopback connections of different network namespaces apart (the netns inode
for a loopback record, else 0; aggregator/correlate.py `key_of` scopes the same way). The client's
socket record, the server's and the wire's therefore hash alike even when an observer got the
orientation wrong (a wire view that missed the SYN). Under NAT (a Service VIP, a NodePort's two
halves) the client's record names the address it dialled: the collector resolves the DNAT from
conntrack and folds it into the record (the client record's server becomes the real backend,
the VIP kept in the record's `nat` field), so after folding every observer names the same
5-tuple. A record the collector could not fold is hashed as it reads, as it is correlated. A mesh
hop is its own connection (its own 5-tuple): each hop's observers agree among themselves.

The hash is CRC-32 of the key's text (stable across processes, machines and Python versions;
Python's `hash()` is salted per process), mod P.

Marks: `(collector, partition, batch_seq)`. A collector numbers its batches (collector/spool.py);
publishing splits one batch into one sub-batch per partition it has records for, and each
sub-batch carries `batch_seq * PARTITION_SPACE + K` as its sequence. The stores' mark and every
row key built on `(collector, batch_seq)` (raw records, rollup deltas, `ingested_batches`)
therefore hold all three, and two partitions' shares of one batch never collapse into one row
(ReplacingMergeTree) or one mark.

Sub-shares: a share larger than NATS' max_payload is published as sub-shares j = 0, 1, ...
(collector/transport_nats.py); sub-share j of partition K is the slot `K + P * j` of the mark,
`batch_seq * PARTITION_SPACE + K + P * j`, which needs `K + P * j < PARTITION_SPACE` (partition K
has `sub_shares(K, P)` of them: 171 for P = 6, 1 for P = 1024). Every slot is still unique per
batch, and the slot mod P is still the partition (`mark_partition`): an aggregator routes a
sub-share like any share, and marks it by its own sequence.
"""

from __future__ import annotations

import zlib

from eastwest.errors import ConfigError
from eastwest.record import FlowRecord

PARTITION_SPACE = 1024            # partitions a mark sequence can name (P <= this)
MAX_BATCH_SEQ = (2**63 - 1) // PARTITION_SPACE
DEFAULT_PARTITIONS = 6            # divides among 1, 2, 3 and 6 replicas evenly


def check_partitions(p: int, flag: str = "--nats-partitions") -> int:
    if not 1 <= int(p) <= PARTITION_SPACE:
        raise ConfigError(flag, p, f"a whole number from 1 to {PARTITION_SPACE}")
    return int(p)


def key_text(protocol: str, a_ip: str, a_port: int, b_ip: str, b_port: int, scope: int) -> bytes:
    """The orientation-free key: the endpoints in a fixed order (ip, then port)."""
    a, b = (a_ip, int(a_port)), (b_ip, int(b_port))
    lo, hi = (a, b) if a <= b else (b, a)
    return f"{protocol}|{lo[0]}|{lo[1]}|{hi[0]}|{hi[1]}|{int(scope)}".encode()


def partition_of(protocol: str, a_ip: str, a_port: int, b_ip: str, b_port: int, scope: int,
                 partitions: int) -> int:
    if partitions == 1:
        return 0
    return zlib.crc32(key_text(protocol, a_ip, a_port, b_ip, b_port, scope)) % partitions


def record_partition(rec: FlowRecord, partitions: int) -> int:
    scope = (rec.netns or 0) if rec.loopback else 0
    return partition_of(rec.protocol, rec.client.ip, rec.client.port, rec.server.ip,
                        rec.server.port, scope, partitions)


def key_partition(key: tuple[str, str, int, str, int, int], partitions: int) -> int:
    """The partition of a correlation key (protocol, client ip, port, server ip, port, scope)."""
    protocol, cip, cport, sip, sport, scope = key
    return partition_of(protocol, cip, cport, sip, sport, scope, partitions)


def mark_seq(batch_seq: int, partition: int) -> int:
    """The sequence of partition K's share of batch `batch_seq` (what the stores mark); with a
    slot (`share_slot`) for `partition`: that sub-share's."""
    if not 0 <= batch_seq <= MAX_BATCH_SEQ:
        raise ValueError(f"batch_seq {batch_seq}: at most {MAX_BATCH_SEQ} with partitions")
    if not 0 <= partition < PARTITION_SPACE:
        raise ValueError(f"partition {partition}: 0..{PARTITION_SPACE - 1}")
    return batch_seq * PARTITION_SPACE + partition


def split_mark(seq: int) -> tuple[int, int]:
    """(batch_seq, slot) of a mark sequence: the slot is the partition for a share that was not
    split (sub-share 0), `K + P * j` for sub-share j (`mark_partition` names K)."""
    return seq // PARTITION_SPACE, seq % PARTITION_SPACE


def share_slot(partition: int, sub: int, partitions: int) -> int:
    """The mark slot of sub-share `sub` of partition K's share: `K + P * sub`."""
    if not 0 <= partition < partitions <= PARTITION_SPACE:
        raise ValueError(f"partition {partition} of {partitions}")
    slot = partition + partitions * sub
    if sub < 0 or slot >= PARTITION_SPACE:
        raise ValueError(f"sub-share {sub} of partition {partition} (P = {partitions}): slot "
                         f"{slot}, the mark has {PARTITION_SPACE}")
    return slot


def sub_shares(partition: int, partitions: int) -> int:
    """How many sub-shares partition K's share of one batch can have (`share_slot` < 1024)."""
    return (PARTITION_SPACE - 1 - partition) // partitions + 1


def mark_partition(seq: int, partitions: int) -> int:
    """The partition of a mark sequence, whichever sub-share it is."""
    return seq % PARTITION_SPACE % partitions
