"""Writing a backup: every live session, read from Redis, as a signed backup file.

The sessions are read master by master (primaries), in round trips of about
BATCH_BYTES, each session in its own MULTI so that its fields, TTL and the
clock are of one instant (read_sessions). write_backup writes them in the
format of service/backup_format.py through gzip, HMAC-signs the bytes as they
go (service/backup_sign.py) and renames the finished file into place
(service/backup_files.py): a reader sees a whole, signed file or none.

Reading and verifying is service/backup_read.py, the key service/backup_key.py.
The `import x as x` lines re-export names of those modules that the tests
reach as `backup.<name>` (and service/housekeeping.py's BATCH, workers/cli.py's
ensure_key_file); other code imports them from the module that defines them.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from service import keys, layout
from service.backup_files import create_private, sync_dir, temp_name
from service.backup_files import prepare_dir as prepare_dir
from service.backup_format import BATCH as BATCH
from service.backup_format import FORMAT as FORMAT
from service.backup_format import MAX_LINE as MAX_LINE
from service.backup_format import (
    BackupInfo,
    Guard,
    Progress,
    SessionRecord,
    end_line,
    header_line,
)
from service.backup_format import encode_record as encode_record
from service.backup_format import max_line_for as max_line_for
from service.backup_key import BackupKeyError as BackupKeyError
from service.backup_key import check_key
from service.backup_key import ensure_key_file as ensure_key_file
from service.backup_key import load_key as load_key
from service.backup_key import write_key_file as write_key_file
from service.backup_read import _lines as _lines
from service.backup_read import iter_backup as iter_backup
from service.backup_read import verify_backup as verify_backup
from service.backup_sign import KeyNeeded as KeyNeeded
from service.backup_sign import MacFile, write_signature
from service.backup_sign import Unsigned as Unsigned
from service.backup_sign import mac_sidecar as mac_sidecar
from service.backup_sign import sidecar as sidecar

log = logging.getLogger(__name__)

# And about this much data per round trip (by _size: a session may hold 1 MiB, and
# its checkpoints 4 MiB more, by default).
BATCH_BYTES = 8 << 20


def primaries(client: redis.Redis | redis.RedisCluster) -> list[redis.Redis]:
    """One client per master: a Cluster is backed up node by node."""
    if isinstance(client, redis.RedisCluster):
        nodes = client.get_primaries()  # type: ignore[no-untyped-call]
        return [client.get_redis_connection(node) for node in nodes]
    return [client]


def redis_now_ms(client: redis.Redis) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def _raw_pipeline(client: redis.Redis, commands: Sequence[tuple[str | bytes, ...]]) -> list[Any]:
    """Replies exactly as Redis sends them (no per-command parsing)."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands(commands))  # type: ignore[no-untyped-call]
        return [conn.read_response() for _ in commands]
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(conn)


def _read_batch(client: redis.Redis, batch: list[bytes]) -> Iterator[SessionRecord]:
    """Each session read in its own MULTI: HGETALL, PTTL and TIME at one instant."""
    commands: list[tuple[str | bytes, ...]] = []
    for key in batch:
        commands += [("MULTI",), ("HGETALL", key), ("PTTL", key), ("TIME",), ("EXEC",)]
    replies = _raw_pipeline(client, commands)
    for n, key in enumerate(batch):
        flat, pttl, (sec, usec) = replies[5 * n + 4]
        if not flat or pttl == -2:
            continue  # gone since SCAN saw it
        if isinstance(flat, Exception):  # not a hash: SessionRecord.problem() reports it
            flat = []
        sid = key.decode("utf-8", "replace").rsplit(":", 1)[1]
        # A map under RESP3, a flat list under RESP2.
        pairs = list(
            flat.items() if isinstance(flat, dict) else zip(flat[::2], flat[1::2], strict=True)
        )
        read_ms = int(sec) * 1000 + int(usec) // 1000
        # The file holds the layout-free form (layout.to_logical), and the
        # session's exact expiry rather than its key's, which may be later.
        logical, exact = layout.to_logical(pairs)
        ttl = None if pttl < 0 else int(pttl)
        if exact is not None:
            if exact <= read_ms:
                continue  # expired: its key outlives it by at most a second
            ttl = exact - read_ms
        yield SessionRecord(sid, logical, ttl, read_ms)


def _size(rec: SessionRecord) -> int:
    """A session's bytes, every field (its checkpoints too) and some for the line."""
    return sum(len(f) + len(v) for f, v in rec.fields) + 64


def read_sessions(nodes: Sequence[redis.Redis]) -> Iterator[SessionRecord]:
    """Every session on the given masters, in constant memory: each round trip
    reads about BATCH_BYTES, by the size of the sessions read so far. SCAN
    may return a key twice; restore then keeps the newer of the two lines."""
    limit = 1  # sessions per read, until their size is known
    for client in nodes:
        pending: list[bytes] = []
        for key in client.scan_iter(match=keys.session_scan_pattern(), count=BATCH):
            pending.append(key)
            if len(pending) >= limit:
                size = 0
                for rec in _read_batch(client, pending):
                    size += _size(rec)
                    yield rec
                limit = max(1, min(BATCH, BATCH_BYTES * len(pending) // max(size, 1)))
                pending = []
        if pending:
            yield from _read_batch(client, pending)


def write_backup(
    nodes: Sequence[redis.Redis],
    path: Path,
    *,
    key: bytes,
    token: int | None = None,
    guard: Guard | None = None,
    progress: Progress | None = None,
) -> BackupInfo:
    """Write every live session to `path`, signed with `key` (its `.hmac`
    sidecar). `guard` is called after each batch and just before the rename:
    if it raises, the temporary file is removed and nothing appears under
    `path`. Every file is created 0600."""
    check_key(key)
    return write_records(
        read_sessions(nodes),
        path,
        key=key,
        created_ms=redis_now_ms(nodes[0]),
        token=token,
        guard=guard,
        progress=progress,
    )


def write_records(
    records: Iterable[SessionRecord],
    path: Path,
    *,
    key: bytes,
    created_ms: int,
    token: int | None = None,
    guard: Guard | None = None,
    progress: Progress | None = None,
) -> BackupInfo:
    """write_backup's file from any records: the sessions read from Redis, or
    a backup's own records less some (service/clients.py rewrites backups
    without a purged client). A temporary file, then the signature, then the
    rename over `path`."""
    check_key(key)
    path = Path(path)
    tmp = temp_name(path)
    count = skipped = checkpoints = 0
    try:
        with create_private(tmp) as raw:
            signing = MacFile(raw, key)
            with gzip.GzipFile(filename="", mode="wb", fileobj=signing, mtime=0) as gz:
                gz.write(header_line(created_ms, token))
                for rec in records:
                    if why := rec.problem():
                        log.warning("backup: skipped key of %s: %s", rec.session_id[:64], why)
                        skipped += 1
                        continue
                    gz.write(encode_record(rec))
                    count += 1
                    checkpoints += rec.checkpoints
                    if count % BATCH == 0:
                        if guard:
                            guard()
                        if progress:
                            progress(count)
                gz.write(end_line(count))
            raw.flush()
            os.fsync(raw.fileno())
        if guard:
            guard()
        # The signature first: a file under its final name always has one.
        write_signature(path, signing)
        os.replace(tmp, path)
        sync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        progress(count)
    return BackupInfo(path, created_ms, count, signing.size, token, skipped, checkpoints)
