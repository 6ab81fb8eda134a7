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


def _session_bodies(command: str) -> Callable[[int, Targets], list[Body]]:
    def make(count: int, targets: Targets) -> list[Body]:
        tag = fresh_tag(command[:3])
        sids = targets.session_ids
        return [body(f"{tag}-{n}", command, {"session_id": sids[n % len(sids)]})
                for n in range(count)]

    return make


def list_bodies(count: int, targets: Targets) -> list[Body]:
    tag = fresh_tag("l")
    cids = targets.client_ids
    return [body(f"{tag}-{n}", "list_client_sessions", {"client_id": cids[n % len(cids)]})
            for n in range(count)]


def statistics_bodies(count: int) -> list[Body]:
    tag = fresh_tag("s")
    return [body(f"{tag}-{n}", "get_session_statistics", {}) for n in range(count)]


def bodies_for(op: str, count: int, targets: Targets) -> list[Body]:
    if op == "create_session":
        return create_bodies(count, f"bench-{fresh_tag('k')}")
    if op == "update_session_state":
        return update_bodies(count, targets.session_ids)
    if op == "list_client_sessions":
        return list_bodies(count, targets)
    if op in ("restore_session", "get_session_info"):
        return _session_bodies(op)(count, targets)
    raise ValueError(f"no workload for {op}")


def session_ids_of(replies: list[bytes]) -> list[str]:
    """The session ids in successful create_session replies."""
    out: list[str] = []
    for reply in replies:
        decoded = codec.loads(reply)
        if decoded.get("status") == "success":
            out.append(str(decoded["result"]["session_id"]))
    return out
