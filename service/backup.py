"""Backup files: every live session, as gzip JSON Lines, signed with HMAC-SHA256.

    {"format": "stui-sessions-backup", "version": 1, "created_ms": ..., "token": ...}
    {"session_id": ..., "fields": {"c": ..., "s:key": "<JSON text>", ...},
     "ttl_ms": ..., "read_ms": ...}
    ...
    {"end": true, "sessions": N}

`fields` is the whole session hash, every value as the string Redis holds
(stored JSON stays its JSON text). `read_ms` is the Redis clock when the line
was read, so a session's expiry is exactly read_ms + ttl_ms. A field pair that
is not UTF-8 goes in "raw" as base64 (the service never writes one). The end
line makes a cut file fail even without its sidecar.

Authentication: the sidecar `<file>.hmac` holds one line
`hmac-sha256 <hex>  <name>`, the HMAC-SHA256 of the file's bytes under the
backup key (Settings.backup_key, or the stripped content of
Settings.backup_key_file; the key is never written into a backup). Files
written before signing have a plain SHA-256 in `<file>.sha256` instead
(`sha256sum -c` compatible); anyone who can edit such a file can recompute
it, so verify_backup accepts one only with allow_unsigned=True. Nothing but
the `.hmac` sidecar is written now.

Files are created 0600 (os.open with the mode, never chmod afterwards) under
a temporary name, synced, then renamed: a reader sees a whole file or none.
The scheduler's backup directory is made 0700 (prepare_dir).

Reading is bounded: lines are split from the gzip stream in READ_CHUNK
pieces, and a line longer than the cap (MAX_LINE, or max_line_for(settings))
is refused before it is ever held whole. A line holds one session, whose
stored bytes are at most max_state_bytes; JSON escaping at most doubles them
(a " or \\ inside stored JSON), so 4 x max_state_bytes + 1 MiB (for the field
names, metadata and base64 raw fields) holds every line the service can write.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import logging
import os
import secrets
import stat
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
import redis

from service import keys
from service.settings import MIB, Settings

log = logging.getLogger(__name__)

FORMAT = "stui-sessions-backup"
VERSION = 1
BATCH = 500  # sessions per round trip at most
BATCH_BYTES = 8 << 20  # and about this much data (a session may hold 1 MiB)
REQUIRED = ("c", "ca", "lm", "to", "v", "a")

READ_CHUNK = MIB  # decompressed bytes read at a time
# The longest line read, for the default max_state_bytes (see the module docstring).
_DEFAULT_STATE_BYTES: int = Settings.model_fields["max_state_bytes"].default
MAX_LINE = 4 * _DEFAULT_STATE_BYTES + MIB
SIDECAR_MAX = 4096  # a sidecar is one short line; more is not read
MIN_KEY_BYTES = 16  # a shorter backup key is refused
KEY_FILE_MAX = 4096  # a backup key file larger than this is refused
FILE_MODE = 0o600  # backups, sidecars, temporary files, key files
DIR_MODE = 0o700  # the scheduler's backup directory
HMAC_TAG = "hmac-sha256"

NO_KEY = (
    "no backup key configured: set STUI_BACKUP_KEY (the key) or STUI_BACKUP_KEY_FILE "
    "(a file holding it); `stui-sessions backup-key generate --output FILE` makes one"
)

Progress = Callable[[int], None]
Guard = Callable[[], None]  # raises when this process may no longer write
Check = Callable[["SessionRecord"], "str | None"]  # why restore would refuse a line, or None


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _RawFile(_Readable, Protocol):
    def seek(self, n: int, /) -> object: ...


class BackupError(Exception):
    """The file is missing, cut, corrupted, forged or not a backup: nothing was restored."""


class KeyNeeded(BackupError):
    """The file is signed but no backup key is configured to check it."""


class Unsigned(BackupError):
    """A legacy file (plain SHA-256 only) without allow_unsigned."""


class BackupKeyError(ValueError):
    """The backup key is missing, unreadable or too short (a configuration error)."""


# -- the key ------------------------------------------------------------------


def load_key(settings: Settings) -> bytes | None:
    """The backup key's bytes, or None when neither setting is given.
    Surrounding whitespace (a trailing newline) is not part of the key."""
    if settings.backup_key is not None:
        key = settings.backup_key.get_secret_value().strip().encode("utf-8")
        where = "STUI_BACKUP_KEY"
    elif settings.backup_key_file is not None:
        path = Path(settings.backup_key_file)
        where = f"STUI_BACKUP_KEY_FILE {path}"
        try:
            with open(path, "rb") as f:
                data = f.read(KEY_FILE_MAX + 1)
        except OSError as exc:
            raise BackupKeyError(
                f"cannot read the backup key file {path}: {exc.strerror}"
            ) from None
        if len(data) > KEY_FILE_MAX:
            raise BackupKeyError(f"{where}: larger than {KEY_FILE_MAX} bytes, not a key file")
        key = data.strip()
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise BackupKeyError(
            f"{where}: the backup key is {len(key)} bytes, shorter than {MIN_KEY_BYTES}; "
            "`stui-sessions backup-key generate --output FILE` makes a good one"
        )
    return key


def require_key(settings: Settings) -> bytes:
    """load_key, for writers: BackupKeyError(NO_KEY) when there is none."""
    key = load_key(settings)
    if key is None:
        raise BackupKeyError(NO_KEY)
    return key


def write_key_file(path: Path) -> Path:
    """A new key file: 32 random bytes as hex, created 0600; FileExistsError
    if anything (a symlink included) is already there."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def ensure_key_file(path: Path) -> Path:
    """The key file at `path`, made once (write_key_file) and reused after;
    its directory is created 0700 when missing."""
    path = Path(path)
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        write_key_file(path)
    except FileExistsError:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if mode & 0o077:
            log.warning("backup key file %s is readable by others (mode %04o)", path, mode)
    return path


