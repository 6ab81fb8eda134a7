"""A real Prometheus (Debian's `prometheus` package) scrapes the service with
deploy/prometheus.yml and evaluates deploy/alerts.yml: every target is up,
the live-sessions figure is the number of sessions made through a real front
over ZeroMQ TCP, and the backup-stale alert fires when backups fail and
clears when they resume.

The configuration is the deployed one, loaded as YAML, changed only where a
test must (each change asserted in `prometheus_config` and
`shortened_rules`):
- the static target (127.0.0.1:9102) becomes the two `http` roles of this
  test, one serving the front's metrics directory, one the scheduler's (as
  two pods' sidecars would), so "every target is up" means both;
- scrape and evaluation intervals of 1 s instead of 15 s, so that a change
  reaches the rules within seconds;
- the rules are a copy of deploy/alerts.yml in which only the `for:`
  durations are shortened (to 2 s): a 5-minute `for:` would make the test
  last over 5 minutes, while the expressions, what the test is about, stay
  byte for byte. The copy is written beside the configuration under the
  same name, so the deployed `rule_files: [alerts.yml]` itself points at it.

Skipped loudly when Prometheus is not installed.
"""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import redis
import yaml

from service import keys, rotation
from tests import test_http_metrics
from tests.conftest import FrontProcess
from tests.helpers import wait_for
from tests.test_http_metrics import HttpProcess
from tests.test_scheduler import scheduler_env
from workers.client import Client
from workers.launchers.process import stop_process
from workers.launchers.prometheus import Prometheus, Rule, find_prometheus
from workers.launchers.redis import EmbeddedRedis

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERT = "StuiSessionsNoRecentBackup"
INTERVAL = "1s"  # scrape and evaluation
RULE_FOR_S = 2.0  # every rule's `for:` in the copy
RULE_FOR = f"{RULE_FOR_S:g}s"
# The scheduler's backup interval, in minutes as STUI_BACKUP_INTERVAL takes
# it: 4.5 s, so the alert's threshold (two intervals) is 9 s. Working backups
# leave the newest at most about one interval + a scrape + an evaluation old
# (about 6.5 s), well under it; a shorter interval would leave less margin.
BACKUP_INTERVAL_MIN = 0.075
BACKUP_INTERVAL_S = BACKUP_INTERVAL_MIN * 60
SESSIONS, CLIENTS = 7, 3
POLL = 0.2  # s between API requests while waiting
# Checked before any fixture starts a process.
needs_prometheus = pytest.mark.skipif(
    find_prometheus() is None,
    reason="SKIPPED LOUDLY: no prometheus on PATH or in /usr/bin "
    "(Debian: apt-get install prometheus)",
)
FOR_LINE = re.compile(r"^(\s+for: )(\S+)$", re.MULTILINE)

# The http role's fixtures, shared with tests/test_http_metrics.py: the
# front's metrics directory, and `stui-sessions http` children stopped at the end.
metrics_dir = test_http_metrics.metrics_dir
start_http = test_http_metrics.start_http


# -- the configuration: the deployed one, with as little changed as possible --


def prometheus_config(targets: list[str]) -> dict[str, Any]:
    """deploy/prometheus.yml with `targets` and 1 s intervals; asserts that
    nothing else differs."""
    deployed = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config: dict[str, Any] = copy.deepcopy(deployed)
    (job,) = config["scrape_configs"]  # the Kubernetes job is commented out
    (static,) = job["static_configs"]
    assert static["targets"] == ["127.0.0.1:9102"], "the deployed config changed: update this"
    static["targets"] = list(targets)
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = INTERVAL
    # Relative, so Prometheus resolves it against the config's own directory,
    # where the launcher writes the shortened copy under this name.
    assert config["rule_files"] == ["alerts.yml"]

    undone = copy.deepcopy(config)
    undone["global"] = deployed["global"]
    undone["scrape_configs"][0]["static_configs"][0]["targets"] = ["127.0.0.1:9102"]
    assert undone == deployed
    assert set(config["global"]) == set(deployed["global"])
    return config


def shortened_rules() -> str:
    """deploy/alerts.yml with every `for:` set to RULE_FOR, by a substitution
    of those lines alone; asserts that every other byte is the deployed one."""
    deployed = (DEPLOY / "alerts.yml").read_text()
    short, count = FOR_LINE.subn(rf"\g<1>{RULE_FOR}", deployed)
    changed = [
        (a, b)
        for a, b in zip(deployed.splitlines(True), short.splitlines(True), strict=True)
        if a != b
    ]
    assert all(FOR_LINE.fullmatch(a.rstrip("\n")) for a, _ in changed)
    rules = [r for g in yaml.safe_load(deployed)["groups"] for r in g["rules"]]
    shortened = [r for g in yaml.safe_load(short)["groups"] for r in g["rules"]]
    assert count == len(changed) == len(rules) and all("for" in r for r in rules)
    assert shortened == [{**r, "for": RULE_FOR} for r in rules]  # expressions untouched
    return short


