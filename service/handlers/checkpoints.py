"""Checkpoints: named snapshots of a session's state and context.

Each command is one script call (service/scripts.py); the snapshots live in
the session hash (service/layout.py), so they expire, close and are backed
up with it. Automatic checkpoints are taken inside the scripts of the
commands that overwrite: update_session_state with replace, clear_context
and restore_checkpoint.
"""

from __future__ import annotations

from typing import Any

from service import models, scripts
from service.codec import Fragment
from service.errors import CheckpointLimitExceeded, CheckpointNotFound
from service.handlers.base import Ctx, Plan, Result, check, require_session_id, session_call
from service.protocol import iso
from service.settings import Settings
from service.store import Arg


def checkpoint_count(heads: bytes | None) -> int:
    """How many checkpoints `kh` lists (its entries are ';'-separated)."""
    return heads.count(b";") if heads else 0


def automatic_checkpoint(ctx: Ctx, taken: Any) -> None:
    """Counts an automatic checkpoint a script took (1) or skipped at the caps (0)."""
    if ctx.checkpoint_event is not None:
        ctx.checkpoint_event("automatic_taken" if int(taken) == 1 else "automatic_skipped")


def _refused(raw: Any, settings: Settings, checkpoint_id: int | None) -> None:
    """The checkpoint statuses, which carry details only the handler knows."""
    if isinstance(raw, list) and raw:
        if raw[0] == b"CKNOTFOUND":
            raise CheckpointNotFound(checkpoint_id=checkpoint_id)
        if raw[0] == b"CKLIMIT":
            if raw[1] == b"count":
                raise CheckpointLimitExceeded(
                    f"the session holds {settings.max_checkpoints} checkpoints, "
                    "none of them automatic",
                    limit=settings.max_checkpoints,
                )
            raise CheckpointLimitExceeded(
                f"the session's checkpoints would exceed {settings.max_checkpoint_bytes} bytes",
                limit=settings.max_checkpoint_bytes,
            )


def create_checkpoint(p: models.CreateCheckpoint, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    s = ctx.settings
    expected = "" if p.expected_version is None else str(p.expected_version)
    extra: list[Arg] = [
        expected,
        "0" if p.label is None else "1",
        "" if p.label is None else p.label,
        s.max_checkpoints,
        s.max_checkpoint_bytes,
    ]
    call = session_call(ctx, scripts.CREATE_CHECKPOINT, sid, p.client_id, extra, replay=True)

    def finish(raw: list[Any]) -> Result:
        try:
            _refused(raw[0], s, None)
        except CheckpointLimitExceeded:
            if ctx.checkpoint_event is not None:
                ctx.checkpoint_event("manual_refused")
            raise
        r = check(raw[0], s)
        if ctx.checkpoint_event is not None:
            ctx.checkpoint_event("manual_taken")
        return {
            "session_id": sid,
            "checkpoint_id": int(r[1]),
            "label": p.label,
            "created_at": iso(int(r[4])),
            "version": int(r[2]),
            "bytes": int(r[3]),
            "automatic": False,
        }

    return Plan([call], finish)


def list_checkpoints(p: models.SessionRef, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    call = session_call(ctx, scripts.LIST_CHECKPOINTS, sid, p.client_id)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        checkpoints = [
            {
                "checkpoint_id": int(r[i]),
                "label": r[i + 5].decode("utf-8") if r[i + 5] is not None else None,
                "created_at": iso(int(r[i + 2])),
                "version": int(r[i + 1]),
                "bytes": int(r[i + 3]),
                "automatic": r[i + 4] == b"1",
            }
            for i in range(1, len(r), 6)
        ]
        return {"session_id": sid, "checkpoints": checkpoints}

    return Plan([call], finish)


def restore_checkpoint(p: models.RestoreCheckpoint, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    s = ctx.settings
    expected = "" if p.expected_version is None else str(p.expected_version)
    extra: list[Arg] = [p.checkpoint_id, expected, s.max_checkpoints, s.max_checkpoint_bytes]
    call = session_call(ctx, scripts.RESTORE_CHECKPOINT, sid, p.client_id, extra, replay=True)

    def finish(raw: list[Any]) -> Result:
        _refused(raw[0], s, p.checkpoint_id)
        r = check(raw[0], s)
        automatic_checkpoint(ctx, r[3])
        if ctx.checkpoint_event is not None:
            ctx.checkpoint_event("restored")
        state = {
            name[2:].decode("utf-8"): Fragment(value)
            for name, value in zip(r[4::2], r[5::2], strict=True)
        }
        return {
            "session_id": sid,
            "restored_from": p.checkpoint_id,
            "version": int(r[1]),
            "last_modified": iso(int(r[2])),
            "session_state": state,
        }

    return Plan([call], finish)


def delete_checkpoint(p: models.DeleteCheckpoint, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    call = session_call(
        ctx, scripts.DELETE_CHECKPOINT, sid, p.client_id, [p.checkpoint_id], replay=True
    )

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        return {"session_id": sid, "checkpoint_id": p.checkpoint_id, "deleted": int(r[1]) == 1}

    return Plan([call], finish)

