"""Real servers for tests and benchmarks: ClickHouse (two local shards) and NATS JetStream.

Each server runs from the Debian package's binary (clickhouse-server 18.16, nats-server 2.9)
with its own config and data directory under a temporary directory, on free loopback ports, and
is stopped (and its directory removed) by `stop()`. Readiness is awaited by connecting, never by
sleeping a fixed time.

ClickHouse's `remote_servers` defines the cluster `ew`: two shards on this same server, told
apart by `<default_database>` (ew_s1, ew_s2), the same layout as two real shard hosts.

`ReplicatedClickHouse`: ZooKeeper (Debian's package, run with java) and four ClickHouse servers,
the cluster `ewr` of 2 shards x 2 replicas with `internal_replication`, each replica its own
process, ports and data directory; a replica can be killed -9 and started again on its store.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CLICKHOUSE_BIN = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
NATS_BIN = shutil.which("nats-server") or "/usr/sbin/nats-server"
CLUSTER = "ew"
SHARD_DBS = ("ew_s1", "ew_s2")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL
    (a killed test run left its servers running before). Servers are started from the main
    thread: the signal follows the thread that forked."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _await(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Poll `ready()` until it is true; fail with the server's log when the process died."""
    give_up = time.monotonic() + timeout
    delay = 0.02
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
        if ready():
            return
        if time.monotonic() > give_up:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class ClickHouseServer:
    def __init__(self, root: Path | None = None, port: int | None = None,
                 remote_servers: str | None = None, extra_config: str = "") -> None:
        if not os.path.exists(CLICKHOUSE_BIN):
            raise RuntimeError(f"{CLICKHOUSE_BIN} is missing: run scripts/setup-system.sh "
                               "(Debian package clickhouse-server)")
        self.root = Path(root or tempfile.mkdtemp(prefix="ew-clickhouse-"))
        self.port = port or free_port()
        self.remote_servers = remote_servers   # the <remote_servers> body; default: 2 local shards
        self.extra_config = extra_config       # more top-level config (ZooKeeper, ...)
        self.proc: subprocess.Popen | None = None

    def url(self, database: str, cluster: bool = True) -> str:
        return (f"clickhouse://127.0.0.1:{self.port}/{database}"
                + (f"?cluster={CLUSTER}" if cluster else ""))

    def start(self) -> ClickHouseServer:
        r = self.root
        for d in ("data", "tmp", "user_files", "schemas"):
            (r / d).mkdir(parents=True, exist_ok=True)
        shards = "".join(
            f"<shard><replica><host>127.0.0.1</host><port>{self.port}</port>"
            f"<default_database>{db}</default_database></replica></shard>" for db in SHARD_DBS)
        remote = self.remote_servers or f"<{CLUSTER}>{shards}</{CLUSTER}>"
        (r / "config.xml").write_text(f"""<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{r}/server.log</log><errorlog>{r}/error.log</errorlog>
    <console>0</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{self.port}</tcp_port>
  <path>{r}/data/</path>
  <tmp_path>{r}/tmp/</tmp_path>
  <user_files_path>{r}/user_files/</user_files_path>
  <format_schema_path>{r}/schemas/</format_schema_path>
  <mark_cache_size>67108864</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <remote_servers>{remote}</remote_servers>
{self.extra_config}
</yandex>
""")
        (r / "users.xml").write_text("""<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
  </interval></default></quotas>
</yandex>
""")
        out = open(r / "stdout.log", "ab")  # noqa: SIM115 - the server owns it until stop()
        self.proc = subprocess.Popen([CLICKHOUSE_BIN, f"--config-file={r}/config.xml"],
                                     stdout=out, stderr=subprocess.STDOUT, cwd=r,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        _await("clickhouse-server", self._answers, self.proc, r / "error.log")
        return self

    def _answers(self) -> bool:
        if not _port_open(self.port):
            return False
        from clickhouse_driver import Client

        c = Client(host="127.0.0.1", port=self.port, connect_timeout=1)
        try:
            c.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False
        finally:
            c.disconnect()

    def client(self):
        from clickhouse_driver import Client

        return Client(host="127.0.0.1", port=self.port)

    def kill(self) -> None:
        """kill -9: no shutdown, the data directory stays for `start()` again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        # the data is thrown away: a clean shutdown (18.16 takes ~30 s) would only cost time
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


ZOOKEEPER_CP = "/usr/share/java/zookeeper.jar:/usr/share/java/zookeeper-jute.jar:" \
               "/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-simple.jar"


class ZooKeeperServer:
    """A standalone ZooKeeper 3.8 (Debian's `zookeeper`, run with java) on a free loopback port."""

    def __init__(self, root: Path | None = None) -> None:
        if not os.path.exists("/usr/share/java/zookeeper.jar") or not shutil.which("java"):
            raise RuntimeError("ZooKeeper is missing: run scripts/setup-system.sh (Debian package "
                               "zookeeper)")
        self.root = Path(root or tempfile.mkdtemp(prefix="ew-zookeeper-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> ZooKeeperServer:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        cfg = self.root / "zoo.cfg"
        cfg.write_text(f"""tickTime=500
dataDir={self.root}/data
clientPort={self.port}
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
maxSessionTimeout=60000
""")
        log = self.root / "zookeeper.log"
        out = open(log, "ab")  # noqa: SIM115 - the server owns it until stop()
        self.proc = subprocess.Popen(
            ["java", "-Xmx256m", "-cp", ZOOKEEPER_CP,
             "org.apache.zookeeper.server.ZooKeeperServerMain", str(cfg)],
            stdout=out, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            preexec_fn=_die_with_parent)
        _await("zookeeper", self._serving, self.proc, log)
        return self

    def _serving(self) -> bool:
        """`ruok` answers before it serves: `srvr` prints `Mode:` once it does."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"srvr")
                return b"Mode:" in s.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


REPLICATED_CLUSTER = "ewr"


class ReplicatedClickHouse:
    """ZooKeeper + 4 ClickHouse servers: cluster `ewr`, 2 shards x 2 replicas,
    `internal_replication` true. `servers[shard][replica]`; `url(db)` names replica 1 of shard
    1 with every other server as `alt_hosts`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="ew-chr-"))
        self.zookeeper = ZooKeeperServer(self.root / "zk")
        ports = [[free_port(), free_port()], [free_port(), free_port()]]
        remote = f"<{REPLICATED_CLUSTER}>" + "".join(
            "<shard><internal_replication>true</internal_replication>" + "".join(
                f"<replica><host>127.0.0.1</host><port>{p}</port>"
                "<default_database>ew</default_database></replica>" for p in shard)
            + "</shard>" for shard in ports) + f"</{REPLICATED_CLUSTER}>"
        self.servers: list[list[ClickHouseServer]] = []
        for si, shard in enumerate(ports):
            row = []
            for ri, port in enumerate(shard):
                extra = (f"<interserver_http_port>{free_port()}</interserver_http_port>"
                         "<interserver_http_host>127.0.0.1</interserver_http_host>"
                         "<zookeeper><node><host>127.0.0.1</host>"
                         f"<port>{self.zookeeper.port}</port></node>"
                         "<session_timeout_ms>6000</session_timeout_ms></zookeeper>"
                         f"<macros><shard>{si + 1}</shard><replica>r{ri + 1}</replica></macros>")
                row.append(ClickHouseServer(self.root / f"ch-s{si + 1}r{ri + 1}", port=port,
                                            remote_servers=remote, extra_config=extra))
            self.servers.append(row)

    @property
    def all(self) -> list[ClickHouseServer]:
        return [s for row in self.servers for s in row]

    def start(self) -> ReplicatedClickHouse:
        self.zookeeper.start()  # first: a server whose replicated tables cannot reach it exits
        for s in self.all:
            s.start()
        return self

    def client(self):
        """A client of the first server that runs (every server has the Distributed tables)."""
        return next(s for s in self.all if s.proc is not None and s.proc.poll() is None).client()

    def url(self, database: str, alt: bool = True) -> str:
        first, *rest = self.all
        alts = ",".join(f"127.0.0.1:{s.port}" for s in rest)
        return (f"clickhouse://127.0.0.1:{first.port}/{database}?cluster={REPLICATED_CLUSTER}"
                + (f"&alt_hosts={alts}" if alt else ""))

    def stop(self) -> None:
        for s in self.all:  # throwaway data: stop() kills, no clean shutdown
            s.stop()
        self.zookeeper.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class NatsServer:
    """nats-server with JetStream, file storage under its own directory; restartable on the
    same port and store (`stop(keep=True)` then `start()`), as the restart test needs."""

    def __init__(self, root: Path | None = None, max_payload: int = 8 * 1024 * 1024) -> None:
        if not os.path.exists(NATS_BIN):
            raise RuntimeError(f"{NATS_BIN} is missing: run scripts/setup-system.sh "
                               "(Debian package nats-server)")
        self.root = Path(root or tempfile.mkdtemp(prefix="ew-nats-"))
        self.port = free_port()
        self.max_payload = max_payload
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        (self.root / "js").mkdir(parents=True, exist_ok=True)
        conf = self.root / "nats.conf"
        conf.write_text(f"""listen: 127.0.0.1:{self.port}
max_payload: {self.max_payload}
jetstream {{ store_dir: "{self.root}/js", max_memory_store: 268435456, max_file_store: 4294967296 }}
""")
        log = self.root / "nats.log"
        self.proc = subprocess.Popen([NATS_BIN, "-c", str(conf), "-l", str(log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        _await("nats-server", self._ready, self.proc, log)
        return self

    def _ready(self) -> bool:
        log = self.root / "nats.log"
        return (_port_open(self.port) and log.exists()
                and "Server is ready" in log.read_text(errors="replace"))

    def stop(self, keep: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:  # the next start appends; readiness looks at the new lines only
            log = self.root / "nats.log"
            if log.exists():
                log.rename(self.root / f"nats-{time.monotonic_ns()}.log")


_clickhouse: ClickHouseServer | None = None


def shared_clickhouse() -> ClickHouseServer:
    """One ClickHouse server per test process, started on first use, stopped at exit."""
    global _clickhouse
    if _clickhouse is None:
        _clickhouse = ClickHouseServer().start()
        atexit.register(_clickhouse.stop)
    return _clickhouse


def store_location(backend: str, path: Path) -> str | Path:
    """Where `open_store(backend, ...)` keeps a test's store: the DuckDB directory, or a
    ClickHouse database (named after the directory, so reopening finds it) on 2 local shards."""
    if backend == "duckdb":
        return path
    db = "t_" + hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return shared_clickhouse().url(db)
