"""NATS JetStream, shared by both ends of the NATS transport: connection options (credentials,
TLS), the stream (created or validated at start), subjects, and an asyncio loop in a thread for
the collector's and the aggregator's blocking code.

In:  `--nats URL` and its companion flags/environment.  Out: a connected `nats.NATS` client, a
JetStream context, and the stream `EASTWEST` (by default) holding one subject per partition,
`eastwest.flows.p<K>.>` (a collector publishes to `eastwest.flows.p<K>.<collector>`,
eastwest/partition.py): the stream's subjects state its partition count P.

The stream (https://docs.nats.io/nats-concepts/jetstream/streams):
- retention `workqueue`: a batch is deleted once the aggregators' durable consumer acks it (the
  aggregators ack only after the store holds it), so `max_bytes` bounds what is *waiting*;
- `max_bytes` and `max_age` limits with discard `new`: a full stream refuses new batches, and the
  collectors keep them in their spool (back-pressure, nothing silently discarded);
- file storage: the stream survives a NATS restart.
An existing stream with other subjects or another retention is an error naming both values
(it belongs to someone else, or was made with another P: P is fixed for a stream's life, since
a connection's partition depends on it); other limits of an existing stream are left as the
operator set them.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from eastwest.errors import ConfigError
from eastwest.partition import DEFAULT_PARTITIONS, check_partitions

TOKEN_ENV = "EASTWEST_NATS_TOKEN"
DEFAULT_STREAM = "EASTWEST"
DEFAULT_PREFIX = "eastwest.flows"
DEFAULT_MAX_BYTES = 1024**3
DEFAULT_MAX_AGE_S = 24 * 3600.0
_SUBJECT_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
T = TypeVar("T")


@dataclass(frozen=True)
class NatsOptions:
    url: str
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_PREFIX
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age_s: float = DEFAULT_MAX_AGE_S
    creds: str | None = None        # a .creds file (JWT + nkey seed), NATS decentralized auth
    token: str | None = None        # or a token ($EASTWEST_NATS_TOKEN); user:pass go in the URL
    ca_file: str | None = None      # TLS: verify the server with this CA
    cert_file: str | None = None    # TLS client certificate (mutual TLS) ...
    key_file: str | None = None     # ... and its key
    connect_timeout: float = 2.0
    partitions: int = DEFAULT_PARTITIONS  # P, fixed per stream (eastwest/partition.py)

    def __post_init__(self) -> None:
        check_partitions(self.partitions)
        for u in self.servers:
            if not u.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ConfigError("--nats", self.url, "expected nats://HOST:4222 (or tls://; "
                                  "several separated by commas)")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.stream):
            raise ConfigError("--nats-stream", self.stream, "letters, digits, _ and - only")
        if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", self.subject_prefix):
            raise ConfigError("--nats-subject", self.subject_prefix, "dot-separated tokens, no "
                              "wildcards")
        if self.max_bytes < 1024 * 1024:
            raise ConfigError("--nats-max-bytes", self.max_bytes, "at least 1 MiB")
        if self.max_age_s <= 0:
            raise ConfigError("--nats-max-age", self.max_age_s, "must be positive")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("--nats-cert/--nats-key", f"{self.cert_file}/{self.key_file}",
                              "give both or neither")
        for key, path in (("--nats-creds", self.creds), ("--nats-ca", self.ca_file),
                          ("--nats-cert", self.cert_file), ("--nats-key", self.key_file)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(key, path, "no such file")

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def subjects(self) -> list[str]:
        """The stream's subjects: one per partition (they state P)."""
        return [self.partition_subjects(k) for k in range(self.partitions)]

    def partition_subjects(self, partition: int) -> str:
        """What partition K's durable consumer takes: every collector's subject of K."""
        return f"{self.subject_prefix}.p{partition}.>"

    def subject_for(self, collector: str, partition: int = 0) -> str:
        """One subject per partition and collector; characters a subject token cannot hold
        become `_` (the batch itself carries the exact collector name)."""
        return f"{self.subject_prefix}.p{partition}.{_SUBJECT_TOKEN.sub('_', collector) or '_'}"

    @property
    def lease_bucket(self) -> str:
        """The JetStream key-value bucket of the aggregators' partition leases."""
        return f"{self.stream}_leases"

    @classmethod
    def from_args(cls, args: Any, env: dict[str, str] | None = None) -> NatsOptions:
        env = dict(os.environ) if env is None else env
        return cls(url=args.nats, stream=getattr(args, "nats_stream", None) or DEFAULT_STREAM,
                   subject_prefix=getattr(args, "nats_subject", None) or DEFAULT_PREFIX,
                   max_bytes=int(getattr(args, "nats_max_bytes", None) or DEFAULT_MAX_BYTES),
                   max_age_s=float(getattr(args, "nats_max_age", None) or DEFAULT_MAX_AGE_S),
                   creds=getattr(args, "nats_creds", None), token=env.get(TOKEN_ENV) or None,
                   ca_file=getattr(args, "nats_ca", None),
                   cert_file=getattr(args, "nats_cert", None),
                   key_file=getattr(args, "nats_key", None),
                   partitions=DEFAULT_PARTITIONS if getattr(args, "nats_partitions", None) is None
                   else int(args.nats_partitions))

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.ca_file or self.cert_file or any(u.startswith("tls://") for u in self.servers)):
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def connect_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"servers": self.servers, "connect_timeout": self.connect_timeout,
                              "allow_reconnect": True, "max_reconnect_attempts": -1,
                              "reconnect_time_wait": 0.5}
        if self.creds:
            kw["user_credentials"] = self.creds
        if self.token:
            kw["token"] = self.token
        tls = self.tls_context()
        if tls is not None:
            kw["tls"] = tls
        return kw


