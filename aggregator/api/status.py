"""GET /api/v1/status: how the aggregator's inputs are doing, for operators (read token).

In: the pipeline (aggregator/pipeline.py). Out: JSON: the version, correlation's backlog, and a
`kubernetes` section (aggregator/k8s/watch.py `status()`): the server and how it is trusted and
authenticated (never a secret), `connected` (every resource listed and no error since),
`synced`, `last_error` (a TLS failure names its cause and the flag that fixes it), objects
indexed per resource, the time of the last event, per-resource counters. `{"enabled": false}`
when no cluster is configured. docs/api.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from aggregator.api.params import check_names
from aggregator.auth import require_read
from eastwest import __version__

router = APIRouter(dependencies=[Depends(require_read)])


@router.get("/api/v1/status", summary="The aggregator's inputs: correlation backlog, "
            "Kubernetes identity (connected, last error, objects indexed, last event)")
def status(request: Request) -> dict[str, Any]:
    check_names(request, set(), filters=False)  # no parameters: a typo is a 400, as everywhere
    pipe = request.app.state.pipeline
    kube = pipe.kubernetes
    return {
        "version": __version__,
        "correlation": {"lag": pipe.correlation.lag()},
        "kubernetes": {"enabled": True, **kube.status()} if kube is not None
        else {"enabled": False},
    }
