"""The backup file format, and the types every backup module shares.

A backup is gzip JSON Lines:

    {"format": "stui-sessions-backup", "version": 1, "created_ms": ..., "token": ...}
    {"session_id": ..., "fields": {"c": ..., "s:key": "<JSON text>", ...},
     "ttl_ms": ..., "read_ms": ...}
    ...
    {"end": true, "sessions": N}

`fields` is the whole session hash, every value as the string Redis holds
(stored JSON stays its JSON text). `read_ms` is the Redis clock when the line
was read, so a session's expiry is exactly read_ms + ttl_ms. A field pair that
is not UTF-8 goes in "raw" as base64 (the service writes none but its
checkpoints' snapshots, which are MessagePack). The end
line makes a cut file fail even without its sidecar.

A line holds one session: its content, whose stored bytes are at most
max_state_bytes, and its checkpoints (kh, k:<id>, kl:<id>; service/layout.py),
which do not count toward max_state_bytes. JSON escaping at most doubles the
content (a " or \\ inside stored JSON): within 4 x max_state_bytes. The
snapshots are at most max_checkpoint_bytes; each is MessagePack, never UTF-8
(its first byte is 0x9a), so it goes in "raw" as base64, 4/3 of its bytes:
within 2 x max_checkpoint_bytes. Then, per checkpoint (at most max_checkpoints),
its head in kh (ASCII, at most 5 numbers of 16 digits), its label (at most
128 characters, each at most 6 bytes escaped, as \\u001f) and the field
names: under CHECKPOINT_LINE_BYTES (1 KiB). So
4 x max_state_bytes + 2 x max_checkpoint_bytes + 1 KiB x max_checkpoints
+ 1 MiB (for the field names, metadata and base64 raw fields) holds every
line the service can write: that is the cap a reader puts on a line
(MAX_LINE, or max_line_for(settings)).

Writing is service/backup.py, reading service/backup_read.py, the signature
sidecar service/backup_sign.py, the key service/backup_key.py and private
files service/backup_files.py.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from service import keys
from service.settings import MIB, Settings

FORMAT = "stui-sessions-backup"
VERSION = 1
BATCH = 500  # sessions per round trip (and per progress report) at most
REQUIRED = ("c", "ca", "lm", "to", "v", "a")

READ_CHUNK = MIB  # bytes read (and, from the gzip stream, decompressed) at a time
CHECKPOINT_LINE_BYTES = 1024  # a checkpoint's head, label and names in a line, at most


def _line_cap(state_bytes: int, checkpoint_bytes: int, checkpoints: int) -> int:
    """See the module docstring."""
    return 4 * state_bytes + 2 * checkpoint_bytes + CHECKPOINT_LINE_BYTES * checkpoints + MIB


def _default(name: str) -> int:
    value: int = Settings.model_fields[name].default
    return value


# The longest line read, for the default settings (see the module docstring).
MAX_LINE = _line_cap(
    _default("max_state_bytes"), _default("max_checkpoint_bytes"), _default("max_checkpoints")
)

Progress = Callable[[int], None]
Guard = Callable[[], None]  # raises when this process may no longer write
Check = Callable[["SessionRecord"], "str | None"]  # why restore would refuse a line, or None


class BackupError(Exception):
    """The file is missing, cut, corrupted, forged or not a backup: nothing was restored."""


def max_line_for(settings: Settings) -> int:
    """The line cap for these settings: 4 x max_state_bytes + 2 x
    max_checkpoint_bytes + 1 KiB x max_checkpoints + 1 MiB, never below
    MAX_LINE (a backup taken before a cap was lowered still reads)."""
    cap = _line_cap(
        settings.max_state_bytes, settings.max_checkpoint_bytes, settings.max_checkpoints
    )
    return max(MAX_LINE, cap)


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
    def checkpoints(self) -> int:
        """How many checkpoints the session holds (the heads kh lists)."""
        heads = self.field(b"kh")
        return heads.count(b";") if heads else 0

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
    checkpoints: int = 0  # that its sessions hold
    # What verify_backup found (write_backup fills the first two only):
    authenticated: bool = True  # False: a legacy file accepted with allow_unsigned
    sha256: str = ""  # of the file's bytes, to notice a change before restoring
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # st_dev, st_ino, size, mtime_ns
    max_line: int = 0  # the line cap it was read with (0: MAX_LINE)
    invalid: int = 0  # session lines that restore would refuse (when a check was given)


# -- the lines ------------------------------------------------------------------


def header_line(created_ms: int, token: int | None) -> bytes:
    header = {"format": FORMAT, "version": VERSION, "created_ms": created_ms}
    return orjson.dumps({**header, "token": token}) + b"\n"


def end_line(sessions: int) -> bytes:
    return orjson.dumps({"end": True, "sessions": sessions}) + b"\n"


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


def int_field(value: Any, where: str) -> int:
    """`value` when it is an integer (a bool is not), else BackupError."""
    if type(value) is not int:
        raise BackupError(f"{where}: expected an integer")
    return value


def check_header(obj: Any, path: Path, where: str) -> None:
    """BackupError unless `obj` (the first line, parsed) is a header of this format."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BackupError(f"{path}: not a stui-sessions backup")
    if obj.get("version") != VERSION:
        raise BackupError(f"{path}: unsupported version {obj.get('version')!r}")
    int_field(obj.get("created_ms"), where)
    token = obj.get("token")
    if token is not None:
        int_field(token, where)


def is_end_line(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("end") is True


def decode_record(obj: Any, where: str) -> SessionRecord:
    """The session of a parsed session line; BackupError if it is not a sane one."""
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
    ttl_ms = None if ttl is None else int_field(ttl, where)
    rec = SessionRecord(sid, pairs, ttl_ms, int_field(obj.get("read_ms"), where))
    if why := rec.problem():
        raise BackupError(f"{where}: {why}")
    return rec
