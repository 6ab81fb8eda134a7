"""What every subcommand that talks to Redis shares: its flags, and how
they are merged over the environment."""

from __future__ import annotations

import argparse
from typing import Any

from service.settings import Settings

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
