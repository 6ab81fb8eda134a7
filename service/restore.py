"""Restore from a backup file: verified whole before the first write, then
each session back through one script call (scripts.RESTORE_BACKUP) that
skips expired sessions, keeps newer versions unless forced, and rebuilds the
indexes so statistics and listings stay exact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis

from service import keys, scripts
from service.backup import (
    BATCH,
    BATCH_BYTES,
    BackupInfo,
    Progress,
    SessionRecord,
    _size,
    iter_backup,
    verify_backup,
)
from service.errors import StorageUnavailable
from service.settings import Settings
from service.store import Call, RedisClient, Store


@dataclass(slots=True)
class RestoreResult:
    restored: int = 0
    expired: int = 0  # expired since the backup: skipped
    newer: int = 0  # Redis holds the same or a newer version: skipped (unless force)
    over_limit: int = 0  # the client already has its maximum of live sessions: skipped


def restore_backup(
    client: RedisClient,
    path: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    settings: Settings | None = None,
) -> RestoreResult:
    """The whole file is verified before the first write: a cut or corrupted
    file raises BackupError and changes nothing. Running it twice is harmless."""
    verified = verify_backup(path)
    return restore_verified(client, verified, force=force, progress=progress, settings=settings)


def restore_verified(
    client: RedisClient,
    verified: BackupInfo,
    *,
    force: bool = False,
    progress: Progress | None = None,
    settings: Settings | None = None,
) -> RestoreResult:
    """restore_backup for a file that verify_backup has just checked. The
    limits are those of `settings` (the defaults when None)."""
    limits = settings or Settings()
    path = verified.path
    result = RestoreResult()
    batch: list[SessionRecord] = []
    done = size = 0
    for _, rec in iter_backup(Path(path)):
        if rec is not None:
            batch.append(rec)
            size += _size(rec)
        if batch and (rec is None or len(batch) >= BATCH or size >= BATCH_BYTES):
            _restore_batch(client, batch, force, limits, result)
            done += len(batch)
            batch, size = [], 0
            if progress:
                progress(done)
    return result


def _restore_batch(
    client: RedisClient,
    batch: list[SessionRecord],
    force: bool,
    limits: Settings,
    result: RestoreResult,
) -> None:
    # Through the Store: one pipeline per master on a Cluster, and scripts
    # (re)loaded on NOSCRIPT, so a Redis restart mid-restore is survived.
    calls = []
    for rec in batch:
        sid = rec.session_id
        args: list[str | bytes | int] = ["", "", "", sid, keys.chash_of_session(sid), ""]
        args += [rec.expires_ms, "1" if force else "0", limits.max_sessions_per_client]
        for name, value in rec.fields:
            args += [name, value]
        calls.append(Call(scripts.RESTORE_BACKUP, keys.session_keys(sid), args))
    try:
        replies = Store(client).run(calls)
    except StorageUnavailable:
        raise redis.ConnectionError("Redis became unavailable during the restore") from None
    for reply in replies:
        if isinstance(reply, StorageUnavailable):
            raise redis.ConnectionError("Redis refused a restore write (try again)")
        if isinstance(reply, Exception):
            raise reply
        status = reply[0]
        if status == b"OK":
            result.restored += 1
        elif status == b"EXPIRED":
            result.expired += 1
        elif status == b"NEWER":
            result.newer += 1
        elif status == b"LIMIT":
            result.over_limit += 1
        else:
            raise RuntimeError(f"unexpected restore reply {reply!r}")
