"""The scheduler worker: one leader among its replicas runs the periodic jobs.

An elector thread takes the lock (service/leader.py) or renews it every third
of its TTL. While this process leads, the main loop runs a file backup every
`backup_interval` minutes (then rotates the directory) and housekeeping every
`cleanup_interval` seconds (which also recomputes the global figures). Every
write checks the fencing token first. Backups are signed with the backup key
(service/backup_key.py): a Scheduler without one refuses to start
(BackupKeyError), and the backup directory is kept 0700. SIGTERM or
SIGINT only sets a flag: a backup in progress stops at its next batch (its
temporary file is removed), the lock is released so that a standby takes
over at once, and the process exits.

Metrics plug in through `SchedulerObserver`; its methods are called from the
main thread, except on_leader, which may come from the elector thread.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Protocol

import redis
from redis.typing import EncodableT, FieldT

from service import keys, rotation
from service.backup import primaries, redis_now_ms, write_backup
from service.backup_files import prepare_dir
from service.backup_key import require_key
from service.housekeeping import global_figures, housekeep
from service.leader import LeaderLock, NotLeader
from service.settings import Settings
from service.store import REDIS_FAILURES, RedisClient, redis_for
from workers.health import SchedulerBeat

log = logging.getLogger(__name__)

# What fails one job, to be retried, and never the scheduler: Redis, and the
# file system (a full, missing or unwritable backup volume).
JOB_FAILURES: tuple[type[BaseException], ...] = (*REDIS_FAILURES, OSError)
RETRY_AFTER_FAILURE = 30.0  # s before a failed job runs again (at most its interval)


class SchedulerObserver(Protocol):
    """Arguments are positional, so implementations may name them freely."""

    def on_leader(self, leader: bool, /) -> None: ...

    def on_backup(
        self, finished_at: float, duration: float, size: int, checkpoints: int, /
    ) -> None:
        """finished_at: Unix time (s); duration in s; size of the file in bytes;
        the checkpoints its sessions hold."""

    def on_figures(self, sessions: int, clients: int, /) -> None: ...


class NullObserver:
    def on_leader(self, leader: bool) -> None:
        pass

    def on_backup(
        self, finished_at: float, duration: float, size: int, checkpoints: int
    ) -> None:
        pass

    def on_figures(self, sessions: int, clients: int) -> None:
        pass


class Stopping(Exception):
    """SIGTERM arrived while a job ran."""


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        client: RedisClient,
        observer: SchedulerObserver | None = None,
        nodes: list[redis.Redis] | None = None,
    ) -> None:
        self.settings = settings
        self.key = require_key(settings)  # BackupKeyError: none, or unusable
        self.client = client
        self.nodes = nodes or primaries(client)
        self.observer: SchedulerObserver = observer or NullObserver()
        self.lock = LeaderLock(client, settings.leader_ttl)
        self.stop = threading.Event()
        self._leading = False  # what the observer was last told
        self._led_token: int | None = None  # the term the main loop planned for
        self._next_backup = self._next_housekeeping = 0.0
        self._elector = threading.Thread(target=self._elect, name="stui-elector", daemon=True)
        # Renewed by the election loop, which turns even while a long backup
        # holds the main loop: the image's HEALTHCHECK reads its age.
        self.health = SchedulerBeat(settings)

    def request_stop(self, *_: object) -> None:
        self.stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> None:
        log.info("scheduler %s started", self.lock.owner)
        self._elector.start()
        try:
            while not self.stop.is_set():
                if self.lock.is_leader():
                    self._work()
                self.stop.wait(0.1)
        finally:
            self._elector.join(timeout=self.settings.leader_ttl)
            try:
                self.lock.release()
            except REDIS_FAILURES:
                log.warning("could not release the leader lock; it expires by itself")
            self._set_leading(False)
            self.health.close()
            log.info("scheduler %s stopped", self.lock.owner)

    # -- election (elector thread) -------------------------------------------

    def _elect(self) -> None:
        period = self.settings.leader_ttl / 3
        while not self.stop.is_set():
            try:
                if self.lock.token is not None:
                    if not self.lock.renew():
                        log.warning("lost the leader lock (token %s)", self._led_token)
                elif self.lock.acquire():
                    log.info("became leader (token %d)", self.lock.token)
            except REDIS_FAILURES as exc:
                log.warning("leader lock: redis unavailable (%s)", type(exc).__name__)
            self._set_leading(self.lock.is_leader())
            self.health.beat()
            self.stop.wait(period)

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            self.observer.on_leader(leading)

    def _guard(self) -> None:
        if self.stop.is_set():
            raise Stopping()
        self.lock.guard()

    # -- jobs (main thread) --------------------------------------------------

    def _work(self) -> None:
        if self.lock.token != self._led_token:
            self._led_token = self.lock.token
            self._plan_new_term()
        try:
            if time.time() >= self._next_housekeeping:
                self._next_housekeeping = time.time() + self._retry(self.settings.cleanup_interval)
                self._run_housekeeping()
                self._next_housekeeping = time.time() + self.settings.cleanup_interval
            if time.time() >= self._next_backup:
                interval = self.settings.backup_interval * 60
                self._next_backup = time.time() + self._retry(interval)
                self._run_backup()
                self._next_backup = time.time() + interval
        except NotLeader:
            log.warning("no longer the leader: job abandoned")
        except Stopping:
            log.info("stopping: job abandoned")
        except JOB_FAILURES as exc:
            log.error("scheduled job failed: %s: %s", type(exc).__name__, exc)

    @staticmethod
    def _retry(interval: float) -> float:
        return min(interval, RETRY_AFTER_FAILURE)

    def _plan_new_term(self) -> None:
        """A new leader goes on from the last backup any leader made."""
        now = time.time()
        self._next_housekeeping = now
        self._next_backup = now
        try:
            last = self.client.hgetall(keys.last_backup_key())
        except REDIS_FAILURES:
            return
        if last:
            at = int(last[b"at_ms"]) / 1000
            self._next_backup = at + self.settings.backup_interval * 60
            # A record of a release before checkpoints has no count: 0.
            checkpoints = int(last.get(b"checkpoints", 0))
            self.observer.on_backup(
                at, float(last[b"duration"]), int(last[b"size"]), checkpoints
            )

    def _run_housekeeping(self) -> None:
        pruned = housekeep(self.client, self.nodes, self._guard)
        figures = global_figures(self.client)
        self.observer.on_figures(figures.sessions, figures.clients)
        log.info(
            "housekeeping: %d sessions, %d clients live; pruned %d zset members, "
            "%d index entries, %d orphans",
            figures.sessions,
            figures.clients,
            pruned.expiry_members,
            pruned.index_entries,
            pruned.orphans,
        )

    def _run_backup(self) -> None:
        token = self.lock.token
        if token is None:
            raise NotLeader()
        directory = Path(self.settings.backup_dir)
        prepare_dir(directory)
        started = time.monotonic()
        name = rotation.backup_name(redis_now_ms(self.nodes[0]), token)
        info = write_backup(
            self.nodes, directory / name, key=self.key, token=token, guard=self._guard
        )
        duration = time.monotonic() - started
        finished_at = time.time()
        record: dict[FieldT, EncodableT] = {
            "at_ms": str(round(finished_at * 1000)),
            "created_ms": str(info.created_ms),
            "duration": f"{duration:.3f}",
            "size": str(info.size),
            "sessions": str(info.sessions),
            "checkpoints": str(info.checkpoints),
            "file": name,
            "token": str(token),
        }
        self.lock.fenced(lambda pipe: pipe.hset(keys.last_backup_key(), mapping=record))
        self.observer.on_backup(finished_at, duration, info.size, info.checkpoints)
        s = self.settings
        # Quick, and due once a backup is in: it runs even if SIGTERM just came.
        removed = rotation.rotate(
            directory, s.backup_keep, s.backup_max_age_days, info.created_ms, self.lock.guard
        )
        log.info(
            "backup %s: %d sessions, %d checkpoints, %d bytes, %.2f s; %d old files removed",
            name,
            info.sessions,
            info.checkpoints,
            info.size,
            duration,
            len(removed),
        )


def metrics_observer(settings: Settings) -> SchedulerObserver | None:
    """The metrics hook: `service.metrics.scheduler_metrics(settings,
    backup_interval_s)` when that module provides it, else None (no metrics)."""
    try:
        metrics = importlib.import_module("service.metrics")
    except ModuleNotFoundError as exc:
        if exc.name != "service.metrics":
            raise
        return None
    factory = getattr(metrics, "scheduler_metrics", None)
    if not callable(factory):
        return None
    observer: SchedulerObserver = factory(settings, settings.backup_interval * 60)
    return observer


def run(settings: Settings, observer: SchedulerObserver | None = None) -> None:
    """The `stui-sessions scheduler` process: until SIGTERM or SIGINT."""
    assert settings.redis_configured, "the entry point checks that a Redis is configured"
    require_key(settings)  # before connecting: the entry point checks it too
    scheduler = Scheduler(settings, redis_for(settings), observer)
    scheduler.install_signal_handlers()
    scheduler.run()
