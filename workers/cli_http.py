"""The `http` subcommand: /healthz, /readyz and /metrics on gunicorn."""

from __future__ import annotations

import argparse
from typing import Any

from workers import health, http
from workers.cli_common import add_redis_flags, settings_from
from workers.runtime import configure_logging


def cmd_http(args: argparse.Namespace) -> int:
    flags = {"http_bind": args.bind, "http_workers": args.workers}
    settings = settings_from(args, **{k: v for k, v in flags.items() if v is not None})
    configure_logging(settings)
    health.publish_http(settings)
    try:
        http.run(settings)
    finally:
        health.withdraw(settings, "http")
    return 0


def register(sub: Any) -> None:
    """Adds the http subcommand to the CLI."""
    p = sub.add_parser(
        "http",
        help="serve /healthz, /readyz and /metrics (needs PROMETHEUS_MULTIPROC_DIR)",
    )
    p.add_argument("--bind", help="HOST:PORT (STUI_HTTP_BIND), default 0.0.0.0:9102")
    add_redis_flags(p)
    p.add_argument("--workers", type=int, help="gunicorn workers (STUI_HTTP_WORKERS), default 1")
    p.set_defaults(func=cmd_http)
