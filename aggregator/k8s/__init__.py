"""Kubernetes workload identity (docs/aggregator.md, "Workload identity"):

- config.py: where the API server is and how to trust and authenticate to it (in-cluster,
  kubeconfig, flags), checked at start-up;
- api.py: list and watch over HTTPS, errors translated (TLS causes named, 410 = `Gone`);
- index.py: address -> owner over time (pod IPs are reused), what lookups read;
- watch.py: `KubernetesIdentity`, the `IdentitySource`: one list+watch thread per resource.
"""

from aggregator.k8s.config import ClusterConfig, TokenSource, load_cluster
from aggregator.k8s.watch import KubernetesIdentity

__all__ = ["ClusterConfig", "KubernetesIdentity", "TokenSource", "load_cluster"]
