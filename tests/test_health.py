"""`stui-sessions healthcheck`: each role's record and its probe, against
real processes (the image tests run the same command under Docker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from service.settings import Settings
from tests.conftest import FrontProcess
from tests.helpers import wait_for
from workers import health
from workers.launchers.process import free_port

pytestmark = pytest.mark.integration


def healthcheck(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "healthcheck", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_no_record_is_unhealthy(tmp_path: Path) -> None:
    done = healthcheck(tmp_path)
    assert done.returncode == 1 and "no role has started" in done.stdout


def test_a_front_is_pinged_on_the_endpoint_it_bound(
    start_front: Callable[..., FrontProcess], tmp_path: Path
) -> None:
    front = start_front(env={"STUI_HEALTH_DIR": str(tmp_path)})
    record = tmp_path / "front.health"
    assert f'"endpoint": "{front.endpoint}"' in record.read_text()
    done = healthcheck(tmp_path)
    assert done.returncode == 0, done.stdout
    assert f"healthy: front: ping on {front.endpoint} answered" in done.stdout
    # Frozen, the same front fails the check: the probe is real.
    assert front.proc is not None
    front.proc.send_signal(signal.SIGSTOP)
    try:
        done = healthcheck(tmp_path)
        assert done.returncode == 1 and "unhealthy: front: no reply" in done.stdout
    finally:
        front.proc.send_signal(signal.SIGCONT)
    # A clean stop removes the record: a stopped role is not probed.
    assert front.stop() == 0
    assert not record.exists()


def test_wildcard_binds_are_probed_on_loopback() -> None:
    assert health.probe_endpoint("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert health.probe_endpoint("tcp://*:6001") == "tcp://127.0.0.1:6001"
    assert health.probe_endpoint("tcp://[::]:5555") == "tcp://[::1]:5555"
    assert health.probe_endpoint("tcp://10.0.0.7:5555") == "tcp://10.0.0.7:5555"
    assert health.probe_endpoint("ipc:///tmp/front") == "ipc:///tmp/front"


def test_a_scheduler_heartbeat_goes_stale(tmp_path: Path) -> None:
    settings = Settings(health_dir=tmp_path, leader_ttl=1.0)
    beat = health.SchedulerBeat(settings)
    assert beat.max_age == health.SCHEDULER_MIN_AGE
    assert [f.healthy for f in health.check(settings)] == [True]
    old = time.time() - health.SCHEDULER_MIN_AGE - 5
    assert beat.path is not None
    os.utime(beat.path, (old, old))
    (finding,) = health.check(settings)
    assert not finding.healthy and "heartbeat" in finding.detail
    beat.beat()
    assert [f.healthy for f in health.check(settings)] == [True]
    beat.close()
    assert health.check(settings) == []


def test_http_role_record_probes_healthz(
    tmp_path: Path, start_front: Callable[..., FrontProcess]
) -> None:
    """The http role's own record: /healthz of a real gunicorn."""
    front = start_front()
    port = free_port()
    env = {
        **os.environ,
        "STUI_REDIS_URL": front.redis_url or "",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "STUI_HEALTH_DIR": str(tmp_path / "health"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "http", "--bind", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: healthcheck(tmp_path / "health").returncode == 0,
            30, step=0.3, what="the http role healthy",
        )  # fmt: skip
        done = healthcheck(tmp_path / "health")
        assert f"http://127.0.0.1:{port}/healthz answered 200" in done.stdout
    finally:
        proc.terminate()
        proc.wait(30)
    assert not (tmp_path / "health" / "http.health").exists()
