"""The Kubernetes identity layer: list + watch in the background, lookups from memory.

Stage: an `IdentitySource` of aggregator/identity.py (after the static map and the
collector-reported workload). In: the API server (aggregator/k8s/api.py), one thread per
resource (pods, services, EndpointSlices, nodes). Out: `lookup(ip, port, at)` from the index
(aggregator/k8s/index.py) and `status()` for GET /api/v1/status.

Each thread runs the informer loop of client-go's reflector: list (remember the list's
resourceVersion) -> watch from it (ADDED/MODIFIED/DELETED change the index; BOOKMARK only
advances the version; each event's object carries the newest version) -> when the server ends
the watch, watch again from the last version; on 410 Gone, list again (the list replaces the
index's objects of that kind: those missing were deleted meanwhile); on any other error, wait
with jittered exponential backoff (`Backoff`) and list again. Correlation never waits on any of
this: before the first list of a kind completes, lookups of it answer None and the layers below
name the end. Errors are kept for the status (the last one, with its time, per resource) and
logged, at most once a minute per resource and message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aggregator.connection import Identity
from aggregator.k8s.api import RESOURCES, Gone, KubeApi, KubeError
from aggregator.k8s.config import ClusterConfig
from aggregator.k8s.index import Index

log = logging.getLogger("eastwest.aggregator.k8s")
WATCH_TIMEOUT_S = (300, 600)  # each watch asks the server to end it after 5-10 min (client-go)
LOG_EVERY_S = 60.0


class Backoff:
    """Jittered exponential backoff ("full jitter"): the n-th wait is uniform in
    [base * 2^n / 2, base * 2^n], capped at `cap`; `reset()` after a success."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.base_s, self.cap_s, self.rand = base_s, cap_s, rand
        self.failures = 0

    def next(self) -> float:
        d = min(self.cap_s, self.base_s * (2 ** self.failures))
        self.failures = min(self.failures + 1, 30)
        return d / 2 + self.rand() * d / 2

    def reset(self) -> None:
        self.failures = 0


@dataclass
class ResourceState:
    synced: bool = False            # a list completed (lookups of this kind answer)
    watching: bool = False
    resource_version: str = ""
    lists: int = 0
    relists_gone: int = 0           # lists after a 410
    events: int = 0
    bookmarks: int = 0
    errors: int = 0
    last_event: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None


class KubernetesIdentity:
    """`IdentitySource` over a watched cluster. `start()` starts the threads, `stop()` ends them."""

    def __init__(self, api: KubeApi, *, keep_deleted_s: float = 3600.0, skew_s: float = 30.0,
                 backoff: Callable[[], Backoff] = Backoff,
                 resources: tuple[str, ...] = tuple(RESOURCES),
                 wall: Callable[[], float] = time.time) -> None:
        self.api = api
        self.index = Index(keep_deleted_s, skew_s, wall)
        self.resources = resources
        self.state = {r: ResourceState() for r in resources}
        self._backoff = backoff
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._logged: dict[tuple[str, str], float] = {}

    @classmethod
    def from_config(cls, cfg: ClusterConfig, **kw: Any) -> KubernetesIdentity:
        return cls(KubeApi(cfg), **kw)

    # -- IdentitySource -------------------------------------------------------------------------
    def lookup(self, ip: str, port: int, at: datetime) -> Identity | None:
        return self.index.lookup(ip, at.timestamp())

    def pod_network_node(self, ip: str, at: datetime) -> Identity | None:
        """The node whose pod CIDR holds `ip`, no pod holding it (aggregator/k8s/index.py)."""
        return self.index.pod_network_node(ip, at.timestamp())

    def service_addresses(self, namespace: str | None, name: str) -> list[str]:
        return self.index.service_addresses(namespace, name)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        for r in self.resources:
            t = threading.Thread(target=self._run, args=(r,), name=f"eastwest-k8s-{r}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.api.close()  # ends the watch streams
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def synced(self) -> bool:
        return all(s.synced for s in self.state.values())

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.synced():
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.02)
        return True

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, resource: str) -> None:
        st = self.state[resource]
        backoff = self._backoff()
        rv: str | None = None  # None: list first
        while not self._stop.is_set():
            try:
                if rv is None:
                    items, rv = self.api.list(resource)
                    self.index.replace(resource, items)
                    st.synced, st.lists, st.resource_version = True, st.lists + 1, rv
                    st.last_event = datetime.now(UTC)
                    log.info("kubernetes: %d %s listed at resourceVersion %s",
                             len(items), resource, rv)
                st.watching = True
                st.last_error = None
                timeout = random.randint(*WATCH_TIMEOUT_S)
                began, got = time.monotonic(), 0
                for kind, obj in self.api.watch(resource, rv, timeout):
                    got += 1
                    if self._stop.is_set():
                        return
                    backoff.reset()  # the watch works: the next failure waits the least
                    new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
                    if kind == "BOOKMARK":
                        st.bookmarks += 1
                    elif kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.index.apply(resource, kind, obj)
                        st.events += 1
                        st.last_event = datetime.now(UTC)
                    rv = st.resource_version = new_rv
                # the server ended the watch (its timeout): watch again from `rv`; one that
                # ends at once with nothing in it (a proxy cutting streams) waits first
                if not got and time.monotonic() - began < 1.0:
                    if self._stop.wait(backoff.next()):
                        return
                else:
                    backoff.reset()
            except Gone as exc:
                st.relists_gone += 1
                log.info("kubernetes: %s", exc)
                rv = None  # list again, at once
            except KubeError as exc:
                if self._stop.is_set():
                    return
                self._failed(resource, st, str(exc))
                rv = None
                if self._stop.wait(backoff.next()):
                    return
            except Exception as exc:  # noqa: BLE001 - a bug or a surprise must not end the thread
                if self._stop.is_set():
                    return
                self._failed(resource, st, f"{resource}: {type(exc).__name__}: {exc}")
                rv = None
                if self._stop.wait(backoff.next()):
                    return
            finally:
                st.watching = False

    def _failed(self, resource: str, st: ResourceState, message: str) -> None:
        st.errors += 1
        st.last_error, st.last_error_at = message, datetime.now(UTC)
        now = time.monotonic()
        key = ("", message)  # the same cause on every resource: logged once
        if now - self._logged.get(key, -1e18) >= LOG_EVERY_S:
            self._logged[key] = now
            log.error("kubernetes: %s", message)

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The `kubernetes` section of GET /api/v1/status."""
        states = self.state.values()
        errors = [(s.last_error_at, s.last_error) for s in states if s.last_error]
        last_events = [s.last_event for s in states if s.last_event is not None]
        return {
            **self.api.cfg.describe(),
            "connected": all(s.synced and s.last_error is None for s in states),
            "synced": self.synced(),
            "last_error": max(errors, key=lambda e: e[0] or datetime.min.replace(tzinfo=UTC))[1]
            if errors else None,
            "objects": dict(self.index.objects),
            "last_event": max(last_events).isoformat() if last_events else None,
            "resources": {r: {"synced": s.synced, "watching": s.watching,
                              "resource_version": s.resource_version, "lists": s.lists,
                              "relists_after_gone": s.relists_gone, "events": s.events,
                              "bookmarks": s.bookmarks, "errors": s.errors,
                              "last_error": s.last_error,
                              "last_error_at": s.last_error_at.isoformat()
                              if s.last_error_at else None}
                          for r, s in self.state.items()},
        }
