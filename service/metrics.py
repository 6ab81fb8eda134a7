"""Every metric of the service, the files they live in, and the front heartbeat.

prometheus-client runs in multiprocess mode: each process writes its values
to memory-mapped files named by pid in PROMETHEUS_MULTIPROC_DIR, and the
`http` role merges the files of every process of the pod into one scrape. So
the processes of a pod share that directory and one process namespace (a pid
must name one process), and the directory is emptied when the pod starts:
`http` removes the files of processes that are no longer running when it
starts, which on a new pod is all of them.

Nothing is built at import time: metrics come to life in the process that
uses them, after `setup` has chosen the directory. Labels only ever take
values from closed sets (command names, error codes); a client id or a
session id never becomes a label.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import mark_process_dead

from service.errors import StuiError
from service.handlers import COMMANDS
from service.settings import Settings

log = logging.getLogger(__name__)

SUCCESS = "success"
UNKNOWN = "unknown"  # a well-formed request naming no known command
INVALID = "invalid"  # a request that could not be decoded at all

# Front latency is about a millisecond; a Redis timeout is storage_timeout (2 s).
DURATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

HEARTBEAT_NAME = "front.heartbeat"


def _codes(cls: type[StuiError]) -> set[str]:
    found = {cls.code}
    for sub in cls.__subclasses__():
        found |= _codes(sub)
    return found


def setup(settings: Settings) -> bool:
    """Points prometheus-client at settings.metrics_dir before any metric is
    made; False when no directory is configured (metrics stay off). The
    variable is exported too, so that spawned workers inherit it."""
    path = settings.metrics_dir
    if path is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    # prometheus-client picks its value class at import, from the environment;
    # a directory set only in Settings (serve) arrives later.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return True


# What the checkpoint handlers report (Ctx.checkpoint_event): kind_outcome,
# and a restore.
CHECKPOINT_EVENTS = frozenset(
    {"manual_taken", "manual_refused", "automatic_taken", "automatic_skipped", "restored"}
)


class FrontMetrics:
    """The front worker's metrics. One instance per process: two instances
    would overwrite each other's values in the shared file.

    Every write goes to a memory-mapped file (about 1.5 us each), so the hot
    path writes nothing: `finished` adds a batch to counts kept in memory,
    and `tick`, called from the worker loop, writes them out at most once
    per FLUSH_EVERY (and `flush` at exit). A scrape therefore lags by up to
    a second, and a worker killed with SIGKILL loses its last second. The
    in-flight gauge is written only when the batch size changes and when
    the worker goes idle, so a busy worker shows the size of its batches."""

    FLUSH_EVERY = 1.0

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "stui_sessions_requests_total",
            "Requests answered, by command and outcome (success or the error code).",
            ["command", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "stui_sessions_request_duration_seconds",
            "Time from reading a request's batch to sending its reply, by command.",
            ["command"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "stui_sessions_requests_in_flight",
            "Requests read and not yet answered, over the pod's front workers.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.redis_errors = Counter(
            "stui_sessions_redis_errors_total",
            "Redis round trips that failed and calls Redis refused.",
            registry=registry,
        )
        self.replies_dropped = Counter(
            "stui_sessions_replies_dropped_total",
            "Replies not sent: the peer's queue was full (it does not read) or it was gone.",
            ["reason"],
            registry=registry,
        )
        self.checkpoints = Counter(
            "stui_sessions_checkpoints_total",
            "Checkpoints by kind (manual, automatic) and outcome: taken, refused at the "
            "caps (manual), skipped at the caps (automatic).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.checkpoint_restores = Counter(
            "stui_sessions_checkpoint_restores_total",
            "Checkpoints restored (restore_checkpoint succeeded).",
            registry=registry,
        )
        self._checkpoint_events: Tally[str] = Tally()
        self.batch_size = Histogram(
            "stui_sessions_batch_size",
            "Requests read and answered together (one Redis pipeline).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self._commands = frozenset(COMMANDS) | {UNKNOWN, INVALID}
        self._outcomes = frozenset(_codes(StuiError)) | {SUCCESS}
        self._counters: dict[tuple[str, str], Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self._bounds = self.duration._upper_bounds
        self._batch_bounds = self.batch_size._upper_bounds
        # Not yet written: counts per (command, outcome); per command, one
        # count per bucket then the sum; the same for batch sizes.
        self._counts: Tally[tuple[str, str]] = Tally()
        self._durations: dict[str, list[float]] = {}
        self._batches = [0.0] * (len(self._batch_bounds) + 1)
        self._in_flight = 0
        self._due = 0.0

    def started(self, count: int) -> None:
        if count != self._in_flight:
            self.in_flight.set(count)
            self._in_flight = count

    def idle(self) -> None:
        if self._in_flight:
            self.in_flight.set(0)
            self._in_flight = 0

    def finished(self, labels: Sequence[tuple[str, str]], seconds: float) -> None:
        """A batch is answered: `labels` holds each request's (command,
        outcome), and every request of the batch waited `seconds`, since
        all replies go out after the batch's one Redis round trip."""
        per_command: dict[str, int] = {}
        if len(labels) == 1:
            self._counts[labels[0]] += 1
            per_command[labels[0][0]] = 1
        else:
            batch = Tally(labels)
            self._counts.update(batch)
            for (command, _), n in batch.items():
                per_command[command] = per_command.get(command, 0) + n
        bucket = bisect_left(self._bounds, seconds)
        for command, n in per_command.items():
            pending = self._durations.get(command)
            if pending is None:
                pending = self._durations[command] = [0.0] * (len(self._bounds) + 1)
            pending[bucket] += n
            pending[-1] += seconds * n
        self._batches[bisect_left(self._batch_bounds, len(labels))] += 1
        self._batches[-1] += len(labels)

    def checkpoint_event(self, event: str) -> None:
        """One of CHECKPOINT_EVENTS, counted in memory until the next flush."""
        self._checkpoint_events[event] += 1

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._due:
            self._due = now + self.FLUSH_EVERY
            self.flush()

    def flush(self) -> None:
        for (command, outcome), n in self._counts.items():
            self._counter(command, outcome).inc(n)
        self._counts.clear()
        for command, pending in self._durations.items():
            _add(self._histogram(command), pending)
        self._durations.clear()
        for event, n in self._checkpoint_events.items():
            if event == "restored":
                self.checkpoint_restores.inc(n)
            elif event in CHECKPOINT_EVENTS:
                kind, outcome = event.split("_")
                self.checkpoints.labels(kind, outcome).inc(n)
        self._checkpoint_events.clear()
        if self._batches[-1]:
            _add(self.batch_size, self._batches)
            self._batches = [0.0] * len(self._batches)

    def observe_request(self, command: str, outcome: str, seconds: float) -> None:
        """One request, written at once (the front batches instead)."""
        self._counter(command, outcome).inc()
        self._histogram(command).observe(seconds)

    def redis_error(self, count: int = 1) -> None:
        self.redis_errors.inc(count)  # rare: written at once

    def reply_dropped(self, reason: str) -> None:
        """reason: 'full' (the peer's send queue) or 'gone' (the peer left)."""
        self.replies_dropped.labels("full" if reason == "full" else "gone").inc()

    def _counter(self, command: str, outcome: str) -> Counter:
        child = self._counters.get((command, outcome))
        if child is None:
            # Only on a miss: a label outside the closed sets is a bug, and
            # must not become a new time series.
            label = command if command in self._commands else UNKNOWN
            code = outcome if outcome in self._outcomes else "InternalError"
            child = self._counters[(command, outcome)] = self.requests.labels(label, code)
        return child

    def _histogram(self, command: str) -> Histogram:
        child = self._histograms.get(command)
        if child is None:
            label = command if command in self._commands else UNKNOWN
            child = self._histograms[command] = self.duration.labels(label)
        return child


