"""Audit lines for refused requests: one JSON object per line on the
`stui.audit` logger. They carry the client id and never a key or secret."""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("stui.audit")

REFUSALS = {"ClientNotAllowed": "policy", "RateLimited": "rate_limit"}


def refused(reason: str, client_id: str | None, command: str | None, **extra: object) -> None:
    if not log.isEnabledFor(logging.WARNING):
        return
    line = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": "refused",
        "reason": reason,
        "client_id": client_id,
        "command": command,
        **extra,
    }
    log.warning(json.dumps(line, ensure_ascii=True, default=str))


def purged(client_id: str, removed: dict[str, object]) -> None:
    """An erasure (stui-sessions clients purge): who, and what went. The
    client id is the subject of the line, as in every audit line; the
    sessions' ids are not written."""
    line = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": "purged",
        "client_id": client_id,
        **removed,
    }
    log.warning(json.dumps(line, ensure_ascii=True, default=str))