def max_line_for(settings: Settings) -> int:
    """The line cap for these settings: 4 x max_state_bytes + 1 MiB, never
    below MAX_LINE (a backup taken before the cap was lowered still reads)."""
    return max(MAX_LINE, 4 * settings.max_state_bytes + MIB)


# -- files ----------------------------------------------------------------------


def _create_private(path: Path) -> IO[bytes]:
    """A new file, 0600 from its creation; never follows or reuses what is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, FILE_MODE), "wb")


def _temp_name(path: Path) -> Path:
    # rotation.py removes the ones a dead writer left: `.stui-sessions-*.tmp-*`.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


_warned_dirs: set[Path] = set()


def prepare_dir(directory: Path) -> None:
    """The scheduler's backup directory: created 0700 when missing; one that
    grants group or other access is tightened to 0700 (a warning says so),
    or, when this process may not change it, a warning says that instead."""
    directory = Path(directory)
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        os.chmod(directory, mode & DIR_MODE)
    except OSError as exc:
        if directory not in _warned_dirs:
            _warned_dirs.add(directory)
            log.warning(
                "backup directory %s is open to group/others (mode %04o) and cannot be "
                "tightened (%s); the backups themselves are 0600",
                directory,
                mode,
                exc.strerror,
            )
        return
    log.warning(
        "backup directory %s was mode %04o: tightened to %04o", directory, mode, mode & DIR_MODE
    )


def dir_is_open(directory: Path) -> int | None:
    """The directory's mode when it grants group or other access, else None."""
    mode = stat.S_IMODE(Path(directory).stat().st_mode)
    return mode if mode & 0o077 else None


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
    # What verify_backup found (write_backup fills the first two only):
    authenticated: bool = True  # False: a legacy file accepted with allow_unsigned
    sha256: str = ""  # of the file's bytes, to notice a change before restoring
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # st_dev, st_ino, size, mtime_ns
    max_line: int = 0  # the line cap it was read with (0: MAX_LINE)
    invalid: int = 0  # session lines that restore would refuse (when a check was given)


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


class _MacFile:
    """The raw file under the gzip stream: its HMAC comes for free."""

    def __init__(self, f: IO[bytes], key: bytes) -> None:
        self.f = f
        self.mac = hmac.new(key, digestmod=hashlib.sha256)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.mac.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _temp_name(path)
    try:
        with _create_private(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    key: bytes,
    token: int | None = None,
    guard: Guard | None = None,
    progress: Progress | None = None,
) -> BackupInfo:
    """Write every live session to `path`, signed with `key` (its `.hmac`
    sidecar). `guard` is called after each batch and just before the rename:
    if it raises, the temporary file is removed and nothing appears under
    `path`. Every file is created 0600."""
    if len(key) < MIN_KEY_BYTES:
        raise BackupKeyError(f"the backup key is shorter than {MIN_KEY_BYTES} bytes")
    path = Path(path)
    created_ms = redis_now_ms(nodes[0])
    tmp = _temp_name(path)
    count = skipped = 0
    try:
        with _create_private(tmp) as raw:
            signing = _MacFile(raw, key)
            with gzip.GzipFile(filename="", mode="wb", fileobj=signing, mtime=0) as gz:
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
        # The signature first: a file under its final name always has one.
        line = f"{HMAC_TAG} {signing.mac.hexdigest()}  {path.name}\n"
        _write_atomic(mac_sidecar(path), line.encode())
        sidecar(path).unlink(missing_ok=True)  # an older file's checksum, if any
        os.replace(tmp, path)
        _sync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        progress(count)
    return BackupInfo(path, created_ms, count, signing.size, token, skipped)


