"""Checkpoints through a live front worker on a real Redis, in both encodings:
taken, the session damaged, restored byte for byte, the restore undone, the
caps, ids, retries and ownership (PROTOCOL.md, "Checkpoints")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from service import keys, layout
from tests import test_http_metrics
from tests.conftest import FrontProcess
from tests.helpers import wait_for
from workers.client import Client, RemoteError

pytestmark = pytest.mark.integration
# The http role's fixtures, shared with tests/test_http_metrics.py.
metrics_dir = test_http_metrics.metrics_dir
start_http = test_http_metrics.start_http

Ctx = zmq.Context[zmq.Socket[bytes]]

STATE: dict[str, Any] = {
    "workspace": "Transcript show: 'héllo ✓'",
    "empty_obj": {},
    "empty_list": [],
    "nested": {"a": [1, {"b": [], "c": {}}, None, 2.5, True], "ü": "日本"},
}
CONTEXT: dict[str, Any] = {
    "workspace_context": {"variables": {"x": 1, "y": []}, "code": "x := 3 + 4"},
    "inspector_state": {"history": [{}, []], "selected_object": {"class": "Foo", "o": {}}},
    "object_registry": {"obj-1": {"class": "Point", "v": [1, 2]}, "obj-✓": {}},
    "evaluation_history": [{"code": "1+1", "result": "2"}, {"code": "[]", "result": []}],
}


@pytest.fixture(params=["command", "envelope"])
def any_client(
    request: pytest.FixtureRequest, front: FrontProcess, zmq_context: Ctx
) -> Iterator[Client]:
    with Client(
        front.endpoint, timeout=5, retries=0, encoding=request.param, context=zmq_context
    ) as c:
        yield c


def code_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except RemoteError as exc:
        return str(exc.code)
    return "ok"


def whole(c: Client, sid: str) -> dict[str, Any]:
    """What a checkpoint holds: the state and the four context parts."""
    state = c.call("restore_session", session_id=sid)["session_state"]
    loaded = c.call("load_context", session_id=sid)
    return {"state": state, "context": loaded["context"]}


def seeded(c: Client, client_id: str = "ck") -> str:
    sid: str = c.call("create_session", client_id=client_id)["session_id"]
    c.call("update_session_state", session_id=sid, state_data=STATE)
    c.call("save_context", session_id=sid, context=CONTEXT)
    return sid


def test_checkpoint_restores_state_and_context_byte_for_byte(any_client: Client) -> None:
    c = any_client
    sid = seeded(c)
    before = whole(c, sid)
    version = c.call("get_session_info", session_id=sid)["version"]
    made = c.call("create_checkpoint", session_id=sid, label="good ✓")
    assert made["automatic"] is False and made["label"] == "good ✓"
    assert made["version"] == version and made["bytes"] > 0
    # Taking one changes no version.
    info = c.call("get_session_info", session_id=sid)
    assert info["version"] == version and info["checkpoint_count"] == 1

    # Damage: a replace and a clear (each takes an automatic checkpoint).
    c.call("update_session_state", session_id=sid, state_data={"oops": 1}, replace=True)
    c.call("clear_context", session_id=sid)
    assert whole(c, sid) == {"state": {"oops": 1}, "context": None}
    listed = c.call("list_checkpoints", session_id=sid)["checkpoints"]
    assert [(x["label"], x["automatic"]) for x in listed] == [
        ("before clear_context", True),
        ("before update_session_state", True),
        ("good ✓", False),
    ]
    assert [x["checkpoint_id"] for x in listed] == [3, 2, 1]

    damaged = whole(c, sid)
    v_before = c.call("get_session_info", session_id=sid)["version"]
    restored = c.call("restore_checkpoint", session_id=sid, checkpoint_id=made["checkpoint_id"])
    assert restored["restored_from"] == made["checkpoint_id"]
    assert restored["version"] == v_before + 1  # up by one, never back
    assert restored["session_state"] == STATE
    assert whole(c, sid) == before
    assert c.call("get_context_summary", session_id=sid)["evaluation_count"] == 2

    # The restore itself is undone by its automatic checkpoint.
    newest = c.call("list_checkpoints", session_id=sid)["checkpoints"][0]
    assert newest["label"] == "before restore_checkpoint" and newest["automatic"] is True
    c.call("restore_checkpoint", session_id=sid, checkpoint_id=newest["checkpoint_id"])
    assert whole(c, sid) == damaged
    # History keeps working after a restore: numbering continues cleanly.
    c.call("restore_checkpoint", session_id=sid, checkpoint_id=made["checkpoint_id"])
    c.call("record_evaluation", session_id=sid, code="3+3", result="6")
    assert c.call("get_context_summary", session_id=sid)["evaluation_count"] == 3


def test_a_clear_that_removes_nothing_takes_no_checkpoint(front: FrontProcess) -> None:
    """Nothing is overwritten, so there is nothing to undo: no automatic
    checkpoint, and none of the older ones pushed out at the cap."""
    with Client(front.endpoint, timeout=5, retries=0) as c:
        sid = seeded(c)
        c.call("clear_context", session_id=sid, parts=["object_registry"])
        assert c.call("get_session_info", session_id=sid)["checkpoint_count"] == 1
        for parts in (["object_registry"], [], None, ["inspector_state"]):
            if parts is None:
                c.call("clear_context", session_id=sid)  # the other three still hold data
                assert c.call("get_session_info", session_id=sid)["checkpoint_count"] == 2
                continue
            v = c.call("get_session_info", session_id=sid)["version"]
            done = c.call("clear_context", session_id=sid, parts=parts)
            assert done["version"] == v + 1  # still a write
            info = c.call("get_session_info", session_id=sid)
            assert info["checkpoint_count"] == (1 if parts != ["inspector_state"] else 2)
        labels = [x["label"] for x in c.call("list_checkpoints", session_id=sid)["checkpoints"]]
        assert labels == ["before clear_context", "before clear_context"]
        # The first one still holds the registry the first clear removed.
        first = c.call("list_checkpoints", session_id=sid)["checkpoints"][-1]
        c.call("restore_checkpoint", session_id=sid, checkpoint_id=first["checkpoint_id"])
        assert whole(c, sid)["context"] == CONTEXT


def test_unknown_checkpoint_and_delete(any_client: Client) -> None:
    c = any_client
    sid = seeded(c)
    assert code_of(lambda: c.call("restore_checkpoint", session_id=sid, checkpoint_id=9)) == (
        "CheckpointNotFound"
    )
    made = c.call("create_checkpoint", session_id=sid)
    assert made["label"] is None
    gone = c.call("delete_checkpoint", session_id=sid, checkpoint_id=made["checkpoint_id"])
    assert gone == {"session_id": sid, "checkpoint_id": made["checkpoint_id"], "deleted": True}
    again = c.call("delete_checkpoint", session_id=sid, checkpoint_id=made["checkpoint_id"])
    assert again["deleted"] is False
    assert c.call("list_checkpoints", session_id=sid)["checkpoints"] == []
    assert c.call("get_session_info", session_id=sid)["checkpoint_count"] == 0
    # Ids are never reused, even once all are deleted.
    assert c.call("create_checkpoint", session_id=sid)["checkpoint_id"] == made["checkpoint_id"] + 1


def test_bad_parameters_are_refused(client: Client) -> None:
    sid = seeded(client)
    assert code_of(lambda: client.call("create_checkpoint", session_id=sid, label="x" * 129)) == (
        "InvalidRequest"
    )
    assert (
        code_of(lambda: client.call("restore_checkpoint", session_id=sid, checkpoint_id="1"))
        == "InvalidRequest"
    )
    assert (
        code_of(lambda: client.call("restore_checkpoint", session_id=sid, checkpoint_id=0))
        == "InvalidRequest"
    )
    assert code_of(lambda: client.call("delete_checkpoint", session_id=sid)) == "InvalidRequest"
    assert (
        code_of(lambda: client.call("create_checkpoint", session_id=sid, expected_version=99))
        == "VersionConflict"
    )


def test_caps_automatic_give_way_manual_refused_automatic_skipped(
    start_front: Callable[..., FrontProcess], zmq_context: Ctx
) -> None:
    front = start_front(env={"STUI_MAX_CHECKPOINTS": "3"})
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        sid = seeded(c)
        c.call("update_session_state", session_id=sid, state_data={"a": 1}, replace=True)
        c.call("update_session_state", session_id=sid, state_data={"a": 2}, replace=True)
        m1 = c.call("create_checkpoint", session_id=sid, label="m1")
        # Full (2 automatic + 1 manual): a manual one makes room by removing
        # the oldest automatic.
        m2 = c.call("create_checkpoint", session_id=sid, label="m2")
        labels = [x["label"] for x in c.call("list_checkpoints", session_id=sid)["checkpoints"]]
        assert labels == ["m2", "m1", "before update_session_state"]
        m3 = c.call("create_checkpoint", session_id=sid, label="m3")
        assert [x["label"] for x in c.call("list_checkpoints", session_id=sid)["checkpoints"]] == [
            "m3",
            "m2",
            "m1",
        ]
        # Only manual ones left: a manual one is refused, changing nothing...
        with pytest.raises(RemoteError) as err:
            c.call("create_checkpoint", session_id=sid, label="m4")
        assert err.value.code == "CheckpointLimitExceeded" and err.value.details == {"limit": 3}
        # ...and an automatic one is skipped while its command succeeds.
        done = c.call("update_session_state", session_id=sid, state_data={"b": 1}, replace=True)
        assert done["session_state"] == {"b": 1}
        c.call("clear_context", session_id=sid)
        listed = c.call("list_checkpoints", session_id=sid)["checkpoints"]
        assert [x["checkpoint_id"] for x in listed] == [
            m3["checkpoint_id"],
            m2["checkpoint_id"],
            m1["checkpoint_id"],
        ]
        # A restore at the cap still restores (its own checkpoint skipped).
        c.call("restore_checkpoint", session_id=sid, checkpoint_id=m1["checkpoint_id"])
        assert c.call("restore_session", session_id=sid)["session_state"] == {"a": 2}


def test_byte_cap(start_front: Callable[..., FrontProcess], zmq_context: Ctx) -> None:
    front = start_front(env={"STUI_MAX_CHECKPOINT_BYTES": "4096"})
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        sid = c.call("create_session", client_id="bytes")["session_id"]
        c.call("update_session_state", session_id=sid, state_data={"big": "x" * 3000})
        first = c.call("create_checkpoint", session_id=sid)
        assert 3000 < first["bytes"] < 4096
        with pytest.raises(RemoteError) as err:
            c.call("create_checkpoint", session_id=sid)
        assert err.value.code == "CheckpointLimitExceeded" and err.value.details == {"limit": 4096}
        assert c.call("get_session_info", session_id=sid)["checkpoint_count"] == 1


def test_a_retried_create_is_executed_once(client: Client) -> None:
    sid = seeded(client)
    params = {"session_id": sid, "label": "once"}
    first = client.result(client.request("create_checkpoint", params, request_id="ck-retry"))
    second = client.result(client.request("create_checkpoint", params, request_id="ck-retry"))
    assert first == second  # the reply's own timestamp aside, the same answer
    assert len(client.call("list_checkpoints", session_id=sid)["checkpoints"]) == 1
    # The same id with other parameters is refused, not replayed.
    other = client.request("create_checkpoint", {**params, "label": "x"}, request_id="ck-retry")
    assert Client.error_code(other) == "InvalidRequest"
    # A retried restore is executed once: one automatic checkpoint, one version.
    cid = first["checkpoint_id"]
    r1 = client.request("restore_checkpoint", {"session_id": sid, "checkpoint_id": cid},
                        request_id="rs-retry")  # fmt: skip
    r2 = client.request("restore_checkpoint", {"session_id": sid, "checkpoint_id": cid},
                        request_id="rs-retry")  # fmt: skip
    assert Client.error_code(r1) is None and Client.error_code(r2) is None
    assert len(client.call("list_checkpoints", session_id=sid)["checkpoints"]) == 2


def test_another_clients_session_is_invisible(client: Client) -> None:
    sid = seeded(client, "owner")
    made = client.call("create_checkpoint", session_id=sid, client_id="owner")
    for command, extra in (
        ("create_checkpoint", {}),
        ("list_checkpoints", {}),
        ("restore_checkpoint", {"checkpoint_id": made["checkpoint_id"]}),
        ("delete_checkpoint", {"checkpoint_id": made["checkpoint_id"]}),
    ):
        reply = client.request(command, {"session_id": sid, "client_id": "intruder", **extra})
        assert Client.error_code(reply) == "SessionNotFound", command
    assert client.call("get_session_info", session_id=sid)["checkpoint_count"] == 1


def test_checkpoints_go_with_a_closed_session_and_stay_with_a_saved_one(client: Client) -> None:
    kept = seeded(client)
    client.call("create_checkpoint", session_id=kept)
    client.call("close_session", session_id=kept, save_state=True)
    assert client.call("restore_session", session_id=kept)["session_state"] == STATE
    assert len(client.call("list_checkpoints", session_id=kept)["checkpoints"]) == 1
    client.call("close_session", session_id=kept)
    reply = client.request("list_checkpoints", {"session_id": kept})
    assert Client.error_code(reply) == "SessionNotFound"


def test_describe_reports_both_caps(client: Client) -> None:
    limits = client.call("describe")["limits"]
    assert limits["max_checkpoints"] == 10
    assert limits["max_checkpoint_bytes"] == 4 * 1024 * 1024


def test_metrics_count_checkpoints_without_ids_in_labels(
    start_front: Callable[..., FrontProcess],
    start_http: Callable[..., Any],
    metrics_dir: Path,
    zmq_context: Ctx,
) -> None:
    front = start_front(
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "STUI_MAX_CHECKPOINTS": "2"}
    )
    http = start_http(front.redis_url)
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        sid = seeded(c, "metrics-client-7f3a")
        one = c.call("create_checkpoint", session_id=sid)  # manual taken
        c.call("clear_context", session_id=sid)  # automatic taken
        c.call("create_checkpoint", session_id=sid)  # manual taken, the automatic gives way
        with pytest.raises(RemoteError):
            c.call("create_checkpoint", session_id=sid)  # manual refused
        c.call("update_session_state", session_id=sid, state_data={}, replace=True)  # skipped
        c.call("restore_checkpoint", session_id=sid, checkpoint_id=one["checkpoint_id"])

    def samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return test_http_metrics.parse(http.scrape())

    name = "stui_sessions_checkpoints_total"
    wait_for(
        lambda: test_http_metrics.value(samples(), "stui_sessions_checkpoint_restores_total") == 1,
        10, step=0.2, what="the restore counted",
    )  # fmt: skip
    got = samples()
    value = test_http_metrics.value
    assert value(got, name, kind="manual", outcome="taken") == 2
    assert value(got, name, kind="manual", outcome="refused") == 1
    assert value(got, name, kind="automatic", outcome="taken") == 1
    # The replace and the restore at the cap (two manual ones): both skipped.
    assert value(got, name, kind="automatic", outcome="skipped") == 2
    text = http.scrape()
    assert sid not in text and "metrics-client-7f3a" not in text


def test_the_stored_snapshot_is_what_layout_reads(client: Client, redis_client: Any) -> None:
    """The scripts' cmsgpack snapshot and layout.parse_snapshot agree, and
    the heads are what list_checkpoints answers."""
    sid = seeded(client)
    made = client.call("create_checkpoint", session_id=sid, label="raw")
    key = keys.session_key(sid)
    raw = redis_client.hgetall(key)
    counters, fields = layout.parse_snapshot(raw[b"k:%d" % made["checkpoint_id"]])
    content = {
        name: value
        for name, value in raw.items()
        if name in layout.SNAPSHOT_FIELDS or name[:2] in layout.CONTENT_PREFIXES
    }
    assert dict(fields) == content and len(fields) == len(content)
    meta = layout.unpack_meta(raw[b"m"])
    assert counters == {name: getattr(meta, name) for name in layout.SNAPSHOT_COUNTERS}
    last, heads = layout.parse_heads(raw[b"kh"])
    assert last == made["checkpoint_id"] and len(heads) == 1
    assert heads[0].bytes == made["bytes"] == len(raw[b"k:%d" % made["checkpoint_id"]])
    assert raw[b"kl:%d" % made["checkpoint_id"]] == b"raw"
    # And the Python writer is what the scripts read: a snapshot packed here
    # and stored is restored as it says.
    blob = layout.pack_snapshot(counters, [(b"s:only", b'"from python"')])
    redis_client.hset(key, b"k:%d" % made["checkpoint_id"], blob)
    client.call("restore_checkpoint", session_id=sid, checkpoint_id=made["checkpoint_id"])
    assert client.call("restore_session", session_id=sid)["session_state"] == {
        "only": "from python"
    }


def test_restore_session_reports_the_count_and_an_empty_label_stays_empty(client: Client) -> None:
    sid = seeded(client)
    assert client.call("restore_session", session_id=sid)["checkpoint_count"] == 0
    made = client.call("create_checkpoint", session_id=sid, label="")
    assert made["label"] == ""
    assert client.call("list_checkpoints", session_id=sid)["checkpoints"][0]["label"] == ""
    restored = client.call("restore_session", session_id=sid)
    assert restored["checkpoint_count"] == 1 and restored["session_state"] == STATE


def test_checkpoints_expire_with_their_session(client: Client, redis_client: Any) -> None:
    sid = client.call("create_session", client_id="brief", timeout=1)["session_id"]
    client.call("update_session_state", session_id=sid, state_data={"a": 1})
    client.call("create_checkpoint", session_id=sid)
    key = keys.session_key(sid)
    assert redis_client.hexists(key, "k:1")
    # The session's key carries its checkpoints: one TTL for both.
    wait_for(lambda: not redis_client.exists(key), 5, step=0.1, what="the session key expired")
    reply = client.request("list_checkpoints", {"session_id": sid})
    assert Client.error_code(reply) == "SessionNotFound"
