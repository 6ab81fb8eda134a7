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
from service.store import Call, RedisClient, Store


@dataclass(slots=True)
class RestoreResult:
    restored: int = 0
    expired: int = 0  # expired since the backup: skipped
    newer: int = 0  # Redis holds the same or a newer version: skipped (unless force)


def restore_backup(
    client: RedisClient,
    path: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """The whole file is verified before the first write: a cut or corrupted
    file raises BackupError and changes nothing. Running it twice is harmless."""
    return restore_verified(client, verify_backup(path), force=force, progress=progress)


def restore_verified(
    client: RedisClient,
    verified: BackupInfo,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """restore_backup for a file that verify_backup has just checked."""
    path = verified.path
    result = RestoreResult()
    batch: list[SessionRecord] = []
    done = size = 0
    for _, rec in iter_backup(Path(path)):
        if rec is not None:
            batch.append(rec)
            size += _size(rec)
        if batch and (rec is None or len(batch) >= BATCH or size >= BATCH_BYTES):
            _restore_batch(client, batch, force, result)
            done += len(batch)
            batch, size = [], 0
            if progress:
                progress(done)
    return result


def _restore_batch(
    client: RedisClient,
    batch: list[SessionRecord],
    force: bool,
    result: RestoreResult,
) -> None:
    # Through the Store: one pipeline per master on a Cluster, and scripts
    # (re)loaded on NOSCRIPT, so a Redis restart mid-restore is survived.
    calls = []
    for rec in batch:
        sid = rec.session_id
        args: list[str | bytes | int] = ["", "", "", sid, keys.chash_of_session(sid), ""]
        args += [rec.expires_ms, "1" if force else "0"]
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
        else:
            raise RuntimeError(f"unexpected restore reply {reply!r}")
