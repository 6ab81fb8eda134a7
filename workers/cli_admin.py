"""Administrative subcommands: client policy and CURVE client keys.

They talk to Redis directly; every front worker picks a change up within
`policy_refresh` seconds (default 0.5 s), without a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import redis

from service import policy
from service.settings import Settings


def _redis(args: argparse.Namespace) -> redis.Redis:
    url = args.redis_url or Settings().redis_url
    if not url:
        raise SystemExit("no Redis configured: set --redis-url or STUI_REDIS_URL")
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def cmd_policy(args: argparse.Namespace) -> int:
    client = _redis(args)
    try:
        if args.action in ("allow", "deny"):
            for value in args.ids:
                policy.add_rule(client, args.action, value, prefix=args.prefix)
        elif args.action == "remove":
            for value in args.ids:
                if not policy.remove_rule(client, value, prefix=args.prefix):
                    print(f"{value}: not in any list", file=sys.stderr)
        print(json.dumps(policy.describe_policy(policy.read_policy(client)), indent=2))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


def add_redis_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", dest="redis_url", help="redis://host:port/db (STUI_REDIS_URL)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "policy",
        help="allow or deny client ids (exact, or by prefix with --prefix)",
        description="Deny wins over allow; a non-empty allow list serves only the clients it "
        "lists. Every front worker applies a change within policy_refresh seconds.",
    )
    p.add_argument("action", choices=["allow", "deny", "remove", "show"])
    p.add_argument("ids", nargs="*", metavar="CLIENT_ID")
    p.add_argument("--prefix", action="store_true", help="the ids are prefixes")
    add_redis_flag(p)
    p.set_defaults(func=cmd_policy)
