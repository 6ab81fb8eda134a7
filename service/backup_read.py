"""Reading a backup in bounded memory, and verifying it before anything trusts it.

verify_backup authenticates the file (service/backup_sign.py), then parses
and checks every line; read_verified then reads a verified file again,
refusing it if it is no longer the file verified or changes while read.

Reading is bounded: lines are split from the gzip stream in READ_CHUNK
pieces, and a line longer than the cap (MAX_LINE, or max_line_for(settings);
see service/backup_format.py) is refused before it is ever held whole.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from service.backup_format import (
    BATCH,
    MAX_LINE,
    READ_CHUNK,
    BackupError,
    BackupInfo,
    Check,
    Progress,
    SessionRecord,
    check_header,
    decode_record,
    int_field,
    is_end_line,
)
from service.backup_sign import authenticate


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _RawFile(_Readable, Protocol):
    def seek(self, n: int, /) -> object: ...


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise BackupError(f"{path}: cannot read: {exc.strerror}") from None


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
        f"{where}: line {n}: longer than {max_line} bytes (4 x max_state_bytes + 2 x "
        "max_checkpoint_bytes + 1 KiB x max_checkpoints + 1 MiB): not a backup of these "
        "settings (raise STUI_MAX_STATE_BYTES or STUI_MAX_CHECKPOINT_BYTES if the file is "
        "genuine)"
    )


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
                    check_header(obj, path, where)
                    header = obj
                elif is_end_line(obj):
                    if int_field(obj.get("sessions"), where) != count:
                        raise BackupError(f"{where}: the end line does not count {count}")
                    # To the end of the stream (its CRC checked): nothing may follow.
                    if next(lines, None) is not None:
                        raise BackupError(f"{path}: data after the end line")
                    yield header, None
                    return
                else:
                    count += 1
                    yield header, decode_record(obj, where)
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
        sha, size, authenticated = authenticate(path, f, key, allow_unsigned)
        f.seek(0)
        reader = _HashingReader(f)
        invalid = checkpoints = 0
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
                    checkpoints=checkpoints,
                )
            checkpoints += rec.checkpoints
            if check is not None and check(rec) is not None:
                invalid += 1
            if progress and sessions % BATCH == 0:
                progress(sessions)
    raise AssertionError("iter_backup ends with its end line or raises")
