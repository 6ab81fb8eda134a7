"""What every subcommand that talks to Redis shares: its flags, and how
they are merged over the environment."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from service.settings import Settings
from service.store import RedisClient, redis_for

# Exit codes of every subcommand: a bad file, bad usage or settings, Redis
# unreachable or refusing.
EXIT_BAD_FILE, EXIT_USAGE, EXIT_REDIS = 1, 2, 3

NO_REDIS = (
    "no Redis configured: set --redis-url or STUI_REDIS_URL "
    "(sentinel mode: --redis-sentinels or STUI_REDIS_SENTINELS)"
)


def add_redis_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        dest="redis_url",
        help="redis://host:port/db (STUI_REDIS_URL); cluster mode: any node",
    )
    p.add_argument(
        "--redis-mode",
        dest="redis_mode",
        choices=["standalone", "sentinel", "cluster"],
        help="STUI_REDIS_MODE, default standalone",
    )
    p.add_argument(
        "--redis-sentinels",
        dest="redis_sentinels",
        metavar="HOST:PORT,...",
        help="sentinel mode: the sentinels (STUI_REDIS_SENTINELS)",
    )
    p.add_argument(
        "--redis-master-name",
        dest="redis_master_name",
        help="sentinel mode: the monitored master's name (STUI_REDIS_MASTER_NAME), "
        "default mymaster",
    )


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    """Environment (STUI_*) first, then the flags that were given."""
    overrides = {
        k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields
    }
    overrides.update(extra)
    return Settings(**overrides)


def redis_from(args: argparse.Namespace, storage_timeout: float | None = None) -> RedisClient:
    """The Redis client the flags and environment name; exits with
    EXIT_USAGE when none is configured."""
    settings = settings_from(args)
    if not settings.redis_configured:
        print(f"error: {NO_REDIS}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    if storage_timeout is not None:
        settings = settings.model_copy(update={"storage_timeout": storage_timeout})
    return redis_for(settings)


def with_redis(args: argparse.Namespace, body: Callable[[RedisClient], int]) -> int:
    """Runs an admin command's body on a client that is always closed; a
    ValueError (bad input) is one error line and EXIT_USAGE. Redis errors
    are turned into EXIT_REDIS by workers.cli.main."""
    client = redis_from(args)
    try:
        return body(client)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        client.close()
