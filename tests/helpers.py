"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from workers.client import Client, RemoteError


def code_of(c: Client, command: str, **params: Any) -> str:
    """ "ok" for a success reply, else the error code."""
    try:
        c.call(command, **params)
    except RemoteError as exc:
        return exc.code
    return "ok"


def wait_for(
    check: Callable[[], Any], timeout: float, step: float = 0.02, what: str = "the condition"
) -> Any:
    """Polls `check` until it returns something true (returned), or fails the
    test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(step)
