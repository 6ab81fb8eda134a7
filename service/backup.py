"""Backup files: every live session, as gzip JSON Lines with a SHA-256 sidecar.

    {"format": "stui-sessions-backup", "version": 1, "created_ms": ..., "token": ...}
    {"session_id": ..., "fields": {"c": ..., "s:key": "<JSON text>", ...},
     "ttl_ms": ..., "read_ms": ...}
    ...
    {"end": true, "sessions": N}

`fields` is the whole session hash, every value as the string Redis holds
(stored JSON stays its JSON text). `read_ms` is the Redis clock when the line
was read, so a session's expiry is exactly read_ms + ttl_ms. A field pair that
is not UTF-8 goes in "raw" as base64 (the service never writes one). The end
line makes a cut file fail even without its sidecar, `<file>.sha256`, which is
`sha256sum -c` compatible. Files are written under a temporary name, synced,
then renamed: a reader sees a whole file or none.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import redis

from service import keys

log = logging.getLogger(__name__)

FORMAT = "stui-sessions-backup"
VERSION = 1
BATCH = 500  # sessions per round trip at most
BATCH_BYTES = 8 << 20  # and about this much data (a session may hold 1 MiB)
REQUIRED = ("c", "ca", "lm", "to", "v", "a")

Progress = Callable[[int], None]
Guard = Callable[[], None]  # raises when this process may no longer write


class BackupError(Exception):
    """The file is missing, cut, corrupted or not a backup: nothing was restored."""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    fields: list[tuple[bytes, bytes]]
    ttl_ms: int | None  # None: the hash had no TTL
    read_ms: int

    def problem(self) -> str | None:
        """Why restore could not take this session back, or None."""
        if not keys.is_session_id(self.session_id):
            return "bad session id"
        meta = dict(self.fields)
        for name in REQUIRED:
            value = meta.get(name.encode())
            if value is None or (name != "c" and not value.isdigit()):
                return f"field {name!r} missing or malformed"
        owner = keys.client_hash(meta[b"c"].decode("utf-8", "replace"))
        if owner != keys.chash_of_session(self.session_id):
            return "session id does not belong to its client"
        return None

    def field(self, name: bytes) -> bytes | None:
        return next((v for f, v in self.fields if f == name), None)

    @property
    def expires_ms(self) -> int:
        if self.ttl_ms is not None:
            return self.read_ms + self.ttl_ms
        return self.read_ms + int(self.field(b"to") or b"0") * 1000


@dataclass(frozen=True, slots=True)
class BackupInfo:
    path: Path
    created_ms: int
    sessions: int
    size: int
    token: int | None
    skipped: int = 0  # keys that looked like sessions but were not (see the log)


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
        yield SessionRecord(sid, pairs, None if pttl < 0 else int(pttl), read_ms)


def _size(rec: SessionRecord) -> int:
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


def encode_record(rec: SessionRecord) -> bytes:
    fields: dict[str, str] = {}
    raw: list[list[str]] = []
    for name, value in rec.fields:
        try:
            fields[name.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raw.append([base64.b64encode(name).decode(), base64.b64encode(value).decode()])
    line: dict[str, Any] = {"session_id": rec.session_id, "fields": fields}
    if raw:
        line["raw"] = raw
    line["ttl_ms"] = rec.ttl_ms
    line["read_ms"] = rec.read_ms
    return orjson.dumps(line) + b"\n"


class _HashingFile:
    """The raw file under the gzip stream: its SHA-256 comes for free."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_dir(directory: Path) -> None:
    """Make the renames durable (a crash could otherwise lose them)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_backup(
    nodes: Sequence[redis.Redis],
    path: Path,
    *,
    token: int | None = None,
    guard: Guard | None = None,
    progress: Progress | None = None,
) -> BackupInfo:
    """Write every live session to `path` (and its sidecar). `guard` is called
    after each batch and just before the rename: if it raises, the temporary
    file is removed and nothing appears under `path`."""
    path = Path(path)
    created_ms = redis_now_ms(nodes[0])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = skipped = 0
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            with gzip.GzipFile(filename="", mode="wb", fileobj=hashing, mtime=0) as gz:
                header = {"format": FORMAT, "version": VERSION, "created_ms": created_ms}
                gz.write(orjson.dumps({**header, "token": token}) + b"\n")
                for rec in read_sessions(nodes):
                    if why := rec.problem():
                        log.warning("backup: skipped key of %s: %s", rec.session_id[:64], why)
                        skipped += 1
                        continue
                    gz.write(encode_record(rec))
                    count += 1
                    if count % BATCH == 0:
                        if guard:
                            guard()
                        if progress:
                            progress(count)
                gz.write(orjson.dumps({"end": True, "sessions": count}) + b"\n")
            raw.flush()
            os.fsync(raw.fileno())
        if guard:
            guard()
        # The checksum first: a file under its final name always has one.
        _write_atomic(sidecar(path), f"{hashing.sha.hexdigest()}  {path.name}\n".encode())
        os.replace(tmp, path)
        _sync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        progress(count)
    return BackupInfo(path, created_ms, count, hashing.size, token, skipped)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _check_sum(path: Path) -> int:
    side = sidecar(path)
    try:
        expected = side.read_text().split()[0].lower()
    except FileNotFoundError:
        raise BackupError(f"{path}: no checksum file {side.name}") from None
    except (OSError, IndexError, UnicodeError):
        raise BackupError(f"{path}: unreadable checksum file {side.name}") from None
    sha, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise BackupError(f"{path}: cannot read: {exc.strerror}") from None
    if sha.hexdigest() != expected:
        raise BackupError(f"{path}: checksum mismatch (the file is cut or corrupted)")
    return size


def _int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise BackupError(f"{where}: expected an integer")
    return value


def _decode_record(obj: Any, where: str) -> SessionRecord:
    if not isinstance(obj, dict) or not isinstance(obj.get("fields"), dict):
        raise BackupError(f"{where}: not a session line")
    sid = obj.get("session_id")
    if not isinstance(sid, str) or not keys.is_session_id(sid):
        raise BackupError(f"{where}: bad session id")
    pairs: list[tuple[bytes, bytes]] = []
    for name, value in obj["fields"].items():
        if not isinstance(value, str):
            raise BackupError(f"{where}: field {name!r} is not a string")
        pairs.append((name.encode(), value.encode()))
    try:
        pairs += [(base64.b64decode(n), base64.b64decode(v)) for n, v in obj.get("raw", [])]
    except (TypeError, ValueError):
        raise BackupError(f"{where}: bad raw field") from None
    ttl = obj.get("ttl_ms")
    ttl_ms = None if ttl is None else _int(ttl, where)
    rec = SessionRecord(sid, pairs, ttl_ms, _int(obj.get("read_ms"), where))
    if why := rec.problem():
        raise BackupError(f"{where}: {why}")
    return rec


def iter_backup(path: Path) -> Iterator[tuple[dict[str, Any], SessionRecord | None]]:
    """(header, record) for each session line, then (header, None) once the end
    line and its count check out. Raises BackupError on the first problem."""
    n, header, count = 0, None, 0
    try:
        with gzip.open(path, "rb") as gz:
            for n, line in enumerate(gz, 1):
                where = f"{path}: line {n}"
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise BackupError(f"{where}: not JSON") from None
                if header is None:
                    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                        raise BackupError(f"{path}: not a stui-sessions backup")
                    if obj.get("version") != VERSION:
                        raise BackupError(f"{path}: unsupported version {obj.get('version')!r}")
                    _int(obj.get("created_ms"), where)
                    header = obj
                elif isinstance(obj, dict) and obj.get("end") is True:
                    if _int(obj.get("sessions"), where) != count:
                        raise BackupError(f"{where}: the end line does not count {count}")
                    if gz.read(1):
                        raise BackupError(f"{path}: data after the end line")
                    yield header, None
                    return
                else:
                    count += 1
                    yield header, _decode_record(obj, where)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise BackupError(f"{path}: after line {n}: not a whole gzip file ({exc})") from None
    raise BackupError(f"{path}: cut after line {n} (no end line)")


def verify_backup(path: Path, progress: Progress | None = None) -> BackupInfo:
    """Checksum, then every line parsed and checked; BackupError if anything is off."""
    path = Path(path)
    size = _check_sum(path)
    for sessions, (header, rec) in enumerate(iter_backup(path)):
        if rec is None:
            token = header.get("token")
            return BackupInfo(path, header["created_ms"], sessions, size, token)
        if progress and sessions % BATCH == 0:
            progress(sessions)
    raise AssertionError("iter_backup ends with its end line or raises")
