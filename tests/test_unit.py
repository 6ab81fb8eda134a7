"""Fast unit tests of the domain, over fakeredis with its Lua support."""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from service import codec, keys
from service.dispatch import Dispatcher
from service.errors import ALL_ERRORS, InternalError, StuiError
from service.protocol import ReplyTo, encode_error
from service.scripts import ALL_SCRIPTS
from service.settings import Settings
from tests.spec import SPEC_CODES
from workers.cli import build_parser
from workers.cli_common import settings_from


def ask(d: Dispatcher, command: str, rid: Any = "1", **params: Any) -> dict[str, Any]:
    reply = codec.loads(
        d.handle([codec.dumps({"id": rid, "command": command, "parameters": params})])[0]
    )
    assert isinstance(reply, dict)
    return reply


def test_every_spec_error_code_has_a_class() -> None:
    assert {e.code for e in ALL_ERRORS} == SPEC_CODES
    assert all(issubclass(e, StuiError) for e in ALL_ERRORS)


@pytest.mark.parametrize("error", ALL_ERRORS, ids=lambda e: e.code)
@pytest.mark.parametrize("encoding", ["command", "envelope"])
def test_every_error_code_encodes_in_both_forms(error: type[StuiError], encoding: str) -> None:
    exc = error("boom") if error.__name__ != "InvalidRequest" else error("boom", field="x")
    reply = json.loads(encode_error(ReplyTo(encoding, "r-1"), exc))  # type: ignore[arg-type]
    if encoding == "command":
        assert reply["status"] == "error" and reply["error_type"] == error.code
        assert reply["id"] == "r-1" and reply["error"] == "boom"
        assert isinstance(reply["details"], dict) and reply["timestamp"].endswith("Z")
    else:
        data = reply["payload"]["data"]
        assert data["response_type"] == "Error" and data["data"]["code"] == error.code
        assert reply["version"] == "1.0.0" and reply["id"] == "r-1"