def test_the_test_configuration_differs_from_deploy_only_where_said() -> None:
    """The derivations' own assertions, without needing Prometheus."""
    config = prometheus_config(["127.0.0.1:1", "127.0.0.1:2"])
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == [
        "127.0.0.1:1",
        "127.0.0.1:2",
    ]
    assert FOR_LINE.findall(shortened_rules()) == [
        (m, RULE_FOR) for m, _ in FOR_LINE.findall((DEPLOY / "alerts.yml").read_text())
    ]


# -- the scheduler, exporting its metrics --------------------------------------


class SchedulerProcess:
    """`stui-sessions scheduler` with its metrics in `metrics`, backups in
    `backups` every BACKUP_INTERVAL_MIN, housekeeping (which recounts the live
    sessions) every second. Configured through the environment, as a pod is."""

    def __init__(self, redis_url: str, backups: Path, metrics: Path, log: Path) -> None:
        self.log = log
        env = {
            **scheduler_env(),  # TEST_KEY signs the backups
            "STUI_REDIS_URL": redis_url,
            "STUI_BACKUP_DIR": str(backups),
            "STUI_BACKUP_INTERVAL": str(BACKUP_INTERVAL_MIN),
            "STUI_CLEANUP_INTERVAL": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        }
        self._log_file: IO[bytes] = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "scheduler"],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        code = stop_process(self.proc, signal.SIGTERM, 20)
        self._log_file.close()
        return code


