"""The one class that talks to Redis for the request path.

It sends a batch of script calls as one pipeline (one network round trip, one
EVALSHA per protocol request), reloads scripts when Redis has lost them
(restart, failover: NOSCRIPT), and turns connection failures into
StorageUnavailable within a bounded time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from service.errors import StorageUnavailable
from service.scripts import ALL_SCRIPTS, Script
from service.settings import Settings

log = logging.getLogger(__name__)

# Replies that mean "Redis cannot take this right now" rather than "this
# request is wrong": a replica after failover, out of memory, loading its
# data set, a cluster reconfiguring, a busy script. The client may retry.
# redis-py turns most of them into their own classes (and strips the code
# from the message); BUSY still arrives as a plain ResponseError.
_TRANSIENT_CLASSES = (
    ReadOnlyError,
    OutOfMemoryError,
    BusyLoadingError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
)
_TRANSIENT_PREFIXES = ("BUSY", "READONLY", "OOM", "LOADING", "MASTERDOWN", "TRYAGAIN")

Arg = str | bytes | int


@dataclass(frozen=True, slots=True)
class Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]


def _pack(call: Call) -> bytes:
    command = ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
    # hiredis' stub types the argument as a 1-tuple; any tuple of args is accepted.
    return bytes(hiredis.pack_command(command))  # type: ignore[arg-type]


def _is_transient(result: Any) -> bool:
    return isinstance(result, _TRANSIENT_CLASSES) or (
        isinstance(result, ResponseError) and str(result).startswith(_TRANSIENT_PREFIXES)
    )


def connect(url: str, timeout: float, password: str | None = None) -> redis.Redis:
    """A client that fails fast: no hidden retries (a retried pipeline could
    outlive the caller's deadline), connect and read bounded by `timeout`.
    A password given here wins over one in the URL."""
    extra: dict[str, Any] = {"password": password} if password else {}
    return redis.Redis.from_url(
        url,
        **extra,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


def redis_for(settings: Settings) -> redis.Redis:
    """The Redis client every role uses, from the settings (URL, password, timeout)."""
    if not settings.redis_url:
        raise ValueError("no Redis configured")
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return connect(settings.redis_url, settings.storage_timeout, password)


class Store:
    # After a failure, answer StorageUnavailable at once for this long instead
    # of letting every queued batch wait out its own timeout.
    HOLD_AFTER_FAILURE = 0.5

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._down_until = 0.0

    def run(self, calls: Sequence[Call]) -> list[Any]:
        """Results in call order. A per-call error is returned in place, as an
        exception object (StorageUnavailable for a transient one); losing
        Redis altogether raises StorageUnavailable."""
        if time.monotonic() < self._down_until:
            raise StorageUnavailable()
        try:
            results = self._pipeline(calls)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                self.load_scripts()
                again = self._pipeline([calls[i] for i in missing])
                for i, r in zip(missing, again, strict=True):
                    results[i] = r
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._down_until = time.monotonic() + self.HOLD_AFTER_FAILURE
            log.warning("redis unavailable: %s", type(exc).__name__)
            raise StorageUnavailable() from None
        except RedisError as exc:  # e.g. SCRIPT LOAD refused while Redis is out of memory
            log.warning("redis refused the batch: %s", exc)
            raise StorageUnavailable() from None
        refused = [i for i, r in enumerate(results) if _is_transient(r)]
        if refused:
            log.warning(
                "redis refused %d of %d calls: %s", len(refused), len(results), results[refused[0]]
            )
            for i in refused:
                results[i] = StorageUnavailable()
        return results

    def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        """One write of every EVALSHA, then one read per reply, on one pooled
        connection. redis-py's Pipeline object does the same with several
        Python calls per command; on the hot path that costs more than the
        script itself, so commands are packed and replies parsed by hiredis."""
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            packed = b"".join(_pack(call) for call in calls)
            conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
            results: list[Any] = []
            for _ in calls:
                try:
                    results.append(conn.read_response())
                except ResponseError as exc:
                    results.append(exc)
            return results
        except BaseException:
            # A half-read connection must never go back to the pool.
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(conn)

    def load_scripts(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for script in ALL_SCRIPTS:
            pipe.execute_command("SCRIPT", "LOAD", script.source)  # type: ignore[no-untyped-call]
        pipe.execute()
        log.info("loaded %d scripts", len(ALL_SCRIPTS))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (RedisError, OSError):
            return False
