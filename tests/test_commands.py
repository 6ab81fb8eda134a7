"""Every command through a live front worker, in both encodings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from tests.conftest import FrontProcess
from workers.client import Client, RemoteError

pytestmark = pytest.mark.integration


@pytest.fixture(params=["command", "envelope"])
def any_client(
    request: pytest.FixtureRequest, front: FrontProcess, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> Iterator[Client]:
    with Client(
        front.endpoint, timeout=5, retries=0, encoding=request.param, context=zmq_context
    ) as c:
        yield c


def test_whole_lifecycle(any_client: Client) -> None:
    c = any_client
    created = c.call("create_session", client_id="alice", timeout=120, client_info={"tui": "1.2"})
    sid = created["session_id"]
    assert created["client_id"] == "alice"
    assert created["is_active"] is True
    assert created["version"] == 1
    assert created["timeout"] == 120
    assert created["created_at"].endswith("Z")

    info = c.call("get_session_info", session_id=sid)
    assert info["client_info"] == {"tui": "1.2"}
    assert info["is_expired"] is False
    assert 118 <= info["time_until_expiry"] <= 120

    upd = c.call("update_session_state", session_id=sid, state_data={"workspace": "3 + 4", "v": []})
    assert upd["session_state"] == {"workspace": "3 + 4", "v": []}
    assert upd["version"] == 2 and upd["update_successful"] is True

    merged = c.call("update_session_state", session_id=sid, state_data={"v": None, "x": 1})
    assert merged["session_state"] == {"workspace": "3 + 4", "x": 1}
    replaced = c.call(
        "update_session_state", session_id=sid, state_data={"only": True}, replace=True
    )
    assert replaced["session_state"] == {"only": True}
    assert replaced["version"] == 4

    saved = c.call(
        "save_context",
        session_id=sid,
        context={
            "workspace_context": {"variables": {"a": 1, "b": 2}, "text": "a + b"},
            "inspector_state": {"history": [1, 2, 3], "selected_object": {"id": "o1"}},
        },
    )
    assert saved["saved"] is True and saved["version"] == 5 and saved["context_bytes"] > 0

    assert (
        c.call(
            "record_evaluation",
            session_id=sid,
            code="3 + 4",
            result="7",
            result_type="SmallInteger",
            execution_time=1.5,
        )["evaluation_count"]
        == 1
    )
    reg = c.call(
        "register_object",
        session_id=sid,
        object_id="o1",
        description="a Set",
        metadata={"class": "Set"},
    )
    assert reg["registry_size"] == 1

    summary = c.call("get_context_summary", session_id=sid)
    assert summary == {
        "session_id": sid,
        "variable_count": 2,
        "evaluation_count": 1,
        "registry_size": 1,
        "inspector_history_length": 3,
        "selected_object": {"id": "o1"},
        "context_bytes": summary["context_bytes"],
        "last_modified": summary["last_modified"],
    }

    loaded = c.call("load_context", session_id=sid)
    assert loaded["loaded"] is True
    ctx = loaded["context"]
    assert ctx["workspace_context"]["variables"] == {"a": 1, "b": 2}
    assert ctx["object_registry"]["o1"]["metadata"] == {"class": "Set"}
    assert [e["code"] for e in ctx["evaluation_history"]] == ["3 + 4"]

    listing = c.call("list_client_sessions", client_id="alice")
    assert listing["session_count"] == 1
    assert listing["sessions"][0]["session_id"] == sid
    assert listing["sessions"][0]["version"] == 7

    released = c.call("release_object", session_id=sid, object_id="o1")
    assert released["released"] is True and released["registry_size"] == 0
    assert c.call("release_object", session_id=sid, object_id="o1")["released"] is False

    cleared = c.call("clear_context", session_id=sid, parts=["evaluation_history"])
    assert cleared["cleared"] == ["evaluation_history"]
    assert c.call("get_context_summary", session_id=sid)["evaluation_count"] == 0

    closed = c.call("close_session", session_id=sid, save_state=True)
    assert closed == {"session_id": sid, "closed": True, "state_saved": True}
    assert c.call("get_session_info", session_id=sid)["is_active"] is False
    restored = c.call("restore_session", session_id=sid)
    assert restored["is_active"] is True
    assert restored["session_state"] == {"only": True}
    assert restored["workspace_context"]["text"] == "a + b"
    assert restored["evaluation_history"] == []

    assert c.call("clear_context", session_id=sid)["cleared"] == [
        "workspace_context",
        "inspector_state",
        "object_registry",
        "evaluation_history",
    ]
    assert c.call("load_context", session_id=sid) == {
        "session_id": sid,
        "loaded": False,
        "context": None,
    }

    assert c.call("close_session", session_id=sid)["state_saved"] is False
    with pytest.raises(RemoteError) as err:
        c.call("get_session_info", session_id=sid)
    assert err.value.code == "SessionNotFound"


def test_statistics_and_system_commands(any_client: Client) -> None:
    c = any_client
    for client_id in ("a", "a", "b"):
        c.call("create_session", client_id=client_id)
    stats = c.call("get_session_statistics")
    assert stats["total_sessions"] == 3
    assert stats["active_clients"] == 2
    assert stats["max_sessions_per_client"] == 5
    assert stats["default_timeout"] == 3600
    assert stats["cleanup_interval"] > 0

    pong = c.call("ping", message="hello")
    assert pong["message"] == "hello" and pong["status"] == "ready"
    assert isinstance(pong["uptime"], int) and pong["server_version"]

    described = c.call("describe")
    assert "create_session" in described["commands"]
    assert set(described["protocol"]["encodings"]) == {"command", "envelope"}
    limits = described["limits"]
    for name in (
        "max_sessions_per_client",
        "history_limit",
        "max_state_bytes",
        "max_registry_size",
        "max_request_bytes",
        "replay_window",
        "default_timeout",
        "max_timeout",
        "min_timeout",
    ):
        assert name in limits


def test_describe_reports_configured_limits(
    start_front: object, redis_client: object, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    env = {
        "STUI_MAX_SESSIONS_PER_CLIENT": "7",
        "STUI_HISTORY_LIMIT": "9",
        "STUI_MAX_STATE_BYTES": "65536",
        "STUI_MAX_REGISTRY_SIZE": "11",
        "STUI_REPLAY_WINDOW": "33",
        "STUI_MAX_REQUEST_BYTES": "200000",
    }
    front = start_front(env=env)  # type: ignore[operator]
    with Client(front.endpoint, context=zmq_context) as c:
        limits = c.call("describe")["limits"]
    assert limits["max_sessions_per_client"] == 7
    assert limits["history_limit"] == 9
    assert limits["max_state_bytes"] == 65536
    assert limits["max_registry_size"] == 11
    assert limits["replay_window"] == 33
    assert limits["max_request_bytes"] == 200000


def test_envelope_reply_shape(
    front: FrontProcess, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    with Client(front.endpoint, encoding="envelope", context=zmq_context) as c:
        reply = c.request("create_session", {"client_id": "env"}, request_id="550e8400")
        assert reply["id"] == "550e8400"
        assert reply["version"] == "1.0.0"
        assert reply["timestamp"].endswith("Z")
        assert reply["payload"]["type"] == "Response"
        assert reply["payload"]["data"]["response_type"] == "CreateSession"
        error = c.request("get_session_info", {"session_id": "nope"}, request_id="e-2")
        assert error["payload"]["data"]["response_type"] == "Error"
        assert error["payload"]["data"]["data"]["code"] == "SessionNotFound"
        assert set(error["payload"]["data"]["data"]) == {"code", "message", "details"}


def test_command_form_reply_shape(client: Client) -> None:
    ok = client.request("ping", request_id="p-1")
    assert set(ok) == {"id", "status", "result", "timestamp"}
    assert ok["id"] == "p-1" and ok["status"] == "success"
    err = client.request("nope", request_id="p-2")
    assert set(err) == {"id", "status", "error", "error_type", "details", "timestamp"}
    assert err["error_type"] == "UnknownCommand" and err["details"] == {"command": "nope"}


def test_top_level_client_id(client: Client) -> None:
    sid = client.call("create_session", client_id="owner")["session_id"]
    body = (
        b'{"id": "t1", "client_id": "other", "command": "get_session_info", '
        b'"parameters": {"session_id": "' + sid.encode() + b'"}}'
    )
    reply = client.send_raw(body)
    assert reply["error_type"] == "SessionNotFound"
    body = b'{"id": "t2", "client_id": "owner", "command": "create_session"}'
    assert client.send_raw(body)["status"] == "success"
    body = (
        b'{"id": "t3", "client_id": "owner", "command": "create_session", '
        b'"parameters": {"client_id": "else"}}'
    )
    reply = client.send_raw(body)
    assert reply["error_type"] == "InvalidRequest" and reply["details"]["field"] == "client_id"
