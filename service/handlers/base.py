"""What every handler shares: the request context, the plan it returns, and
the mapping of script statuses to protocol errors.

A handler does not talk to Redis. It returns a Plan: the script calls to make
and a function that turns their raw results into the reply's result. The
front worker sends the calls of every request in a batch as one pipeline,
so requests that arrive together reach Redis together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service import codec, keys, scripts
from service.errors import (
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    RegistryFull,
    SessionLimitExceeded,
    SessionNotFound,
    StorageUnavailable,
    StuiError,
    VersionConflict,
)
from service.protocol import iso
from service.settings import Settings
from service.statistics import StatsCache
from service.store import Arg, Call

log = logging.getLogger(__name__)

Result = dict[str, Any]
Finish = Callable[[list[Any]], Result]


@dataclass(slots=True)
class Ctx:
    settings: Settings
    command: str
    request_id: str | int | None
    # As the client sent them (with a top-level client_id merged in): the
    # replay fingerprint covers exactly these.
    params: dict[str, Any]
    started_at: float = 0.0
    command_names: Sequence[str] = field(default_factory=tuple)
    rate_spec: str = ""  # settings.rate_spec(), computed once per worker
    create_rate_spec: str = ""
    # Who sent the request, for the replay scope: the authenticated client id
    # (CURVE) or the peer's network address; '' when unknown.
    requester: str = ""
    stats: StatsCache | None = None  # the worker's statistics snapshot
    # Counts a checkpoint event (metrics.CHECKPOINT_EVENTS); None: metrics off.
    checkpoint_event: Callable[[str], None] | None = None
    # The client's plan (service/plans.py), whose limits `settings` holds;
    # None: the service's own.
    plan: str | None = None


@dataclass(slots=True)
class Plan:
    calls: list[Call]
    finish: Finish
    # The finish reads the statistics snapshot: the dispatcher refreshes it
    # first when it is older than stats_max_age.
    needs_stats: bool = False


def immediate(result: Result) -> Plan:
    return Plan([], lambda _raw: result)


def text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def check(raw: Any, settings: Settings) -> list[Any]:
    """The raw script reply if its status is OK, else the matching error."""
    if isinstance(raw, StuiError):
        raise raw
    if isinstance(raw, Exception):
        log.error("script failed: %s", raw)
        raise InternalError()
    status = raw[0]
    if status == b"OK":
        return list(raw)
    if status == b"RATELIMITED":
        wait_ms = int(raw[1])
        raise RateLimited(retry_after=max(1, -(-wait_ms // 1000)))
    if status == b"NOTFOUND":
        raise SessionNotFound()
    if status == b"CONFLICT":
        raise VersionConflict(current_version=int(raw[1]))
    if status == b"TOOLARGE":
        raise PayloadTooLarge(
            f"the session (state, context and client_info) would exceed "
            f"{settings.max_state_bytes} bytes",
            limit_bytes=settings.max_state_bytes,
        )
    if status == b"TOOMANYKEYS":
        raise PayloadTooLarge(
            f"the session state would hold more than {settings.max_state_keys} keys",
            limit=settings.max_state_keys,
            limit_bytes=settings.max_state_bytes,
            field="state_data",
        )
    if status == b"LIMIT":
        raise SessionLimitExceeded(limit=settings.max_sessions_per_client)
    if status == b"FULL":
        raise RegistryFull(limit=settings.max_registry_size)
    if status == b"REUSED":
        raise InvalidRequest(
            "this request id was already used with different parameters", field="id"
        )
    if status == b"COLLISION":  # a new session id already taken: 2**-128, retry is safe
        raise StorageUnavailable("could not allocate a session id; retry")
    log.error("unexpected script status %r", status)
    raise InternalError()


def replay_id(ctx: Ctx, target: str) -> bytes:
    """ARGV[2] of a mutating script: b'' (no replay protection) for a request
    without an id, else the record's id (keys.replay_id) for this command on
    this target with this request id, from this requester. A request id that
    another requester used first (another CURVE identity, or with CURVE off
    another network address) never answers for this one: it runs as a new
    request."""
    if ctx.request_id is None:
        return b""
    try:
        canonical = codec.dumps_sorted([ctx.command, ctx.params])
    except codec.JSONError:
        # Nesting just under the serializer's limit: storing the value worked,
        # but wrapping it for the fingerprint goes a few levels deeper.
        raise InvalidRequest("parameters nested too deeply", field="parameters") from None
    scope = f"{ctx.command}\0{target}\0{codec.dumps(ctx.request_id).decode()}\0{ctx.requester}"
    return keys.replay_id(scope, canonical)


def script_args(ctx: Ctx, client_id: str, rid: bytes, session_id: str, chash: str,
                rate_spec: str) -> list[Arg]:
    """ARGV[1..6], the convention every session script shares (service/scripts.py)."""
    return [client_id, rid, ctx.settings.replay_window * 1000, session_id, chash, rate_spec]


def session_call(
    ctx: Ctx,
    script: Any,
    session_id: str,
    client_id: str | None,
    extra: Sequence[Arg] = (),
    replay: bool = False,
) -> Call:
    """A call of a session-scoped script (see service/scripts.py for the convention)."""
    chash = keys.chash_of_session(session_id)
    if client_id is not None and keys.client_hash(client_id) != chash:
        # Another client's session: invisible, and no reason to ask Redis.
        raise SessionNotFound()
    rid = replay_id(ctx, session_id) if replay else b""
    args = script_args(ctx, client_id or "", rid, session_id, chash, ctx.rate_spec)
    args += extra
    return Call(script, keys.session_keys(session_id), args)


def client_call(ctx: Ctx, script: Any, chash: str) -> Call:
    """A call of a client-scoped script (RATE, LIST): KEYS[1] and KEYS[2] the
    client index, as the prelude expects."""
    index = keys.client_index_key(chash)
    return Call(script, [index, index], script_args(ctx, "", b"", "", chash, ctx.rate_spec))


def rate_limited(ctx: Ctx, client_id: str | None, plan: Plan) -> Plan:
    """The plan, behind the client's rate limit, for a command whose calls do
    not touch that client's keys (or that makes none). A request that names
    no client is not limited."""
    if client_id is None or not ctx.rate_spec:
        return plan
    rate = client_call(ctx, scripts.RATE, keys.client_hash(client_id))
    inner = plan.finish

    def finish(raw: list[Any]) -> Result:
        check(raw[0], ctx.settings)
        return inner(raw[1:])

    return Plan([rate, *plan.calls], finish)


def require_session_id(session_id: str) -> str:
    """A well-formed string that cannot be one of our ids names no session."""
    if not keys.is_session_id(session_id):
        raise SessionNotFound()
    return session_id


def expiry_fields(expires_ms: int, now_ms: int) -> Result:
    return {
        "expires_at": iso(expires_ms),
        "time_until_expiry": max(0, (expires_ms - now_ms) // 1000),
    }


def encode_value(value: Any, field_name: str) -> bytes:
    try:
        return codec.dumps(value)
    except codec.JSONError as exc:
        raise InvalidRequest(
            f"invalid field '{field_name}': {exc}"[:300], field=field_name
        ) from None
