"""Session lifecycle commands."""

from __future__ import annotations

from typing import Any

from service import keys, layout, models, scripts
from service.codec import Fragment
from service.errors import InvalidRequest, PayloadTooLarge
from service.handlers.base import (
    Ctx,
    Plan,
    Result,
    check,
    client_call,
    encode_value,
    expiry_fields,
    rate_limited,
    replay_id,
    require_session_id,
    script_args,
    session_call,
    text,
)
from service.handlers.checkpoints import automatic_checkpoint, checkpoint_count
from service.protocol import iso
from service.store import Call


def create_session(p: models.CreateSession, ctx: Ctx) -> Plan:
    s = ctx.settings
    # A plan may lower the largest timeout below the default: then that is it.
    timeout = p.timeout if p.timeout is not None else s.timeout_given
    if timeout > s.max_timeout:
        raise InvalidRequest(
            f"timeout above this client's largest, {s.max_timeout} s",
            field="timeout",
            limit=s.max_timeout,
        )
    info = encode_value(p.client_info, "client_info") if p.client_info is not None else b""
    if len(info) > s.client_info_cap:
        raise PayloadTooLarge(
            f"client_info larger than {s.client_info_cap} bytes",
            limit_bytes=s.client_info_cap,
            field="client_info",
        )
    chash = keys.client_hash(p.client_id)
    sid = keys.new_session_id(chash)
    rid = replay_id(ctx, p.client_id)
    key_list = keys.session_keys(sid)
    args = script_args(ctx, p.client_id, rid, sid, chash, ctx.create_rate_spec)
    args += [timeout, info, s.max_sessions_per_client]
    call = Call(scripts.CREATE, key_list, args)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], s)
        created, expires = int(r[2]), int(r[3])
        return {
            "session_id": text(r[1]),
            "client_id": p.client_id,
            "created_at": iso(created),
            "last_modified": iso(created),
            "timeout": timeout,
            "expires_at": iso(expires),
            "is_active": True,
            "version": 1,
        }

    return Plan([call], finish)


def _info_result(
    session_id: str, meta: layout.Meta, now: int, client_info: bytes | None
) -> Result:
    return {
        "session_id": session_id,
        "client_id": meta.c,
        "created_at": iso(meta.ca),
        "last_modified": iso(meta.lm),
        "timeout": meta.to,
        "is_active": bool(meta.a),
        "version": meta.v,
        "is_expired": False,
        "client_info": Fragment(client_info) if client_info else None,
        **expiry_fields(meta.xe, now),
    }