def test_a_bug_becomes_internal_error_without_stack(
    fake_dispatcher: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import handlers, models

    def broken(*_: Any) -> Any:
        raise ZeroDivisionError("secret detail")

    monkeypatch.setitem(
        handlers._BY_ANY_NAME, "ping", handlers.Command("ping", models.Ping, broken)
    )
    d = fake_dispatcher()
    raw = d.handle([b'{"id": "b", "command": "ping"}'])[0]
    assert b"secret" not in raw and b"Traceback" not in raw
    assert json.loads(raw)["error_type"] == InternalError.code
    # the dispatcher keeps serving
    assert ask(d, "describe")["status"] == "success"


def test_a_failing_script_is_internal_error(fake_dispatcher: Callable[..., Dispatcher]) -> None:
    d = fake_dispatcher()
    sid = ask(d, "create_session", client_id="c")["result"]["session_id"]
    # corrupt the session hash so the script fails at run time
    d.store.client.hset(keys.session_key(sid), "m", "not-a-number")
    reply = ask(d, "update_session_state", session_id=sid, state_data={"a": 1})
    assert reply["error_type"] == "InternalError"
    assert "Traceback" not in json.dumps(reply) and "lua" not in reply["error"].lower()


def test_key_formats_are_pinned() -> None:
    chash = keys.client_hash("alice")
    assert chash == "2bd806c97f0e00af"
    bucket = keys.bucket_of(chash)
    assert bucket == int(chash, 16) % 64 == 47
    sid = keys.new_session_id(chash)
    assert keys.is_session_id(sid) and sid.startswith(chash + ".")
    assert len(sid) == 39
    assert keys.session_key(sid) == f"stui:{{b47}}:s:{sid}"
    assert keys.client_index_key(chash) == "stui:{b47}:c:2bd806c97f0e00af"
    assert keys.bucket_expiry_key(47) == "stui:{b47}:exp"
    assert keys.bucket_clients_key(47) == "stui:{b47}:clients"
    # every key of one session command shares one hash tag (one Cluster slot)
    tags = {k.split("}")[0] for k in keys.session_keys(sid)}
    assert tags == {"stui:{b47"}
    assert keys.session_keys(sid) == [
        keys.session_key(sid),
        keys.client_index_key(chash),
        keys.bucket_expiry_key(47),
        keys.bucket_clients_key(47),
    ]
    # A replay record's id: two 8-byte digests, of the request and of its parameters.
    rid = keys.replay_id("update\0sid\0\"r-1\"\0addr:127.0.0.1", b'["update",{}]')
    assert isinstance(rid, bytes) and len(rid) == keys.REPLAY_ID_BYTES == 16
    digest, fp = rid[:8], rid[8:]
    assert keys.replay_id("other", b'["update",{}]')[8:] == fp
    assert keys.replay_id("other", b'["update",{}]')[:8] != digest
    other_params = keys.replay_id("update\0sid\0\"r-1\"\0addr:127.0.0.1", b'["update",{"a":1}]')
    assert other_params[:8] == digest and other_params[8:] != fp


def test_hostile_client_ids_cannot_reach_key_names() -> None:
    for hostile in ["{b01}", "a:b:c", "x\ny", "é" * 1000, "}{"]:
        chash = keys.client_hash(hostile)
        assert len(chash) == 16 and all(c in "0123456789abcdef" for c in chash)


def test_every_script_has_a_header() -> None:
    for script in ALL_SCRIPTS:
        body = script.source.split("local function is_state")[-1]
        assert "-- Returns" in body or "Returns" in body, script.name
        assert "KEYS" in body or "ARGV" in body, script.name


def test_each_script_carries_every_prelude_helper_it_uses_and_no_other() -> None:
    """scripts._prelude_for keeps the prelude blocks a body needs: every
    prelude name a script's code uses is defined in it (else Lua would read
    an undefined global at run time), and a block nothing uses is left out
    (each costs closures on every call)."""
    import re

    from service import scripts
    from service.scripts import _PRELUDE, _prelude_for

    def code(lua: str) -> str:
        return re.sub(r"--[^\n]*", "", lua)

    helpers = set(re.findall(r"^local function (\w+)", _PRELUDE, re.MULTILINE))
    assert {"rate_take", "load_meta", "pack_meta", "replay_add"} <= helpers
    for script in ALL_SCRIPTS:
        if "local t = redis.call('TIME')" not in script.source:
            continue  # not built on the prelude (STATS)
        defined = set(re.findall(r"^local function (\w+)", script.source, re.MULTILINE))
        used = set(re.findall(r"[A-Za-z_]\w*", code(script.source))) & helpers
        assert used <= defined, (script.name, used - defined)
        for name in defined & helpers:
            rest = re.sub(rf"^local function {name}\b", "", code(script.source), flags=re.M)
            assert re.search(rf"\b{name}\b", rest), (script.name, f"{name} is never called")
    # The INFO script reads; it has no use for the writers of the replay records.
    info = _prelude_for(scripts.INFO.source.split("get_session_info")[-1])
    assert "local function replay_add" not in info


@pytest.mark.parametrize(
    "text",
    [
        b"NaN",
        b"[Infinity]",
        b"-Infinity",
        b"1e400",
        b'"\\ud800"',
        b"[1,]",
        b"{'a':1}",
        b"\xff",
        b"",
        b"[" * 5000,
    ],
)
def test_codec_refuses_what_is_not_strict_json(text: bytes) -> None:
    with pytest.raises(codec.JSONError):
        codec.loads(text)


def test_codec_holds_64_bit_integers_exactly_and_refuses_wider_ones() -> None:
    edges = (
        b'{"a": 18446744073709551615, "b": [-9223372036854775808, 0.1],'
        b' "c": "1234567890123456789012"}'
    )
    value = codec.loads(edges)
    assert value["a"] == 2**64 - 1 and value["b"][0] == -(2**63)
    assert codec.loads(codec.dumps(value)) == value
    for wide, path in (
        (b'{"a": 123456789012345678901234567890}', "a"),
        (b'{"a": 1, "b": [0, -18446744073709551617]}', "b.1"),
        (b'{"x": {"y": -9223372036854775809}}', "x.y"),
        (b"[18446744073709551616]", "0"),
        (b'{"a": [1.5e20, 100000000000000000000]}', "a.1"),
    ):
        with pytest.raises(codec.WideInteger) as refused:
            codec.loads(wide)
        assert refused.value.path == path
    # Floats that large stay floats, even next to a long digit run.
    floats = b'{"a": 1.7976931348623157e308, "b": 1e19, "c": 1E20, "d": 1000000000000000000}'
    assert codec.loads(floats)["a"] == 1.7976931348623157e308
    # Stored before the rule (values are stored as their JSON text): written back exactly.
    assert codec.dumps({"n": 2**70}) == b'{"n":1180591620717411303424}'


def test_a_long_digit_run_costs_no_second_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """One parser for every message: a 19-digit run inside a string used to
    switch the whole message to the standard library's parser."""
    import json

    def forbidden(*_: object, **__: object) -> object:
        raise AssertionError("the standard library parser ran")

    monkeypatch.setattr(json, "loads", forbidden)
    body = b'{"id": 1, "command": "ping", "parameters": {"message": "1234567890123456789012"}}'
    assert codec.loads(body)["parameters"]["message"] == "1234567890123456789012"


@pytest.mark.parametrize(
    "params,field",
    [
        ({"client_id": "bad id"}, "client_id"),
        ({"client_id": "x" * 129}, "client_id"),
        ({"client_id": 5}, "client_id"),
        ({"client_id": "ok", "timeout": "3600"}, "timeout"),
        ({"client_id": "ok", "timeout": 3600.0}, "timeout"),
        ({"client_id": "ok", "timeout": True}, "timeout"),
        ({"client_id": "ok", "timeout": 0}, "timeout"),
        ({"client_id": "ok", "timeout": 2_592_001}, "timeout"),
        ({"client_id": "ok", "client_info": []}, "client_info"),
        ({"client_id": "ok", "colour": "red"}, "colour"),
        ({}, "client_id"),
    ],
)
def test_create_session_parameter_validation(
    fake_dispatcher: Callable[..., Dispatcher], params: dict[str, Any], field: str
) -> None:
    reply = ask(fake_dispatcher(), "create_session", **params)
    assert reply["error_type"] == "InvalidRequest"
    assert reply["details"] == {"field": field}


def test_malformed_session_id_is_not_found_without_redis(
    fake_dispatcher: Callable[..., Dispatcher],
) -> None:
    d = fake_dispatcher()
    assert isinstance(d.store.client, redis.Redis)  # FakeRedis, never a cluster here
    d.store.client.connection_pool.disconnect()
    for sid in ["x", "../../etc/passwd", "{b01}:s:x", "0" * 39]:
        assert ask(d, "get_session_info", session_id=sid)["error_type"] == "SessionNotFound"
    assert ask(d, "get_session_info", session_id=12)["error_type"] == "InvalidRequest"


def test_unsupported_version_and_envelope_names(fake_dispatcher: Callable[..., Dispatcher]) -> None:
    d = fake_dispatcher()
    env = {
        "id": "e",
        "version": "2.0.0",
        "payload": {"type": "Request", "data": {"request_type": "Ping", "params": {}}},
    }
    reply = codec.loads(d.handle([codec.dumps(env)])[0])
    data = reply["payload"]["data"]["data"]
    assert data["code"] == "UnsupportedVersion" and data["details"] == {"supported": ["1.x"]}
    env["version"] = "1.4.2"
    env["payload"]["data"]["request_type"] = "GetSessionStatistics"  # type: ignore[index]
    reply = codec.loads(d.handle([codec.dumps(env)])[0])
    assert reply["payload"]["data"]["response_type"] == "GetSessionStatistics"


def test_request_ids_are_echoed_or_null(fake_dispatcher: Callable[..., Dispatcher]) -> None:
    d = fake_dispatcher()
    assert ask(d, "ping", rid=7)["id"] == 7
    assert ask(d, "ping", rid="x" * 256)["id"] == "x" * 256
    too_long = ask(d, "ping", rid="x" * 257)
    assert too_long["id"] is None and too_long["details"] == {"field": "id"}
    assert ask(d, "ping", rid=[1])["id"] is None
    assert ask(d, "ping", rid=None)["status"] == "success"


def test_every_script_call_stays_in_one_cluster_slot(
    fake_dispatcher: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis Cluster readiness: each call's keys hash to one slot, and every
    key a script touches arrives in KEYS (the scripts never build names)."""
    from redis.crc import key_slot

    from service.store import Call, Store

    d = fake_dispatcher()
    seen: list[Call] = []
    real_send = Store.send

    def spy(self: Store, calls: list[Call]) -> Any:
        seen.extend(calls)
        return real_send(self, calls)

    monkeypatch.setattr(Store, "send", spy)
    sid = ask(d, "create_session", client_id="slots")["result"]["session_id"]
    steps: list[tuple[str, dict[str, Any]]] = [
        ("restore_session", {}),
        ("update_session_state", {"state_data": {"a": 1}}),
        ("get_session_info", {}),
        ("save_context", {"context": {"workspace_context": {}}}),
        ("load_context", {}),
        ("get_context_summary", {}),
        ("clear_context", {}),
        ("record_evaluation", {"code": "1"}),
        ("register_object", {"object_id": "o", "description": "d"}),
        ("release_object", {"object_id": "o"}),
        ("close_session", {}),
    ]
    for command, params in steps:
        assert ask(d, command, session_id=sid, **params)["status"] == "success", command
    ask(d, "list_client_sessions", client_id="slots")
    ask(d, "get_session_statistics")
    assert len(seen) >= 13 + 64
    for call in seen:
        assert len({key_slot(k.encode()) for k in call.keys}) == 1, call.script.name
    # no script source builds a key name: it only ever indexes KEYS
    for script in ALL_SCRIPTS:
        assert "stui:" not in script.source


@pytest.mark.parametrize(
    "message",
    [
        "READONLY You can't write against a read only replica.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "LOADING Redis is loading the dataset in memory",
    ],
)
def test_transient_redis_refusals_are_storage_unavailable(
    fake_dispatcher: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    from redis.exceptions import ResponseError

    from service.store import Store

    d = fake_dispatcher()

    def refused(self: Store, calls: list[Any]) -> Generator[None, None, list[Any]]:
        yield  # written
        return [ResponseError(message)] * len(calls)

    monkeypatch.setattr(Store, "_pipeline", refused)
    reply = ask(d, "create_session", client_id="t")
    assert reply["error_type"] == "StorageUnavailable"


def test_an_unexpected_store_failure_answers_and_keeps_serving(
    fake_dispatcher: Callable[..., Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.store import Store

    d = fake_dispatcher()
    real = Store._pipeline

    def explode(self: Store, calls: Any) -> Any:
        raise TypeError("unexpected")

    monkeypatch.setattr(Store, "_pipeline", explode)
    assert ask(d, "create_session", client_id="t")["error_type"] == "InternalError"
    monkeypatch.setattr(Store, "_pipeline", real)
    assert ask(d, "create_session", client_id="t")["status"] == "success"


def test_envelope_top_level_client_id_is_the_client(
    fake_dispatcher: Callable[..., Dispatcher],
) -> None:
    d = fake_dispatcher()
    sid = ask(d, "create_session", client_id="owner")["result"]["session_id"]

    def envelope(client_id: str) -> dict[str, Any]:
        env = {
            "id": "e",
            "version": "1.0.0",
            "client_id": client_id,
            "payload": {
                "type": "Request",
                "data": {"request_type": "GetSessionInfo", "params": {"session_id": sid}},
            },
        }
        reply = codec.loads(d.handle([codec.dumps(env)])[0])
        assert isinstance(reply, dict)
        return dict(reply["payload"]["data"])

    assert envelope("intruder")["data"]["code"] == "SessionNotFound"
    assert envelope("owner")["data"]["client_id"] == "owner"


def test_errors_before_parsing_keep_the_envelope_form(
    fake_dispatcher: Callable[..., Dispatcher],
) -> None:
    d = fake_dispatcher(max_request_bytes=2048)
    big = b'{"id": "x", "version": "1.0.0", "payload": {"pad": "' + b"x" * 4096 + b'"}}'
    reply = codec.loads(d.handle([big])[0])
    assert reply["payload"]["data"]["data"]["code"] == "PayloadTooLarge"
    assert reply["payload"]["data"]["data"]["details"] == {"limit_bytes": 2048}
    broken = codec.loads(d.handle([b'{"payload": {"type": "Request", '])[0])
    assert broken["payload"]["data"]["data"]["code"] == "InvalidRequest"


def test_default_timeout_setting_applies(fake_dispatcher: Callable[..., Dispatcher]) -> None:
    d = fake_dispatcher(default_timeout=77)
    assert ask(d, "create_session", client_id="t")["result"]["timeout"] == 77
    limits = ask(d, "describe")["result"]["limits"]
    assert (limits["min_timeout"], limits["max_timeout"]) == (1, 2_592_000)
    assert limits["transport_max_bytes"] == limits["max_request_bytes"] + 64 * 1024


def test_sentinel_settings_are_checked_at_start() -> None:
    with pytest.raises(ValidationError, match="redis_sentinels"):
        Settings(redis_mode="sentinel")
    for bad in ["nohost", "host:", ":26379", "host:0", "host:99999", "host:port"]:
        with pytest.raises(ValidationError, match="host:port"):
            Settings(redis_mode="sentinel", redis_sentinels=bad)
    ok = Settings(redis_mode="sentinel", redis_sentinels=" s1:26379, [::1]:26380 ,")
    assert ok.sentinel_addresses == [("s1", 26379), ("::1", 26380)]
    assert ok.redis_configured and ok.redis_url is None
    assert not Settings(redis_url=None).redis_configured
    assert Settings(redis_url="redis://x:1/0", redis_mode="cluster").redis_configured


def test_cli_takes_the_redis_topology_flags() -> None:
    for command in (["front"], ["serve"], ["scheduler"], ["http"], ["backup", "--output", "x"]):
        topology = ["--redis-mode", "sentinel", "--redis-sentinels", "a:1,b:2"]
        args = build_parser().parse_args([*command, *topology, "--redis-master-name", "m"])
        settings = settings_from(args)
        assert settings.redis_mode == "sentinel", command
        assert settings.sentinel_addresses == [("a", 1), ("b", 2)]
        assert settings.redis_master_name == "m"


def test_a_body_in_both_encodings_is_refused(fake_dispatcher: Callable[..., Dispatcher]) -> None:
    """A message that is an envelope and a command at once would be read one
    way by one reader and the other way by another: it is refused, in the
    envelope form (its "payload" decides), and nothing is created."""
    d = fake_dispatcher()
    envelope = {"type": "Request", "data": {"request_type": "Ping", "params": {}}}
    for extra in ({"command": "create_session"}, {"parameters": {"client_id": "both"}}):
        body = {"id": "both-1", "version": "1.0.0", "payload": envelope, **extra}
        reply = codec.loads(d.handle([codec.dumps(body)])[0])
        error = reply["payload"]["data"]
        assert error["response_type"] == "Error", reply
        assert error["data"]["code"] == "InvalidRequest"
        assert error["data"]["details"] == {"field": "payload"}
        assert reply["id"] == "both-1"
    assert ask(d, "list_client_sessions", client_id="both")["result"]["session_count"] == 0


def test_serve_listens_on_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.cli import SERVE_BIND, build_parser, serve_bind
    from workers.cli_common import settings_from

    monkeypatch.delenv("STUI_BIND", raising=False)
    assert SERVE_BIND == "tcp://127.0.0.1:5555"
    assert serve_bind(settings_from(build_parser().parse_args(["serve"]))) == SERVE_BIND
    wide = build_parser().parse_args(["serve", "--bind", "tcp://0.0.0.0:7000"])
    assert serve_bind(settings_from(wide)) == "tcp://0.0.0.0:7000"
    monkeypatch.setenv("STUI_BIND", "tcp://10.0.0.5:5555")
    assert serve_bind(settings_from(build_parser().parse_args(["serve"]))) == "tcp://10.0.0.5:5555"
    # front keeps the all-interfaces default: it is what a pod's port needs.
    monkeypatch.delenv("STUI_BIND")
    assert Settings(redis_url="redis://unused").bind == "tcp://0.0.0.0:5555"


def test_a_session_keeps_the_replay_records_of_its_newest_mutations(
    fake_dispatcher: Callable[..., Dispatcher],
) -> None:
    """Replay records live in the session (service/layout.py, REPLAY_MAX):
    a retry of any of its newest REPLAY_MAX mutations is answered from its
    record; an older one runs again."""
    from service import layout

    d = fake_dispatcher()
    sid = ask(d, "create_session", client_id="rp")["result"]["session_id"]

    def update(rid: str, n: int) -> dict[str, Any]:
        body = {"id": rid, "command": "update_session_state",
                "parameters": {"session_id": sid, "state_data": {"n": n}}}
        reply: dict[str, Any] = json.loads(d.handle([json.dumps(body).encode()])[0])
        return reply

    first = [update(f"u{n}", n)["result"]["version"] for n in range(layout.REPLAY_MAX + 1)]
    for n in range(1, layout.REPLAY_MAX + 1):  # the newest REPLAY_MAX: replayed
        assert update(f"u{n}", n)["result"]["version"] == first[n]
    again = update("u0", 0)  # the oldest: its record was dropped, it runs again
    assert again["result"]["version"] == first[-1] + 1
    reused = update("u0", 99)  # same id, other parameters (its record is the newest)
    assert reused["error_type"] == "InvalidRequest" and reused["details"]["field"] == "id"


class _FakeRouter:
    """A ROUTER's send as the Outbox sees it: a full queue (zmq.Again) or a
    peer that has left (EHOSTUNREACH)."""

    def __init__(self) -> None:
        self.mode = "full"
        self.sent: list[bytes] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        import errno

        import zmq

        if self.mode == "full":
            raise zmq.Again()
        if self.mode == "gone":
            raise zmq.ZMQError(errno.EHOSTUNREACH)
        self.sent.append(frame)


def test_replies_held_for_a_peer_that_leaves_are_dropped_and_the_outbox_goes_on() -> None:
    """A peer whose replies wait in the outbox disconnects: the next flush
    drops each of them once (counted as gone), forgets the peer and keeps
    serving the others. (It used to raise KeyError, which ended the front.)"""
    from workers.outbox import Outbox

    sock = _FakeRouter()
    dropped: list[str] = []
    outbox = Outbox(sock, 10**6, dropped.append)  # type: ignore[arg-type]
    outbox.send([b"leaver", b"", b"reply 1"])
    outbox.send([b"leaver", b"", b"reply 2"])
    sock.mode = "gone"
    outbox.flush()
    assert dropped == ["gone", "gone"]
    assert not outbox
    sock.mode = "open"
    outbox.send([b"other", b"", b"reply 3"])
    outbox.flush()
    assert sock.sent == [b"other", b"", b"reply 3"]
