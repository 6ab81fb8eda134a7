"""The one class that talks to Redis for the request path.

It sends a batch of script calls as one pipeline (one network round trip, one
EVALSHA per protocol request), reloads scripts when Redis has lost them
(restart, failover: NOSCRIPT), and turns connection failures into
StorageUnavailable within a bounded time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel

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
    AskError,  # also MovedError: still moving after one slot-map refresh
)
_TRANSIENT_PREFIXES = (
    "BUSY",
    "READONLY",
    "OOM",
    "LOADING",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
)

Arg = str | bytes | int


@dataclass(frozen=True, slots=True)
class Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]


# A batch's trip to Redis as a generator: it pauses (yields) once its calls
# are written, and returns their results once read. Retries (NOSCRIPT,
# MOVED) after the first read run without pausing again.
Steps = Generator[None, None, list[Any]]


class Flight:
    """A batch of calls at Redis (Store.send): written, replies not read.

    Between send() and results() the caller must not use the Store again
    for another batch: a batch's replies are read in the order it was sent,
    one batch at a time. A flight dropped unread disconnects its
    connections (their replies would be read by the next batch)."""

    __slots__ = ("_results", "_steps")

    def __init__(self, steps: Steps) -> None:
        self._steps = steps
        self._results: list[Any] | None = None
        try:
            next(steps)  # write, up to the pause
        except StopIteration as done:  # nothing to pause for
            self._results = done.value

    def results(self) -> list[Any]:
        """The results in call order, as Store.run returns them (or raises).
        Once only: a flight that raised, or was abandoned, has no results."""
        if self._results is None:
            try:
                while True:
                    next(self._steps)
            except StopIteration as done:
                if done.value is None:
                    raise RuntimeError("this flight already failed or was abandoned") from None
                self._results = done.value
        return self._results

    def abandon(self) -> None:
        """Give the flight up unread; its connections are disconnected."""
        self._steps.close()


def _pack(call: Call) -> bytes:
    command = ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
    # hiredis' stub types the argument as a 1-tuple; any tuple of args is accepted.
    return bytes(hiredis.pack_command(command))  # type: ignore[arg-type]


def _is_transient(result: Any) -> bool:
    return isinstance(result, _TRANSIENT_CLASSES) or (
        isinstance(result, ResponseError) and str(result).startswith(_TRANSIENT_PREFIXES)
    )


RedisClient = redis.Redis | redis.RedisCluster

# Everything a Redis call can raise when Redis (or, on a Cluster, every node
# that could tell the slot map) cannot be used right now. RedisClusterException
# is not a RedisError, so a bare `except RedisError` would let it through.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, RedisClusterException)


class RedisTopologyError(RuntimeError):
    """The configured Redis set-up cannot be used at start (e.g. cluster mode
    against a node that is not in a cluster). Not a wire error: the process
    reports it and exits."""


def _fail_fast(timeout: float) -> dict[str, Any]:
    """No hidden retries (a retried pipeline could outlive the caller's
    deadline); connect and read bounded by `timeout`."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def connect(url: str, timeout: float, password: str | None = None) -> redis.Redis:
    """A standalone client that fails fast. A password given here wins over
    one in the URL."""
    extra: dict[str, Any] = {"password": password} if password else {}
    return redis.Redis.from_url(url, **extra, **_fail_fast(timeout), retry_on_timeout=False)


def connect_cluster(url: str, timeout: float, password: str | None = None) -> redis.RedisCluster:
    """A Cluster client from the URL of any node; the others are discovered.
    Node clients fail fast like the standalone one; slot moves are handled by
    the Store (MOVED: refresh the slot map and resend once)."""
    extra: dict[str, Any] = {"password": password} if password else {}
    fail_fast = _fail_fast(timeout)
    retry = fail_fast.pop("retry")  # RedisCluster takes it as a parameter of its own
    try:
        # Unlike the other clients, this one reads the slot map at once.
        return redis.RedisCluster.from_url(url, **extra, **fail_fast, retry=retry)
    except (RedisClusterException, RedisError, OSError) as exc:
        where = urlsplit(url)
        raise RedisTopologyError(
            f"no Redis Cluster reachable at {where.hostname}:{where.port}: {exc}"
        ) from None


def connect_sentinel(settings: Settings) -> redis.Redis:
    """A client of the current master, found through the sentinels. Its pool
    asks the sentinels again on every new connection, so after a failover the
    next connection goes to the new master; a write reaching the demoted one
    fails (READONLY becomes a connection error) instead of being lost."""
    timeout = settings.storage_timeout
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    url_kwargs: dict[str, Any] = {}
    if settings.redis_url:
        parsed = redis.connection.parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
        url_kwargs = {k: parsed[k] for k in ("db", "username", "password") if k in parsed}
    if password:
        url_kwargs["password"] = password
    # redis-py types Sentinel from 8.2 on: the ignores are for older releases.
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        settings.sentinel_addresses,
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        **_fail_fast(timeout),
    )
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
        settings.redis_master_name, **url_kwargs
    )
    return master