def sidecar(path: Path) -> Path:
    """The legacy plain checksum `<file>.sha256` (read, never written)."""
    return path.with_name(path.name + ".sha256")


def mac_sidecar(path: Path) -> Path:
    """The signature `<file>.hmac`."""
    return path.with_name(path.name + ".hmac")


def sidecars(path: Path) -> tuple[Path, Path]:
    return mac_sidecar(path), sidecar(path)


def _read_sidecar(path: Path, side: Path) -> list[str] | None:
    """The sidecar's words, or None when there is none."""
    try:
        with open(side, "rb") as f:
            text = f.read(SIDECAR_MAX).decode("utf-8", "replace")  # the name may be UTF-8
    except FileNotFoundError:
        return None
    except OSError:
        raise BackupError(f"{path}: unreadable {side.name}") from None
    return text.split()


def _hex_digest(words: list[str], at: int) -> str | None:
    if len(words) <= at:
        return None
    value = words[at].lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        return None
    return value


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _digests(f: IO[bytes], key: bytes | None) -> tuple[str, str | None, int]:
    """(sha256 hex, hmac hex or None, size) of the whole file, from its start."""
    f.seek(0)
    sha = hashlib.sha256()
    mac = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None
    size = 0
    while chunk := f.read(READ_CHUNK):
        sha.update(chunk)
        if mac is not None:
            mac.update(chunk)
        size += len(chunk)
    return sha.hexdigest(), mac.hexdigest() if mac is not None else None, size


def _authenticate(
    path: Path, f: IO[bytes], key: bytes | None, allow_unsigned: bool
) -> tuple[str, int, bool]:
    """(sha256 hex, size, authenticated) once the file's signature checks out
    (or, with allow_unsigned, its legacy checksum); BackupError otherwise."""
    mac_side, sum_side = sidecars(path)
    words = _read_sidecar(path, mac_side)
    if words is not None:
        expected = _hex_digest(words, 1) if words and words[0] == HMAC_TAG else None
        if expected is None:
            raise BackupError(f"{path}: {mac_side.name} is not a {HMAC_TAG} signature line")
        if key is None:
            raise KeyNeeded(
                f"{path}: signed ({mac_side.name}) but no backup key is configured to check "
                "it: set STUI_BACKUP_KEY or STUI_BACKUP_KEY_FILE to the key that signed it"
            )
        sha, mac, size = _digests(f, key)
        assert mac is not None
        if not hmac.compare_digest(mac, expected):
            raise BackupError(
                f"{path}: signature mismatch ({mac_side.name}): the file was changed or "
                "signed with another key"
            )
        return sha, size, True
    words = _read_sidecar(path, sum_side)
    if words is None:
        raise BackupError(
            f"{path}: no signature file {mac_side.name} (nor a checksum {sum_side.name})"
        )
    if not allow_unsigned:
        raise Unsigned(
            f"{path}: not signed, only a plain SHA-256 checksum ({sum_side.name}) that anyone "
            "who can edit the file can recompute; if you trust where it came from, pass "
            "--allow-unsigned"
        )
    expected = _hex_digest(words, 0)
    if expected is None:
        raise BackupError(f"{path}: unreadable checksum file {sum_side.name}")
    sha, _, size = _digests(f, None)
    if not hmac.compare_digest(sha, expected):
        raise BackupError(f"{path}: checksum mismatch (the file is cut or corrupted)")
    return sha, size, False


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise BackupError(f"{path}: cannot read: {exc.strerror}") from None


# -- reading --------------------------------------------------------------------


class _HashingReader:
    """Reads the raw file for the gzip stream, hashing what it hands over."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def seek(self, n: int) -> object:
        raise OSError("the backup is read in one pass")

    def drain(self) -> str:
        """Hash the rest of the file too; the whole file's SHA-256."""
        while self.read(READ_CHUNK):
            pass
        return self.sha.hexdigest()


