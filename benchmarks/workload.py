"""Request bodies for each measured command.

Every body gets a request id never used before in the run: the service keeps
a replay record per mutating request id, and a repeated id would be answered
from that record instead of being executed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.loadgen import Body
from service import codec

OPS = (
    "create_session",
    "update_session_state",
    "restore_session",
    "get_session_info",
    "list_client_sessions",
)
SESSIONS_PER_CLIENT = 5  # the service's default max_sessions_per_client
STATE_BYTES = 1024

_tags = itertools.count()

_SOURCE = (
    "| result | result := (1 to: 100) inject: 0 into: [:sum :each | sum + each]. "
    "Transcript showln: result printString. "
)


def state_data(n: int) -> dict[str, Any]:
    """A workspace-like state whose JSON encoding is STATE_BYTES long."""
    state: dict[str, Any] = {"cursor": {"line": n % 997, "column": n % 80}, "workspace": ""}
    pad = STATE_BYTES - len(codec.dumps(state))
    state["workspace"] = (_SOURCE * (pad // len(_SOURCE) + 1))[:pad]
    return state


def fresh_tag(label: str) -> str:
    """A prefix no earlier request id or client id of this run has used."""
    return f"{label}{next(_tags)}"


def body(rid: str, command: str, params: dict[str, Any]) -> Body:
    return rid.encode(), codec.dumps({"id": rid, "command": command, "parameters": params})


@dataclass(frozen=True)
class Targets:
    """Sessions (with 1 KB state) and clients that read and update commands aim at."""

    session_ids: list[str]
    client_ids: list[str]


def create_bodies(count: int, client_prefix: str) -> list[Body]:
    """count creates, SESSIONS_PER_CLIENT per distinct client."""
    tag = fresh_tag("c")
    return [
        body(f"{tag}-{n}", "create_session",
             {"client_id": f"{client_prefix}-{n // SESSIONS_PER_CLIENT}", "timeout": 3600})
        for n in range(count)
    ]


def update_bodies(count: int, session_ids: list[str]) -> list[Body]:
    tag = fresh_tag("u")
    return [
        body(f"{tag}-{n}", "update_session_state",
             {"session_id": session_ids[n % len(session_ids)], "state_data": state_data(n)})
        for n in range(count)
    ]


def list_bodies(count: int, targets: Targets) -> list[Body]:
    tag = fresh_tag("l")
    cids = targets.client_ids
    return [body(f"{tag}-{n}", "list_client_sessions", {"client_id": cids[n % len(cids)]})
            for n in range(count)]


def statistics_bodies(count: int) -> list[Body]:
    tag = fresh_tag("s")
    return [body(f"{tag}-{n}", "get_session_statistics", {}) for n in range(count)]


# Every other command, for its Redis time per request (benchmarks.phases.
# every_command); close_session last, as it ends the target sessions.
OTHER_OPS = (
    "save_context",
    "load_context",
    "get_context_summary",
    "record_evaluation",
    "register_object",
    "release_object",
    "clear_context",
    "ping",
    "get_session_statistics",
    "close_session",
)
CONTEXT = {"workspace_context": {"variables": {"result": 5050}, "selection": [3, 12]},
           "inspector_state": {"object": "a Point", "history": ["3 @ 4"]}}


def _per_session(command: str, params: Callable[[int], dict[str, Any]]
                 ) -> Callable[[int, Targets], list[Body]]:
    def make(count: int, targets: Targets) -> list[Body]:
        tag = fresh_tag(command[:3])
        sids = targets.session_ids
        return [body(f"{tag}-{n}", command, {"session_id": sids[n % len(sids)], **params(n)})
                for n in range(count)]

    return make


_OTHER: dict[str, Callable[[int, Targets], list[Body]]] = {
    "save_context": _per_session("save_context", lambda n: {"context": CONTEXT}),
    "load_context": _per_session("load_context", lambda n: {}),
    "get_context_summary": _per_session("get_context_summary", lambda n: {}),
    "record_evaluation": _per_session("record_evaluation", lambda n: {
        "code": "(1 to: 100) inject: 0 into: [:a :b | a + b]", "result": 5050}),
    # Object ids cycle, so the registry stays small and release finds them.
    "register_object": _per_session("register_object", lambda n: {
        "object_id": f"o{n % 7}", "description": "a Point (3 @ 4)"}),
    "release_object": _per_session("release_object", lambda n: {"object_id": f"o{n % 7}"}),
    "clear_context": _per_session("clear_context", lambda n: {"parts": ["inspector_state"]}),
    "ping": lambda count, targets: [
        body(f"{fresh_tag('p')}-{n}", "ping",
             {"client_id": targets.client_ids[n % len(targets.client_ids)]})
        for n in range(count)],
    "get_session_statistics": lambda count, targets: statistics_bodies(count),
    "close_session": lambda count, targets: close_bodies(count, targets),
}
_closed = [0]  # target sessions closed so far in this run


def close_bodies(count: int, targets: Targets) -> list[Body]:
    """One close per target session not closed yet (a second would find it
    gone), continuing where the last call stopped (the warm-up's)."""
    sids = targets.session_ids[_closed[0]:][:count]
    _closed[0] += len(sids)
    tag = fresh_tag("x")
    return [body(f"{tag}-{n}", "close_session", {"session_id": sid}) for n, sid in enumerate(sids)]


def bodies_for(op: str, count: int, targets: Targets) -> list[Body]:
    if op == "create_session":
        return create_bodies(count, f"bench-{fresh_tag('k')}")
    if op == "update_session_state":
        return update_bodies(count, targets.session_ids)
    if op == "list_client_sessions":
        return list_bodies(count, targets)
    if op in ("restore_session", "get_session_info"):
        return _per_session(op, lambda n: {})(count, targets)
    if op in _OTHER:
        return _OTHER[op](count, targets)
    raise ValueError(f"no workload for {op}")


def session_ids_of(replies: list[bytes]) -> list[str]:
    """The session ids in successful create_session replies."""
    out: list[str] = []
    for reply in replies:
        decoded = codec.loads(reply)
        if decoded.get("status") == "success":
            out.append(str(decoded["result"]["session_id"]))
    return out