def redis_for(settings: Settings) -> RedisClient:
    """The Redis client every role uses, from the settings (mode, URL or
    sentinels, password, timeout)."""
    if not settings.redis_configured:
        raise ValueError("no Redis configured")
    if settings.redis_mode == "sentinel":
        return connect_sentinel(settings)
    assert settings.redis_url
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    if settings.redis_mode == "cluster":
        return connect_cluster(settings.redis_url, settings.storage_timeout, password)
    return connect(settings.redis_url, settings.storage_timeout, password)


class Store:
    # After a failure, answer StorageUnavailable at once for this long instead
    # of letting every queued batch wait out its own timeout.
    HOLD_AFTER_FAILURE = 0.5

    def __init__(self, client: RedisClient, wait_replicas: int = 0, wait_ms: int = 1000) -> None:
        self.client = client
        # WAIT after each pipeline: the batch is acknowledged only when that
        # many replicas hold it, else every call in it answers
        # StorageUnavailable (a retry with the same request id is safe).
        self.wait = Wait(wait_replicas, wait_ms) if wait_replicas > 0 else None
        self._down_until = 0.0
        # Cluster: after a node failure the slot map is stale; it is read
        # again before the next batch rather than on the failing one, whose
        # deadline is already spent.
        self._refresh_slots = False

    def run(self, calls: Sequence[Call]) -> list[Any]:
        """Results in call order. A per-call error is returned in place, as an
        exception object (StorageUnavailable for a transient one); losing
        Redis altogether raises StorageUnavailable."""
        return self.send(calls).results()

    def send(self, calls: Sequence[Call]) -> Flight:
        """The calls written to Redis, their replies not read yet: the caller
        may do other work (decode the next batch) while Redis runs them, then
        reads them with Flight.results(), which returns or raises as run()
        does. Raises at once when Redis is known to be down (the hold after a
        failure) or the write itself fails."""
        return Flight(self._steps(calls))

    def _steps(self, calls: Sequence[Call]) -> Steps:
        if time.monotonic() < self._down_until:
            raise StorageUnavailable()
        try:
            if self._refresh_slots and isinstance(self.client, redis.RedisCluster):
                self.client.nodes_manager.initialize()
                self._refresh_slots = False
            results = yield from self._pipeline(calls)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                self.load_scripts()
                again = yield from self._pipeline([calls[i] for i in missing])
                for i, r in zip(missing, again, strict=True):
                    results[i] = r
        except (redis.ConnectionError, redis.TimeoutError, OSError, RedisClusterException) as exc:
            # RedisClusterException: no node could give the slot map.
            self._down_until = time.monotonic() + self.HOLD_AFTER_FAILURE
            self._refresh_slots = True
            log.warning("redis unavailable: %s", type(exc).__name__)
            raise StorageUnavailable() from None
        except RedisError as exc:  # e.g. SCRIPT LOAD refused while Redis is out of memory
            self._refresh_slots = True
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

    def _pipeline(self, calls: Sequence[Call]) -> Steps:
        if isinstance(self.client, redis.RedisCluster):
            return (yield from self._cluster_pipeline(self.client, calls))
        outcome = (yield from _send([(self.client.connection_pool, calls)], self.wait))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _cluster_pipeline(self, cluster: redis.RedisCluster, calls: Sequence[Call]) -> Steps:
        """One pipeline per master, each holding the calls whose first key's
        slot it serves (every call's keys share one hash tag, so one slot);
        all are written before any is read.
        A MOVED reply means the slot map changed (failover, resharding): it is
        read again and those calls are resent once. ASK (a slot half-way
        through a migration) is left as a transient refusal: the map is still
        right, and the client's retry comes after the move."""
        results = yield from self._send_by_node(cluster, calls)
        moved = [i for i, r in enumerate(results) if isinstance(r, MovedError)]
        if moved:
            cluster.nodes_manager.initialize()
            again = yield from self._send_by_node(cluster, [calls[i] for i in moved])
            for i, r in zip(moved, again, strict=True):
                results[i] = r
        return results

    def _send_by_node(self, cluster: redis.RedisCluster, calls: Sequence[Call]) -> Steps:
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, call in enumerate(calls):
            node = cluster.nodes_manager.get_node_from_slot(_slot(call))
            by_node.setdefault(node.name, (node, []))[1].append(i)
        groups: list[tuple[Any, Sequence[Call]]] = []
        for node, indexes in by_node.values():
            if node.redis_connection is None:  # a node only just discovered
                cluster.nodes_manager.create_redis_connections([node])  # type: ignore[no-untyped-call]
            groups.append((node.redis_connection.connection_pool, [calls[i] for i in indexes]))
        outcomes = yield from _send(groups, self.wait)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed and len(failed) == len(outcomes):
            raise failed[0]  # nothing reachable: the whole batch fails (and holds)
        if failed:
            # Some master is down (or failing over): its calls get
            # StorageUnavailable, the others their replies; the slot map is
            # read again before the next batch.
            self._refresh_slots = True
            log.warning("redis: %d of %d masters unreachable", len(failed), len(outcomes))
        results: list[Any] = [None] * len(calls)
        for (_, indexes), outcome in zip(by_node.values(), outcomes, strict=True):
            for n, i in enumerate(indexes):
                results[i] = StorageUnavailable() if isinstance(outcome, Exception) else outcome[n]
        return results

    def load_scripts(self) -> None:
        """Every script on every master (a Cluster master only runs scripts
        it has loaded itself)."""
        if isinstance(self.client, redis.RedisCluster):
            targets: list[redis.Redis] = [
                self.client.get_redis_connection(node)
                for node in self.client.get_primaries()  # type: ignore[no-untyped-call]
            ]
        else:
            targets = [self.client]
        for target in targets:
            pipe = target.pipeline(transaction=False)
            for script in ALL_SCRIPTS:
                pipe.execute_command("SCRIPT", "LOAD", script.source)  # type: ignore[no-untyped-call]
            pipe.execute()
        log.info("loaded %d scripts on %d node(s)", len(ALL_SCRIPTS), len(targets))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (RedisError, OSError):
            return False


