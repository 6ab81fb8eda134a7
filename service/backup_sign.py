"""Signature sidecars: signing a backup as it is written, checking one before it is read.

The sidecar `<file>.hmac` holds one line `hmac-sha256 <hex>  <name>`, the
HMAC-SHA256 of the file's bytes under the backup key (service/backup_key.py).
Files written before signing have a plain SHA-256 in `<file>.sha256` instead
(`sha256sum -c` compatible); anyone who can edit such a file can recompute
it, so authenticate accepts one only with allow_unsigned=True. Nothing but
the `.hmac` sidecar is written now.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import IO

from service.backup_files import write_atomic
from service.backup_format import READ_CHUNK, BackupError

SIDECAR_MAX = 4096  # a sidecar is one short line; more is not read
HMAC_TAG = "hmac-sha256"


class KeyNeeded(BackupError):
    """The file is signed but no backup key is configured to check it."""


class Unsigned(BackupError):
    """A legacy file (plain SHA-256 only) without allow_unsigned."""


def sidecar(path: Path) -> Path:
    """The legacy plain checksum `<file>.sha256` (read, never written)."""
    return path.with_name(path.name + ".sha256")


def mac_sidecar(path: Path) -> Path:
    """The signature `<file>.hmac`."""
    return path.with_name(path.name + ".hmac")


def sidecars(path: Path) -> tuple[Path, Path]:
    return mac_sidecar(path), sidecar(path)


# -- signing ----------------------------------------------------------------------


class MacFile:
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


def write_signature(path: Path, signing: MacFile) -> None:
    """The `.hmac` sidecar of `path`, from what went through `signing`
    (written atomically, 0600); an older file's `.sha256`, if any, is removed."""
    line = f"{HMAC_TAG} {signing.mac.hexdigest()}  {path.name}\n"
    write_atomic(mac_sidecar(path), line.encode())
    sidecar(path).unlink(missing_ok=True)


# -- checking ---------------------------------------------------------------------


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


def authenticate(
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
