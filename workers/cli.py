"""The `stui-sessions` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service import codec, metrics
from service.settings import Settings
from service.store import REDIS_FAILURES, RedisTopologyError, redis_for
from workers import cli_admin, cli_clients, cli_health, cli_http, cli_ops, health
from workers.cli_common import EXIT_REDIS, EXIT_USAGE, NO_REDIS, add_redis_flags, settings_from
from workers.client import Client, CurveKeys, NoReply
from workers.front import FrontWorker
from workers.launchers.redis import EmbeddedRedis
from workers.multiproc import WorkerPool
from workers.runtime import build_dispatcher, configure_logging

SERVE_BIND = "tcp://127.0.0.1:5555"


def serve_bind(settings: Settings) -> str:
    """A local run listens on loopback only, unless told otherwise (--bind,
    STUI_BIND): with CURVE off, anyone who reaches the port can use any
    client's sessions."""
    return settings.bind if "bind" in settings.model_fields_set else SERVE_BIND


def _run_fronts(settings: Settings) -> None:
    if not settings.redis_configured:
        raise SystemExit(NO_REDIS)
    health.publish_front(settings, settings.bind)
    try:
        _run_front_processes(settings)
    finally:
        health.withdraw(settings, "front")


def _run_front_processes(settings: Settings) -> None:
    if settings.workers > 1:
        # Check the Redis set-up here, once: an unusable one is then one
        # error line, not a traceback from every worker the pool restarts.
        redis_for(settings).close()
        WorkerPool(settings, settings.bind, settings.workers).run()
        return
    dispatcher, client_keys = build_dispatcher(settings)
    worker = FrontWorker(settings, dispatcher, settings.bind, client_keys=client_keys)
    worker.install_signal_handlers()
    worker.run()


def cmd_front(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings)
    _run_fronts(settings)
    return 0


@contextlib.contextmanager
def _redis_for(settings: Settings) -> Iterator[str | None]:
    """The configured Redis's URL, or an embedded one persisting under data_dir."""
    if settings.redis_configured:
        yield settings.redis_url
        return
    server = EmbeddedRedis(data_dir=settings.data_dir / "redis")
    with server:
        (settings.data_dir / "redis.port").write_text(str(server.port))
        print(
            f"embedded redis-server on {server.url}, data in {settings.data_dir / 'redis'}",
            file=sys.stderr,
        )
        yield server.url


def cmd_serve(args: argparse.Namespace) -> int:
    """Everything on one machine: Redis (embedded unless configured), the
    front in this process, a scheduler and the HTTP server as children."""
    settings = settings_from(args)
    configure_logging(settings)
    bind = serve_bind(settings)
    with _redis_for(settings) as url, _companions(settings, url) as metrics_dir:
        print(f"stui-sessions serving on {bind}", file=sys.stderr)
        update = {"redis_url": url, "metrics_dir": metrics_dir, "bind": bind}
        _run_fronts(settings.model_copy(update=update))
    return 0


