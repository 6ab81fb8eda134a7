"""Scheduler, backup, restore, verify and backup-key subcommands.

The one-off commands draw a progress line on stderr when it is a terminal and
say nothing in a pipe (but for warnings). Exit codes: 0 done, 1 the file is
bad, forged or unsigned without --allow-unsigned (nothing was restored), or
cannot be written, 2 bad arguments, no Redis or no usable backup key
configured, 3 Redis unavailable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import redis

from service import restore
from service.backup import primaries, write_backup
from service.backup_files import dir_is_open
from service.backup_format import BackupError, BackupInfo, SessionRecord, max_line_for
from service.backup_key import BackupKeyError, load_key, require_key, write_key_file
from service.backup_read import verify_backup
from service.backup_sign import KeyNeeded
from service.housekeeping import global_figures
from service.settings import Settings
from service.store import RedisClient
from workers import scheduler
from workers.cli_common import (
    EXIT_BAD_FILE,
    EXIT_REDIS,
    EXIT_USAGE,
    NO_REDIS,
    add_redis_flags,
    redis_from,
    settings_from,
)
from workers.runtime import configure_logging


class ProgressLine:
    """A '\\r' line on a terminal (at most ten redraws a second); nothing elsewhere."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.total = total
        self._drawn = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._drawn < 0.1:
            return
        self._drawn = now
        if self.total:
            frac = min(1.0, done / self.total)
            bar = "#" * int(frac * 30)
            text = f"{self.label} [{bar:<30}] {done}/{self.total} {frac:4.0%}"
        else:
            text = f"{self.label} {done}"
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()

    def finish(self, summary: str) -> None:
        if self.enabled:
            self.stream.write(f"\r{summary}\x1b[K\n")
            self.stream.flush()


def _client(args: argparse.Namespace) -> RedisClient:
    # A one-off command may wait on a slow Redis longer than a request would.
    return redis_from(args, storage_timeout=60.0)


