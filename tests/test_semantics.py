"""The spec's semantic rules, against a real redis-server through a live front."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import zmq

from tests.conftest import FrontProcess
from workers.client import Client, RemoteError

pytestmark = pytest.mark.integration

Ctx = zmq.Context[zmq.Socket[bytes]]


def error_of(fn: Callable[[], Any]) -> RemoteError:
    with pytest.raises(RemoteError) as err:
        fn()
    return err.value


def parallel(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(i) in n threads released together; results in order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except RemoteError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_twenty_concurrent_creates_exactly_five_succeed(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    fronts = [start_front(workers=2), start_front()]

    def create(i: int) -> Any:
        with Client(fronts[i % 2].endpoint, timeout=10, retries=0, context=zmq_context) as c:
            return c.call("create_session", client_id="crowd")

    results = parallel(20, create)
    ok = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, RemoteError)]
    assert len(ok) == 5
    assert len(refused) == 15
    assert {e.code for e in refused} == {"SessionLimitExceeded"}
    assert all(e.details == {"limit": 5} for e in refused)
    with Client(fronts[0].endpoint, context=zmq_context) as c:
        assert c.call("list_client_sessions", client_id="crowd")["session_count"] == 5


def test_two_writers_same_expected_version_one_wins(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    fronts = [start_front(), start_front()]
    with Client(fronts[0].endpoint, context=zmq_context) as c:
        sid = c.call("create_session", client_id="w")["session_id"]

    def write(i: int) -> Any:
        with Client(fronts[i].endpoint, timeout=10, retries=0, context=zmq_context) as c:
            return c.call(
                "update_session_state", session_id=sid, state_data={"writer": i}, expected_version=1
            )

    for _ in range(5):
        results = parallel(2, write)
        wins = [r for r in results if isinstance(r, dict)]
        losses = [r for r in results if isinstance(r, RemoteError)]
        assert len(wins) == 1 and len(losses) == 1
        assert losses[0].code == "VersionConflict"
        assert losses[0].details == {"current_version": 2}
        with Client(fronts[0].endpoint, context=zmq_context) as c:
            state = c.call("restore_session", session_id=sid)
            assert state["session_state"] == wins[0]["session_state"]
            # reset for the next round: a fresh session at version 1
            c.call("close_session", session_id=sid)
            sid = c.call("create_session", client_id="w")["session_id"]


def test_same_request_id_executes_once(client: Client) -> None:
    sid = client.call("create_session", client_id="r")["session_id"]
    params = {"session_id": sid, "state_data": {"n": 1}}
    first = client.request("update_session_state", params, request_id="same-1")
    second = client.request("update_session_state", params, request_id="same-1")
    assert first["result"]["version"] == 2
    assert second["result"]["version"] == 2
    assert second["result"]["last_modified"] == first["result"]["last_modified"]
    assert client.call("get_session_info", session_id=sid)["version"] == 2

    # evaluations are the clearest case: a repeat would add a history entry
    ev = {"session_id": sid, "code": "Transcript show: 'once'"}
    for _ in range(3):
        reply = client.request("record_evaluation", ev, request_id="eval-1")
        assert reply["result"]["evaluation_count"] == 1
    assert client.call("get_context_summary", session_id=sid)["evaluation_count"] == 1

    # a repeated create returns the first session, and creates no other
    a = client.request("create_session", {"client_id": "r2"}, request_id="c-1")
    b = client.request("create_session", {"client_id": "r2"}, request_id="c-1")
    assert a["result"]["session_id"] == b["result"]["session_id"]
    assert client.call("list_client_sessions", client_id="r2")["session_count"] == 1

    # a repeated close answers like the first, though the session is gone
    c1 = client.request("close_session", {"session_id": sid}, request_id="x-1")
    c2 = client.request("close_session", {"session_id": sid}, request_id="x-1")
    assert c1["result"] == c2["result"] == {"session_id": sid, "closed": True, "state_saved": False}


def test_same_request_id_different_parameters_is_refused(client: Client) -> None:
    sid = client.call("create_session", client_id="r")["session_id"]
    client.request(
        "update_session_state", {"session_id": sid, "state_data": {"a": 1}}, request_id="dup"
    )
    reply = client.request(
        "update_session_state", {"session_id": sid, "state_data": {"a": 2}}, request_id="dup"
    )
    assert reply["error_type"] == "InvalidRequest" and reply["details"] == {"field": "id"}
    assert client.call("restore_session", session_id=sid)["session_state"] == {"a": 1}


def test_replay_window_expires(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    front = start_front(env={"STUI_REPLAY_WINDOW": "1"})
    with Client(front.endpoint, context=zmq_context) as c:
        sid = c.call("create_session", client_id="rw")["session_id"]
        ev = {"session_id": sid, "code": "1"}
        c.request("record_evaluation", ev, request_id="late")
        time.sleep(1.3)
        assert (
            c.request("record_evaluation", ev, request_id="late")["result"]["evaluation_count"] == 2
        )


def test_ownership(client: Client) -> None:
    sid = client.call("create_session", client_id="alice")["session_id"]
    for command, extra in [
        ("get_session_info", {}),
        ("restore_session", {}),
        ("load_context", {}),
        ("update_session_state", {"state_data": {"x": 1}}),
        ("close_session", {}),
        ("record_evaluation", {"code": "1"}),
        ("get_context_summary", {}),
    ]:
        err = error_of(
            lambda c=command, e=extra: client.call(  # type: ignore[misc]
                c, session_id=sid, client_id="mallory", **e
            )
        )
        assert err.code == "SessionNotFound", command
    assert client.call("get_session_info", session_id=sid, client_id="alice")["version"] == 1
    assert client.call("list_client_sessions", client_id="mallory")["session_count"] == 0


def test_expiry_and_sliding_expiry(client: Client) -> None:
    short = client.call("create_session", client_id="exp", timeout=1)["session_id"]
    slide = client.call("create_session", client_id="exp", timeout=2)["session_id"]
    reader = client.call("create_session", client_id="exp", timeout=2)["session_id"]
    assert client.call("get_session_statistics")["total_sessions"] == 3
    time.sleep(1.2)
    # activity at 1.2 s moves `slide` to 3.2 s; a read does not move `reader`
    client.call("update_session_state", session_id=slide, state_data={"k": 1})
    client.call("get_session_info", session_id=reader)
    assert error_of(lambda: client.call("get_session_info", session_id=short)).code == (
        "SessionNotFound"
    )
    time.sleep(1.2)  # 2.4 s: reader (2 s, never refreshed) is gone, slide lives
    assert error_of(lambda: client.call("restore_session", session_id=reader)).code == (
        "SessionNotFound"
    )
    info = client.call("get_session_info", session_id=slide)
    assert info["time_until_expiry"] >= 0
    listing = client.call("list_client_sessions", client_id="exp")
    assert [s["session_id"] for s in listing["sessions"]] == [slide]
    stats = client.call("get_session_statistics")
    assert stats["total_sessions"] == 1 and stats["active_clients"] == 1
    time.sleep(1.2)  # 3.6 s: all gone, counted nowhere
    assert client.call("get_session_statistics")["total_sessions"] == 0
    assert client.call("get_session_statistics")["active_clients"] == 0
    assert client.call("list_client_sessions", client_id="exp")["session_count"] == 0


def test_expired_sessions_free_the_client_limit(client: Client) -> None:
    for _ in range(5):
        client.call("create_session", client_id="lim", timeout=1)
    assert error_of(lambda: client.call("create_session", client_id="lim")).code == (
        "SessionLimitExceeded"
    )
    time.sleep(1.2)
    assert client.call("create_session", client_id="lim")["version"] == 1


def test_closed_with_save_still_counts(client: Client) -> None:
    sids = [client.call("create_session", client_id="keep")["session_id"] for _ in range(5)]
    client.call("close_session", session_id=sids[0], save_state=True)
    assert error_of(lambda: client.call("create_session", client_id="keep")).code == (
        "SessionLimitExceeded"
    )
    listing = client.call("list_client_sessions", client_id="keep")
    assert listing["session_count"] == 5
    assert [s["is_active"] for s in listing["sessions"]].count(False) == 1
    client.call("close_session", session_id=sids[0])
    client.call("create_session", client_id="keep")


def test_history_cap_keeps_newest(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    front = start_front(env={"STUI_HISTORY_LIMIT": "3"})
    with Client(front.endpoint, context=zmq_context) as c:
        sid = c.call("create_session", client_id="h")["session_id"]
        counts = [
            c.call("record_evaluation", session_id=sid, code=str(i))["evaluation_count"]
            for i in range(6)
        ]
        assert counts == [1, 2, 3, 3, 3, 3]
        history = c.call("load_context", session_id=sid)["context"]["evaluation_history"]
        assert [e["code"] for e in history] == ["3", "4", "5"]
        c.call(
            "save_context",
            session_id=sid,
            context={"evaluation_history": [{"code": str(i)} for i in range(10)]},
        )
        history = c.call("load_context", session_id=sid)["context"]["evaluation_history"]
        assert [e["code"] for e in history] == ["7", "8", "9"]


def test_state_size_cap_changes_nothing(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    front = start_front(env={"STUI_MAX_STATE_BYTES": "4096", "STUI_MAX_REGISTRY_SIZE": "2"})
    with Client(front.endpoint, context=zmq_context) as c:
        sid = c.call("create_session", client_id="cap")["session_id"]
        c.call("update_session_state", session_id=sid, state_data={"a": "x" * 2000})
        for command, params in [
            ("update_session_state", {"state_data": {"b": "y" * 2100}}),
            ("save_context", {"context": {"workspace_context": {"t": "z" * 2100}}}),
            ("record_evaluation", {"code": "w" * 2100}),
            ("register_object", {"object_id": "big", "description": "d" * 2100}),
        ]:
            err = error_of(
                lambda cm=command, p=params: c.call(  # type: ignore[misc]
                    cm, session_id=sid, **p
                )
            )
            assert err.code == "PayloadTooLarge", command
            assert err.details == {"limit_bytes": 4096}
        after = c.call("restore_session", session_id=sid)
        assert after["version"] == 2
        assert after["session_state"] == {"a": "x" * 2000}
        assert after["evaluation_history"] == [] and after["object_registry"] == {}
        # replacing the big key frees its bytes
        c.call("update_session_state", session_id=sid, state_data={"a": None, "b": "y" * 2100})

        c.call("register_object", session_id=sid, object_id="o1", description="1")
        c.call("register_object", session_id=sid, object_id="o2", description="2")
        err = error_of(
            lambda: c.call("register_object", session_id=sid, object_id="o3", description="3")
        )
        assert err.code == "RegistryFull" and err.details == {"limit": 2}
        # replacing an existing entry is not growth
        c.call("register_object", session_id=sid, object_id="o2", description="2b")
        err = error_of(
            lambda: c.call(
                "save_context",
                session_id=sid,
                context={"object_registry": {"a": 1, "b": 2, "c": 3}},
            )
        )
        assert err.code == "RegistryFull"
        assert c.call("get_context_summary", session_id=sid)["registry_size"] == 2


AWKWARD: dict[str, Any] = {
    "empty_list": [],
    "empty_object": {},
    "nested": {"a": [[], {}, [{}], {"b": []}], "c": [[[]]]},
    "unicode": "Smalltalk ✓ — 日本語 🦜 \u202eRTL\u202c",
    "escapes": 'quote " backslash \\ nul \u0000 newline \n tab \t',
    "max_u64": 2**64 - 1,
    "min_i64": -(2**63),
    "float": 0.1,
    "small": 5e-324,
    "huge_float": 1.7976931348623157e308,
    "neg_zero": -0.0,
    "bools": [True, False, None],
    "": "empty key",
    "s:looks:like:a:field": 1,
    "日本": {"🦜": ["x"]},
    "deep": [[[[[[[[[[{"x": []}]]]]]]]]]],
}


def test_awkward_json_round_trips(client: Client) -> None:
    sid = client.call("create_session", client_id="json", client_info={"a": [], "b": {}})[
        "session_id"
    ]
    upd = client.call("update_session_state", session_id=sid, state_data=AWKWARD)
    expected = json.dumps(AWKWARD, sort_keys=True)
    assert json.dumps(upd["session_state"], sort_keys=True) == expected
    restored = client.call("restore_session", session_id=sid)
    assert json.dumps(restored["session_state"], sort_keys=True) == expected
    assert restored["client_info"] == {"a": [], "b": {}}
    assert isinstance(restored["session_state"]["max_u64"], int)
    assert str(restored["session_state"]["neg_zero"]) == "-0.0"

    context = {
        "workspace_context": {"variables": [], "x": AWKWARD},
        "inspector_state": {"history": [], "selected_object": None},
        "object_registry": {"ö": {"n": 2**64 - 1}, "o:1": []},
        "evaluation_history": [[], {}, AWKWARD],
    }
    client.call("save_context", session_id=sid, context=context)
    loaded = client.call("load_context", session_id=sid)["context"]
    assert json.dumps(loaded, sort_keys=True) == json.dumps(context, sort_keys=True)


def test_raw_bytes_are_strict_json(client: Client) -> None:
    """64-bit integers keep every digit on the wire; a wider one is refused
    (not rounded), with the request's id and the field that holds it."""
    sid = client.call("create_session", client_id="raw")["session_id"]

    def update(number: str) -> dict[str, Any]:
        body = (
            '{"id": 1, "command": "update_session_state", "parameters": {"session_id": "'
            + sid
            + '", "state_data": {"n": '
            + number
            + "}}}"
        ).encode()
        return client.send_raw(body)

    assert update("18446744073709551615")["result"]["session_state"]["n"] == 2**64 - 1
    refused = update("123456789012345678901234567890")
    assert refused["id"] == 1 and refused["error_type"] == "InvalidRequest"
    assert refused["details"] == {"field": "state_data.n"}
    assert client.call("restore_session", session_id=sid)["session_state"] == {"n": 2**64 - 1}