@contextlib.contextmanager
def _companions(settings: Settings, redis_url: str | None) -> Iterator[Path]:
    """The scheduler and the HTTP server, as child processes sharing the
    metrics directory, which is wiped first: this process starts them all."""
    metrics_dir = settings.metrics_dir or settings.data_dir / "metrics"
    metrics.clear_dir(metrics_dir)
    backup_dir = (
        settings.backup_dir
        if "backup_dir" in settings.model_fields_set
        else settings.data_dir / "backups"
    )
    # The children read their settings from the environment: pass on what
    # came from flags too.
    redis_env = {
        "STUI_REDIS_URL": redis_url,
        "STUI_REDIS_MODE": settings.redis_mode,
        "STUI_REDIS_SENTINELS": settings.redis_sentinels,
        "STUI_REDIS_MASTER_NAME": settings.redis_master_name,
    }
    env = {
        **os.environ,
        **{k: v for k, v in redis_env.items() if v is not None},
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "STUI_BACKUP_DIR": str(backup_dir),
    }
    if settings.backup_key is None and settings.backup_key_file is None:
        # The scheduler signs backups: with no key configured, one is made
        # once under data_dir (0600) and reused on every later run.
        from service import backup

        key_file = backup.ensure_key_file(settings.data_dir / "backup.key").absolute()
        env["STUI_BACKUP_KEY_FILE"] = str(key_file)
    http_bind = (
        settings.http_bind if "http_bind" in settings.model_fields_set else ("127.0.0.1:9102")
    )
    me = [sys.executable, "-m", "workers.cli"]
    children = [
        subprocess.Popen([*me, "scheduler"], env=env),
        subprocess.Popen([*me, "http", "--bind", http_bind], env=env),
    ]
    print(f"scheduler (backups in {backup_dir}) and http on {http_bind} started", file=sys.stderr)
    try:
        yield metrics_dir
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(settings.shutdown_grace + 5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _parse_value(text: str) -> Any:
    """key=value: the value is JSON when it parses as JSON, else a string."""
    try:
        return codec.loads(text.encode("utf-8"))
    except codec.JSONError:
        return text


def cmd_call(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"parameters are key=value, got {item!r}", file=sys.stderr)
            return 2
        params[key] = _parse_value(value)
    curve = None
    if args.server_key or args.client_key:
        if not (args.server_key and args.client_key):
            print("CURVE needs both --server-key and --client-key", file=sys.stderr)
            return 2
        curve = CurveKeys.from_files(args.server_key, args.client_key)
    with Client(
        args.endpoint,
        timeout=args.timeout,
        retries=args.retries,
        encoding=args.encoding,
        curve=curve,
    ) as client:
        try:
            reply = client.request(args.command_name, params)
        except NoReply as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
    print(json.dumps(reply, indent=2, ensure_ascii=False))
    return 1 if Client.error_code(reply) else 0


def _add_settings_flags(p: argparse.ArgumentParser, default_bind: str) -> None:
    add_redis_flags(p)
    p.add_argument("--bind", help=f"ZeroMQ endpoint to bind (STUI_BIND), default {default_bind}")
    p.add_argument("--workers", type=int, help="front worker processes (STUI_WORKERS)")
    p.add_argument(
        "--shutdown-grace",
        dest="shutdown_grace",
        type=float,
        help="seconds to answer in-flight requests after SIGTERM",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stui-sessions", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    front = sub.add_parser("front", help="run front workers against a Redis")
    _add_settings_flags(front, "tcp://0.0.0.0:5555")
    front.set_defaults(func=cmd_front)

    serve = sub.add_parser("serve", help="one-command local run (embedded Redis if none is set)")
    _add_settings_flags(serve, SERVE_BIND)
    serve.add_argument(
        "--data-dir",
        dest="data_dir",
        type=Path,
        help="where the embedded Redis keeps its files (STUI_DATA_DIR)",
    )
    serve.set_defaults(func=cmd_serve)

    call = sub.add_parser("call", help="send one request and print the JSON reply")
    call.add_argument("command_name", metavar="COMMAND")
    call.add_argument(
        "params",
        nargs="*",
        metavar="key=value",
        help="a parameter; the value is read as JSON when it parses, else a string",
    )
    call.add_argument(
        "--endpoint",
        action="append",
        default=None,
        help="server endpoint (repeat for failover), default tcp://127.0.0.1:5555",
    )
    call.add_argument("--timeout", type=float, default=5.0)
    call.add_argument("--retries", type=int, default=2)
    call.add_argument("--encoding", choices=["command", "envelope"], default="command")
    call.add_argument("--server-key", help="CURVE: the server's public key file")
    call.add_argument("--client-key", help="CURVE: this client's secret key file")
    call.set_defaults(func=cmd_call)
    cli_admin.register(sub)
    cli_admin.register_keys(sub)
    cli_admin.register_plans(sub)
    cli_clients.register(sub)
    cli_ops.register(sub)
    cli_http.register(sub)
    cli_health.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "endpoint", "") is None:
        args.endpoint = ["tcp://127.0.0.1:5555"]
    # Bad settings or an unusable Redis set-up at start: one clear line for
    # the operator, not a traceback.
    try:
        return int(args.func(args))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        print(f"error: invalid settings: {problems}", file=sys.stderr)
        return EXIT_USAGE
    except RedisTopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REDIS
    except REDIS_FAILURES as exc:  # e.g. an admin command with Redis down
        print(f"error: redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REDIS


if __name__ == "__main__":
    sys.exit(main())