def _add(histogram: Histogram, pending: list[float]) -> None:
    """Adds counts per bucket (then the sum) to a histogram, one write per
    bucket that changed. `observe` takes one value at a time, so this uses
    the histogram's own fields; a test pins that the result equals as many
    calls of `observe`."""
    for i, n in enumerate(pending[:-1]):
        if n:
            histogram._buckets[i].inc(n)
    histogram._sum.inc(pending[-1])


_front: FrontMetrics | None = None


def front_metrics(settings: Settings) -> FrontMetrics | None:
    """This process's front metrics, or None when metrics are off."""
    global _front
    if _front is None and setup(settings):
        _front = FrontMetrics()
    return _front


class SchedulerMetrics:
    """The scheduler's observer. Figures and the leader flag disappear with
    the process (live modes); the last backup survives a scheduler restart
    within the pod (max, most recent). A replica that is not the leader
    reports 0 figures, so that max() across replicas is the leader's.
    on_leader may come from another thread than on_figures."""

    def __init__(
        self, backup_interval: float | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        registry = registry if registry is not None else CollectorRegistry()

        def gauge(name: str, doc: str, mode: str) -> Gauge:
            return Gauge(name, doc, multiprocess_mode=mode, registry=registry)  # type: ignore[arg-type]

        self.is_leader = gauge(
            "stui_sessions_scheduler_is_leader", "1 when this replica holds the lock.", "livemax"
        )
        self.leader_since = gauge(
            "stui_sessions_scheduler_leader_since_timestamp_seconds",
            "When this replica took the lead (0 when it does not lead).",
            "livemax",
        )
        self.live_sessions = gauge(
            "stui_sessions_live_sessions", "Sessions not expired, as the leader counted.", "livemax"
        )
        self.active_clients = gauge(
            "stui_sessions_active_clients", "Clients with a live session.", "livemax"
        )
        self.last_backup = gauge(
            "stui_sessions_last_backup_timestamp_seconds",
            "Unix time of the last successful backup.",
            "max",
        )
        self.last_backup_duration = gauge(
            "stui_sessions_last_backup_duration_seconds",
            "How long the last successful backup took.",
            "mostrecent",
        )
        self.last_backup_size = gauge(
            "stui_sessions_last_backup_size_bytes",
            "Size of the last successful backup file.",
            "mostrecent",
        )
        self.last_backup_checkpoints = gauge(
            "stui_sessions_last_backup_checkpoints",
            "Checkpoints the live sessions held, as the last successful backup counted.",
            "mostrecent",
        )
        self.backup_interval = gauge(
            "stui_sessions_backup_interval_seconds",
            "Configured time between backups (the alerts' yardstick).",
            "max",
        )
        if backup_interval is not None:
            self.backup_interval.set(backup_interval)
        self._leading = False
        self._lock = threading.Lock()

    def on_leader(self, leader: bool) -> None:
        with self._lock:
            if leader and not self._leading:
                self.leader_since.set(time.time())
            elif not leader and self._leading:
                self.leader_since.set(0)
                self.live_sessions.set(0)
                self.active_clients.set(0)
            self._leading = leader
            self.is_leader.set(1 if leader else 0)

    def on_backup(
        self, finished_at: float, duration: float, size: int, checkpoints: int
    ) -> None:
        self.last_backup.set(finished_at)
        self.last_backup_duration.set(duration)
        self.last_backup_size.set(size)
        self.last_backup_checkpoints.set(checkpoints)

    def on_figures(self, sessions: int, clients: int) -> None:
        with self._lock:
            if not self._leading:  # counted just before the lead was lost
                return
            self.live_sessions.set(sessions)
            self.active_clients.set(clients)


def scheduler_metrics(settings: Settings, backup_interval: float | None = None) -> SchedulerMetrics:
    """The scheduler's observer, exported through settings.metrics_dir when one
    is set (else kept in memory and never seen). backup_interval in seconds."""
    setup(settings)
    return SchedulerMetrics(backup_interval)


# The metrics directory -------------------------------------------------------


def pid_of(path: Path) -> int | None:
    """The pid in a metric file's name (counter_123.db, gauge_livesum_123.db)."""
    tail = path.stem.rpartition("_")[2]
    return int(tail) if tail.isdigit() else None


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, but a live one
        return True
    return True


def remove_dead_files(directory: Path) -> int:
    """At start: removes the files of every process that no longer runs (on
    a new pod, all of them), and keeps those of processes already writing."""
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in directory.glob("*.db"):
        pid = pid_of(path)
        if pid is not None and not is_running(pid):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def clear_dir(directory: Path) -> None:
    """Empties the directory of metric files and the heartbeat: for a process
    that starts every other one of the pod itself (`serve`), before it does."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in [*directory.glob("*.db"), directory / HEARTBEAT_NAME]:
        path.unlink(missing_ok=True)


def reap_live_gauges(directory: Path) -> None:
    """Before a scrape: the live gauges (in flight, leader) of processes that
    died forget them, as gunicorn's child_exit does for its own workers.
    Counters and histograms of dead processes stay, so that sums never go back."""
    for path in directory.glob("gauge_live*.db"):
        pid = pid_of(path)
        if pid is not None and not is_running(pid):
            mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


# The front heartbeat ---------------------------------------------------------


def heartbeat_path(settings: Settings) -> Path | None:
    if settings.heartbeat_file is not None:
        return settings.heartbeat_file
    if settings.metrics_dir is not None:
        return settings.metrics_dir / HEARTBEAT_NAME
    return None


class Heartbeat:
    """A file whose mtime a front worker moves at most once a second from its
    loop; /readyz of the same pod reads its age. No Redis write."""

    def __init__(self, path: Path, every: float = 1.0) -> None:
        self.path = path
        self.every = every
        self._due = 0.0
        self._failed = False

    def beat(self) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.every
        try:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.touch()
            self._failed = False
        except OSError as exc:
            if not self._failed:  # once per failure streak, not once a second
                log.warning("cannot write the heartbeat %s: %s", self.path, exc)
            self._failed = True


def heartbeat_age(path: Path) -> float | None:
    """Seconds since the last beat, None when there was none."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None
