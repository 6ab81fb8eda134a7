"""What every launcher shares: free local ports, polling until a started
process answers, the error a launcher raises, and stopping a child it
started."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import redis


class LaunchError(RuntimeError):
    """A launcher could not find, start or reach what it launches."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether `port` on 127.0.0.1 can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    tolerate: tuple[type[BaseException], ...] = (redis.RedisError, OSError),
    error: type[LaunchError] = LaunchError,
) -> None:
    """Polls `check` every 0.1 s until it returns true; an exception of a
    `tolerate` type counts as not yet (the process is still coming up).
    After `timeout` seconds, raises `error` naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except tolerate:
            pass
        if time.monotonic() > deadline:
            raise error(f"timed out waiting for {what}")
        time.sleep(0.1)


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20.0
) -> int:
    """Signal a child, wait for it, kill it if it outlives `timeout`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
