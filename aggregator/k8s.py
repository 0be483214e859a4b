"""Kubernetes identity: pod and service IPs -> workloads, through the official `kubernetes` client.

Stage: an `IdentitySource` layer of aggregator/identity.py (after the static map and the
collector-reported workload). In: the API server's pods, services and endpoints (core/v1 list
calls, https://kubernetes.io/docs/reference/kubernetes-api/). Out: `Identity` by IP.

- A pod IP names the pod's controller: a ReplicaSet owner becomes its Deployment (the name
  without the `pod-template-hash` suffix); StatefulSet, DaemonSet, Job owners are taken as they
  are; a bare pod is kind Pod. host = `spec.nodeName`. Host-network pods are skipped (their IP is
  the node's, shared by many).
- A service's ClusterIP names the service (kind Service): what a client that dialed the VIP
  reached before DNAT (docs/architecture.md).
- An endpoint address without a pod behind it (a selector-less service) names the service.
The maps are refreshed at most every `ttl_s` seconds, on lookup, so the data path never waits
on the API server more than once per period; a failed refresh keeps the old maps and is counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aggregator.connection import Identity

log = logging.getLogger("eastwest.aggregator.k8s")


def _controller(pod: Any) -> tuple[str, str]:
    meta = pod.metadata
    for ref in meta.owner_references or []:
        if not ref.controller:
            continue
        if ref.kind == "ReplicaSet":
            h = (meta.labels or {}).get("pod-template-hash")
            if h and ref.name.endswith("-" + h):
                return ref.name[: -len(h) - 1], "Deployment"
            return ref.name, "ReplicaSet"
        return ref.name, ref.kind
    return meta.name, "Pod"


class KubernetesIdentity:
    def __init__(self, api: Any, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api  # a kubernetes.client.CoreV1Api (or anything with the same list calls)
        self.ttl_s = ttl_s
        self.clock = clock
        self.by_ip: dict[str, Identity] = {}
        self.refreshed_at: float | None = None
        self.failures = 0

    @classmethod
    def connect(cls, url: str, token: str | None = None, verify_ssl: bool = True,
                ttl_s: float = 30.0) -> KubernetesIdentity:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = url.rstrip("/")
        cfg.verify_ssl = verify_ssl
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return cls(client.CoreV1Api(client.ApiClient(cfg)), ttl_s)

    def refresh(self) -> int:
        pods = self.api.list_pod_for_all_namespaces(watch=False).items
        services = self.api.list_service_for_all_namespaces(watch=False).items
        endpoints = self.api.list_endpoints_for_all_namespaces(watch=False).items
        by_ip: dict[str, Identity] = {}
        for ep in endpoints:
            for subset in ep.subsets or []:
                for addr in subset.addresses or []:
                    if addr.target_ref is None and addr.ip:
                        by_ip[addr.ip] = Identity(name=ep.metadata.name, namespace=ep.metadata.namespace,
                                                  kind="Service", source="kubernetes")
        for svc in services:
            for ip in [svc.spec.cluster_ip, *(svc.spec.cluster_ips or [])]:
                if ip and ip != "None":
                    by_ip[ip] = Identity(name=svc.metadata.name, namespace=svc.metadata.namespace,
                                         kind="Service", labels=dict(svc.metadata.labels or {}),
                                         source="kubernetes")
        for pod in pods:
            if pod.spec.host_network or pod.status is None:
                continue
            name, kind = _controller(pod)
            ident = Identity(name=name, namespace=pod.metadata.namespace, kind=kind,
                             host=pod.spec.node_name, labels=dict(pod.metadata.labels or {}),
                             source="kubernetes")
            ips = [p.ip for p in (pod.status.pod_ips or []) if p.ip] or [pod.status.pod_ip]
            for ip in ips:
                if ip:
                    by_ip[ip] = ident
        self.by_ip = by_ip
        self.refreshed_at = self.clock()
        return len(by_ip)

    def lookup(self, ip: str, port: int) -> Identity | None:
        now = self.clock()
        if self.refreshed_at is None or now - self.refreshed_at >= self.ttl_s:
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the API server is down: keep the old maps
                self.failures += 1
                self.refreshed_at = now
                log.warning("kubernetes refresh failed (%d so far): %s", self.failures, exc)
        return self.by_ip.get(ip)
