"""The scheduler: leader election with fencing, periodic backups, rotation, housekeeping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import redis
from pydantic import SecretStr

from service import backup, keys, rotation
from service.dispatch import Dispatcher
from service.leader import LeaderLock, NotLeader, current_leader
from service.settings import Settings
from service.store import Store, connect
from tests.helpers import wait_for
from tests.test_backup import KEY_ENV, TEST_KEY, TEST_KEY_TEXT, run
from workers.launchers.process import stop_process
from workers.launchers.redis import EmbeddedRedis
from workers.scheduler import Scheduler

TTL = 1.0  # the lock TTL of these tests (s)


def scheduler_env(key: bool = True) -> dict[str, str]:
    """The environment of a scheduler child: TEST_KEY signs its backups."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STUI_BACKUP_KEY")}
    return {**base, **(KEY_ENV if key else {})}


class SchedulerProcess:
    def __init__(self, redis_url: str, backup_dir: Path, log: Path) -> None:
        self.log = log
        self._log_file: IO[bytes] = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "scheduler",
                "--redis-url",
                redis_url,
                "--backup-dir",
                str(backup_dir),
                "--backup-interval",
                "0.01",  # 0.6 s
                "--leader-ttl",
                str(TTL),
                "--cleanup-interval",
                "1",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=scheduler_env(),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        code = stop_process(self.proc, sig, timeout)
        self._log_file.close()
        return code