async def connect(opts: NatsOptions, name: str, *, no_echo: bool = False) -> Any:
    """A client that reconnects on its own; `no_echo`: its own publishes never come back to
    its subscriptions."""
    import nats

    async def quiet(_exc: Exception) -> None:  # reconnects are retried; callers count failures
        return None

    return await nats.connect(name=name, error_cb=quiet, no_echo=no_echo, **opts.connect_kwargs())


async def ensure_stream(js: Any, opts: NatsOptions) -> Any:
    """Create the stream, or check that an existing one is ours; returns its StreamInfo."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        info = await js.stream_info(opts.stream)
    except NotFoundError:
        return await js.add_stream(StreamConfig(
            name=opts.stream, description="eastwest flow-record batches (collector -> aggregators)",
            subjects=opts.subjects, retention=RetentionPolicy.WORK_QUEUE,
            max_bytes=opts.max_bytes, max_age=opts.max_age_s, discard=DiscardPolicy.NEW,
            storage=StorageType.FILE, duplicate_window=120.0))
    cfg = info.config
    have = list(cfg.subjects or [])
    if have != opts.subjects:
        theirs = _partitions_of(have, opts.subject_prefix)
        if theirs is not None:
            raise ConfigError("--nats-partitions", opts.partitions, f"stream {opts.stream!r} "
                              f"was created with {theirs} partitions, and P is fixed for a "
                              f"stream's life: give --nats-partitions {theirs} (every collector "
                              "and aggregator of a stream states the same P), or another "
                              "--nats-stream")
        shown = have if len(have) <= 3 else [*have[:2], "…", have[-1]]
        want = opts.subjects if opts.partitions <= 3 else [*opts.subjects[:2], "…",
                                                             opts.subjects[-1]]
        raise ConfigError("--nats-stream", opts.stream, f"exists with subjects {shown}, "
                          f"not {want}: choose another --nats-stream or --nats-subject (a "
                          "stream of an eastwest without partitions: drain it, then delete it)")
    if cfg.retention != RetentionPolicy.WORK_QUEUE:
        raise ConfigError("--nats-stream", opts.stream, f"exists with retention "
                          f"{cfg.retention}, eastwest needs workqueue")
    return info


def _partitions_of(subjects: list[str], prefix: str) -> int | None:
    """P of a stream whose subjects are exactly `<prefix>.p0.>` … `<prefix>.p<P-1>.>`."""
    want = [f"{prefix}.p{k}.>" for k in range(len(subjects))]
    return len(subjects) if subjects and subjects == want else None


class LoopThread:
    """An asyncio event loop in a daemon thread; `run(coro, timeout)` from any other thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            # cancel what the NATS client left running (subscription readers, pingers), so the
            # loop closes with no pending task
            async def cancel_all() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                self.run(cancel_all(), 5)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
