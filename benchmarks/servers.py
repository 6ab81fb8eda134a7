"""The processes under test, and what can be read off them.

A private redis-server (no persistence, free port), the real front worker
(`python -m workers.cli front ... --workers 1`) and the echo server, each a
child process so that its CPU time can be read with psutil.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
import zmq

from workers.launchers.process import free_port
from workers.launchers.redis import EmbeddedRedis

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Snapshot:
    """Counters read before and after a measured drive."""

    server_cpu: float  # seconds, user + system, of the server under test
    redis_cpu: float  # seconds, INFO cpu used_cpu_user + used_cpu_sys
    commands: dict[str, int]  # INFO commandstats calls, by command
    script_usec: int  # INFO commandstats usec of evalsha: Redis time in the scripts
    loadgen_cpu: float  # seconds, this process (the load generator) with its zmq threads

    def minus(self, before: Snapshot) -> Snapshot:
        names = set(self.commands) | set(before.commands)
        return Snapshot(
            self.server_cpu - before.server_cpu,
            self.redis_cpu - before.redis_cpu,
            {n: self.commands.get(n, 0) - before.commands.get(n, 0) for n in sorted(names)},
            self.script_usec - before.script_usec,
            self.loadgen_cpu - before.loadgen_cpu,
        )


def process_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _clean_env() -> dict[str, str]:
    """No STUI_* settings leak in from the caller's shell: defaults only, but
    for one: the statistics phase measures an exact read of the 64 buckets,
    so the front reads them for every request (STUI_STATS_MAX_AGE=0) rather
    than from its snapshot of at most a second (the default), which costs a
    request no script call of its own (tests/test_bounds.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUI_")}
    env["STUI_LOG_LEVEL"] = "WARNING"
    env["STUI_STATS_MAX_AGE"] = "0"
    return env


def wait_answering(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                   proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until the server answers a ping on a REQ socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{endpoint}: server exited with {proc.returncode}")
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            sock.send(b'{"id":"ready","command":"ping","parameters":{}}')
            if sock.poll(500, zmq.POLLIN):
                sock.recv()
                return
        finally:
            sock.close(linger=0)
    raise RuntimeError(f"{endpoint}: no answer within {timeout} s")


class Stack:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.redis_server = EmbeddedRedis()  # no data_dir: no persistence
        self.front_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.echo_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.front: subprocess.Popen[bytes] | None = None
        self.echo: subprocess.Popen[bytes] | None = None
        self.rc: redis.Redis | None = None

    def start(self) -> Stack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_server.start()
        self.rc = redis.Redis.from_url(self.redis_server.url)
        py = sys.executable
        self.front = self._spawn("front", [py, "-m", "workers.cli", "front", "--redis-url",
                                           self.redis_server.url, "--bind", self.front_endpoint,
                                           "--workers", "1"])
        self.echo = self._spawn("echo", [py, "-m", "benchmarks.echo_server",
                                         "--bind", self.echo_endpoint])
        wait_answering(self.ctx, self.front_endpoint, self.front)
        wait_answering(self.ctx, self.echo_endpoint, self.echo)
        return self

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            return subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=log,
                                    stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for proc in (self.front, self.echo):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.front = self.echo = None
        if self.rc is not None:
            self.rc.close()
            self.rc = None
        self.redis_server.stop()
        self.ctx.destroy(linger=0)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading the counters --------------------------------------------------

    @property
    def redis(self) -> redis.Redis:
        assert self.rc is not None, "stack not started"
        return self.rc

    def endpoint(self, server: str) -> str:
        return self.front_endpoint if server == "front" else self.echo_endpoint

    def pid(self, server: str) -> int:
        proc = self.front if server == "front" else self.echo
        assert proc is not None, "stack not started"
        if proc.poll() is not None:
            raise RuntimeError(f"the {server} server exited with {proc.returncode}")
        return proc.pid

    def info(self, section: str) -> dict[str, Any]:
        return dict(self.redis.info(section))

    def snapshot(self, server: str) -> Snapshot:
        cpu = self.info("cpu")
        stats = self.info("commandstats")
        commands = {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if isinstance(value, dict)
        }
        usec = int(stats.get("cmdstat_evalsha", {}).get("usec", 0))
        return Snapshot(process_cpu(self.pid(server)),
                        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), commands,
                        usec, time.process_time())

    def used_memory(self) -> int:
        return int(self.info("memory")["used_memory"])

    def server_version(self) -> str:
        return str(self.info("server")["redis_version"])
