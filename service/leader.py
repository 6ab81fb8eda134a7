"""One scheduler leader among replicas: a Redis lock with a TTL, and a fencing token.

The lock `stui:{scheduler}:leader` holds '<owner>|<token>', taken with SET NX PX
and renewed by its holder. The token is an INCR of `stui:{scheduler}:fence`
taken just before the attempt, so a later leader always holds a larger one.
A process is still the leader while the lock holds exactly its owner and
token: `guard()` checks that before every write the scheduler makes, and
`fenced()` checks it inside the write's own transaction (WATCH on the lock),
so a leader that was paused past its TTL cannot write once another has won.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable

import redis
from redis.client import Pipeline

from service import keys
from service.store import RedisClient


class NotLeader(Exception):
    """This process no longer holds the lock (or never did)."""


class LeaderLock:
    def __init__(self, client: RedisClient, ttl: float, owner: str | None = None) -> None:
        self.client = client
        self.ttl_ms = max(1, round(ttl * 1000))
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.token: int | None = None
        self._valid_until = 0.0  # monotonic: the lock is surely ours until then

    @property
    def value(self) -> bytes:
        return f"{self.owner}|{self.token}".encode()

    def is_leader(self) -> bool:
        """The local view, without asking Redis: held and renewed within its TTL."""
        return self.token is not None and time.monotonic() < self._valid_until

    def acquire(self) -> bool:
        if self.client.exists(keys.leader_lock_key()):
            return False  # the common case for a standby: no token spent
        started = time.monotonic()
        token = int(self.client.incr(keys.fencing_counter_key()))
        value = f"{self.owner}|{token}"
        if not self.client.set(keys.leader_lock_key(), value, nx=True, px=self.ttl_ms):
            return False
        self.token = token
        self._valid_until = started + self.ttl_ms / 1000
        return True

    def renew(self) -> bool:
        """Extend the TTL if the lock is still ours; False (and no longer
        leader) if it is not."""
        if self.token is None:
            return False
        started = time.monotonic()
        try:
            self.fenced(lambda pipe: pipe.pexpire(keys.leader_lock_key(), self.ttl_ms))
        except NotLeader:
            return False
        self._valid_until = started + self.ttl_ms / 1000
        return True

    def guard(self) -> None:
        """Raises NotLeader unless the lock still holds this owner and token."""
        if not self.is_leader() or self.client.get(keys.leader_lock_key()) != self.value:
            self.lost()
            raise NotLeader()

    def fenced(self, write: Callable[[Pipeline], object], *watch: str) -> list[object]:
        """Run `write` (which queues commands on the pipeline) in a transaction
        that happens only if the lock is still ours when it commits. `watch`:
        further keys (in the lock's slot on a Cluster) the write depends on."""
        lock = keys.leader_lock_key()
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(lock, *watch)
                if self.token is None or pipe.get(lock) != self.value:
                    raise NotLeader()
                pipe.multi()
                write(pipe)
                return list(pipe.execute())
            except (NotLeader, redis.WatchError):
                self.lost()
                raise NotLeader() from None

    def lost(self) -> None:
        self.token = None
        self._valid_until = 0.0

    def release(self) -> None:
        """Give the lock up at once (graceful stop), so a standby need not wait
        for the TTL."""
        if self.token is None:
            return
        with contextlib.suppress(NotLeader):
            self.fenced(lambda pipe: pipe.delete(keys.leader_lock_key()))
        self.lost()


def current_leader(client: RedisClient) -> tuple[str, int] | None:
    """(owner, token) of the lock's holder, or None when nobody leads."""
    raw = client.get(keys.leader_lock_key())
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    owner, _, token = text.rpartition("|")
    return owner, int(token)
