"""Health for the image's HEALTHCHECK: each role says how to probe it.

One image runs every role, and a container's HEALTHCHECK cannot know which
one it runs nor where a front was told to bind. So each role, as it starts,
leaves a record in ``STUI_HEALTH_DIR`` (the image sets ``/tmp/stui-health``;
unset, nothing is written): the front its bound endpoint, the http role its
``/healthz`` URL, the scheduler a heartbeat that its election loop renews.
``stui-sessions healthcheck`` probes every record there and passes only when
there is at least one and each one passes:

- front: a ``ping`` through the real protocol on the endpoint it bound (a
  wildcard address is reached on loopback). With CURVE on, a probe has no
  registered client key, so it checks that the port takes a TCP connection
  and that the front's heartbeat (the metrics directory's) is fresh;
- http: ``GET /healthz`` answers 200;
- scheduler: the heartbeat is younger than three election periods (at
  least 30 s), whether this replica leads or stands by.

Kubernetes does not run a HEALTHCHECK: the chart has probes of its own.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.metrics import heartbeat_age, heartbeat_path
from service.settings import Settings

SUFFIX = ".health"
SCHEDULER_MIN_AGE = 30.0  # s: a slow Redis round must not fail the check
PROBE_TIMEOUT = 3.0  # s, within the image's HEALTHCHECK --timeout


@dataclass(frozen=True)
class Finding:
    role: str
    healthy: bool
    detail: str


def _record_path(settings: Settings, role: str) -> Path | None:
    if settings.health_dir is None:
        return None
    return settings.health_dir / f"{role}{SUFFIX}"


def publish(settings: Settings, role: str, **probe: Any) -> Path | None:
    """Writes this role's record (atomically: a checker never reads half of it)."""
    path = _record_path(settings, role)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"role": role, **probe}), encoding="utf-8")
    tmp.replace(path)
    return path


def withdraw(settings: Settings, role: str) -> None:
    """Removes the record on a clean exit, so that a stopped role is not probed."""
    path = _record_path(settings, role)
    if path is not None:
        path.unlink(missing_ok=True)


def publish_front(settings: Settings, endpoint: str) -> None:
    publish(settings, "front", endpoint=endpoint, curve=settings.curve)


def publish_http(settings: Settings) -> None:
    host, _, port = settings.http_bind.rpartition(":")
    publish(settings, "http", url=f"http://{_loopback(host)}:{port}/healthz")


class SchedulerBeat:
    """The scheduler's record, whose mtime its election loop moves each period."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_age = max(SCHEDULER_MIN_AGE, 3 * settings.leader_ttl)
        self.path = publish(settings, "scheduler", max_age=self.max_age)

    def beat(self) -> None:
        if self.path is not None:
            try:
                os.utime(self.path)
            except OSError:
                # Someone removed the directory: write the record again.
                self.path = publish(self.settings, "scheduler", max_age=self.max_age)

    def close(self) -> None:
        withdraw(self.settings, "scheduler")


def _loopback(host: str) -> str:
    """Where a wildcard bind is reached from inside the same container."""
    if host in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("[::]", "::", "[*]"):
        return "[::1]"
    return host


def probe_endpoint(endpoint: str) -> str:
    """The endpoint a probe connects to for a front that bound ``endpoint``."""
    scheme, sep, rest = endpoint.partition("://")
    if scheme != "tcp" or not sep:
        return endpoint
    host, _, port = rest.rpartition(":")
    return f"tcp://{_loopback(host)}:{port}"


def _check_front(record: dict[str, Any], settings: Settings) -> Finding:
    endpoint = probe_endpoint(str(record["endpoint"]))
    if record.get("curve"):
        return _check_curve_front(endpoint, settings)
    # Imported here: the other roles' checks need no ZeroMQ.
    from workers.client import Client, NoReply

    try:
        with Client(endpoint, timeout=PROBE_TIMEOUT, retries=0) as client:
            reply = client.request("ping", {})
    except NoReply as exc:
        return Finding("front", False, f"no reply from {endpoint}: {exc}")
    code = Client.error_code(reply)
    if code:
        return Finding("front", False, f"ping on {endpoint} answered {code}")
    return Finding("front", True, f"ping on {endpoint} answered")


def _check_curve_front(endpoint: str, settings: Settings) -> Finding:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), PROBE_TIMEOUT).close()
    except (OSError, ValueError) as exc:
        return Finding("front", False, f"CURVE front {endpoint} takes no connection: {exc}")
    beat = heartbeat_path(settings)
    age = heartbeat_age(beat) if beat is not None else None
    if beat is not None and (age is None or age > max(settings.heartbeat_max_age, 5.0)):
        return Finding("front", False, f"CURVE front {endpoint}: heartbeat {beat} is stale")
    return Finding("front", True, f"CURVE front {endpoint} takes connections")


def _check_http(record: dict[str, Any]) -> Finding:
    url = str(record["url"])
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        return Finding("http", False, f"{url}: {exc}")
    return Finding("http", status == 200, f"{url} answered {status}")


def _check_scheduler(path: Path, record: dict[str, Any]) -> Finding:
    age = time.time() - path.stat().st_mtime
    limit = float(record["max_age"])
    return Finding("scheduler", age <= limit, f"heartbeat {age:.0f} s old (limit {limit:.0f} s)")


def check(settings: Settings) -> list[Finding]:
    """Probes every record in the health directory; empty when there is none."""
    if settings.health_dir is None or not settings.health_dir.is_dir():
        return []
    findings = []
    for path in sorted(settings.health_dir.glob(f"*{SUFFIX}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            role = record["role"]
            if role == "front":
                findings.append(_check_front(record, settings))
            elif role == "http":
                findings.append(_check_http(record))
            elif role == "scheduler":
                findings.append(_check_scheduler(path, record))
            else:
                findings.append(Finding(str(role), False, f"unknown role in {path}"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            findings.append(Finding(path.stem, False, f"unreadable record {path}: {exc}"))
    return findings
