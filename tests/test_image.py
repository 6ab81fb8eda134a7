"""The image and the compose stack, built from the project's own files and
run for real under Docker.

Where Docker Hub cannot be reached, the image is built on a local stand-in
for ``python:3.11-slim`` (workers/launchers/docker.py makes it once with
debootstrap, then finds it in the daemon's store), and the compose stack
takes a Redis image built on the same base from Debian's redis-server
(deploy/image/redis.Dockerfile). Without a Docker daemon (and without root
to start one) every test here skips loudly.

The containers run with the image's own HEALTHCHECK command; only its
interval is shortened (``--health-interval``), so that "turns healthy" takes
seconds rather than the image's 15 s per probe.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from service import codec
from tests.helpers import wait_for
from workers.client import Client, RemoteError
from workers.launchers.docker import (
    Docker,
    DockerDaemon,
    DockerUnavailable,
    build_image,
    ensure_base_image,
)
from workers.launchers.process import LaunchError, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "stui-sessions:test"
REDIS_IMAGE = "local/redis:7"
UID = 10001
HEALTH = ["--health-interval", "1s", "--health-start-period", "30s", "--health-retries", "3"]


def _progress(line: str) -> None:
    print(f"[image] {line}", file=sys.stderr, flush=True)


@dataclass
class Stack:
    """A Docker daemon with the images built, and what a test started on it."""

    docker: Docker
    network: str
    redis_url: str
    started: list[str] = field(default_factory=list)

    def run(self, *args: str, name: str | None = None) -> str:
        name = name or f"stui-test-{uuid.uuid4().hex[:10]}"
        self.docker.run("run", "-d", "--name", name, "--network", self.network, *args)
        self.started.append(name)
        return name

    def inspect(self, name: str, template: str) -> str:
        return self.docker.run("inspect", "-f", template, name).stdout.strip()

    def wait_healthy(self, name: str, timeout: float = 90.0) -> None:
        def healthy() -> bool:
            status = self.inspect(name, "{{.State.Status}} {{.State.Health.Status}}")
            assert not status.startswith(("exited", "dead")), self.logs(name)
            return status == "running healthy"

        try:
            wait_for(healthy, timeout, step=0.5, what=f"{name} healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.health_log(name)}\n{self.logs(name)}") from None

    def health_log(self, name: str) -> str:
        return self.inspect(name, "{{json .State.Health}}")

    def logs(self, name: str) -> str:
        done = self.docker.run("logs", "--tail", "40", name, check=False)
        return f"--- logs of {name} ---\n{done.stdout}{done.stderr}"

    def host_port(self, name: str, port: int) -> int:
        out = self.docker.run("port", name, f"{port}/tcp").stdout.splitlines()[0]
        return int(out.rsplit(":", 1)[1])

    def process_uid(self, name: str) -> int:
        """The real uid of the container's main process, as its kernel sees it."""
        status = self.docker.run("exec", name, "cat", "/proc/1/status").stdout
        line = next(x for x in status.splitlines() if x.startswith("Uid:"))
        return int(line.split()[1])

    def remove(self, name: str) -> None:
        self.docker.run("rm", "-f", "-v", name, check=False)
        if name in self.started:
            self.started.remove(name)


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    daemon = DockerDaemon(progress=_progress)
    try:
        found = daemon.start()
    except DockerUnavailable as exc:
        pytest.skip(f"SKIPPED LOUDLY: no Docker here: {exc}")
    try:
        t0 = time.monotonic()
        ensure_base_image(found, progress=_progress)
        t1 = time.monotonic()
        build_image(found, ROOT, IMAGE, progress=_progress)
        t2 = time.monotonic()
        build_image(
            found,
            ROOT / "deploy/image",
            REDIS_IMAGE,
            dockerfile=ROOT / "deploy/image/redis.Dockerfile",
            progress=_progress,
        )
        _progress(
            f"base {t1 - t0:.0f} s, image {t2 - t1:.0f} s, redis image "
            f"{time.monotonic() - t2:.0f} s"
        )
        yield found
    finally:
        daemon.stop()


@pytest.fixture
def stack(docker: Docker) -> Iterator[Stack]:
    network = f"stui-test-{uuid.uuid4().hex[:10]}"
    docker.run("network", "create", network)
    made = Stack(docker, network, "redis://redis:6379/0")
    try:
        made.run("--network-alias", "redis", REDIS_IMAGE)
        yield made
    finally:
        for name in list(made.started):
            made.remove(name)
        docker.run("network", "rm", network, check=False)


def _role_args(stack: Stack) -> list[str]:
    """As the chart runs every role: read-only root, writable /tmp only."""
    return [*HEALTH, "--read-only", "--tmpfs", "/tmp:mode=1777", "-e",
            f"STUI_REDIS_URL={stack.redis_url}"]  # fmt: skip


