"""The pod's HTTP face, as a plain WSGI app (gunicorn serves it: workers/http.py).

- /healthz: the process answers.
- /readyz: Redis answers PING within ready_timeout, and the pod's front
  worker heartbeat is at most heartbeat_max_age old (0 turns that check off,
  for a pod without a front worker). 503 with the failed checks otherwise.
- /metrics: the files of every process of the pod, merged by
  prometheus-client's multiprocess collector.

gunicorn calls it from several threads of a worker (workers/http.py): one
scrape at a time reaps and reads the metric files, and the Redis client is
made once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from wsgiref.types import StartResponse, WSGIEnvironment

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics import heartbeat_age, heartbeat_path, reap_live_gauges
from service.settings import Settings
from service.store import REDIS_FAILURES, RedisClient, RedisTopologyError, redis_for

_TEXT = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]

Response = tuple[str, list[tuple[str, str]], bytes]


# What /readyz turns into "not ready" rather than an error page.
_REDIS_NOT_READY: tuple[type[BaseException], ...] = (
    *REDIS_FAILURES,
    ValueError,
    RedisTopologyError,
)


class HttpApp:
    def __init__(
        self,
        settings: Settings,
        metrics_dir: Path,
        redis_client: RedisClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.heartbeat = heartbeat_path(settings) or metrics_dir / "front.heartbeat"
        self._redis = redis_client
        self._redis_lock = threading.Lock()
        # Two scrapes reaping at once would race to remove the same files.
        self._scrape_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        self.routes: dict[str, Callable[[WSGIEnvironment], Response]] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/metrics": self.metrics,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        route = self.routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            status, headers, body = "404 Not Found", _TEXT, b"not found\n"
        elif environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            status, headers, body = "405 Method Not Allowed", [*_TEXT, ("Allow", "GET")], b""
        else:
            status, headers, body = route(environ)
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    def healthz(self, environ: WSGIEnvironment) -> Response:
        return "200 OK", _TEXT, b"ok\n"

    def readyz(self, environ: WSGIEnvironment) -> Response:
        failed = [problem for problem in (self._redis_problem(), self._front_problem()) if problem]
        if failed:
            return "503 Service Unavailable", _TEXT, "".join(f"{p}\n" for p in failed).encode()
        return "200 OK", _TEXT, b"ready\n"

    def metrics(self, environ: WSGIEnvironment) -> Response:
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        with self._scrape_lock:
            reap_live_gauges(self.metrics_dir)
            body = encoder(self.registry)
        return "200 OK", [("Content-Type", content_type)], body

    def _redis_problem(self) -> str | None:
        try:
            self._client().ping()
        except _REDIS_NOT_READY as exc:
            return f"redis: {type(exc).__name__}"
        return None

    def _client(self) -> RedisClient:
        with self._redis_lock:
            if self._redis is None:
                quick = {"storage_timeout": self.settings.ready_timeout}
                self._redis = redis_for(self.settings.model_copy(update=quick))
            return self._redis

    def _front_problem(self) -> str | None:
        limit = self.settings.heartbeat_max_age
        if limit == 0:
            return None
        age = heartbeat_age(self.heartbeat)
        if age is None:
            return f"front: no heartbeat at {self.heartbeat}"
        if age > limit:
            return f"front: heartbeat {age:.1f} s old (limit {limit:g} s)"
        return None


def make_app(settings: Settings, redis_client: redis.Redis | None = None) -> HttpApp:
    if settings.metrics_dir is None:
        raise ValueError("no metrics directory: set PROMETHEUS_MULTIPROC_DIR")
    return HttpApp(settings, settings.metrics_dir, redis_client)