@pytest.fixture
def scheduler(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[SchedulerProcess]:
    """On a clean Redis (redis_client flushes it first)."""
    process = SchedulerProcess(
        redis_server.url,
        tmp_path / "backups",
        tmp_path / "scheduler-metrics",
        tmp_path / "scheduler.log",
    )
    yield process
    assert process.stop() == 0, process.text()


# -- the test -------------------------------------------------------------------


def wait_evaluations(prom: Prometheus, name: str, count: int) -> Rule:
    """Until the rule `name` has been evaluated `count` more times; the rule."""
    seen = {prom.rule(name).last_evaluation}

    def evaluated() -> bool:
        seen.add(prom.rule(name).last_evaluation)
        return len(seen) > count

    wait_for(evaluated, 30, POLL, f"{count} evaluations of {name}")
    return prom.rule(name)


def poll(check: Callable[[], object], what: str, now: Callable[[], object]) -> None:
    """wait_for with the API's requests spaced out; on a timeout, the failure
    says what `now` returns then (wait_for's message is made beforehand)."""
    try:
        wait_for(check, 60, POLL, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; now {now()}") from None


def last_backup(client: redis.Redis) -> dict[str, str]:
    """The scheduler's record of the last successful backup, in Redis."""
    raw = client.hgetall(keys.last_backup_key())
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(raw: bytes | str) -> str:
    # Bytes from the fixture's client, which does not decode replies.
    return raw.decode() if isinstance(raw, bytes) else raw


def backup_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if rotation.NAME_RE.fullmatch(p.name)}


@needs_prometheus
@pytest.mark.integration
def test_prometheus_scrapes_the_service_and_the_backup_alert_fires_and_clears(
    scheduler: SchedulerProcess,
    start_front: Callable[..., FrontProcess],
    start_http: Callable[..., HttpProcess],
    metrics_dir: Path,
    redis_server: EmbeddedRedis,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """(1) both targets up, (2) the live-sessions gauge equal to the sessions
    made, (3) StuiSessionsNoRecentBackup firing while backups fail and
    resolved once they succeed again. Its `for:` is 2 s here, not 5 min: see
    the module's docstring."""
    began = time.monotonic()
    marks: dict[str, float] = {}
    # One pod's worth each: a front and its http role; the scheduler and its own.
    front = start_front(env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    front_http = start_http(redis_server.url)
    scheduler_http = start_http(
        redis_server.url,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "scheduler-metrics"),
        STUI_HEARTBEAT_MAX_AGE="0",  # /readyz of a pod without a front
    )
    front_target = f"127.0.0.1:{front_http.port}"
    scheduler_target = f"127.0.0.1:{scheduler_http.port}"
    config = prometheus_config([front_target, scheduler_target])

    with Prometheus(config, {"alerts.yml": shortened_rules()}) as prom:
        # (1) Every target is up.
        def health() -> dict[str, str]:
            return {t.labels["instance"]: t.health for t in prom.targets()}

        want = {front_target: "up", scheduler_target: "up"}
        poll(lambda: health() == want, "both targets up", prom.targets)
        assert {t.labels["job"] for t in prom.targets()} == {"stui-sessions"}
        marks["targets up"] = time.monotonic()

        # The shortened copy is what Prometheus loaded, and every rule evaluates.
        deployed = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
        names = [r["alert"] for g in deployed["groups"] for r in g["rules"]]
        poll(lambda: all(r.last_evaluation for r in prom.rules()), "rules evaluated", prom.rules)
        rules = prom.rules()
        assert [r.name for r in rules] == names
        assert all(r.health == "ok" and not r.last_error for r in rules), rules
        assert {r.duration for r in rules} == {RULE_FOR_S}

        # (2) The live sessions: none, then as many as made through the front.
        live = "stui_sessions_live_sessions"
        poll(lambda: prom.value(live) == 0, "0 live sessions", lambda: prom.query(live))
        with Client(front.endpoint, timeout=5, retries=0) as client:
            for n in range(SESSIONS):
                client.call("create_session", client_id=f"prometheus-test-{n % CLIENTS}")
        poll(lambda: prom.value(live) == SESSIONS, "live sessions", lambda: prom.query(live))
        (sample,) = prom.query(live)
        assert sample.labels["instance"] == scheduler_target  # the leader's count
        assert prom.value("stui_sessions_active_clients") == CLIENTS
        created = (
            f'sum(stui_sessions_requests_total{{instance="{front_target}",'
            f'command="create_session",outcome="success"}})'
        )
        # The front writes its counts out once a second.
        poll(lambda: prom.value(created) == SESSIONS, "creates", lambda: prom.query(created))
        marks["sessions counted"] = time.monotonic()

        # (3) The backup alert. Its second condition, as Prometheus sees it:
        # the leader has led for longer than two intervals (the interval as
        # the scheduler exports it).
        assert prom.value("max(stui_sessions_backup_interval_seconds)") == BACKUP_INTERVAL_S
        led_long = (
            "time() - max(stui_sessions_scheduler_leader_since_timestamp_seconds > 0)"
            " > 2 * max(stui_sessions_backup_interval_seconds)"
        )
        poll(
            lambda: prom.value(led_long) is not None,
            "2 intervals led",
            lambda: prom.query(led_long),
        )
        # Backups work: quiet, evaluations after the leader condition holds.
        assert wait_evaluations(prom, ALERT, 2).state == "inactive"
        assert prom.alerts() == []
        last_ok = prom.value("max(stui_sessions_last_backup_timestamp_seconds)")
        assert last_ok is not None and last_ok > 0
        backups = tmp_path / "backups"
        made_before = backup_files(backups)
        assert made_before
        marks["quiet while backups work"] = time.monotonic()

        # Backups stop: a regular file where the directory was, so that each
        # backup fails (FileExistsError) while the scheduler keeps leading and
        # exporting. Killing it instead would take its gauges away with it,
        # and the alert could not fire.
        away = tmp_path / "backups.away"
        backups.rename(away)
        backups.write_text("not a directory: every backup fails\n")
        states: list[str] = []

        def alert_state() -> str | None:
            state = prom.rule(ALERT).state
            if not states or states[-1] != state:
                states.append(str(state))
            return state

        poll(
            lambda: alert_state() == "firing", f"{ALERT} firing", lambda: (states, scheduler.text())
        )
        marks["firing"] = time.monotonic()
        (alert,) = prom.alerts()  # the others stay quiet
        assert (alert.name, alert.state, alert.labels["severity"]) == (ALERT, "firing", "critical")
        assert scheduler.proc.poll() is None
        assert "scheduled job failed: FileExistsError" in scheduler.text()
        assert health() == want  # both still scraped
        assert prom.value("max(stui_sessions_scheduler_is_leader)") == 1
        # The failures moved nothing: the last successful backup, in Redis
        # and in the gauge, is one written into the directory before the break.
        stale = prom.value("max(stui_sessions_last_backup_timestamp_seconds)")
        record = last_backup(redis_client)
        assert stale is not None and stale >= last_ok
        assert abs(stale - int(record["at_ms"]) / 1000) < 0.001
        assert (away / record["file"]).is_file()

        # Backups resume: the directory is back; the next attempt (one
        # interval after the last failed one) succeeds and the alert clears.
        backups.unlink()
        away.rename(backups)

        def resolved() -> bool:
            return prom.rule(ALERT).state == "inactive" and prom.alerts() == []

        poll(resolved, f"{ALERT} resolved", lambda: (prom.rule(ALERT), scheduler.text()))
        marks["cleared"] = time.monotonic()
        fresh = prom.value("max(stui_sessions_last_backup_timestamp_seconds)")
        assert fresh is not None and fresh > stale
        resumed = last_backup(redis_client)["file"]
        assert resumed not in made_before and resumed in backup_files(backups)
        assert scheduler.proc.poll() is None and health() == want

    steps = ", ".join(f"{k} at {v - began:.1f} s" for k, v in marks.items())
    print(f"{steps}; the alert went {' -> '.join(states)} -> inactive")
