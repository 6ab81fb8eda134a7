"""Metrics, health and alerts: a real gunicorn (`stui-sessions http`) and real
front worker processes sharing one multiprocess directory, scraped over HTTP;
promtool checks the scrape, the alert rules and the example configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.http_app import make_app
from service.metrics import (
    INVALID,
    SUCCESS,
    UNKNOWN,
    FrontMetrics,
    Heartbeat,
    SchedulerMetrics,
    clear_dir,
    remove_dead_files,
)
from service.settings import Settings
from service.store import connect
from tests.conftest import FrontProcess
from workers.client import Client
from workers.http import gunicorn_options
from workers.launchers.process import free_port, stop_process
from workers.launchers.redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="SKIPPED LOUDLY: promtool not on PATH (Debian: apt-get install prometheus)",
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers ------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class HttpProcess:
    """`stui-sessions http` as a child process: a gunicorn master and workers."""

    def __init__(self, redis_url: str, env: dict[str, str], workers: int = 2) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"stui-http-{self.port}.log"
        cmd = [sys.executable, "-m", "workers.cli", "http", "--bind", f"127.0.0.1:{self.port}",
               "--redis-url", redis_url, "--workers", str(workers)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"http exited early: {self.log.read_text()}")
            try:
                if http_get(self.base + "/healthz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"http not answering: {self.log.read_text()}")
            time.sleep(0.1)

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.base + path)

    def scrape(self) -> str:
        status, text = self.get("/metrics")
        assert status == 200, text
        return text

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    path = tmp_path / "metrics"
    path.mkdir()
    return path


@pytest.fixture
def start_http(metrics_dir: Path) -> Iterator[Callable[..., HttpProcess]]:
    started: list[HttpProcess] = []

    def start(redis_url: str, **env: str) -> HttpProcess:
        server = HttpProcess(redis_url, {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **env})
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.stop() == 0, server.log.read_text()


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


# -- the front through gunicorn -----------------------------------------------


@pytest.mark.integration
def test_scrape_counts_every_request_of_two_front_processes(
    start_front: Callable[..., FrontProcess],
    start_http: Callable[..., HttpProcess],
    redis_client: redis.Redis,
    metrics_dir: Path,
) -> None:
    front = start_front(env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, workers=2)
    http = start_http(front.redis_url)
    secret_clients = [f"client-secret-{n}-7f3a" for n in range(3)]
    session_ids: list[str] = []
    with Client(front.endpoint, timeout=5, retries=0) as client:
        for _ in range(4):
            for cid in secret_clients:
                session_ids.append(client.call("create_session", client_id=cid)["session_id"])
        for sid in session_ids:
            client.call("get_session_info", session_id=sid)
        missing = session_ids[0].rsplit(".", 1)[0] + ".AAAAAAAAAAAAAAAAAAAAAA"
        assert client.error_code(client.request("get_session_info", {"session_id": missing}))
        assert client.error_code(client.request("no_such_command", {})) == "UnknownCommand"
        assert client.error_code(client.send_raw(b"{not json")) == "InvalidRequest"
        assert client.error_code(client.request("ping", {"surprise": 1})) == "InvalidRequest"
        for _ in range(5):
            client.call("ping")
    req = "stui_sessions_requests_total"

    def all_counted() -> bool:
        samples = parse(http.scrape())
        return (
            value(samples, req, command="ping", outcome=SUCCESS) >= 6
            and value(samples, req, command="create_session", outcome=SUCCESS) >= 12
            and value(samples, req, command="get_session_info", outcome=SUCCESS) >= 12
        )

    # Each of the two workers writes its counts out once a second, each on its
    # own clock: wait until both have written their last batch (the last
    # pings alone may all have been served, and written, by one of them).
    # (The fixture's readiness probe pinged the front at least once too.)
    wait_for(all_counted, what="both workers' counts written")
    samples = parse(http.scrape())
    total = len(session_ids) * 2 + 4 + value(samples, req, command="ping", outcome=SUCCESS)
    assert value(samples, req, command="create_session", outcome=SUCCESS) == 12
    assert value(samples, req, command="get_session_info", outcome=SUCCESS) == 12
    assert value(samples, req, command="get_session_info", outcome="SessionNotFound") == 1
    assert value(samples, req, command=UNKNOWN, outcome="UnknownCommand") == 1
    assert value(samples, req, command=INVALID, outcome="InvalidRequest") == 1
    assert value(samples, req, command="ping", outcome="InvalidRequest") == 1
    assert sum(v for (name, _), v in samples.items() if name == req) == total
    assert value(samples, "stui_sessions_batch_size_sum") == total
    hist = "stui_sessions_request_duration_seconds"
    assert value(samples, hist + "_count", command="create_session") == 12
    assert value(samples, hist + "_bucket", command="create_session", le="+Inf") == 12
    assert 0 < value(samples, hist + "_sum", command="create_session") < 12 * 5
    assert value(samples, "stui_sessions_batch_size_count") >= 1
    assert value(samples, "stui_sessions_requests_in_flight") == 0
    assert value(samples, "stui_sessions_redis_errors_total") == 0
    # Both worker processes wrote their own files; the scrape is their sum.
    # The proxy process adds one only for replies it dropped (to a start-up
    # probe that had given up and gone before its reply came).
    assert len(list(metrics_dir.glob("counter_*.db"))) in (2, 3)

    text = http.scrape()
    for secret in [*secret_clients, *session_ids, *(s.split(".")[0] for s in session_ids)]:
        assert secret not in text
    label_names = {k for (_, labels) in samples for k, _ in labels}
    # reason: of stui_sessions_replies_dropped_total, "full" or "gone".
    assert label_names <= {"command", "outcome", "le", "reason"}
    reasons = {v for (name, labels) in samples for k, v in labels if k == "reason"}
    assert reasons <= {"full", "gone"}
    assert http.get("/healthz") == (200, "ok\n")
    assert http.get("/readyz") == (200, "ready\n")
    assert http.get("/nope")[0] == 404

    if PROMTOOL is None:
        pytest.skip("SKIPPED LOUDLY: promtool not on PATH (Debian: apt-get install prometheus)")
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


@pytest.mark.integration
def test_readyz_follows_redis_and_the_front_heartbeat(
    start_front: Callable[..., FrontProcess],
    start_http: Callable[..., HttpProcess],
    metrics_dir: Path,
) -> None:
    own = EmbeddedRedis().start()  # this test stops it; the shared one stays up
    try:
        front = start_front(
            env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, redis_url=own.url
        )
        http = start_http(own.url, STUI_HEARTBEAT_MAX_AGE="2")
        assert http.get("/readyz") == (200, "ready\n")

        own.stop()
        status, body = http.get("/readyz")
        assert status == 503 and body.startswith("redis: "), body
        assert http.get("/healthz")[0] == 200
        with Client(front.endpoint, timeout=5, retries=0, retry_unavailable=False) as client:
            assert client.error_code(client.request("ping", {})) is None
            reply = client.request("create_session", {"client_id": "c"})
            assert client.error_code(reply) == "StorageUnavailable"
        def unavailable() -> float:
            return value(
                parse(http.scrape()), "stui_sessions_requests_total",
                command="create_session", outcome="StorageUnavailable",
            )

        wait_for(lambda: unavailable() == 1, what="the failed request counted")
        assert value(parse(http.scrape()), "stui_sessions_redis_errors_total") >= 1

        own = EmbeddedRedis(port=own.port).start()
        wait_for(lambda: http.get("/readyz")[0] == 200, what="ready again")

        assert front.proc is not None
        pid = front.proc.pid
        assert (metrics_dir / f"gauge_livesum_{pid}.db").exists()
        front.stop()
        wait_for(lambda: http.get("/readyz")[0] == 503, timeout=6, what="stale heartbeat")
        status, body = http.get("/readyz")
        assert status == 503 and body.startswith("front: heartbeat"), body
        # The dead worker's in-flight gauge goes at the next scrape; its counts stay.
        samples = parse(http.scrape())
        assert not (metrics_dir / f"gauge_livesum_{pid}.db").exists()
        assert (metrics_dir / f"counter_{pid}.db").exists()
        assert value(samples, "stui_sessions_redis_errors_total") >= 1
    finally:
        own.stop()


@pytest.mark.integration
def test_scheduler_metrics_reach_the_scrape(
    start_http: Callable[..., HttpProcess], redis_server: EmbeddedRedis, metrics_dir: Path
) -> None:
    http = start_http(redis_server.url, STUI_HEARTBEAT_MAX_AGE="0")
    script = textwrap.dedent("""
        import sys
        from service.metrics import scheduler_metrics
        from service.settings import Settings
        m = scheduler_metrics(Settings(), backup_interval=900)
        m.on_leader(True)
        m.on_figures(7, 3)
        m.on_backup(1700000000.0, 2.5, 12345, 17)
        print("ready", flush=True)
        sys.stdin.readline()
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        samples = parse(http.scrape())
        assert value(samples, "stui_sessions_scheduler_is_leader") == 1
        assert value(samples, "stui_sessions_live_sessions") == 7
        assert value(samples, "stui_sessions_active_clients") == 3
        assert value(samples, "stui_sessions_last_backup_timestamp_seconds") == 1700000000.0
        assert value(samples, "stui_sessions_last_backup_duration_seconds") == 2.5
        assert value(samples, "stui_sessions_last_backup_size_bytes") == 12345
        assert value(samples, "stui_sessions_last_backup_checkpoints") == 17
        assert value(samples, "stui_sessions_backup_interval_seconds") == 900
        assert value(samples, "stui_sessions_scheduler_leader_since_timestamp_seconds") > 0
        assert http.get("/readyz")[0] == 200  # heartbeat check off: a scheduler-only pod
        proc.communicate("", timeout=10)  # the scheduler process exits
    # Gone with the process: the leader flag and the figures. Kept: the last backup.
    samples = parse(http.scrape())
    names = {name for name, _ in samples}
    assert "stui_sessions_scheduler_is_leader" not in names
    assert "stui_sessions_live_sessions" not in names
    assert value(samples, "stui_sessions_last_backup_timestamp_seconds") == 1700000000.0