def test_every_role_turns_healthy_as_uid_10001_on_a_read_only_root(stack: Stack) -> None:
    key = secrets.token_urlsafe(48)
    front = stack.run(*_role_args(stack), "-p", "127.0.0.1::5555", IMAGE)
    # Bound elsewhere than the image's default: the check follows the bind.
    moved = stack.run(*_role_args(stack), IMAGE, "front", "--bind", "tcp://0.0.0.0:6001")
    scheduler = stack.run(
        *_role_args(stack),
        "--tmpfs", "/backups:mode=1777",
        "-e", f"STUI_BACKUP_KEY={key}", "-e", "STUI_BACKUP_DIR=/backups",
        IMAGE, "scheduler",
    )  # fmt: skip
    http = stack.run(*_role_args(stack), IMAGE, "http", "--bind", "0.0.0.0:9102")
    for name in (front, moved, scheduler, http):
        stack.wait_healthy(name)
        assert stack.process_uid(name) == UID
        assert stack.inspect(name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        denied = stack.docker.run("exec", name, "touch", "/written", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    # What each check looked at, in its own words.
    assert "ping on tcp://127.0.0.1:6001 answered" in stack.health_log(moved)
    assert "healthy: scheduler: heartbeat" in stack.health_log(scheduler)
    assert "/healthz answered 200" in stack.health_log(http)
    # The front answers through its published port.
    with Client(f"tcp://127.0.0.1:{stack.host_port(front, 5555)}", timeout=5) as c:
        sid = c.call("create_session", client_id="image")["session_id"]
        assert c.call("get_session_info", session_id=sid)["client_id"] == "image"


def test_a_front_that_cannot_serve_turns_unhealthy(stack: Stack) -> None:
    """The check is not a constant: a front whose process is frozen fails it."""
    front = stack.run(*_role_args(stack), IMAGE)
    stack.wait_healthy(front)
    stack.docker.run("kill", "--signal", "STOP", front)
    try:
        wait_for(
            lambda: stack.inspect(front, "{{.State.Health.Status}}") == "unhealthy",
            60, step=0.5, what="a frozen front reported unhealthy",
        )  # fmt: skip
    finally:
        stack.docker.run("kill", "--signal", "CONT", front, check=False)
    assert "no reply from tcp://127.0.0.1:5555" in stack.health_log(front)


def _send_updates(endpoint: str, sid: str, n: int) -> zmq.Socket[bytes]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for i in range(n):
        params = {"session_id": sid, "code": f"{i} factorial"}
        body = {"id": f"e{i}", "command": "record_evaluation", "parameters": params}
        sock.send_multipart([b"", codec.dumps(body)])
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_docker_stop_with_requests_in_flight_answers_all_and_exits_0(
    stack: Stack, workers: int
) -> None:
    n = 50
    front = stack.run(
        *_role_args(stack), "-p", "127.0.0.1::5555", IMAGE,
        "front", "--bind", "tcp://0.0.0.0:5555", "--workers", str(workers),
    )  # fmt: skip
    stack.wait_healthy(front)
    endpoint = f"tcp://127.0.0.1:{stack.host_port(front, 5555)}"
    with Client(endpoint, timeout=5) as c:
        sid = c.call("create_session", client_id="stopping")["session_id"]
    # Freeze the container, queue the requests at its port, then `docker
    # stop` it: the daemon thaws a paused container as it sends SIGTERM, so
    # the front finds the stop request and the requests, in flight, at once.
    stack.docker.run("pause", front)
    sock = _send_updates(endpoint, sid, n)
    time.sleep(0.5)
    stopping = threading.Thread(target=lambda: stack.docker.run("stop", front, timeout=60))
    stopping.start()
    time.sleep(1.0)
    stack.docker.run("unpause", front, check=False)  # in case this daemon does not
    replies: list[dict[str, Any]] = []
    while len(replies) < n and sock.poll(8000):
        replies.append(codec.loads(sock.recv_multipart()[-1]))
    sock.close()
    stopping.join(60)
    logs = stack.logs(front)
    assert len(replies) == n, logs
    assert all(r["status"] == "success" for r in replies), replies
    assert stack.inspect(front, "{{.State.ExitCode}} {{.State.OOMKilled}}") == "0 false", logs
    assert "stopped after" in logs
    # The front went, and every evaluation it acknowledged is in Redis.
    other = stack.run(*_role_args(stack), "-p", "127.0.0.1::5555", IMAGE)
    stack.wait_healthy(other)
    with Client(f"tcp://127.0.0.1:{stack.host_port(other, 5555)}", timeout=5) as c:
        assert c.call("get_session_info", session_id=sid)["version"] == n + 1


def test_serve_with_a_volume_keeps_sessions_across_a_restart(stack: Stack) -> None:
    volume = f"{stack.network}-data"
    name = stack.run(
        *HEALTH, "-v", f"{volume}:/var/lib/stui", "-p", "127.0.0.1::5555",
        IMAGE, "serve", "--bind", "tcp://0.0.0.0:5555",
    )  # fmt: skip
    try:
        stack.wait_healthy(name)
        state = {"workspace": "Transcript show: 'hi'", "nested": {"a": [1, {}, []]}, "u": "é✓"}
        with Client(f"tcp://127.0.0.1:{stack.host_port(name, 5555)}", timeout=5) as c:
            sid = c.call("create_session", client_id="kept")["session_id"]
            c.call("update_session_state", session_id=sid, state_data=state, expected_version=1)
        stack.docker.run("restart", name, timeout=60)
        stack.wait_healthy(name)
        # A restart may publish the port anew.
        with Client(f"tcp://127.0.0.1:{stack.host_port(name, 5555)}", timeout=5) as c:
            got = c.call("restore_session", session_id=sid)
        assert got["session_state"] == state and got["version"] == 2
    finally:
        stack.remove(name)
        stack.docker.run("volume", "rm", volume, check=False)


# -- the compose stack -------------------------------------------------------------


def _compose_cli() -> list[str] | None:
    for cli in (["docker-compose"], ["docker", "compose"]):
        try:
            done = subprocess.run([*cli, "version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cli
    return None


@dataclass
class Compose:
    cli: list[str]
    docker: Docker
    project: str
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.cli, "-f", str(ROOT / "deploy/compose.yaml"), "-p", self.project, *args],
            env={**self.docker.env, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise LaunchError(f"compose {' '.join(args)}: {done.stderr[-3000:]}")
        return done

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in ("ps -a", "volume ls", "network ls"):
            out = self.docker.run(*kind.split(), "-q", "--filter", label).stdout.split()
            found += [f"{kind.split()[0]}:{x}" for x in out]
        return found


def test_compose_stack_loses_no_acknowledged_write_when_a_front_dies(docker: Docker) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("SKIPPED LOUDLY: neither docker-compose nor the compose plugin is here")
    ports = {
        name: free_port() for name in ("STUI_FRONT1_PORT", "STUI_FRONT2_PORT", "STUI_HTTP_PORT")
    }
    compose = Compose(
        cli,
        docker,
        f"stuitest{uuid.uuid4().hex[:8]}",
        {
            "STUI_IMAGE": IMAGE,
            "STUI_REDIS_IMAGE": REDIS_IMAGE,
            "STUI_BACKUP_KEY": secrets.token_urlsafe(48),
            **{k: str(v) for k, v in ports.items()},
        },
    )
    try:
        compose("up", "-d")
        services = ("redis", "front-1", "front-2", "scheduler-1", "scheduler-2", "http")
        names = [compose.container(s) for s in services]

        def all_healthy() -> bool:
            states = [docker.run("inspect", "-f", "{{.State.Health.Status}}", n).stdout.strip()
                      for n in names]  # fmt: skip
            return all(s == "healthy" for s in states)

        wait_for(all_healthy, 120, step=1.0, what="every compose service healthy")
        front1 = f"tcp://127.0.0.1:{ports['STUI_FRONT1_PORT']}"
        front2 = f"tcp://127.0.0.1:{ports['STUI_FRONT2_PORT']}"
        acknowledged: dict[str, int] = {}  # session -> highest acknowledged version
        with Client(front1, timeout=5) as c1, Client(front2, timeout=5) as c2:
            for i in range(20):
                client = c1 if i % 2 else c2
                sid = client.call("create_session", client_id=f"compose-{i % 4}")["session_id"]
                acknowledged[sid] = 1
        # Keep writing through front-2 while it is killed; what it
        # acknowledged before it died must all be there.
        stop = threading.Event()

        def write_through_front2() -> None:
            with Client(front2, timeout=2, retries=0) as c:
                while not stop.is_set():
                    for sid in list(acknowledged):
                        version = acknowledged[sid]
                        try:
                            reply = c.call(
                                "update_session_state", session_id=sid,
                                state_data={"n": version}, expected_version=version,
                            )  # fmt: skip
                        except (RemoteError, TimeoutError):
                            return
                        acknowledged[sid] = reply["version"]

        writer = threading.Thread(target=write_through_front2)
        writer.start()
        time.sleep(2.0)
        compose("kill", "front-2")
        stop.set()
        writer.join(30)
        assert sum(acknowledged.values()) > len(acknowledged), "front-2 acknowledged no update"
        with Client(front1, timeout=5) as c:
            for sid, version in acknowledged.items():
                got = c.call("restore_session", session_id=sid)
                # An update sent as front-2 died may have landed unacknowledged,
                # one version above what was acknowledged; none is missing.
                assert got["version"] in (version, version + 1), (sid, version, got)
                if got["version"] > 1:
                    assert got["session_state"] == {"n": got["version"] - 1}
        inspected = json.loads(docker.run("inspect", compose.container("front-2")).stdout)
        assert inspected[0]["State"]["Running"] is False
    finally:
        logs = compose("logs", "--tail", "30", timeout=60).stdout if _alive(compose) else ""
        compose("down", "-v", "--remove-orphans", timeout=180)
        if os.environ.get("STUI_TEST_VERBOSE"):
            print(logs, file=sys.stderr)
    assert compose.leftovers() == []


def _alive(compose: Compose) -> bool:
    try:
        compose("ps", timeout=60)
    except LaunchError:
        return False
    return True