@pytest.fixture
def start_scheduler(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[Callable[[str], SchedulerProcess]]:
    started: list[SchedulerProcess] = []

    def start(name: str) -> SchedulerProcess:
        p = SchedulerProcess(redis_server.url, tmp_path / "backups", tmp_path / f"{name}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop(signal.SIGKILL)


def leader_pid(client: redis.Redis) -> int | None:
    held = current_leader(client)
    return int(held[0].split(":")[1]) if held else None


def backups_of(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if rotation.NAME_RE.fullmatch(p.name))


def token_of(path: Path) -> int:
    match = rotation.NAME_RE.fullmatch(path.name)
    assert match is not None
    return int(match[3])


@pytest.mark.integration
def test_one_leader_works_and_a_standby_takes_over_after_sigkill(
    start_scheduler: Callable[[str], SchedulerProcess], redis_client: redis.Redis, tmp_path: Path
) -> None:
    a, b = start_scheduler("a"), start_scheduler("b")
    by_pid = {a.pid: a, b.pid: b}
    first = wait_for(lambda: leader_pid(redis_client), 10)
    leader, standby = by_pid[first], by_pid[({a.pid, b.pid} - {first}).pop()]
    directory = tmp_path / "backups"
    wait_for(lambda: len(backups_of(directory)) >= 3, 10)

    held = current_leader(redis_client)
    assert held is not None
    token = held[1]
    assert {token_of(p) for p in backups_of(directory)} == {token}
    assert "became leader" in leader.text() and "became leader" not in standby.text()
    assert "backup stui-sessions-" not in standby.text()
    for path in backups_of(directory):
        info = backup.verify_backup(path, key=TEST_KEY)
        assert info.token == token and info.authenticated
    record = redis_client.hgetall(keys.last_backup_key())
    assert int(record[b"token"]) == token

    leader.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: leader_pid(redis_client) == standby.pid, 2 * TTL)
    took_over = time.monotonic() - killed
    assert took_over < 2 * TTL
    new = current_leader(redis_client)
    assert new is not None and new[1] > token
    wait_for(lambda: any(token_of(p) == new[1] for p in backups_of(directory)), 5)
    assert "became leader" in standby.text()
    print(f"took over {took_over:.2f} s after SIGKILL (TTL {TTL} s)")


@pytest.mark.integration
def test_sigterm_releases_the_lock_at_once(
    start_scheduler: Callable[[str], SchedulerProcess], redis_client: redis.Redis
) -> None:
    a = start_scheduler("a")
    wait_for(lambda: leader_pid(redis_client) == a.pid, 10)
    b = start_scheduler("b")
    time.sleep(0.5)  # b is up and standing by
    assert a.stop(signal.SIGTERM) == 0
    stopped = time.monotonic()
    assert "stopped" in a.text()
    wait_for(lambda: leader_pid(redis_client) == b.pid, TTL)
    assert time.monotonic() - stopped < TTL


@pytest.mark.integration
def test_a_stale_leader_cannot_write(redis_client: redis.Redis, tmp_path: Path) -> None:
    old = LeaderLock(redis_client, ttl=0.3, owner="old")
    assert old.acquire() and old.token is not None
    stale_token = old.token
    old.guard()  # fine while it holds the lock
    time.sleep(0.4)  # paused past its TTL, without renewing
    new = LeaderLock(redis_client, ttl=5, owner="new")
    assert new.acquire() and new.token is not None and new.token > old.token
    old._valid_until = time.monotonic() + 10  # its local view has not caught up yet

    before = redis_client.hgetall(keys.last_backup_key())
    with pytest.raises(NotLeader):
        old.fenced(lambda pipe: pipe.hset(keys.last_backup_key(), "token", str(old.token)))
    assert redis_client.hgetall(keys.last_backup_key()) == before

    old.token, old._valid_until = stale_token, time.monotonic() + 10  # as before the check
    path = tmp_path / rotation.backup_name(0, stale_token)
    with pytest.raises(NotLeader):
        backup.write_backup([redis_client], path, key=TEST_KEY, token=old.token, guard=old.guard)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file
    assert not old.renew() and not old.is_leader()
    assert current_leader(redis_client) == ("new", new.token)
    new.guard()
    new.release()
    assert current_leader(redis_client) is None


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def on_leader(self, leader: bool) -> None:
        with self.lock:
            self.events.append(("leader", leader))

    def on_backup(
        self, finished_at: float, duration: float, size: int, checkpoints: int
    ) -> None:
        with self.lock:
            self.events.append(("backup", finished_at, duration, size, checkpoints))

    def on_figures(self, sessions: int, clients: int) -> None:
        with self.lock:
            self.events.append(("figures", sessions, clients))

    def kinds(self) -> list[str]:
        with self.lock:
            return [e[0] for e in self.events]


def make_scheduler(
    url: str, tmp_path: Path, interval_min: float, observer: Recorder
) -> tuple[Scheduler, threading.Thread]:
    settings = Settings(
        redis_url=url,
        leader_ttl=TTL,
        backup_dir=tmp_path / "b",
        backup_interval=interval_min,
        backup_keep=2,
        cleanup_interval=1,
        backup_key=SecretStr(TEST_KEY_TEXT),
    )
    scheduler = Scheduler(settings, redis.Redis.from_url(url), observer)
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    return scheduler, thread


@pytest.mark.integration
def test_observer_sees_leadership_backups_and_figures(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    seen = Recorder()
    scheduler, thread = make_scheduler(redis_server.url, tmp_path, 0.01, seen)
    try:
        wait_for(lambda: seen.kinds().count("backup") >= 4, 10)
        wait_for(lambda: "figures" in seen.kinds(), 5)
    finally:
        scheduler.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    assert seen.events[0] == ("leader", True) and seen.events[-1] == ("leader", False)
    assert ("figures", 0, 0) in seen.events
    backups = [e for e in seen.events if e[0] == "backup"]
    assert all(size > 0 and 0 <= duration < 5 for _, _, duration, size, _ in backups)
    assert len(backups_of(tmp_path / "b")) == 2  # rotated to backup_keep
    # Signed, with their .hmac only; files 0600 in a directory 0700.
    assert os.stat(tmp_path / "b").st_mode & 0o777 == 0o700
    for path in backups_of(tmp_path / "b"):
        assert backup.verify_backup(path, key=TEST_KEY).authenticated
        assert not backup.sidecar(path).exists()
        for made in (path, backup.mac_sidecar(path)):
            assert made.stat().st_mode & 0o777 == 0o600, made
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        n for p in backups_of(tmp_path / "b") for n in (p.name, p.name + ".hmac")
    )
    assert current_leader(redis_client) is None  # released on stop


@pytest.mark.integration
def test_a_backup_counts_the_checkpoints_it_holds(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = Settings(redis_url=redis_server.url, rate_limit=0, create_rate_limit=0)
    d = Dispatcher(settings, Store(connect(redis_server.url, 10.0)))
    sids = [r["session_id"] for r in run(d, [("create_session", {"client_id": "ck"})] * 2)]
    run(d, [("update_session_state", {"session_id": sid, "state_data": {"a": 1}}) for sid in sids])
    run(d, [("create_checkpoint", {"session_id": sids[0]})])
    run(d, [("create_checkpoint", {"session_id": sids[1]})] * 2)
    seen = Recorder()
    scheduler, thread = make_scheduler(redis_server.url, tmp_path, 1.0, seen)
    try:
        wait_for(lambda: "backup" in seen.kinds(), 10)
    finally:
        scheduler.request_stop()
        thread.join(10)
    assert [e[4] for e in seen.events if e[0] == "backup"] == [3]
    assert redis_client.hget(keys.last_backup_key(), "checkpoints") == b"3"
    (path,) = backups_of(tmp_path / "b")
    assert backup.verify_backup(path, key=TEST_KEY).checkpoints == 3


@pytest.mark.integration
def test_a_new_leader_goes_on_from_the_last_backup(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    now_ms = int(time.time() * 1000)
    record = {"at_ms": now_ms, "duration": "1.5", "size": 123, "token": 1, "file": "x"}
    redis_client.hset(keys.last_backup_key(), mapping=record)  # type: ignore[arg-type]
    seen = Recorder()
    scheduler, thread = make_scheduler(redis_server.url, tmp_path, 1.0, seen)
    try:
        wait_for(lambda: "figures" in seen.kinds(), 5)
        time.sleep(0.5)
    finally:
        scheduler.request_stop()
        thread.join(10)
    # Reported, not redone; a record without a checkpoint count (an older
    # release's) reports 0.
    assert ("backup", now_ms / 1000, 1.5, 123, 0) in seen.events
    assert backups_of(tmp_path / "b") == []


def test_rotation_by_count_and_age(tmp_path: Path) -> None:
    day = 86_400_000
    now = 1_750_000_000_000
    made = []
    for n, age in enumerate([0, 1, 2, 3 * day, 10 * day]):
        path = tmp_path / rotation.backup_name(now - age, n)
        path.write_bytes(b"x")
        backup.mac_sidecar(path).write_text("x")
        if n % 2:  # a legacy file: its .sha256 goes too
            backup.sidecar(path).write_text("x")
        made.append(path)
    (tmp_path / "manual.jsonl.gz").write_bytes(b"x")
    stale = tmp_path / ".stui-sessions-x.jsonl.gz.tmp-1"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    removed = rotation.rotate(tmp_path, keep=3, max_age_days=2, now_ms=now)
    assert sorted(removed) == sorted(made[3:])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in made[:3]]
        + [p.name + ".hmac" for p in made[:3]]
        + [made[1].name + ".sha256", "manual.jsonl.gz"]
    )
    # The newest file stays, however old.
    assert rotation.rotate(tmp_path, keep=1, max_age_days=0.5, now_ms=now + 100 * day) == made[1:3]
    assert made[0].exists()


def test_scheduler_keys_are_pinned_and_share_one_slot() -> None:
    assert keys.leader_lock_key() == "stui:{scheduler}:leader"
    assert keys.fencing_counter_key() == "stui:{scheduler}:fence"
    assert keys.last_backup_key() == "stui:{scheduler}:last_backup"
    assert keys.session_scan_pattern() == "stui:{b[0-9][0-9]}:s:*"
    assert keys.client_index_scan_pattern() == "stui:{b[0-9][0-9]}:c:*"


def test_the_scheduler_refuses_to_start_without_a_backup_key(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "workers.cli", "scheduler", "--redis-url", redis_server.url]
    for extra, message in (
        ({}, "no backup key configured: set STUI_BACKUP_KEY (the key) or STUI_BACKUP_KEY_FILE"),
        ({"STUI_BACKUP_KEY": "short"}, "shorter than 16"),
        ({"STUI_BACKUP_KEY_FILE": str(tmp_path / "missing")}, "cannot read the backup key file"),
    ):
        done = subprocess.run(
            [*command, "--backup-dir", str(tmp_path / "b")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**scheduler_env(key=False), **extra},
        )
        assert done.returncode == 2, done
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done
        assert message in done.stderr, done
    assert not (tmp_path / "b").exists()
    assert current_leader(redis_client) is None
    with pytest.raises(backup.BackupKeyError, match="STUI_BACKUP_KEY_FILE"):
        Scheduler(Settings(redis_url=redis_server.url), redis_client)


def test_the_backup_directory_is_tightened_to_0700(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = tmp_path / "new" / "backups"
    backup.prepare_dir(made)
    assert made.stat().st_mode & 0o777 == 0o700
    assert not caplog.text  # nothing to say about a directory it made
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    backup.prepare_dir(loose)
    assert loose.stat().st_mode & 0o777 == 0o700
    assert "was mode 0755: tightened to 0700" in caplog.text