def get_session_info(p: models.SessionRef, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    call = session_call(ctx, scripts.INFO, sid, p.client_id)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        result = _info_result(sid, layout.unpack_meta(r[2]), int(r[1]), r[3] or None)
        result["checkpoint_count"] = checkpoint_count(r[4] or None)
        return result

    return Plan([call], finish)


def restore_session(p: models.SessionRef, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    call = session_call(ctx, scripts.RESTORE, sid, p.client_id)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        h = dict(zip(r[4::2], r[5::2], strict=True))
        result = _info_result(sid, layout.unpack_meta(r[2]), int(r[1]), h.get(b"ci"))
        result["checkpoint_count"] = checkpoint_count(r[3] or None)
        result.update(session_contents(h))
        return result

    return Plan([call], finish)


def session_contents(h: dict[bytes, bytes]) -> Result:
    """State and context from a session hash's fields (stored JSON kept as is)."""
    state: dict[str, Fragment] = {}
    registry: dict[str, Fragment] = {}
    history: list[tuple[int, bytes]] = []
    for name, value in h.items():
        prefix = name[:2]
        if prefix == b"s:":
            state[name[2:].decode("utf-8")] = Fragment(value)
        elif prefix == b"o:":
            registry[name[2:].decode("utf-8")] = Fragment(value)
        elif prefix == b"e:":
            history.append((int(name[2:]), value))
    history.sort()
    w, i = h.get(b"w"), h.get(b"i")
    return {
        "session_state": state,
        "workspace_context": Fragment(w) if w else None,
        "inspector_state": Fragment(i) if i else None,
        "object_registry": registry,
        "evaluation_history": [Fragment(v) for _, v in history],
    }


def update_session_state(p: models.UpdateSessionState, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    limit = ctx.settings.max_state_keys
    if len(p.state_data) > limit:
        # Refused before Redis: one update may name at most this many keys.
        raise PayloadTooLarge(
            f"state_data names more than {limit} keys",
            limit=limit,
            limit_bytes=ctx.settings.max_state_bytes,
            field="state_data",
        )
    pairs: list[str | bytes | int] = []
    sent: dict[str, Fragment] = {}  # the reply's state, with what Redis had
    for key, value in p.state_data.items():
        pairs.append(key)
        if value is None:
            pairs.append(b"")
        else:
            encoded = encode_value(value, f"state_data.{key}")
            pairs.append(encoded)
            sent[key] = Fragment(encoded)
    expected = "" if p.expected_version is None else str(p.expected_version)
    s = ctx.settings
    extra = [
        expected,
        "1" if p.replace else "0",
        s.max_state_bytes,
        limit,
        s.max_checkpoints,
        s.max_checkpoint_bytes,
        *pairs,
    ]
    call = session_call(ctx, scripts.UPDATE, sid, p.client_id, extra, replay=True)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], s)
        if p.replace:
            automatic_checkpoint(ctx, r[3])
        # Redis sends the keys this update did not name (none after a replace).
        state = {
            name[2:].decode("utf-8"): Fragment(value)
            for name, value in zip(r[4::2], r[5::2], strict=True)
        }
        state.update(sent)
        return {
            "session_id": sid,
            "last_modified": iso(int(r[2])),
            "session_state": state,
            "version": int(r[1]),
            "update_successful": True,
        }

    return Plan([call], finish)


def close_session(p: models.CloseSession, ctx: Ctx) -> Plan:
    sid = require_session_id(p.session_id)
    extra = ["1" if p.save_state else "0"]
    call = session_call(ctx, scripts.CLOSE, sid, p.client_id, extra, replay=True)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        return {"session_id": sid, "closed": True, "state_saved": int(r[1]) == 1}

    return Plan([call], finish)


def list_client_sessions(p: models.ListClientSessions, ctx: Ctx) -> Plan:
    chash = keys.client_hash(p.client_id)
    call = client_call(ctx, scripts.LIST, chash)

    def finish(raw: list[Any]) -> Result:
        r = check(raw[0], ctx.settings)
        now = int(r[1])
        rows = []
        for f, packed in zip(r[2::2], r[3::2], strict=True):
            e = layout.parse_entry(packed)
            rows.append((e.created, layout.session_of_field(f, chash), e.expires, e.modified,
                         e.timeout, e.version, e.active))
        rows.sort()
        sessions = [
            {
                "session_id": sid,
                "created_at": iso(created),
                "last_modified": iso(modified),
                "timeout": timeout,
                "is_active": bool(active),
                "version": version,
                **expiry_fields(exp, now),
            }
            for created, sid, exp, modified, timeout, version, active in rows
        ]
        return {"client_id": p.client_id, "session_count": len(sessions), "sessions": sessions}

    return Plan([call], finish)


def get_session_statistics(p: models.NoParams, ctx: Ctx) -> Plan:
    s = ctx.settings
    stats = ctx.stats
    assert stats is not None, "the dispatcher gives every request the worker's snapshot"

    def finish(raw: list[Any]) -> Result:
        figures = stats.current()
        return {
            "total_sessions": figures.sessions,
            "active_clients": figures.clients,
            "max_sessions_per_client": s.max_sessions_per_client,
            "default_timeout": s.timeout_given,
            "cleanup_interval": s.cleanup_interval,
            "history_limit": s.history_limit,
            "replay_window": s.replay_window,
            "stats_max_age": s.stats_max_age,
        }

    plan = rate_limited(ctx, p.client_id, Plan([], finish))
    plan.needs_stats = True
    return plan
