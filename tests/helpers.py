"""Small helpers shared by the integration tests."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

from workers.client import Client, RemoteError


def code_of(c: Client, command: str, **params: Any) -> str:
    """"ok" for a success reply, else the error code."""
    try:
        c.call(command, **params)
    except RemoteError as exc:
        return exc.code
    return "ok"


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
