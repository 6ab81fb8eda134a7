"""Private files and directories for backups, their sidecars and key files.

Files are created 0600 (os.open with the mode, never chmod afterwards),
exclusively and without following a link, under a temporary name, synced,
then renamed: a reader sees a whole file or none; the directory is synced
after the renames so that a crash cannot lose them. The scheduler's backup
directory is made 0700 (prepare_dir).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import IO

# The logger these lines have always come from (they were in service/backup.py).
log = logging.getLogger("service.backup")

FILE_MODE = 0o600  # backups, sidecars, temporary files, key files
DIR_MODE = 0o700  # the scheduler's backup directory


def create_private(path: Path) -> IO[bytes]:
    """A new file, 0600 from its creation; never follows or reuses what is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, FILE_MODE), "wb")


def temp_name(path: Path) -> Path:
    # rotation.py removes the ones a dead writer left: `.stui-sessions-*.tmp-*`.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_atomic(path: Path, data: bytes) -> None:
    """`data` under `path`, 0600, whole or not at all (the directory is not synced)."""
    tmp = temp_name(path)
    try:
        with create_private(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_dir(directory: Path) -> None:
    """Make the renames durable (a crash could otherwise lose them)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
