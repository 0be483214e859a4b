"""Kubernetes names on the lab, end to end, with NO workload map: a fake API server over HTTPS
with its own CA (tests/k8s_fake.py; no API server binary can be installed here, docs/deploy.md)
serves the lab's inventory as a cluster: namespaces' pods with labels and owner references
(Deployments through ReplicaSets, a StatefulSet, a DaemonSet, a Job), Services with VIPs,
EndpointSlices and Nodes. The aggregator is configured by its real flags (`--k8s-api
https://127.0.0.1:PORT --k8s-ca FILE --k8s-token-file FILE`), lists and watches it, and one
collector per lab host sends it what the eBPF probes and the VXLAN capture see. Every edge of
the graph is named namespace/workload with the kind the cluster says, and the edges equal the
truth's calling pairs (connections and bytes)."""

from __future__ import annotations

import time

import pytest

from aggregator.settings import INGEST_TOKEN_ENV, READ_TOKEN_ENV, AggregatorSettings
from eastwest.cli import build_parser
from tests.k8s_fake import Certs, FakeApiServer, objects_from_inventory
from tests.lab.harness import (
    INGEST,
    READ,
    Aggregator,
    collectors,
    served_edges,
    truth_edges,
    window_of,
)

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
LAB = "ewk8s"
TOKEN = "lab-k8s-token-0123456789"


def test_every_edge_is_named_by_the_watched_cluster_without_a_workload_map(lab_factory, tmp_path):
    lab = lab_factory(name=LAB, hosts=3, pods_per_host=2)
    certs = Certs(tmp_path / "pki", name="ewk8s-cluster")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    with FakeApiServer(certs, tokens={TOKEN}) as api:
        api.load(objects_from_inventory(lab.inventory))
        args = build_parser().parse_args([
            "aggregator", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0",
            "--k8s-api", api.url, "--k8s-ca", str(certs.ca_file),
            "--k8s-token-file", str(token)])
        settings = AggregatorSettings.from_args(args, env={INGEST_TOKEN_ENV: INGEST,
                                                           READ_TOKEN_ENV: READ})
        assert settings.workload_map is None
        with Aggregator(None, None, settings=settings) as agg:
            deadline = time.monotonic() + 30
            while not (st := agg.get("/api/v1/status")["kubernetes"])["synced"]:
                assert time.monotonic() < deadline, st
                time.sleep(0.05)
            assert st["connected"] and st["last_error"] is None, st
            assert st["objects"] == {"pods": len(lab.inventory["pods"]),
                                     "services": len(lab.inventory["services"]),
                                     "endpointslices": len(lab.inventory["services"]),
                                     "nodes": len(lab.inventory["hosts"])}
            with collectors(lab, agg.url, tmp_path / "spool", ["h1", "h2", "h3"]) as cs:
                truth = lab.traffic(duration=5.0, seed=17)
                for c in cs:
                    c.stop()
            assert len(truth) > 20
            g = agg.get("/api/v1/graph", **window_of(truth))
            assert served_edges(g) == truth_edges(lab, truth)
            kinds = {**{f"{s['namespace']}/{name}": s["kind"]
                        for name, s in lab.inventory["services"].items()}, "load/loadgen": "Job"}
            assert {n["id"]: n["kind"] for n in g["nodes"]} == {
                n["id"]: kinds[n["id"]] for n in g["nodes"]}
            assert agg.get("/api/v1/status")["kubernetes"]["last_error"] is None
