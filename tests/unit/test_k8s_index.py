"""The Kubernetes identity index (aggregator/k8s/index.py): which object owned an address at a
time. Pod IPs are reused: the owner is the one whose span [start, end) holds the connection's
start; deleted owners are kept for `keep_deleted`; a missed delete ends at the next owner's
start; within `skew` of a span its owner answers. No server here: objects go in as the watch
delivers them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aggregator.k8s.index import Index, controller
from tests.k8s_fake import endpoint_slice, node, pod, service

T = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Wall:
    def __init__(self) -> None:
        self.t = T

    def __call__(self) -> float:
        return self.t


def with_uid(obj: dict, uid: str) -> dict:
    obj["metadata"]["uid"] = uid
    return obj


def name(ix: Index, ip: str, at: float) -> str | None:
    hit = ix.lookup(ip, at)
    return None if hit is None else f"{hit.kind}:{hit.wid}"


def test_a_pod_names_its_controller_with_namespace_node_and_labels():
    wall = Wall()
    ix = Index(clock=wall)
    ix.replace("pods", [
        with_uid(pod("api-7d9f8b6c5d-x2x9z", "shop", "10.42.0.7", "node-2",
                     owner=("ReplicaSet", "api-7d9f8b6c5d"), labels={"app": "api"},
                     created=iso(T - 3600)), "u1"),
        with_uid(pod("db-0", "shop", ["10.42.0.8", "fd00::8"], "node-3",
                     owner=("StatefulSet", "db"), created=iso(T - 3600)), "u2"),
        with_uid(pod("lonely", "dev", "10.42.0.9", "node-1", created=iso(T - 3600)), "u3"),
        with_uid(pod("kube-proxy-abc", "kube-system", "172.18.0.2", "node-1", host_network=True,
                     owner=("DaemonSet", "kube-proxy"), created=iso(T - 3600)), "u4"),
    ])
    api = ix.lookup("10.42.0.7", T)
    assert api is not None
    assert (api.wid, api.kind, api.host, api.source) == ("shop/api", "Deployment", "node-2",
                                                        "kubernetes")
    assert api.labels == {"app": "api", "pod-template-hash": "7d9f8b6c5d"}
    assert name(ix, "10.42.0.8", T) == name(ix, "fd00::8", T) == "StatefulSet:shop/db"
    assert name(ix, "10.42.0.9", T) == "Pod:dev/lonely"
    assert name(ix, "172.18.0.2", T) is None  # host network: the node's address, not the pod's
    assert ix.objects["pods"] == 4


def test_a_replicaset_whose_name_does_not_end_in_the_hash_stays_a_replicaset():
    meta = {"name": "x", "labels": {"pod-template-hash": "abc"},
            "ownerReferences": [{"kind": "ReplicaSet", "name": "manual-rs", "controller": True}]}
    assert controller(meta) == ("manual-rs", "ReplicaSet")


def test_services_endpoints_without_pods_and_nodes():
    ix = Index(clock=Wall())
    ix.replace("services", [service("api", "shop", ["10.96.0.10", "fd00:96::a"]),
                            service("headless", "shop", [])])
    ix.replace("endpointslices", [endpoint_slice("legacy", "shop", [
        ("192.168.50.4", None),
        ("10.42.0.7", {"kind": "Pod", "name": "api-1", "namespace": "shop"})])])
    ix.replace("nodes", [node("node-1", ["10.213.0.1"])])
    assert name(ix, "10.96.0.10", T) == name(ix, "fd00:96::a", T) == "Service:shop/api"
    assert name(ix, "192.168.50.4", T) == "Service:shop/legacy"  # selector-less: no pod behind
    assert name(ix, "10.42.0.7", T) is None  # a pod's endpoint: the pod names it, not the slice
    n = ix.lookup("10.213.0.1", T)
    assert n is not None and (n.wid, n.kind, n.host) == ("node-1", "Node", "node-1")


def test_pod_ip_reused_old_connections_keep_the_old_pod():
    """A deleted at T+100, B gets its address; a connection that started before the delete is
    A's, one after it B's, whatever order they are asked in (late records)."""
    wall = Wall()
    ix = Index(clock=wall)
    a = with_uid(pod("a-1", "shop", "10.42.0.7", "n1", owner=("StatefulSet", "a"),
                     created=iso(T - 600)), "ua")
    ix.replace("pods", [a])
    wall.t = T + 100
    ix.apply("pods", "DELETED", a)
    wall.t = T + 101
    ix.apply("pods", "ADDED", with_uid(pod("b-1", "shop", "10.42.0.7", "n2",
                                           owner=("StatefulSet", "b"), created=iso(T + 99)), "ub"))
    assert name(ix, "10.42.0.7", T + 150) == "StatefulSet:shop/b"
    assert name(ix, "10.42.0.7", T + 50) == "StatefulSet:shop/a"      # asked after B came
    assert name(ix, "10.42.0.7", T - 500) == "StatefulSet:shop/a"
    # B was created before A's delete was seen, but the address was A's until then
    assert name(ix, "10.42.0.7", T + 99.5) == "StatefulSet:shop/a"
    assert name(ix, "10.42.0.7", T + 100) == "StatefulSet:shop/b"


def test_a_missed_delete_ends_where_the_next_owner_starts():
    wall = Wall()
    ix = Index(clock=wall)
    ix.replace("pods", [with_uid(pod("a-1", "shop", "10.42.0.7", "n1", created=iso(T - 600)), "ua")])
    wall.t = T + 300
    # a re-list after a watch outage: A is gone, B holds the address since T+200
    ix.replace("pods", [with_uid(pod("b-1", "shop", "10.42.0.7", "n1", created=iso(T + 200)), "ub")])
    assert name(ix, "10.42.0.7", T + 100) == "Pod:shop/a-1"
    assert name(ix, "10.42.0.7", T + 250) == "Pod:shop/b-1"
    assert ix.objects["pods"] == 1


def test_deleted_owners_are_kept_for_keep_deleted_then_forgotten():
    wall = Wall()
    ix = Index(keep_deleted_s=600, skew_s=30, clock=wall)
    a = with_uid(pod("a-1", "shop", "10.42.0.7", "n1", created=iso(T - 600)), "ua")
    ix.replace("pods", [a])
    ix.apply("pods", "DELETED", a)
    assert name(ix, "10.42.0.7", T - 10) == "Pod:shop/a-1"
    assert name(ix, "10.42.0.7", T + 20) == "Pod:shop/a-1"   # within skew of its end
    assert name(ix, "10.42.0.7", T + 31) is None            # nobody's now: the layer below
    wall.t = T + 601
    assert ix.prune() == 1
    assert name(ix, "10.42.0.7", T - 10) is None


def test_skew_before_creation_and_terminal_phases():
    wall = Wall()
    ix = Index(skew_s=30, clock=wall)
    p = with_uid(pod("job-x", "batch", "10.42.0.30", "n1", owner=("Job", "job"),
                     created=iso(T)), "uj")
    ix.replace("pods", [p])
    assert name(ix, "10.42.0.30", T - 20) == "Job:batch/job"  # collector clock 20 s behind
    assert name(ix, "10.42.0.30", T - 40) is None
    wall.t = T + 60
    done = with_uid(pod("job-x", "batch", "10.42.0.30", "n1", owner=("Job", "job"),
                        created=iso(T), phase="Succeeded"), "uj")
    ix.apply("pods", "MODIFIED", done)  # the kubelet released the address
    assert name(ix, "10.42.0.30", T + 59) == "Job:batch/job"
    assert name(ix, "10.42.0.30", T + 200) is None


def test_a_pod_that_gets_its_ip_later_owns_it_from_then():
    wall = Wall()
    ix = Index(skew_s=0, clock=wall)
    p = with_uid(pod("w-1", "shop", "10.42.0.40", "n1", created=iso(T)), "uw")
    pending = {**p, "status": {"phase": "Pending"}}
    ix.replace("pods", [pending])
    assert name(ix, "10.42.0.40", T + 5) is None
    wall.t = T + 10
    ix.apply("pods", "MODIFIED", p)
    assert name(ix, "10.42.0.40", T + 5) == "Pod:shop/w-1"  # no earlier owner: from creation


@pytest.mark.parametrize("kind", ["pods", "services"])
def test_a_relabelled_owner_names_new_connections_by_the_new_labels(kind):
    wall = Wall()
    ix = Index(skew_s=0, clock=wall)
    obj = (with_uid(pod("x", "ns", "10.42.0.50", "n1", labels={"v": "1"}, created=iso(T - 60)), "u")
           if kind == "pods" else with_uid(service("x", "ns", ["10.42.0.50"], {"v": "1"}), "u"))
    ix.replace(kind, [obj])
    wall.t = T + 10
    obj["metadata"]["labels"] = {"v": "2"}
    ix.apply(kind, "MODIFIED", obj)
    old, new = ix.lookup("10.42.0.50", T + 5), ix.lookup("10.42.0.50", T + 20)
    assert old is not None and new is not None
    assert (old.labels["v"], new.labels["v"]) == ("1", "2")


def test_watch_events_forget_ended_owners_past_keep_deleted_without_a_relist():
    wall = Wall()
    ix = Index(keep_deleted_s=600, clock=wall)
    a = with_uid(pod("a-1", "shop", "10.42.0.7", "n1", created=iso(T - 600)), "ua")
    ix.replace("pods", [])
    ix.apply("pods", "ADDED", a)
    ix.apply("pods", "DELETED", a)
    wall.t = T + 700
    ix.apply("pods", "ADDED", with_uid(pod("b-1", "shop", "10.42.0.99", "n1"), "ub"))
    assert ix.tables["pods"].spans.get("10.42.0.7") is None


def test_addresses_are_indexed_in_the_collectors_canonical_form():
    ix = Index(clock=Wall())
    ix.replace("pods", [with_uid(pod("v6", "shop", ["FD00:0:0::0A", "not-an-ip"], "n1",
                                     created=iso(T - 60)), "u6")])
    assert name(ix, "fd00::a", T) == "Pod:shop/v6"


class PodNetworks:
    """The index as the resolver's Kubernetes source (aggregator/k8s/watch.py does the same)."""

    def __init__(self, ix: Index) -> None:
        self.ix = ix

    def lookup(self, ip: str, port: int, at: datetime):
        return self.ix.lookup(ip, at.timestamp())

    def pod_network_node(self, ip: str, at: datetime):
        return self.ix.pod_network_node(ip, at.timestamp())