def _redis_failed(exc: Exception) -> int:
    print(f"error: redis: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_REDIS


def _bad_file(exc: BackupError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, KeyNeeded) else EXIT_BAD_FILE


def _usage(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _key(settings: Settings, required: bool) -> bytes | None:
    """The backup key; BackupKeyError when it is unusable (or missing and required)."""
    return require_key(settings) if required else load_key(settings)


def _warn_unsigned(info: BackupInfo) -> None:
    if not info.authenticated:
        print(
            f"warning: {info.path} is not authenticated (no .hmac signature, only a plain "
            "SHA-256 checksum): accepted because of --allow-unsigned",
            file=sys.stderr,
        )


def cmd_scheduler(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings)
    if not settings.redis_configured:
        print(f"error: {NO_REDIS}", file=sys.stderr)
        return EXIT_USAGE
    try:
        _key(settings, required=True)
    except BackupKeyError as exc:
        return _usage(exc)
    scheduler.run(settings, scheduler.metrics_observer(settings))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    try:
        key = _key(settings_from(args), required=True)
    except BackupKeyError as exc:
        return _usage(exc)
    assert key is not None
    client = _client(args)
    try:
        mode = dir_is_open(Path(args.output).absolute().parent)
        if mode is not None:
            print(
                f"warning: {Path(args.output).absolute().parent} is open to group/others "
                f"(mode {mode:04o}); the backup files themselves are 0600",
                file=sys.stderr,
            )
        progress = ProgressLine("backup", global_figures(client).sessions)
        info = write_backup(primaries(client), args.output, key=key, progress=progress)
    except redis.RedisError as exc:
        return _redis_failed(exc)
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_FILE
    finally:
        client.close()
    progress.finish(f"backup: {info.sessions} sessions, {info.size} bytes in {info.path}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        key = _key(settings, required=False)
    except BackupKeyError as exc:
        return _usage(exc)
    try:
        checking = ProgressLine("verifying")
        info = verify_backup(
            args.file,
            progress=checking,
            key=key,
            allow_unsigned=args.allow_unsigned,
            max_line=max_line_for(settings),
        )
        checking.finish(f"verified: {info.sessions} sessions")
    except BackupError as exc:
        return _bad_file(exc)
    _warn_unsigned(info)
    client = _client(args)
    progress = ProgressLine("restoring", info.sessions)
    try:
        result = restore.restore_verified(
            client, info, force=args.force, progress=progress, settings=settings
        )
    except BackupError as exc:  # the file changed since it was verified
        return _bad_file(exc)
    except redis.RedisError as exc:
        return _redis_failed(exc)
    finally:
        client.close()
    summary = (
        f"restored {result.restored} sessions; skipped {result.expired} expired, "
        f"{result.newer} with the same or a newer version in Redis, "
        f"{result.over_limit} over their client's session limit, "
        f"{result.invalid} refused as invalid"
    )
    if progress.enabled:
        progress.finish(summary)
    elif result.invalid or result.over_limit:
        print(summary, file=sys.stderr)  # in a pipe too: sessions were left out
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        key = _key(settings, required=False)
    except BackupKeyError as exc:
        return _usage(exc)
    progress = ProgressLine("verifying")
    try:
        info = verify_backup(
            args.file,
            progress=progress,
            key=key,
            allow_unsigned=args.allow_unsigned,
            max_line=max_line_for(settings),
            check=lambda rec: _refusal(rec, settings),
        )
    except BackupError as exc:
        progress.finish("verify failed")
        return _bad_file(exc)
    progress.finish("verified")
    _warn_unsigned(info)
    taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_ms / 1000))
    signed = "signed" if info.authenticated else "NOT authenticated"
    refused = (
        f"; {info.invalid} that restore would refuse under these settings" if info.invalid else ""
    )
    print(f"{info.path}: OK, {info.sessions} sessions, taken {taken}, {signed}{refused}")
    return 0


def _refusal(rec: SessionRecord, settings: Settings) -> str | None:
    try:
        restore.check_session(rec, settings)
    except restore.Invalid as why:
        restore.log.warning("would refuse session %s...: %s", rec.session_id[:20], why)
        return str(why)
    return None


def cmd_backup_key_generate(args: argparse.Namespace) -> int:
    path: Path = args.output
    try:
        write_key_file(path)
    except FileExistsError:
        print(
            f"error: {path} exists: refusing to overwrite a backup key "
            "(the backups it signed need it)",
            file=sys.stderr,
        )
        return EXIT_BAD_FILE
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_FILE
    print(f"backup key written to {path} (mode 0600): set STUI_BACKUP_KEY_FILE={path}")
    return 0


def register(sub: Any) -> None:
    """Adds the scheduler and backup subcommands to the CLI."""
    p = sub.add_parser(
        "scheduler",
        help="run the scheduler (one leader among replicas: backups, housekeeping)",
    )
    add_redis_flags(p)
    p.add_argument("--backup-dir", dest="backup_dir", type=Path, help="(STUI_BACKUP_DIR)")
    p.add_argument(
        "--backup-interval",
        dest="backup_interval",
        type=float,
        help="minutes between backups (STUI_BACKUP_INTERVAL)",
    )
    p.add_argument(
        "--backup-keep", dest="backup_keep", type=int, help="files kept (STUI_BACKUP_KEEP)"
    )
    p.add_argument(
        "--backup-max-age-days",
        dest="backup_max_age_days",
        type=float,
        help="older files are removed (STUI_BACKUP_MAX_AGE_DAYS)",
    )
    p.add_argument("--leader-ttl", dest="leader_ttl", type=float, help="s (STUI_LEADER_TTL)")
    p.add_argument(
        "--cleanup-interval", dest="cleanup_interval", type=int, help="s (STUI_CLEANUP_INTERVAL)"
    )
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("backup", help="write every live session to a backup file now")
    add_redis_flags(p)
    p.add_argument("--output", "-o", type=Path, required=True, help="the backup file to write")
    p.set_defaults(func=cmd_backup)

    allow_unsigned = (
        "accept a file written before backups were signed (a plain .sha256 checksum only, "
        "which anyone who can edit the file can recompute)"
    )

    p = sub.add_parser(
        "restore",
        help="restore a backup file (verified first; newer sessions in Redis are kept)",
    )
    p.add_argument("file", type=Path)
    add_redis_flags(p)
    p.add_argument(
        "--force", action="store_true", help="overwrite sessions with the same or a newer version"
    )
    p.add_argument(
        "--allow-unsigned", dest="allow_unsigned", action="store_true", help=allow_unsigned
    )
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("verify", help="check a backup file's signature and every line")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--allow-unsigned", dest="allow_unsigned", action="store_true", help=allow_unsigned
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("backup-key", help="the HMAC key that signs backups")
    keys = p.add_subparsers(dest="backup_key_command", required=True)
    g = keys.add_parser("generate", help="write a new key file (32 random bytes as hex, mode 0600)")
    g.add_argument(
        "--output", "-o", type=Path, required=True, help="the key file (never overwritten)"
    )
    g.set_defaults(func=cmd_backup_key_generate)