def _lines(stream: _Readable, max_line: int, where: Path) -> Iterator[bytes]:
    """The stream's lines (each with its newline, the last maybe without),
    never holding more than max_line bytes of one: a longer line is refused
    as soon as that many bytes of it have been read."""
    pending = bytearray()
    n = 0
    while chunk := stream.read(READ_CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            n += 1
            if len(pending) + end + 1 - start > max_line:
                raise BackupError(_too_long(where, n, max_line))
            if pending:
                pending += memoryview(chunk)[start : end + 1]
                yield bytes(pending)
                pending.clear()
            else:
                yield chunk[start : end + 1]
            start = end + 1
        if len(pending) + len(chunk) - start > max_line:
            raise BackupError(_too_long(where, n + 1, max_line))
        pending += memoryview(chunk)[start:]
    if pending:
        yield bytes(pending)


def _too_long(where: Path, n: int, max_line: int) -> str:
    return (
        f"{where}: line {n}: longer than {max_line} bytes (4 x max_state_bytes + 1 MiB): "
        "not a backup of these settings (raise STUI_MAX_STATE_BYTES if the file is genuine)"
    )


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
            raise BackupError(f"{where}: field {name[:64]!r} is not a string")
        pairs.append((name.encode(), value.encode()))
    raw = obj.get("raw", [])
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
        raise BackupError(f"{where}: bad raw field")
    try:
        pairs += [(base64.b64decode(n), base64.b64decode(v)) for n, v in raw]
    except (TypeError, ValueError):
        raise BackupError(f"{where}: bad raw field") from None
    ttl = obj.get("ttl_ms")
    ttl_ms = None if ttl is None else _int(ttl, where)
    rec = SessionRecord(sid, pairs, ttl_ms, _int(obj.get("read_ms"), where))
    if why := rec.problem():
        raise BackupError(f"{where}: {why}")
    return rec


def _iter_stream(
    raw: _RawFile, path: Path, max_line: int
) -> Iterator[tuple[dict[str, Any], SessionRecord | None]]:
    n, header, count = 0, None, 0
    try:
        with gzip.GzipFile(filename="", mode="rb", fileobj=raw) as gz:
            lines = _lines(gz, max_line, path)
            for n, line in enumerate(lines, 1):
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
                    token = obj.get("token")
                    if token is not None:
                        _int(token, where)
                    header = obj
                elif isinstance(obj, dict) and obj.get("end") is True:
                    if _int(obj.get("sessions"), where) != count:
                        raise BackupError(f"{where}: the end line does not count {count}")
                    # To the end of the stream (its CRC checked): nothing may follow.
                    if next(lines, None) is not None:
                        raise BackupError(f"{path}: data after the end line")
                    yield header, None
                    return
                else:
                    count += 1
                    yield header, _decode_record(obj, where)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise BackupError(f"{path}: after line {n}: not a whole gzip file ({exc})") from None
    raise BackupError(f"{path}: cut after line {n} (no end line)")


def iter_backup(
    path: Path, *, max_line: int = MAX_LINE
) -> Iterator[tuple[dict[str, Any], SessionRecord | None]]:
    """(header, record) for each session line, then (header, None) once the end
    line and its count check out. Raises BackupError on the first problem.
    It does not authenticate the file: verify_backup does."""
    path = Path(path)
    with _open(path) as f:
        yield from _iter_stream(f, path, max_line)


def read_verified(
    verified: BackupInfo,
) -> Iterator[tuple[dict[str, Any], SessionRecord | None]]:
    """iter_backup of a file verify_backup has checked: BackupError before the
    first line if the file is no longer the one verified, and after the last
    if its bytes changed while they were read."""
    path = Path(verified.path)
    with _open(path) as f:
        if _identity(os.fstat(f.fileno())) != verified.identity:
            raise BackupError(f"{path}: the file changed since it was verified")
        reader = _HashingReader(f)
        yield from _iter_stream(reader, path, verified.max_line or MAX_LINE)
        if reader.drain() != verified.sha256:
            raise BackupError(f"{path}: the file changed while it was read")


def verify_backup(
    path: Path,
    progress: Progress | None = None,
    *,
    key: bytes | None,
    allow_unsigned: bool = False,
    max_line: int = MAX_LINE,
    check: Check | None = None,
) -> BackupInfo:
    """Signature (or, with allow_unsigned, a legacy file's checksum), then every
    line parsed and checked in bounded memory; BackupError if anything is off.
    `check`, when given, is asked about each session line: the ones it objects
    to are counted in BackupInfo.invalid (restore would skip them)."""
    path = Path(path)
    with _open(path) as f:
        identity = _identity(os.fstat(f.fileno()))
        sha, size, authenticated = _authenticate(path, f, key, allow_unsigned)
        f.seek(0)
        reader = _HashingReader(f)
        invalid = 0
        for sessions, (header, rec) in enumerate(_iter_stream(reader, path, max_line)):
            if rec is None:
                if reader.drain() != sha:
                    raise BackupError(f"{path}: the file changed while it was verified")
                return BackupInfo(
                    path,
                    header["created_ms"],
                    sessions,
                    size,
                    header.get("token"),
                    authenticated=authenticated,
                    sha256=sha,
                    identity=identity,
                    max_line=max_line,
                    invalid=invalid,
                )
            if check is not None and check(rec) is not None:
                invalid += 1
            if progress and sessions % BATCH == 0:
                progress(sessions)
    raise AssertionError("iter_backup ends with its end line or raises")
