"""Workspace context, inspector state, object registry and evaluation history."""

from __future__ import annotations

from typing import Any

from service import models, scripts
from service.codec import Fragment
from service.errors import InvalidRequest, RegistryFull
from service.handlers.base import (
    Ctx,
    Plan,
    Result,
    check,
    encode_value,
    require_session_id,
    session_call,
)
from service.handlers.checkpoints import automatic_checkpoint
from service.handlers.sessions import session_contents
from service.protocol import iso, now_ms
from service.store import Arg

_PART_LETTERS = {
    "workspace_context": "w",
    "inspector_state": "i",
    "object_registry": "o",
    "evaluation_history": "e",
}


def _count(value: Any) -> int:
    return len(value) if isinstance(value, dict | list) else 0


def save_context(p: models.SaveContext, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    s = ctx.settings
    c = p.context
    given = c.model_fields_set
    if not given:
        raise InvalidRequest(
            "context names none of " + ", ".join(models.CONTEXT_PARTS), field="context"
        )
    args: list[Arg] = [
        "" if p.expected_version is None else str(p.expected_version),
        s.max_state_bytes,
    ]
    if "workspace_context" in given:
        w = c.workspace_context
        args += [
            b"" if w is None else encode_value(w, "context.workspace_context"),
            _count(w.get("variables")) if w else 0,
        ]
    else:
        args += ["-", 0]
    if "inspector_state" in given:
        i = c.inspector_state
        args += [
            b"" if i is None else encode_value(i, "context.inspector_state"),
            _count(i.get("history")) if i else 0,
            encode_value(i.get("selected_object") if i else None, "context.inspector_state"),
        ]
    else:
        args += ["-", 0, b"null"]
    if "object_registry" in given:
        reg = c.object_registry or {}
        if len(reg) > s.max_registry_size:
            raise RegistryFull(limit=s.max_registry_size)
        args.append(len(reg))
        for oid, entry in reg.items():
            args += [oid, encode_value(entry, f"context.object_registry.{oid}")]
    else:
        args.append(-1)
    if "evaluation_history" in given:
        # Only the newest history_limit entries are kept, as with record_evaluation.
        hist = (c.evaluation_history or [])[-s.history_limit :]
        args.append(len(hist))
        args += [encode_value(e, "context.evaluation_history") for e in hist]
    else:
        args.append(-1)
    call = session_call(ctx, scripts.SAVE_CONTEXT, sid, p.client_id, args, replay=True)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], s)
        return {
            "session_id": sid,
            "saved": True,
            "last_modified": iso(int(r[2])),
            "version": int(r[1]),
            "context_bytes": int(r[3]),
        }

    return Plan([call], finish)


def load_context(p: models.SessionRef, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    call = session_call(ctx, scripts.LOAD_CONTEXT, sid, p.client_id)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        fields = dict(zip(r[1::2], r[2::2], strict=True))
        parts = session_contents(fields)
        del parts["session_state"]  # the script sends context fields only
        empty = (
            fields.get(b"w") in (None, b"{}")
            and fields.get(b"i") in (None, b"{}")
            and not parts["object_registry"]
            and not parts["evaluation_history"]
        )
        if empty:
            return {"session_id": sid, "loaded": False, "context": None}
        return {"session_id": sid, "loaded": True, "context": parts}

    return Plan([call], finish)


def get_context_summary(p: models.SessionRef, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    call = session_call(ctx, scripts.SUMMARY, sid, p.client_id)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        newest, oldest = int(r[5]), int(r[6])
        return {
            "session_id": sid,
            "variable_count": int(r[1]),
            "evaluation_count": max(0, newest - oldest + 1),
            "registry_size": int(r[4]),
            "inspector_history_length": int(r[2]),
            "selected_object": Fragment(r[3]) if r[3] else None,
            "context_bytes": int(r[7]),
            "last_modified": iso(int(r[8])),
        }

    return Plan([call], finish)


def clear_context(p: models.ClearContext, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    parts = list(dict.fromkeys(p.parts)) if p.parts is not None else list(models.CONTEXT_PARTS)
    letters = "".join(_PART_LETTERS[part] for part in parts)
    s = ctx.settings
    extra: list[Arg] = [letters, s.max_checkpoints, s.max_checkpoint_bytes]
    call = session_call(ctx, scripts.CLEAR_CONTEXT, sid, p.client_id, extra, replay=True)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], s)
        automatic_checkpoint(ctx, r[2])
        return {"session_id": sid, "cleared": parts, "version": int(r[1])}

    return Plan([call], finish)


def record_evaluation(p: models.RecordEvaluation, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    s = ctx.settings
    entry = {
        "code": p.code,
        "result": p.result,
        "result_type": p.result_type,
        "has_error": p.has_error,
        "execution_time": p.execution_time,
        "tool_id": p.tool_id,
        "timestamp": iso(now_ms()),
    }
    extra: list[Arg] = [encode_value(entry, "result"), s.history_limit, s.max_state_bytes]
    call = session_call(ctx, scripts.RECORD_EVALUATION, sid, p.client_id, extra, replay=True)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], s)
        return {"session_id": sid, "evaluation_count": int(r[1]), "version": int(r[2])}

    return Plan([call], finish)


def register_object(p: models.RegisterObject, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    s = ctx.settings
    entry = {
        "object_id": p.object_id,
        "description": p.description,
        "metadata": p.metadata if p.metadata is not None else {},
        "registered_at": iso(now_ms()),
    }
    extra: list[Arg] = [
        p.object_id,
        encode_value(entry, "metadata"),
        s.max_registry_size,
        s.max_state_bytes,
    ]
    call = session_call(ctx, scripts.REGISTER_OBJECT, sid, p.client_id, extra, replay=True)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], s)
        return {
            "session_id": sid,
            "object_id": p.object_id,
            "registry_size": int(r[1]),
            "version": int(r[2]),
        }

    return Plan([call], finish)


def release_object(p: models.ReleaseObject, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    call = session_call(ctx, scripts.RELEASE_OBJECT, sid, p.client_id, [p.object_id], replay=True)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        return {
            "session_id": sid,
            "object_id": p.object_id,
            "released": int(r[1]) == 1,
            "registry_size": int(r[2]),
            "version": int(r[3]),
        }

    return Plan([call], finish)