def _slot(call: Call) -> int:
    key = call.keys[0]
    return int(key_slot(key.encode() if isinstance(key, str) else key))


# A connection that failed: that pipeline's fate is unknown, the others' not.
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


def _send(
    groups: Sequence[tuple[Any, Sequence[Call]]], wait: Wait | None = None
) -> Generator[None, None, list[list[Any] | Exception]]:
    """Each (connection pool, calls) group as one pipeline on a connection of
    its pool: every group is written first, then the replies are read, so
    the batch costs one network round trip however many masters it spans.
    redis-py's Pipeline object does the same with several Python calls per
    command; on the hot path that costs more than the script itself, so
    commands are packed and replies parsed by hiredis.
    Per group: its replies, or the connection error that cut it off (one
    master down does not fail the other masters' calls).
    `wait`: a WAIT at the end of each pipeline.
    A generator (see Flight): it pauses once, between the writes and the
    reads; closed there, it disconnects what it wrote to."""
    taken: list[tuple[Any, Any]] = []
    sent: list[Any] = []  # per group: its connection, or the error
    try:
        for pool, calls in groups:
            try:
                conn = pool.get_connection()  # on failure the pool takes it back
            except _CONNECTION_ERRORS as exc:
                sent.append(exc)
                continue
            taken.append((pool, conn))
            packed = b"".join(_pack(call) for call in calls)
            if wait is not None:
                packed += wait.packed
            try:
                conn.send_packed_command([packed])
                sent.append(conn)
            except _CONNECTION_ERRORS as exc:
                conn.disconnect()
                sent.append(exc)
        yield  # everything written: Redis works while the caller does
        outcomes: list[list[Any] | Exception] = []
        for conn, (_, calls) in zip(sent, groups, strict=True):
            if isinstance(conn, Exception):
                outcomes.append(conn)
                continue
            try:
                outcomes.append(_read(conn, calls, wait))
            except _CONNECTION_ERRORS as exc:
                conn.disconnect()  # half-read: must never be reused
                outcomes.append(exc)
        return outcomes
    except BaseException:
        # A half-read connection must never go back to a pool.
        for _, conn in taken:
            conn.disconnect()
        raise
    finally:
        for pool, conn in taken:
            pool.release(conn)


def _read(conn: Any, calls: Sequence[Call], wait: Wait | None) -> list[Any]:
    results: list[Any] = []
    for _ in calls:
        try:
            results.append(conn.read_response())
        except ResponseError as exc:
            results.append(exc)
    if wait is None:
        return results
    try:
        acked = int(conn.read_response())
    except ResponseError:  # e.g. a master demoted to a replica refuses WAIT
        acked = 0
    if acked >= wait.replicas:
        return results
    log.warning("only %d of %d replicas acknowledged the batch", acked, wait.replicas)
    # This server may be a master on its way out (Sentinel demotes it only
    # seconds later): a new connection asks the sentinels again.
    conn.disconnect()
    # Calls refused with MOVED or NOSCRIPT did not run: keep them, so that
    # they are resent (to the slot's new master, after loading the scripts).
    # Everything else may have run but is not acknowledged.
    return [r if isinstance(r, _NOT_RUN) else StorageUnavailable() for r in results]


_NOT_RUN = (MovedError, NoScriptError)


@dataclass(frozen=True, slots=True)
class Wait:
    """WAIT <replicas> <ms> at the end of every pipeline, packed once."""

    replicas: int
    ms: int

    @property
    def packed(self) -> bytes:
        return _packed_wait(self.replicas, self.ms)


@functools.cache
def _packed_wait(replicas: int, ms: int) -> bytes:
    return bytes(hiredis.pack_command(("WAIT", replicas, ms)))  # type: ignore[arg-type]
