"""The `http` role: gunicorn, started from Python, serving service/http_app.py.

The gunicorn master starts before any of its workers, so it prepares the
metrics directory (the files of processes that no longer run go; those of a
front worker already writing stay), and it tells prometheus-client when one
of its workers exits. The app is loaded in each worker after the fork, so
that every worker has its own Redis connection.

The worker class is workers/http_worker.py: gunicorn's own workers let one
slow client take the probes down.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]
from prometheus_client.multiprocess import mark_process_dead

from service.http_app import make_app
from service.metrics import remove_dead_files, setup
from service.settings import Settings
from workers.cli_common import NO_REDIS
from workers.http_worker import (
    HTTP_THREADS,
    KEEPALIVE,
    WORKER_TIMEOUT,
    ProbeSafeWorker,
    worker_connections,
)

log = logging.getLogger(__name__)


def gunicorn_options(settings: Settings, metrics_dir: Path) -> dict[str, Any]:
    def on_starting(server: Any) -> None:
        removed = remove_dead_files(metrics_dir)
        log.info("metrics in %s (%d stale files removed)", metrics_dir, removed)

    def child_exit(server: Any, worker: Any) -> None:
        mark_process_dead(worker.pid, str(metrics_dir))  # type: ignore[no-untyped-call]

    return {
        "bind": [settings.http_bind],
        "workers": settings.http_workers,
        "worker_class": ProbeSafeWorker,
        "threads": HTTP_THREADS,
        "worker_connections": worker_connections(),
        "timeout": WORKER_TIMEOUT,
        "graceful_timeout": max(1, math.ceil(settings.shutdown_grace)),
        "keepalive": KEEPALIVE,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "proc_name": "stui-sessions-http",
        "on_starting": on_starting,
        "child_exit": child_exit,
    }


class HttpServer(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        # gunicorn >= 25 opens a control socket at one path per user: two
        # servers on a machine would fight over it, and nothing here uses it.
        if "control_socket_disable" in self.cfg.settings:
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Any:
        return make_app(self.settings)


def run(settings: Settings) -> None:
    """Serves until SIGTERM (graceful) or SIGINT; gunicorn exits the process."""
    if not settings.redis_configured:
        raise SystemExit(NO_REDIS)
    if not setup(settings) or settings.metrics_dir is None:
        raise SystemExit("no metrics directory: set PROMETHEUS_MULTIPROC_DIR")
    HttpServer(settings, gunicorn_options(settings, settings.metrics_dir)).run()