def test_http_refuses_to_start_without_metrics_dir() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "http", "--redis-url", "redis://127.0.0.1:1/0",
         "--bind", f"127.0.0.1:{free_port()}"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode != 0 and "PROMETHEUS_MULTIPROC_DIR" in done.stderr


# -- the alert rules and the example configuration ----------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    checked = promtool("check", "rules", str(ROOT / "deploy" / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout


@needs_promtool
def test_example_prometheus_config_passes_promtool_check() -> None:
    checked = promtool("check", "config", str(ROOT / "deploy" / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  # Leader present: quiet. Nobody leads (or no scheduler at all): fires.
  - interval: 1m
    input_series:
      - series: 'stui_sessions_scheduler_is_leader{{pod="a"}}'
        values: '1x5 0x10'
      - series: 'stui_sessions_scheduler_is_leader{{pod="b"}}'
        values: '0x15'
    alert_rule_test:
      - eval_time: 4m
        alertname: StuiSessionsNoSchedulerLeader
        exp_alerts: []
      - eval_time: 8m
        alertname: StuiSessionsNoSchedulerLeader
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: No stui-sessions scheduler is the leader
              description: >-
                No scheduler replica reports holding the leader lock. Check that
                the scheduler pods run and reach Redis.
  - interval: 1m
    input_series: []
    alert_rule_test:
      - eval_time: 2m
        alertname: StuiSessionsNoSchedulerLeader
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: No stui-sessions scheduler is the leader
              description: >-
                No scheduler replica reports holding the leader lock. Check that
                the scheduler pods run and reach Redis.

  # Backups every 60 s until minute 10, then none; the leader leads since t=1 s.
  # A new leader (since minute 20) is given two intervals first.
  - interval: 1m
    input_series:
      - series: 'stui_sessions_backup_interval_seconds{{pod="a"}}'
        values: '60x40'
      - series: 'stui_sessions_last_backup_timestamp_seconds{{pod="a"}}'
        values: '0+60x10 600x30'
      - series: 'stui_sessions_scheduler_leader_since_timestamp_seconds{{pod="a"}}'
        values: '1x40'
      - series: 'stui_sessions_scheduler_leader_since_timestamp_seconds{{pod="b"}}'
        values: '0x40'
    alert_rule_test:
      - eval_time: 10m
        alertname: StuiSessionsNoRecentBackup
        exp_alerts: []
      - eval_time: 13m
        alertname: StuiSessionsNoRecentBackup
        exp_alerts: []
      - eval_time: 19m
        alertname: StuiSessionsNoRecentBackup
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: No successful stui-sessions backup for two intervals
              description: >-
                The last successful backup is 9m 0s old. Look at the leading
                scheduler's log and at the backup volume.
  - interval: 1m
    input_series:
      - series: 'stui_sessions_backup_interval_seconds{{pod="a"}}'
        values: '60x40'
      - series: 'stui_sessions_last_backup_timestamp_seconds{{pod="a"}}'
        values: '0x40'
      - series: 'stui_sessions_scheduler_leader_since_timestamp_seconds{{pod="a"}}'
        values: '1200x40'
    alert_rule_test:
      - eval_time: 21m
        alertname: StuiSessionsNoRecentBackup
        exp_alerts: []

  # 10% of requests StorageUnavailable: fires. 50% SessionNotFound: quiet.
  - interval: 1m
    input_series:
      - series: 'stui_sessions_requests_total{{command="get",outcome="success"}}'
        values: '0+900x20'
      - series: 'stui_sessions_requests_total{{command="get",outcome="StorageUnavailable"}}'
        values: '0+100x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: StuiSessionsHighErrorRatio
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: Over 1% of stui-sessions requests fail on the server side
              description: >-
                10% of requests answered StorageUnavailable or InternalError
                over the last 5 minutes.
  - interval: 1m
    input_series:
      - series: 'stui_sessions_requests_total{{command="get",outcome="success"}}'
        values: '0+100x20'
      - series: 'stui_sessions_requests_total{{command="get",outcome="SessionNotFound"}}'
        values: '0+100x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: StuiSessionsHighErrorRatio
        exp_alerts: []

  # Every create between 0.25 and 0.5 s: fires for that command only.
  - interval: 1m
    input_series:
      - series: 'stui_sessions_request_duration_seconds_bucket{{command="create",le="0.25"}}'
        values: '0x20'
      - series: 'stui_sessions_request_duration_seconds_bucket{{command="create",le="0.5"}}'
        values: '0+600x20'
      - series: 'stui_sessions_request_duration_seconds_bucket{{command="create",le="+Inf"}}'
        values: '0+600x20'
      - series: 'stui_sessions_request_duration_seconds_count{{command="create"}}'
        values: '0+600x20'
      - series: 'stui_sessions_request_duration_seconds_bucket{{command="ping",le="0.01"}}'
        values: '0+600x20'
      - series: 'stui_sessions_request_duration_seconds_bucket{{command="ping",le="0.25"}}'
        values: '0+600x20'
      - series: 'stui_sessions_request_duration_seconds_bucket{{command="ping",le="+Inf"}}'
        values: '0+600x20'
      - series: 'stui_sessions_request_duration_seconds_count{{command="ping"}}'
        values: '0+600x20'
    alert_rule_test:
      - eval_time: 16m
        alertname: StuiSessionsHighLatencyP99
        exp_alerts:
          - exp_labels: {{severity: warning, command: create}}
            exp_annotations:
              summary: stui-sessions p99 latency above 250 ms for create
              description: >-
                p99 latency of create is 497.5ms over the last 5
                minutes.
"""


@needs_promtool
def test_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(RULE_TESTS.format(rules=ROOT / "deploy" / "alerts.yml"))
    checked = promtool("test", "rules", str(tests))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- in-process: the metrics objects, the WSGI app, the hooks -----------------


def exposition(registry: CollectorRegistry) -> list[str]:
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if "_created" not in line
    ]


def test_a_batch_counts_like_its_requests_one_by_one() -> None:
    batched, single = CollectorRegistry(), CollectorRegistry()
    fast, slow = FrontMetrics(batched), FrontMetrics(single)
    labels = [("create_session", SUCCESS)] * 5 + [("ping", SUCCESS), (UNKNOWN, "UnknownCommand")]
    for seconds in (0.0004, 0.003, 0.003, 7.0, 0.001):
        fast.started(len(labels))
        fast.finished(labels, seconds)
        fast.finished(labels[:1], seconds)
        for command, outcome in [*labels, labels[0]]:
            slow.observe_request(command, outcome, seconds)
        slow.batch_size.observe(len(labels))
        slow.batch_size.observe(1)
    fast.idle()
    assert exposition(batched) != exposition(single)  # nothing written yet
    fast.flush()
    written, expected = (
        {k: v for k, v in parse(generate_latest(r).decode()).items() if "_created" not in k[0]}
        for r in (batched, single)
    )
    assert written == pytest.approx(expected)


def test_labels_stay_in_closed_sets() -> None:
    registry = CollectorRegistry()
    metrics = FrontMetrics(registry)
    metrics.finished([("alice@example.org", "SessionNotFound"), ("ping", "weird")], 0.001)
    metrics.flush()
    text = "\n".join(exposition(registry))
    assert "alice" not in text and "weird" not in text
    assert 'command="unknown",outcome="SessionNotFound"' in text
    assert 'command="ping",outcome="InternalError"' in text


def test_scheduler_observer_reports_the_leader_only() -> None:
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(backup_interval=3600, registry=registry)
    metrics.on_leader(True)
    metrics.on_figures(10, 4)
    metrics.on_backup(1700000000.0, 1.5, 4096, 3)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "stui_sessions_live_sessions") == 10
    assert value(samples, "stui_sessions_scheduler_leader_since_timestamp_seconds") > 0
    metrics.on_leader(False)
    metrics.on_figures(11, 5)  # counted just before the lead was lost: dropped
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "stui_sessions_scheduler_is_leader") == 0
    assert value(samples, "stui_sessions_live_sessions") == 0
    assert value(samples, "stui_sessions_scheduler_leader_since_timestamp_seconds") == 0
    assert value(samples, "stui_sessions_last_backup_size_bytes") == 4096


def call(app: Any, path: str, method: str = "GET") -> tuple[str, bytes]:
    seen: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
        seen.append(status)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method}, start_response))
    return seen[0], body


def test_wsgi_app_routes_and_readiness(metrics_dir: Path) -> None:
    settings = Settings(redis_url="redis://unused").model_copy(
        update={"metrics_dir": metrics_dir, "heartbeat_max_age": 2.0}
    )
    app = make_app(settings, fakeredis.FakeRedis())
    assert call(app, "/healthz") == ("200 OK", b"ok\n")
    assert call(app, "/metrics")[0] == "200 OK"
    assert call(app, "/other")[0].startswith("404")
    assert call(app, "/healthz", "POST")[0].startswith("405")
    status, body = call(app, "/readyz")
    assert status.startswith("503") and b"front: no heartbeat" in body
    beat = metrics_dir / "front.heartbeat"
    Heartbeat(beat).beat()
    assert call(app, "/readyz") == ("200 OK", b"ready\n")
    os.utime(beat, (time.time() - 10, time.time() - 10))
    status, body = call(app, "/readyz")
    assert status.startswith("503") and b"front: heartbeat 10." in body
    down = make_app(settings, connect(f"redis://127.0.0.1:{free_port()}/0", 0.5))
    status, body = call(down, "/readyz")
    assert status.startswith("503") and body.startswith(b"redis: ConnectionError")


def test_heartbeat_writes_at_most_once_a_second(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path / "sub" / "hb")
    beat.beat()
    first = (tmp_path / "sub" / "hb").stat().st_mtime_ns
    os.utime(tmp_path / "sub" / "hb", ns=(first - 10**9, first - 10**9))
    beat.beat()  # within the second: no write
    assert (tmp_path / "sub" / "hb").stat().st_mtime_ns == first - 10**9


def test_gunicorn_hooks_clean_the_directory(metrics_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"counter_{dead.pid}.db", f"gauge_livesum_{dead.pid}.db",
                 f"counter_{os.getpid()}.db", f"gauge_livesum_{os.getpid()}.db"):
        (metrics_dir / name).write_bytes(b"")
    options = gunicorn_options(Settings(), metrics_dir)

    class Worker:
        pid = os.getpid()

    options["child_exit"](None, Worker())  # a gunicorn worker exited: its live gauges go
    assert not (metrics_dir / f"gauge_livesum_{os.getpid()}.db").exists()
    assert remove_dead_files(metrics_dir) == 2  # at start: every file of a dead process
    assert sorted(p.name for p in metrics_dir.iterdir()) == [f"counter_{os.getpid()}.db"]
    (metrics_dir / "front.heartbeat").touch()
    clear_dir(metrics_dir)  # serve, before it starts the pod's processes
    assert list(metrics_dir.iterdir()) == []
