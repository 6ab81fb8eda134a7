"""The backup key: the HMAC-SHA256 key that signs and checks backups.

It is Settings.backup_key, or the stripped content of Settings.backup_key_file
(at most KEY_FILE_MAX bytes); either way at least MIN_KEY_BYTES long. It is
never written into a backup. Key files are 32 random bytes as hex, created
0600 with O_EXCL|O_NOFOLLOW: an existing file (or link) is never overwritten.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from service.backup_files import DIR_MODE, FILE_MODE
from service.settings import Settings

# The logger these lines have always come from (they were in service/backup.py).
log = logging.getLogger("service.backup")

MIN_KEY_BYTES = 16  # a shorter backup key is refused
KEY_FILE_MAX = 4096  # a backup key file larger than this is refused

NO_KEY = (
    "no backup key configured: set STUI_BACKUP_KEY (the key) or STUI_BACKUP_KEY_FILE "
    "(a file holding it); `stui-sessions backup-key generate --output FILE` makes one"
)


class BackupKeyError(ValueError):
    """The backup key is missing, unreadable or too short (a configuration error)."""


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


def check_key(key: bytes) -> None:
    """BackupKeyError when `key` is too short to sign with."""
    if len(key) < MIN_KEY_BYTES:
        raise BackupKeyError(f"the backup key is shorter than {MIN_KEY_BYTES} bytes")


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
