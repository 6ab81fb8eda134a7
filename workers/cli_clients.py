"""`stui-sessions clients show` and `clients purge`: one client whole, and
its erasure (service/clients.py does the work)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from service import audit, clients, models
from service.backup import primaries, redis_now_ms
from service.backup_format import BackupError
from service.backup_key import BackupKeyError, require_key
from service.store import RedisClient
from workers.cli_common import (
    EXIT_BAD_FILE,
    EXIT_REDIS,
    EXIT_USAGE,
    add_redis_flags,
    settings_from,
    with_redis,
)
from workers.runtime import configure_logging

_CLIENT_ID = re.compile(models.CLIENT_ID_PATTERN)


def _client_id(value: str) -> str:
    if not _CLIENT_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} does not match the client id pattern {models.CLIENT_ID_PATTERN}"
        )
    return value


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _print_view(view: clients.ClientView) -> None:
    print(f"client {view.client_id}")
    print(f"  plan: {view.plan or '(none: the service defaults)'}")
    print("  limits: " + ", ".join(f"{k} {v}" for k, v in view.limits.items()))
    rate = "off" if view.rate_tokens is None else f"{view.rate_tokens:.1f} tokens"
    create = "off" if view.create_tokens is None else f"{view.create_tokens:.1f} tokens"
    print(f"  rate limit: {rate} (create_session: {create})")
    print(f"  CURVE keys registered: {view.curve_keys}")
    print(f"  live sessions: {len(view.sessions)}")
    for s in view.sessions:
        size = "?" if s.bytes is None else f"{s.bytes} B"
        print(
            f"    {s.session_id}  created {_iso(s.created_ms)}  modified "
            f"{_iso(s.last_modified_ms)}  expires {_iso(s.expires_ms)}  v{s.version}  "
            f"{size}  {s.checkpoints} checkpoints{'' if s.active else '  (inactive)'}"
        )


def cmd_show(args: argparse.Namespace) -> int:
    settings = settings_from(args)

    def body(client: RedisClient) -> int:
        view = clients.show(client, settings, args.client_id)
        if args.json:
            print(json.dumps(view.to_json(), indent=2))
        else:
            _print_view(view)
        return 0

    return with_redis(args, body)


def _confirm(client_id: str, backups: Path | None) -> bool:
    where = f" and from every backup in {backups}" if backups else ""
    sys.stderr.write(
        f"Erase client {client_id!r}: every session, checkpoint and record of it in Redis"
        f"{where}. This cannot be undone. Type the client id to go on: "
    )
    sys.stderr.flush()
    return sys.stdin.readline().strip() == client_id


def cmd_purge(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings)
    key = None
    if args.backups is not None:
        if not args.backups.is_dir():
            print(f"error: {args.backups} is not a directory", file=sys.stderr)
            return EXIT_USAGE
        try:
            key = require_key(settings)
        except BackupKeyError as exc:
            print(f"error: {exc} (rewriting backups signs them anew)", file=sys.stderr)
            return EXIT_USAGE
    if not args.yes and not _confirm(args.client_id, args.backups):
        print("aborted: nothing was changed", file=sys.stderr)
        return EXIT_USAGE

    def body(client: RedisClient) -> int:
        settle = 2 * settings.policy_refresh + 0.5
        print(f"purge {args.client_id}: denying it for {settle:.1f} s while every front "
              "picks the rule up, then removing", file=sys.stderr)
        try:
            done = clients.purge(client, args.client_id, keep_key=args.keep_key, settle=settle)
        except clients.PurgeIncomplete as exc:
            print(f"error: {exc}", file=sys.stderr)
            audit.purged(args.client_id, {"incomplete": str(exc)})
            return EXIT_REDIS
        report: dict[str, Any] = {"redis": done.to_json()}
        if args.backups is not None and key is not None:
            # Redis' clock once nothing of the client is left there: a backup
            # begun after it holds nothing of the client.
            purged_ms = redis_now_ms(primaries(client)[0])
            rewritten: list[dict[str, Any]] = []
            report["backups"] = rewritten
            try:
                for r in clients.rewrite_backups(
                    args.backups, args.client_id, key=key, allow_unsigned=args.allow_unsigned,
                    purged_ms=purged_ms, progress=lambda line: print(f"  {line}", file=sys.stderr),
                ):
                    entry: dict[str, Any] = {"file": r.path.name, "removed": r.removed,
                                             "kept": r.kept}
                    if r.note:
                        entry["note"] = r.note
                    rewritten.append(entry)
            except (BackupError, OSError) as exc:
                # Redis is purged either way: say so, and which files are done.
                print(f"error: {exc}; Redis holds nothing of the client, the backup files "
                      "listed in the audit line are rewritten, run the purge again for the "
                      "others", file=sys.stderr)
                audit.purged(args.client_id, {**report, "failed_backup": str(exc)[:300]})
                return EXIT_BAD_FILE
        audit.purged(args.client_id, report)
        print(json.dumps({"client_id": args.client_id, **report}, indent=2))
        return 0

    return with_redis(args, body)


def register(sub: Any) -> None:
    p = sub.add_parser("clients", help="look at one client whole, or erase it")
    actions = p.add_subparsers(dest="action", required=True)
    show = actions.add_parser(
        "show", help="a client's plan, limits, live sessions, rate-limit level and CURVE key"
    )
    show.add_argument("client_id", type=_client_id, metavar="CLIENT_ID")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=cmd_show)
    purge = actions.add_parser(
        "purge",
        help="erase everything Redis (and, with --backups, the backup files) holds of a client",
        description="Removes the client's sessions, checkpoints, index and bucket members, rate "
        "buckets, replay records and, unless --keep-key, its CURVE key. The client is denied "
        "while it runs, so that its requests are refused rather than racing with it. Safe to "
        "run twice. Writes an audit line (logger stui.audit).",
    )
    purge.add_argument("client_id", type=_client_id, metavar="CLIENT_ID")
    purge.add_argument("--backups", type=Path, metavar="DIR",
                       help="rewrite every backup file there without the client (signed anew)")
    purge.add_argument("--allow-unsigned", action="store_true",
                       help="with --backups: accept legacy files with only a .sha256")
    purge.add_argument("--keep-key", action="store_true", help="keep its CURVE key registered")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=cmd_purge)
    for q in (show, purge):
        add_redis_flags(q)
