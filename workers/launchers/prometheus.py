"""A Prometheus server as a child process, and small typed helpers over its
HTTP API: used by tests/test_prometheus.py to scrape the service with
deploy/prometheus.yml and evaluate deploy/alerts.yml for real.

Uses `prometheus` from PATH, else Debian's /usr/bin/prometheus (package
`prometheus`). Only the standard library talks to it (urllib, json): the
launcher adds no dependency to the `workers` package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from workers.launchers.process import LaunchError, free_port, stop_process, wait_until

DEBIAN_BINARY = "/usr/bin/prometheus"


def find_prometheus() -> str | None:
    """The prometheus binary (PATH, else Debian's), or None so that callers
    can skip loudly."""
    found = shutil.which("prometheus")
    if found:
        return found
    # /usr/bin is on nearly every PATH, but not on a scrubbed one (sudo, CI).
    if os.access(DEBIAN_BINARY, os.X_OK):
        return DEBIAN_BINARY
    return None


class PrometheusNotFound(LaunchError):
    pass


class PrometheusError(LaunchError):
    """Prometheus did not start, or its API refused a request (the message
    carries its errorType and error)."""


@dataclass(frozen=True)
class Target:
    """One active scrape target of /api/v1/targets."""

    scrape_url: str
    health: str  # "up", "down" or "unknown" (not scraped yet)
    last_error: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels and its value."""

    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Alert:
    """One active alert of /api/v1/alerts (Prometheus lists only pending and
    firing ones: a resolved alert is gone from the list)."""

    name: str
    state: str  # "pending" or "firing"
    labels: dict[str, str]
    value: str  # the expression's value when it became active, as Prometheus prints it


@dataclass(frozen=True)
class Rule:
    """One rule of /api/v1/rules."""

    name: str
    group: str
    type: str  # "alerting" or "recording"
    query: str  # the expression, as Prometheus re-prints it after parsing
    duration: float  # s: an alerting rule's `for:` (0 for a recording rule)
    health: str  # "ok", "err" or "unknown" (not evaluated yet)
    last_error: str
    state: str | None  # alerting rules: "inactive", "pending" or "firing"
    last_evaluation: datetime | None  # None until first evaluated


def _labels(raw: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(raw or {}).items()}


def _timestamp(raw: Any) -> datetime | None:
    # Go's zero time means "never"; Python 3.11 parses RFC 3339 with a Z and
    # nanoseconds (it keeps microseconds).
    if not raw or str(raw).startswith("0001-01-01"):
        return None
    return datetime.fromisoformat(str(raw))


class Prometheus:
    """`prometheus` on 127.0.0.1:<free port>, with `config` (a mapping, as
    loaded from a prometheus.yml) written into a temporary directory, and
    `files` (name -> text, e.g. rule files) written beside it, so that a
    relative `rule_files` entry of the config finds them. Its TSDB lives in
    the same directory. start() returns once /-/ready answers 200 (config
    loaded, TSDB open); stop() ends the child it started, by PID, and removes
    the directory. Use it as a context manager."""

    def __init__(
        self,
        config: Mapping[str, Any],
        files: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
    ) -> None:
        self.config = config
        self.files = dict(files or {})
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Made by start(), removed by stop(): nothing is left behind by a
        # launcher that never started (no binary) or that was stopped.
        self.dir: Path | None = None
        # Outside the temporary directory, which stop() removes: the log
        # outlives a failed test.
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"stui-prometheus-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, binary: str, directory: Path) -> list[str]:
        return [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def start(self, wait: float = 30.0) -> Prometheus:
        binary = find_prometheus()
        if binary is None:
            raise PrometheusNotFound("prometheus is not installed (apt-get install prometheus)")
        for name in self.files:
            if Path(name).name != name or name == "prometheus.yml":
                raise ValueError(f"{name!r}: a file name, written beside the config")
        self.dir = directory = Path(tempfile.mkdtemp(prefix="stui-prometheus-"))
        try:
            # JSON is YAML: the mapping is written without needing PyYAML here.
            (directory / "prometheus.yml").write_text(json.dumps(self.config, indent=2))
            for name, text in self.files.items():
                (directory / name).write_text(text)
            with open(self.log, "wb") as log:
                # The binary itself, in the foreground: this Popen is
                # Prometheus, and stopping it stops the server.
                self.proc = subprocess.Popen(
                    self.command(binary, directory), stdout=log, stderr=subprocess.STDOUT
                )
            wait_until(self._ready, wait, f"prometheus ready on {self.url}", error=PrometheusError)
        except PrometheusError as exc:  # exited, or not ready in time: say why
            self.stop()
            raise PrometheusError(f"{exc}; its log ({self.log}):\n{self.log_text()}") from None
        except BaseException:
            self.stop()  # never leave an orphan (or the directory) behind a failed start
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            # Not tolerated by wait_until: an exited server will not come up.
            raise PrometheusError(f"prometheus exited with {self.proc.returncode}")
        with urllib.request.urlopen(self.url + "/-/ready", timeout=1.0) as response:
            return int(response.status) == 200

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "prometheus not started"
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            # SIGTERM: a clean shutdown; killed if it takes longer than 10 s.
            stop_process(self.proc, timeout=10.0)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the HTTP API --------------------------------------------------------

    def api(self, path: str, params: Mapping[str, str] | None = None, timeout: float = 5.0) -> Any:
        """GET /api/v1/<path>: its `data`, or PrometheusError when the answer
        is not {"status": "success"} (a bad query answers 400 with a reason)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.url}/api/v1/{path}{query}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}")
            except ValueError:
                body = {}
            finally:
                exc.close()
            if not isinstance(body, dict) or "error" not in body:
                raise PrometheusError(f"GET {url}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def targets(self) -> list[Target]:
        """The active scrape targets and their health."""
        data = self.api("targets", {"state": "active"})
        return [
            Target(
                scrape_url=str(t["scrapeUrl"]),
                health=str(t["health"]),
                last_error=str(t.get("lastError", "")),
                labels=_labels(t.get("labels")),
            )
            for t in data["activeTargets"]
        ]

    def query(self, expr: str) -> list[Sample]:
        """An instant query, evaluated now; its result must be a vector."""
        data = self.api("query", {"query": expr})
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} is a {data['resultType']}, not a vector")
        return [
            Sample(labels=_labels(s["metric"]), value=float(s["value"][1])) for s in data["result"]
        ]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields at most one sample; None when it
        yields none (no such series, or a comparison that filtered it out)."""
        samples = self.query(expr)
        if len(samples) > 1:
            raise PrometheusError(f"{expr!r} yields {len(samples)} samples, not at most one")
        return samples[0].value if samples else None

    def alerts(self) -> list[Alert]:
        """The alerts now pending or firing."""
        data = self.api("alerts")
        return [
            Alert(
                name=str(a["labels"]["alertname"]),
                state=str(a["state"]),
                labels=_labels(a["labels"]),
                value=str(a.get("value", "")),
            )
            for a in data["alerts"]
        ]

    def rules(self) -> list[Rule]:
        """Every loaded rule, with its health and, for an alerting rule, its state."""
        data = self.api("rules")
        return [
            Rule(
                name=str(r["name"]),
                group=str(g["name"]),
                type=str(r["type"]),
                query=str(r["query"]),
                duration=float(r.get("duration", 0)),
                health=str(r["health"]),
                last_error=str(r.get("lastError", "")),
                state=str(r["state"]) if "state" in r else None,
                last_evaluation=_timestamp(r.get("lastEvaluation")),
            )
            for g in data["groups"]
            for r in g["rules"]
        ]

    def rule(self, name: str) -> Rule:
        """The one rule called `name` (KeyError when none is loaded)."""
        found = [r for r in self.rules() if r.name == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} rules named {name!r}")
        return found[0]
