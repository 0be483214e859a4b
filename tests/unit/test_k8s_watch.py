"""The Kubernetes identity layer against a fake API server over HTTPS with its own CA
(tests/k8s_fake.py: no API server binary can be installed here). List then watch: ADDED,
MODIFIED and DELETED change the index; bookmarks advance the resourceVersion; a watch that gets
410 Gone lists again; a wrong CA is a named TLS error in GET /api/v1/status while the aggregator
keeps serving; a rotated token file is read again; pod IP reuse through the real correlation
path (the pipeline's column correlator), records arriving late."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.identity import IdentityResolver
from aggregator.k8s import KubernetesIdentity, load_cluster
from aggregator.k8s.watch import Backoff
from aggregator.settings import AggregatorSettings
from aggregator.store.duckdb import DuckDBStore
from eastwest.record import Endpoint, FlowRecord
from tests.k8s_fake import Certs, FakeApiServer, endpoint_slice, node, pod, service
from tests.unit.pipes import driven

TOKEN = "test-token-0123456789"


def until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path) -> Path:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


@pytest.fixture
def fake(certs) -> Iterator[FakeApiServer]:
    with FakeApiServer(certs, tokens={TOKEN}) as api:
        yield api


def watcher(fake: FakeApiServer, certs: Certs, token_file: Path,
            **kw: object) -> KubernetesIdentity:
    cfg = load_cluster(fake.url, ca=str(certs.ca_file), token_file=str(token_file), env={})
    assert cfg is not None
    k = KubernetesIdentity.from_config(cfg, backoff=lambda: Backoff(0.01, 0.05), **kw)  # type: ignore[arg-type]
    k.start()
    return k


def now() -> datetime:
    return datetime.now(UTC)


def wid(k: KubernetesIdentity, ip: str, at: datetime | None = None) -> str | None:
    hit = k.lookup(ip, 80, at or now())
    return None if hit is None else f"{hit.kind}:{hit.wid}"


def test_list_then_watch_events_change_the_index(fake, certs, token_file):
    fake.load({"pods": [pod("api-7d9f8b6c5d-x2x9z", "shop", "10.42.0.7", "node-2",
                            owner=("ReplicaSet", "api-7d9f8b6c5d"), labels={"app": "api"})],
               "services": [service("api", "shop", ["10.96.0.10"])],
               "endpointslices": [endpoint_slice("legacy", "shop", [("192.168.50.4", None)])],
               "nodes": [node("node-2", ["10.213.0.2"])]})
    k = watcher(fake, certs, token_file)
    try:
        assert k.wait_synced(10)
        assert wid(k, "10.42.0.7") == "Deployment:shop/api"
        assert wid(k, "10.96.0.10") == "Service:shop/api"
        assert wid(k, "192.168.50.4") == "Service:shop/legacy"
        assert wid(k, "10.213.0.2") == "Node:node-2"
        # every list asked for pages, every watch for bookmarks from the list's version
        for kind in ("pods", "services", "endpointslices", "nodes"):
            (lst,) = fake.calls(kind, watch=False)
            assert lst["limit"] == "500"
            until(lambda kind=kind: fake.calls(kind, watch=True), f"{kind} watch")
            w = fake.calls(kind, watch=True)[0]
            assert w["allowWatchBookmarks"] == "true" and w["resourceVersion"] == "104"
        fake.put("pods", pod("db-0", "shop", "10.42.0.8", "node-3", owner=("StatefulSet", "db")))
        until(lambda: wid(k, "10.42.0.8") == "StatefulSet:shop/db", "ADDED")
        moved = pod("db-0", "shop", "10.42.0.9", "node-3", owner=("StatefulSet", "db"))
        fake.put("pods", moved)
        until(lambda: wid(k, "10.42.0.9") == "StatefulSet:shop/db", "MODIFIED")
        fake.delete("services", "api", "shop")
        until(lambda: k.index.objects["services"] == 0, "DELETED")
        assert wid(k, "10.96.0.10", now() + timedelta(minutes=5)) is None
        st = k.status()
        assert st["connected"] and st["synced"] and st["last_error"] is None
        assert st["objects"] == {"pods": 2, "services": 0, "endpointslices": 1, "nodes": 1}
        assert st["resources"]["pods"]["events"] == 2 and st["last_event"] is not None
        assert len(fake.calls("pods", watch=False)) == 1  # no re-list: the watch carried it
        assert st["resources"]["pods"]["lists"] == 1
    finally:
        k.stop()


def test_bookmarks_advance_the_resource_version_and_the_next_watch_starts_there(
        fake, certs, token_file):
    k = watcher(fake, certs, token_file, resources=("pods",))
    try:
        assert k.wait_synced(10)
        until(lambda: fake.calls("pods", watch=True), "watch")
        rv = fake.bookmark()
        until(lambda: k.state["pods"].bookmarks == 1, "bookmark")
        assert k.state["pods"].resource_version == str(rv) and k.state["pods"].events == 0
        # the server ends the watch (a restart; here: compaction of nothing older): the next
        # watch asks from the bookmark's version, not the list's
        fake.put("pods", pod("a-1", "shop", "10.42.0.20", "n1"))
        until(lambda: wid(k, "10.42.0.20") == "Pod:shop/a-1", "ADDED after the bookmark")
    finally:
        k.stop()


def test_a_watch_that_gets_410_gone_lists_again(fake, certs, token_file):
    fake.put("pods", pod("a-1", "shop", "10.42.0.21", "n1"))
    k = watcher(fake, certs, token_file, resources=("pods",))
    try:
        assert k.wait_synced(10)
        until(lambda: fake.calls("pods", watch=True), "watch")
        # while nobody watches the log is compacted and a pod is deleted and another added:
        fake.compact()  # ends the open watch; the next one, from the old version, gets 410
        fake.delete("pods", "a-1", "shop")
        fake.put("pods", pod("b-1", "shop", "10.42.0.22", "n1"))
        until(lambda: k.state["pods"].relists_gone >= 1 and k.state["pods"].lists >= 2,
              "a re-list after 410")
        until(lambda: wid(k, "10.42.0.22") == "Pod:shop/b-1", "the re-list's pod")
        assert k.index.objects["pods"] == 1  # a-1 missing from the list: deleted
        assert wid(k, "10.42.0.21", now() + timedelta(minutes=5)) is None
        assert k.status()["last_error"] is None  # 410 is routine, not an error
    finally:
        k.stop()


def test_the_token_file_is_read_again_when_it_rotates(fake, certs, token_file):
    k = watcher(fake, certs, token_file, resources=("pods",))
    try:
        assert k.wait_synced(10)
        until(lambda: fake.calls("pods", watch=True), "watch")
        # the kubelet rotates the projected token; the old one stops working
        fake.tokens = {"rotated-token-9876543210"}
        token_file.write_text("rotated-token-9876543210\n")
        fake.compact()  # the watch ends; the next calls must carry the new token
        fake.put("pods", pod("c-1", "shop", "10.42.0.23", "n1"))
        until(lambda: wid(k, "10.42.0.23") == "Pod:shop/c-1", "a list with the new token")
        auths = [a for _, kind, _, a in fake.requests if kind == "pods"]
        assert auths[0] == f"Bearer {TOKEN}" and auths[-1] == "Bearer rotated-token-9876543210"
        assert all(a in (f"Bearer {TOKEN}", "Bearer rotated-token-9876543210") for a in auths)
    finally:
        k.stop()


def test_a_refused_token_is_a_named_error_and_retried(fake, certs, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("wrong-token-0000000000")
    k = watcher(fake, certs, bad, resources=("pods",))
    try:
        fake.put("pods", pod("d-1", "shop", "10.42.0.24", "n1"))
        until(lambda: k.state["pods"].errors >= 2, "two failed lists (backoff, then retry)")
        assert wid(k, "10.42.0.24") is None  # nothing listed yet: the layers below name it
        err = k.status()["last_error"]
        assert "401 Unauthorized" in err and "--k8s-token-file" in err
        assert not k.status()["connected"] and not k.synced()
        bad.write_text(TOKEN)  # fixed: the next retry reads the file again and gets in
        assert k.wait_synced(10)
        until(lambda: k.status()["last_error"] is None, "the error cleared")
        assert wid(k, "10.42.0.24") == "Pod:shop/d-1"
    finally:
        k.stop()


def test_lists_follow_continue_pages(fake, certs, token_file, monkeypatch):
    monkeypatch.setattr("aggregator.k8s.api.PAGE", 2)
    fake.load({"pods": [pod(f"p-{i}", "shop", f"10.42.1.{i}", "n1") for i in range(5)]})
    k = watcher(fake, certs, token_file, resources=("pods",))
    try:
        assert k.wait_synced(10)
        assert [c.get("continue") for c in fake.calls("pods", watch=False)] == [None, "2", "4"]
        assert all(wid(k, f"10.42.1.{i}") == f"Pod:shop/p-{i}" for i in range(5))
    finally:
        k.stop()


def test_a_wrong_ca_is_a_named_tls_error_in_status_and_the_aggregator_keeps_serving(
        fake, certs, token_file, tmp_path):
    other = Certs(tmp_path / "other", name="some-other-cluster")
    settings = AggregatorSettings(data_dir=tmp_path / "data", insecure_open=True,
                                  k8s_api=fake.url, k8s_ca=other.ca_file,
                                  k8s_token_file=token_file)
    app = create_app(settings)
    with TestClient(app) as client:
        kube = app.state.pipeline.kubernetes
        until(lambda: kube.status()["last_error"], "the TLS error")
        st = client.get("/api/v1/status").json()["kubernetes"]
        assert st["enabled"] and not st["connected"] and not st["synced"]
        assert st["last_error"] == (
            f"TLS to {fake.url}: certificate verify failed: self-signed certificate in "
            "certificate chain: give the cluster CA with --k8s-ca FILE")
        assert st["objects"] == {"pods": 0, "services": 0, "endpointslices": 0, "nodes": 0}
        assert st["ca"] == str(other.ca_file) and TOKEN not in str(st)  # never a secret
        assert client.get("/healthz").json() == {"status": "ok"}
        metrics = client.get("/metrics").text
        assert 'eastwest_kubernetes_connected{resource="pods"} 0.0' in metrics
        assert 'eastwest_kubernetes_synced{resource="nodes"} 0.0' in metrics
        assert 'eastwest_kubernetes_errors_total{resource="pods"}' in metrics
        assert client.get("/api/v1/graph").status_code == 200  # serving, names from below
        assert not any(a for _, _, _, a in fake.requests)  # no request got through: no token sent
    assert not any(t.name.startswith("eastwest-k8s") and t.is_alive()
                   for t in __import__("threading").enumerate())


def test_status_without_kubernetes(tmp_path):
    app = create_app(AggregatorSettings(data_dir=tmp_path / "data", insecure_open=True))
    with TestClient(app) as client:
        body = client.get("/api/v1/status").json()
        assert body["kubernetes"] == {"enabled": False} and "records" in body["correlation"]["lag"]


# -- pod IP reuse, through the pipeline's correlation ------------------------------------------
def record(observer: str, start: datetime, cport: int, coll: str) -> FlowRecord:
    return FlowRecord(record_id=f"{coll}:{cport}:{observer}", collector=coll, source="vxlan",
                      start=start, end=start + timedelta(seconds=2), final=True, protocol="tcp",
                      family=4, client=Endpoint("10.42.0.50", cport),
                      server=Endpoint("10.42.0.7", 5432), observer=observer, bytes_c2s=100,
                      bytes_s2c=200)


def test_a_reused_pod_ip_names_each_connection_after_the_pod_that_had_it_then(
        fake, certs, token_file, tmp_path):
    """db-a has 10.42.0.7; it is deleted, db-b gets the address. A connection that started
    before the delete is db-a's, one after it db-b's; the old connection's record arrives
    LAST (a collector's spool drained late), after db-b took the address."""
    t0 = now().replace(microsecond=0) - timedelta(minutes=10)
    fake.load({"pods": [
        pod("client-1", "shop", "10.42.0.50", "n1", owner=("StatefulSet", "client"),
            created=t0.strftime("%Y-%m-%dT%H:%M:%SZ")),
        pod("db-a-0", "shop", "10.42.0.7", "n2", owner=("StatefulSet", "db-a"),
            created=t0.strftime("%Y-%m-%dT%H:%M:%SZ"))]})
    k = watcher(fake, certs, token_file)
    assert k.wait_synced(10)
    store = DuckDBStore(tmp_path / "store")
    d = driven(store, IdentityResolver(None, [k]), settle_s=0)
    try:
        before = now() - timedelta(seconds=60)   # while db-a had the address
        d.ingest("h1", 1, [record("path", before - timedelta(seconds=30), 41000, "h1")])
        fake.delete("pods", "db-a-0", "shop")
        until(lambda: k.index.objects["pods"] == 1, "db-a deleted")
        fake.put("pods", pod("db-b-0", "shop", "10.42.0.7", "n3", owner=("StatefulSet", "db-b")))
        until(lambda: wid(k, "10.42.0.7", now() + timedelta(seconds=60)) == "StatefulSet:shop/db-b",
              "db-b has the address")
        after = now() + timedelta(seconds=40)
        d.ingest("h1", 2, [record("path", after, 41001, "h1")])
        d.ingest("h2", 1, [record("path", before, 41002, "h2")])  # late: the old pod's
        assert d.flush(30)
        rows = sorted((r["client_wid"], r["server_wid"], r["client_port"])
                      for r in d.rows("client_wid", "server_wid", "client_port"))
        assert rows == [("shop/client", "shop/db-a", 41000), ("shop/client", "shop/db-a", 41002),
                        ("shop/client", "shop/db-b", 41001)]
    finally:
        d.close()
        k.stop()


def test_a_certificate_for_another_name_is_named_as_such(tmp_path, token_file):
    wrong = Certs(tmp_path / "pki", name="named-cluster", san=("kubernetes.default.svc",))
    with FakeApiServer(wrong, tokens={TOKEN}) as api:
        k = watcher(api, wrong, token_file, resources=("pods",))
        try:
            until(lambda: k.status()["last_error"], "the TLS error")
            assert k.status()["last_error"] == (
                f"TLS to {api.url}: certificate verify failed: IP address mismatch, certificate "
                "is not valid for '127.0.0.1'.: give --k8s-api a name or address the API "
                "server's certificate names")
        finally:
            k.stop()


def test_watches_that_end_at_once_and_empty_back_off_instead_of_spinning(fake, certs, token_file):
    waits: list[float] = []

    class Counted(Backoff):
        def next(self) -> float:
            waits.append(super().next())
            return waits[-1]

    fake.watch_cap_s = 0.0  # a proxy that cuts every stream at once
    cfg = load_cluster(fake.url, ca=str(certs.ca_file), token_file=str(token_file), env={})
    k = KubernetesIdentity.from_config(cfg, backoff=lambda: Counted(0.01, 0.05, rand=lambda: 1.0),
                                       resources=("pods",))
    k.start()
    try:
        until(lambda: len(waits) >= 3, "backoff between empty watches")
        assert waits[:3] == [0.01, 0.02, 0.04]  # growing: not reset by an empty watch
        assert k.state["pods"].errors == 0 and k.state["pods"].lists == 1  # no error, no re-list
    finally:
        k.stop()
