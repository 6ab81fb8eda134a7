"""Administrative subcommands: client policy, CURVE client keys and plans.

They talk to Redis directly; every front worker picks a change up within
`policy_refresh` seconds (default 0.5 s), without a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import zmq.auth

from service import auth, plans, policy
from service.store import RedisClient
from workers.cli_common import EXIT_BAD_FILE, add_redis_flags, with_redis
from workers.curve import generate_key_pair


def cmd_policy(args: argparse.Namespace) -> int:
    def body(client: RedisClient) -> int:
        if args.action in ("allow", "deny"):
            for value in args.ids:
                policy.add_rule(client, args.action, value, prefix=args.prefix)
        elif args.action == "remove":
            for value in args.ids:
                if not policy.remove_rule(client, value, prefix=args.prefix):
                    print(f"{value}: not in any list", file=sys.stderr)
        print(json.dumps(policy.describe_policy(policy.read_policy(client)), indent=2))
        return 0

    return with_redis(args, body)


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
    add_redis_flags(p)
    p.set_defaults(func=cmd_policy)


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "generate":
        try:
            public_file, secret_file = generate_key_pair(args.dir, args.name)
        except (OSError, ValueError) as exc:  # an existing file or link is never replaced
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_FILE
        public, _ = zmq.auth.load_certificate(str(public_file))
        print(
            json.dumps(
                {
                    "public_key": public.decode(),
                    "public_file": str(public_file),
                    "secret_file": str(secret_file),
                },
                indent=2,
            )
        )
        return 0

    def body(client: RedisClient) -> int:
        if args.action == "add":
            auth.add_client_key(client, args.client_id, args.public_key)
        elif args.action == "remove" and not auth.remove_client_key(client, args.target):
            print(f"{args.target}: no such client or key", file=sys.stderr)
            return 1
        # list (and after a change): public keys only, never a secret
        print(json.dumps(auth.read_client_keys(client), indent=2, sort_keys=True))
        return 0

    return with_redis(args, body)


def register_keys(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="CURVE keys: generate a pair, register or remove a client's public key",
        description="Every front worker applies a change within policy_refresh seconds. "
        "A Z85 key may start with '-': put '--' before the positional arguments.",
    )
    actions = keys.add_subparsers(dest="action", required=True)
    gen = actions.add_parser("generate", help="write NAME.key (public) and NAME.key_secret")
    gen.add_argument("--dir", type=Path, default=Path("."), help="where to write")
    gen.add_argument("--name", default="server", help="file name stem")
    add = actions.add_parser("add", help="register a client's public key (Z85)")
    add.add_argument("client_id")
    add.add_argument("public_key")
    remove = actions.add_parser("remove", help="unregister a public key, or all of a client's")
    remove.add_argument("target", metavar="CLIENT_ID|PUBLIC_KEY")
    listing = actions.add_parser("list", help="registered public keys and their client ids")
    for p in (add, remove, listing):
        add_redis_flags(p)
    keys.set_defaults(func=cmd_keys)


# `plans set` flags: each sets one limit (service/plans.py LIMITS).
_PLAN_FLAGS = {
    "max_sessions": ("max_sessions_per_client", int),
    "rate_limit": ("rate_limit", float),
    "rate_burst": ("rate_burst", int),
    "max_state_bytes": ("max_state_bytes", int),
    "max_timeout": ("max_timeout", int),
    "history_limit": ("history_limit", int),
    "max_checkpoints": ("max_checkpoints", int),
    "max_checkpoint_bytes": ("max_checkpoint_bytes", int),
}


def cmd_plans(args: argparse.Namespace) -> int:
    def body(client: RedisClient) -> int:
        if args.action == "set":
            limits = {
                name: getattr(args, flag)
                for flag, (name, _) in _PLAN_FLAGS.items()
                if getattr(args, flag) is not None
            }
            plans.set_plan(client, args.name, limits)
        elif args.action == "remove" and not plans.remove_plan(client, args.name):
            print(f"{args.name}: no such plan", file=sys.stderr)
            return 1
        elif args.action == "assign":
            plans.assign(client, args.client_id, args.plan, prefix=args.prefix)
        elif args.action == "unassign" and not plans.unassign(
            client, args.client_id, prefix=args.prefix
        ):
            kind = "prefix" if args.prefix else "client id"
            print(f"{args.client_id}: no such {kind} assigned", file=sys.stderr)
            return 1
        print(json.dumps(plans.describe(plans.read_table(client)), indent=2))
        return 0

    return with_redis(args, body)


def register_plans(sub: Any) -> None:
    p = sub.add_parser(
        "plans",
        help="named sets of limits, assigned to a client id or an id prefix",
        description="An exact assignment beats the longest matching prefix, which beats the "
        "service's settings; a limit a plan leaves unset follows the settings. Every front "
        "worker applies a change within policy_refresh seconds. Each command prints every "
        "plan and assignment as JSON.",
    )
    actions = p.add_subparsers(dest="action", required=True)
    put = actions.add_parser("set", help="create or replace a plan (unset limits follow the "
                             "service's settings)")
    put.add_argument("name", metavar="NAME")
    for flag, (name, kind) in _PLAN_FLAGS.items():
        put.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help=name)
    listing = actions.add_parser("list", help="every plan and assignment")
    remove = actions.add_parser("remove", help="remove a plan (refused while assigned)")
    remove.add_argument("name", metavar="NAME")
    give = actions.add_parser("assign", help="give a client id (or, with --prefix, every id "
                              "that starts with it) a plan")
    give.add_argument("client_id", metavar="CLIENT_ID")
    give.add_argument("plan", metavar="PLAN")
    give.add_argument("--prefix", action="store_true", help="CLIENT_ID is a prefix")
    take = actions.add_parser("unassign", help="remove a client id's (or prefix's) assignment")
    take.add_argument("client_id", metavar="CLIENT_ID")
    take.add_argument("--prefix", action="store_true", help="CLIENT_ID is a prefix")
    for q in (put, listing, remove, give, take):
        add_redis_flags(q)
    p.set_defaults(func=cmd_plans)