def test_an_address_of_a_nodes_pod_cidr_no_pod_holds_is_the_node():
    """The node's own address on the pod network (its CNI's gateway, flannel's cni0 or
    flannel.1) is the source it masquerades NodePort calls with (docs/aggregator.md, "NodePort
    calls with masquerade"): it names the node, below the pods and the process layer."""
    from aggregator.identity import Facts, IdentityResolver, PodNetworkSource

    wall = Wall()
    ix = Index(clock=wall)
    ix.replace("nodes", [node("node-2", ["10.213.0.2"], ["10.244.2.0/24", "fd00:ee:2::/64"]),
                         node("node-3", ["10.213.0.3"])])  # no pod CIDR: names nothing more
    ix.replace("pods", [with_uid(pod("api-1", "shop", "10.244.2.11", "node-2",
                                     created=iso(T - 3600)), "p1")])
    gw = ix.pod_network_node("10.244.2.1", T)
    assert gw is not None and (gw.wid, gw.kind, gw.host, gw.source) == (
        "node-2", "Node", "node-2", "cidr")
    assert name(ix, "10.244.2.1", T) is None  # not by the pods' layer: a lower one
    assert ix.pod_network_node("fd00:ee:2::1", T) == gw
    assert ix.pod_network_node("10.244.2.11", T) is None  # a pod holds it
    assert ix.pod_network_node("10.244.3.1", T) is None   # no node's pod CIDR
    # the pod's address after the pod ended (and the skew passed) is free again: the node's
    wall.t = T + 10
    ix.apply("pods", "DELETED", with_uid(pod("api-1", "shop", "10.244.2.11", "node-2"), "p1"))
    assert ix.pod_network_node("10.244.2.11", T + 100) == gw
    assert ix.pod_network_node("10.244.2.11", T) is None  # when the pod held it
    # in the resolver: below the process layer (a pod the watch has not delivered yet, seen
    # from its own socket, is its container), above `external:`
    at = datetime.fromtimestamp(T, UTC)
    src = PodNetworks(ix)
    assert isinstance(src, PodNetworkSource)
    from aggregator.k8s import KubernetesIdentity

    assert isinstance(KubernetesIdentity(None), PodNetworkSource)  # type: ignore[arg-type]
    r = IdentityResolver(None, [src], pod_networks=[src])
    assert r.resolve("10.244.2.1", 40000, None, at).wid == "node-2"
    assert r.resolve("10.244.2.50", 8080, Facts(container="96e808661893abcd"), at).wid == (
        "container:96e808661893")
    assert r.resolve("10.244.9.9", 1, None, at).wid == "external:10.244.9.9"
    # the node deleted, or listed again without it: its CIDR names nothing
    ix.apply("nodes", "DELETED", node("node-2", ["10.213.0.2"], ["10.244.2.0/24"]))
    assert ix.pod_network_node("10.244.2.1", T) is None
    ix.replace("nodes", [node("node-2", ["10.213.0.2"], ["10.244.2.0/24"])])
    assert ix.pod_network_node("10.244.2.1", T) is not None
    ix.replace("nodes", [])
    assert ix.pod_network_node("10.244.2.1", T) is None
