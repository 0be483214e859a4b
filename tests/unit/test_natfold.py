"""NAT folding at the collector (collector/natfold.py): records of translated connections are
rewritten to their real ends with the translations in `nat`, from conntrack tables fed here by a
fake event reader (the kernel side is proven in tests/lab/test_lab_services.py and
tests/lab/test_services_join_lab.py)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from collector.conntrack import NatTable, Translation
from collector.natfold import NatFolder, NatFoldingSink
from eastwest.record import Endpoint, FlowRecord, Nat

T0 = datetime(2026, 12, 7, 8, 0, 0, tzinfo=UTC)
CLIENT, VIP, BACKEND = ("10.244.1.10", 40000), ("10.96.0.10", 80), ("10.244.3.13", 8080)
NODE, NODEPORT, MASQ = ("10.213.0.2", 30080), ("10.213.0.2", 30080), ("10.244.2.1", 61000)
HOST_NS, POD_NS = 4026530001, 4026530002


class FakeReader:
    def __init__(self) -> None:
        self.table = NatTable()
        self.lost = 0
        self.pending: list[Translation] = []
        self.closed = False

    def drain(self) -> int:
        for t in self.pending:
            self.table.add(t)
        n, self.pending = len(self.pending), []
        return n

    def close(self) -> None:
        self.closed = True


def folder(*names: str | None, unreadable: tuple[str, ...] = ()) -> tuple[NatFolder, dict]:
    readers: dict[str | None, FakeReader] = {}
    inodes = {"h1": HOST_NS, "pod": POD_NS, None: 1}

    def opener(ns: str | None) -> FakeReader:
        if ns in unreadable:
            raise OSError(1, "Operation not permitted")
        readers[ns] = FakeReader()
        return readers[ns]

    return NatFolder(list(names), opener=opener, inode_of=lambda ns: inodes.get(ns, 9)), readers


def rec(observer: str, client: tuple[str, int], server: tuple[str, int], *, n: int = 1,
        final: bool = False, protocol: str = "tcp", start: datetime = T0,
        source: str = "socket", loopback: bool = False) -> FlowRecord:
    return FlowRecord(record_id=f"c:{n}", collector="c", source=source,  # type: ignore[arg-type]
                      start=start, end=start + timedelta(seconds=1), final=final,
                      protocol=protocol, family=4, client=Endpoint(*client),
                      server=Endpoint(*server), observer=observer,  # type: ignore[arg-type]
                      loopback=loopback)


def dnat(client=CLIENT, vip=VIP, backend=BACKEND, protocol="tcp") -> Translation:
    return Translation(protocol, (*client, *vip), (*backend, *client))


def nodeport() -> Translation:
    return Translation("tcp", (*CLIENT, *NODEPORT), (*BACKEND, *MASQ))


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_a_clusterip_call_of_the_client_is_keyed_by_its_backend_and_keeps_the_vip(protocol):
    f, readers = folder("h1")
    readers["h1"].pending.append(dnat(protocol=protocol))
    out = f.fold([rec("client", CLIENT, VIP, protocol=protocol)], T0)[0]
    assert (out.client, out.server) == (Endpoint(*CLIENT), Endpoint(*BACKEND))
    assert out.nat == [Nat("dnat", Endpoint(*VIP), Endpoint(*BACKEND), HOST_NS)]
    assert out.dialled == Endpoint(*VIP)
    assert out.incomplete == []
    # the server's record on the same host (the backend is a local pod) learns the VIP too
    srv = f.fold([rec("server", CLIENT, BACKEND, n=2, protocol=protocol)], T0)[0]
    assert (srv.client, srv.server, srv.nat) == (out.client, out.server, out.nat)


def test_a_record_without_a_translation_is_left_alone():
    f, readers = folder("h1")
    readers["h1"].pending.append(dnat())
    plain = rec("client", CLIENT, ("10.244.3.14", 5432))
    assert f.fold([plain], T0) == [plain]
    other = rec("client", ("10.244.1.11", 40000), VIP)  # another client to the VIP: not known
    assert f.fold([other], T0) == [other]


def test_a_fold_outlives_the_conntrack_entry_until_the_connections_final_record():
    f, readers = folder("h1")
    readers["h1"].table = NatTable(capacity=1)
    readers["h1"].pending.append(dnat())
    first = f.fold([rec("client", CLIENT, VIP)], T0)[0]
    readers["h1"].pending.append(dnat(client=("10.244.1.11", 1)))  # evicts ours from the table
    again = f.fold([rec("client", CLIENT, VIP, n=2)], T0)[0]
    assert again.server == first.server == Endpoint(*BACKEND)
    last = f.fold([rec("client", CLIENT, VIP, n=3, final=True)], T0)[0]
    assert last.server == Endpoint(*BACKEND)
    gone = f.fold([rec("client", CLIENT, VIP, n=4)], T0)[0]  # final: the memo forgot it
    assert gone.server == Endpoint(*VIP)


def test_a_masqueraded_server_learns_its_original_client():
    f, readers = folder("h3")
    readers["h3"].pending.append(Translation("tcp", (*CLIENT, *BACKEND), (*BACKEND, *MASQ)))
    out = f.fold([rec("server", MASQ, BACKEND)], T0)[0]
    assert (out.client, out.server) == (Endpoint(*CLIENT), Endpoint(*BACKEND))
    assert out.nat == [Nat("snat", Endpoint(*CLIENT), Endpoint(*MASQ), 9)]
    assert out.dialled is None


def test_the_nodeport_middle_hosts_wire_record_carries_the_whole_translation():
    """h2 DNATs h1's call to the NodePort to a backend on h3 and masquerades it: its wire
    capture sees the translated leg (h2 -> backend) and folds it to (client, backend)."""
    f, readers = folder("h2")
    readers["h2"].pending.append(nodeport())
    out = f.fold([rec("path", MASQ, BACKEND, source="vxlan")], T0)[0]
    assert (out.client, out.server) == (Endpoint(*CLIENT), Endpoint(*BACKEND))
    assert out.nat == [Nat("dnat", Endpoint(*NODEPORT), Endpoint(*BACKEND), 9),
                       Nat("snat", Endpoint(*CLIENT), Endpoint(*MASQ), 9)]
    assert out.dialled == Endpoint(*NODEPORT)


def test_a_sidecar_redirect_then_the_nodes_dnat_make_one_chain_in_order():
    f, readers = folder("h1", "pod")
    sidecar = ("127.0.0.1", 15001)
    # the pod's own OUTPUT REDIRECT first, then the node's DNAT of the same tuple (a chain as a
    # transparent proxy in the pod and kube-proxy in the node see one connection)
    readers["pod"].pending.append(Translation("tcp", (*CLIENT, *VIP), (*sidecar, *CLIENT)))
    readers["h1"].pending.append(Translation("tcp", (*CLIENT, *sidecar), (*BACKEND, *CLIENT)))
    out = f.fold([rec("client", CLIENT, VIP)], T0)[0]
    assert out.nat == [Nat("redirect", Endpoint(*VIP), Endpoint(*sidecar), POD_NS),
                       Nat("dnat", Endpoint(*sidecar), Endpoint(*BACKEND), HOST_NS)]
    assert out.server == Endpoint(*BACKEND) and out.dialled == Endpoint(*VIP)


def test_records_fold_the_same_in_every_order():
    f0, r0 = folder("h1")
    r0["h1"].pending += [dnat(), dnat(client=("10.244.1.11", 2), backend=("10.244.2.12", 8080))]
    batch = [rec("client", CLIENT, VIP, n=1), rec("client", ("10.244.1.11", 2), VIP, n=2),
             rec("server", CLIENT, BACKEND, n=3), rec("client", CLIENT, ("10.244.3.14", 1), n=4),
             rec("client", CLIENT, VIP, n=5, final=True)]
    want = sorted(f0.fold(list(batch), T0), key=lambda r: r.record_id)
    for order in itertools.permutations(batch):
        f, r = folder("h1")
        r["h1"].pending += [dnat(), dnat(client=("10.244.1.11", 2), backend=("10.244.2.12", 8080))]
        # one record at a time, as batches of one arrive
        got = [f.fold([x], T0)[0] for x in order]
        assert sorted(got, key=lambda x: x.record_id) == want


def test_unreadable_conntrack_marks_client_records_only():
    f, readers = folder("h1", "pod", unreadable=("pod",))
    assert "pod" in f.unreadable and "Operation not permitted" in f.unreadable["pod"]
    readers["h1"].pending.append(dnat())
    out = f.fold([rec("client", CLIENT, VIP, n=1),              # resolved: not marked
                  rec("client", CLIENT, ("10.244.3.14", 1), n=2),  # could have been: marked
                  rec("server", MASQ, BACKEND, n=3),              # server side: not marked
                  rec("path", MASQ, BACKEND, n=4, source="vxlan"),
                  rec("client", ("127.0.0.1", 1), ("127.0.0.1", 2), n=5, loopback=True),
                  rec("client", CLIENT, ("10.244.3.14", 1), n=6, protocol="icmp")], T0)
    assert [r.incomplete for r in out] == [[], ["nat"], [], [], [], []]
    assert f.marked == 1


def test_lost_events_mark_only_unresolved_client_records_that_started_around_the_loss():
    f, readers = folder("h1")
    f.drain(T0)
    readers["h1"].lost = 1  # an overrun between this drain and the next
    later = T0 + timedelta(seconds=5)
    out = f.fold([rec("client", CLIENT, ("10.244.3.14", 1), n=1, start=T0 + timedelta(seconds=2)),
                  rec("client", CLIENT, ("10.244.3.14", 2), n=2, start=T0 - timedelta(seconds=9))],
                 later)
    assert [r.incomplete for r in out] == [["nat"], []]
    after = f.fold([rec("client", CLIENT, ("10.244.3.14", 3), n=3, start=later
                        + timedelta(seconds=1))], later + timedelta(seconds=5))
    assert after[0].incomplete == []


def test_the_folding_sink_folds_then_closes_both():
    f, readers = folder("h1")
    readers["h1"].pending.append(dnat())

    class Keep:
        def __init__(self) -> None:
            self.got: list[FlowRecord] = []
            self.closed = False

        def write(self, records: list[FlowRecord]) -> None:
            self.got += records

        def close(self) -> None:
            self.closed = True

    inner = Keep()
    sink = NatFoldingSink(inner, f, lambda: T0)
    sink.write([rec("client", CLIENT, VIP)])
    sink.close()
    assert inner.got[0].server == Endpoint(*BACKEND) and inner.closed and readers["h1"].closed


def test_the_collectors_flags_choose_the_folder(monkeypatch):
    """collector/main.py folds unless --no-nat or a capture file; one reader per named --netns
    (this namespace when none is named), an inode number counted unreadable."""
    import argparse

    from collector import natfold

    opened: list[list[str | None]] = []
    monkeypatch.setattr(natfold, "NatFolder", lambda names: opened.append(names) or "folder")
    assert natfold.folder_for(argparse.Namespace(no_nat=True, netns=["h1"])) is None
    assert natfold.folder_for(argparse.Namespace(pcap=["x.pcap"], netns=[])) is None
    assert natfold.folder_for(argparse.Namespace(netns=["h1", "h1-p0"])) == "folder"
    assert natfold.folder_for(argparse.Namespace(netns=[])) == "folder"
    assert opened == [["h1", "h1-p0"], [None]]
    f, _ = folder("h1", "4026531840")
    assert list(f.unreadable) == ["4026531840"] and len(f.readers) == 1
