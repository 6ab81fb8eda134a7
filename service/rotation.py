"""Backup file names (sortable by time, carrying the leader's fencing token)
and rotation by count and age."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

from service.backup_format import Guard
from service.backup_sign import sidecars

NAME_RE = re.compile(r"stui-sessions-(\d{8}T\d{6})(\d{3})Z-t(\d+)\.jsonl\.gz")
STALE_TEMP_S = 86400.0


def backup_name(created_ms: int, token: int) -> str:
    """Sortable by time: stui-sessions-20250102T030405678Z-t42.jsonl.gz."""
    at = datetime.fromtimestamp(created_ms // 1000, UTC)
    return f"stui-sessions-{at:%Y%m%dT%H%M%S}{created_ms % 1000:03d}Z-t{token}.jsonl.gz"


def name_time_ms(name: str) -> int | None:
    m = NAME_RE.fullmatch(name)
    if m is None:
        return None
    at = datetime.strptime(m[1], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return int(at.timestamp()) * 1000 + int(m[2])


def rotate(
    directory: Path, keep: int, max_age_days: float, now_ms: int, guard: Guard | None = None
) -> list[Path]:
    """Remove scheduler backups (and both kinds of sidecar, `.hmac` and the
    legacy `.sha256`) beyond the newest `keep` or older than `max_age_days`;
    the newest one always stays. Other files are left alone."""
    found = sorted(
        ((t, p) for p in Path(directory).iterdir() if (t := name_time_ms(p.name)) is not None),
        reverse=True,
    )
    removed: list[Path] = []
    for n, (t, p) in enumerate(found):
        if n > 0 and (n >= keep or now_ms - t > max_age_days * 86_400_000):
            if guard:
                guard()
            p.unlink(missing_ok=True)
            for side in sidecars(p):
                side.unlink(missing_ok=True)
            removed.append(p)
    for tmp in Path(directory).glob(".stui-sessions-*.tmp-*"):
        if time.time() - tmp.stat().st_mtime > STALE_TEMP_S:  # left by a writer that died
            tmp.unlink(missing_ok=True)
    return removed
