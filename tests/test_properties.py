"""Property-based tests of the protocol layer and the session semantics.

Hypothesis drives the in-process dispatcher (the `fake_dispatcher` fixture:
the real Dispatcher and Lua scripts over fakeredis), so thousands of requests
run in seconds. The properties:

- whatever the bytes, `decode` either returns a request or raises its own
  DecodeError, and `Dispatcher.handle` answers every body with exactly one
  well-formed, strict-JSON reply without a stack trace;
- arbitrary parameter dicts (valid keys with valid or wrongly typed values,
  unknown keys) for every command never give InternalError, and an
  InvalidRequest always names the offending field;
- any JSON object stored as session state comes back exactly;
- a random sequence of merges, replaces and versioned writes matches a plain
  dict model.

`check_reply` is also the reply checker of tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.dispatch import Dispatcher
from service.handlers import COMMANDS
from service.protocol import DecodeError, Request, decode, encode_error
from tests.spec import DETAILS_KEY, SPEC_CODES

MakeDispatcher = Callable[..., Dispatcher]
Encoding = Literal["command", "envelope"]

# PROTOCOL.md's error table, and the details key each code promises.
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")
STACK_MARKERS = (b"Traceback", b'File "')

COMMAND_NAMES = tuple(COMMANDS)


def pascal(command: str) -> str:
    return "".join(part.capitalize() for part in command.split("_"))


PASCAL_NAMES = frozenset(pascal(c) for c in COMMAND_NAMES)


# --- the reply checker -----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    encoding: Encoding
    id: Any
    code: str | None  # None: a success
    details: dict[str, Any]
    result: Any  # the success's result (None for an error)
    response_type: str | None  # envelope form only


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def _finite_int(text: str) -> int:
    if math.isinf(float(text)):  # serde_json: "number out of range"
        raise ValueError(f"{text[:20]}... overflows a double")
    return int(text)


def strict_loads(raw: bytes) -> Any:
    """RFC 8259 as serde_json and JSON.parse read it: UTF-8, no NaN or Infinity,
    no number that overflows a double (integers included), no lone surrogate."""
    obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_int=_finite_int)
    # Lone surrogate escapes parse in Python but in no strict parser.
    json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return obj


def check_reply(raw: bytes) -> Reply | str:
    """The reply, if it is well formed in either encoding; else what is wrong."""
    if any(marker in raw for marker in STACK_MARKERS):
        return f"stack trace in reply: {raw[:300]!r}"
    try:
        obj = strict_loads(raw)
    except (ValueError, UnicodeError) as exc:
        return f"reply is not strict JSON ({exc}): {raw[:300]!r}"
    if not isinstance(obj, dict):
        return f"reply is not an object: {raw[:300]!r}"
    try:
        rid, stamp = obj["id"], obj["timestamp"]
        result: Any = None
        response_type: str | None = None
        encoding: Encoding
        if "payload" in obj:
            encoding = "envelope"
            if obj["version"] != "1.0.0" or obj["payload"]["type"] != "Response":
                return f"bad envelope: {raw[:300]!r}"
            data = obj["payload"]["data"]
            response_type = data["response_type"]
            if response_type == "Error":
                error = data["data"]
                code, message, details = error["code"], error["message"], error["details"]
            elif response_type in PASCAL_NAMES:
                code, message, details, result = None, None, {}, data["data"]
            else:
                return f"unknown response_type {response_type!r}: {raw[:300]!r}"
        else:
            encoding = "command"
            status = obj["status"]
            if status == "error":
                if "result" in obj:
                    return f"an error with a result: {raw[:300]!r}"
                code, message, details = obj["error_type"], obj["error"], obj["details"]
            elif status == "success":
                if "error" in obj or "error_type" in obj:
                    return f"a success with an error: {raw[:300]!r}"
                code, message, details, result = None, None, {}, obj["result"]
            else:
                return f"status {status!r}: {raw[:300]!r}"
    except (KeyError, TypeError) as exc:
        return f"reply lacks {exc}: {raw[:300]!r}"
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        return f"reply id {rid!r} is neither a string, an integer nor null"
    if not isinstance(stamp, str) or not TIMESTAMP.fullmatch(stamp):
        return f"timestamp {stamp!r} is not ISO-8601 UTC with Z"
    if code is None:
        if not isinstance(result, dict):
            return f"success result is not an object: {raw[:300]!r}"
        return Reply(encoding, rid, None, {}, result, response_type)
    if code not in SPEC_CODES:
        return f"error code {code!r} is not in the protocol's table: {raw[:300]!r}"
    if not isinstance(message, str) or not message:
        return f"error message {message!r} is not a non-empty string"
    if not isinstance(details, dict):
        return f"details {details!r} is not an object"
    if code in DETAILS_KEY and DETAILS_KEY[code] not in details:
        return f"{code} without details.{DETAILS_KEY[code]}: {raw[:300]!r}"
    if code == "InternalError" and message != "internal error":
        return f"InternalError carries a message: {raw[:300]!r}"
    return Reply(encoding, rid, code, details, None, response_type)


def valid_reply(raw: bytes) -> Reply:
    reply = check_reply(raw)
    assert not isinstance(reply, str), reply
    return reply


def expected_reply_id(body: bytes) -> tuple[bool, Any]:
    """(known, id): the id the reply to this body must carry, when a strict
    parser reads the body as an object; (False, None) when it cannot tell."""
    try:
        obj = strict_loads(body)
    except (ValueError, UnicodeError, RecursionError):
        return False, None
    if not isinstance(obj, dict):
        return True, None
    rid = obj.get("id")
    if isinstance(rid, str) and len(rid) <= 256:
        return True, rid
    if isinstance(rid, int) and not isinstance(rid, bool) and -(2**63) <= rid < 2**63:
        return True, rid
    return True, None


# --- strategies ------------------------------------------------------------------

HUGE_NUMBERS: tuple[Any, ...] = (
    2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, -(2**64), 10**19, 10**30, -(10**40),
    10**300, 2**53 + 1, -0.0, 0.0, 5e-324, 1.7976931348623157e308, -1.7976931348623157e308,
    1e-300, 123456789012345678901234567890,
)  # fmt: skip
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.sampled_from(HUGE_NUMBERS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)

# What the service holds exactly: integers within 64 bits (wider ones are
# refused with InvalidRequest, see test_wide_integers_are_refused_not_rounded).
I64_MIN, U64_MAX = -(2**63), 2**64 - 1


def _fits(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or I64_MIN <= value <= U64_MAX


exact_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=I64_MIN, max_value=U64_MAX)
    | st.sampled_from([n for n in HUGE_NUMBERS if _fits(n)])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
exact_values: st.SearchStrategy[Any] = st.recursive(
    exact_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def to_body(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False).encode("utf-8")


PARAM_NAMES = sorted(
    {name for c in COMMANDS.values() for name in c.params.model_fields} | {"client_id"}
)
ALL_NAMES = sorted({*COMMAND_NAMES, *PASCAL_NAMES})


@st.composite
def request_like(draw: st.DrawFn) -> Any:
    """Objects shaped like requests of either encoding, with any field possibly
    of the wrong type, missing or extra."""
    command = draw(st.sampled_from(ALL_NAMES) | json_values)
    params = draw(
        st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=8), json_values, max_size=6)
        | json_values
    )
    rid = draw(st.none() | st.text(max_size=300) | st.integers() | json_values)
    obj: dict[str, Any]
    if draw(st.booleans()):
        obj = {"id": rid, "command": command, "parameters": params}
    else:
        version = draw(st.sampled_from(["1.0.0", "1", "1.9.9", "2.0.0", "0.1", ""]) | json_values)
        ptype = draw(st.just("Request") | json_values)
        data: Any = draw(st.just({"request_type": command, "params": params}) | json_values)
        obj = {
            "id": rid,
            "version": version,
            "timestamp": "2026-01-05T10:30:00Z",
            "payload": {"type": ptype, "data": data},
        }
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=2)):
        obj.pop(key, None)
    if draw(st.booleans()):
        obj["client_id"] = draw(st.sampled_from(["prop-owner", "x"]) | json_values)
    return obj


request_bodies = st.builds(to_body, request_like(), st.booleans())
any_bodies = (
    st.binary(max_size=300) | st.builds(to_body, json_values, st.booleans()) | request_bodies
)

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- decoding never fails ----------------------------------------------------------


def check_against_body(reply: Reply, body: bytes) -> None:
    """What a reply owes the body it answers, when the body is readable: its
    id; for an object, its encoding (an envelope iff it has a "payload" key)
    and, for an InvalidRequest, a named field (only a body that is not JSON or
    not an object gets `field: null`)."""
    known, rid = expected_reply_id(body)
    if not known:
        return
    assert reply.id == rid and type(reply.id) is type(rid), (reply, body[:200])
    obj = strict_loads(body)
    if isinstance(obj, dict):
        assert reply.encoding == ("envelope" if "payload" in obj else "command"), reply
        if reply.code == "InvalidRequest":
            assert isinstance(reply.details["field"], str), (reply, body[:300])


def handle_one(d: Dispatcher, body: bytes) -> Reply:
    replies = d.handle([body])
    assert len(replies) == 1
    reply = valid_reply(replies[0])
    check_against_body(reply, body)
    return reply


def decode_never_raises(body: bytes, max_bytes: int) -> None:
    """decode returns a Request or raises DecodeError; the error encodes well."""
    try:
        request = decode(body, max_bytes)
    except DecodeError as exc:
        reply = valid_reply(encode_error(exc.reply_to, exc.error))
        assert reply.code is not None and reply.code != "InternalError"
        if len(body) > max_bytes:
            assert reply.code == "PayloadTooLarge"
            assert reply.details == {"limit_bytes": max_bytes}
    else:
        assert isinstance(request, Request) and len(body) <= max_bytes
        assert isinstance(request.command, str) and isinstance(request.params, dict)


@settings(SETTINGS, max_examples=300)
@given(body=st.binary(max_size=400), max_bytes=st.sampled_from([16, 128, 10 * 1024 * 1024]))
def test_arbitrary_bytes(fake_dispatcher: MakeDispatcher, body: bytes, max_bytes: int) -> None:
    decode_never_raises(body, max_bytes)
    handle_one(fake_dispatcher(), body)


@settings(SETTINGS, max_examples=300)
@given(value=json_values, ascii_only=st.booleans())
def test_arbitrary_json_values(
    fake_dispatcher: MakeDispatcher, value: Any, ascii_only: bool
) -> None:
    body = to_body(value, ascii_only)
    decode_never_raises(body, 10 * 1024 * 1024)
    reply = handle_one(fake_dispatcher(), body)
    if not isinstance(value, dict):
        assert reply.code == "InvalidRequest" and reply.id is None


@settings(SETTINGS, max_examples=300)
@given(body=request_bodies)
def test_request_shaped_objects(fake_dispatcher: MakeDispatcher, body: bytes) -> None:
    decode_never_raises(body, 10 * 1024 * 1024)
    reply = handle_one(fake_dispatcher(), body)
    assert reply.code != "InternalError", body[:300]


@settings(SETTINGS, max_examples=100)
@given(bodies=st.lists(any_bodies, min_size=1, max_size=10))
def test_a_batch_gets_one_reply_per_body_in_order(
    fake_dispatcher: MakeDispatcher, bodies: list[bytes]
) -> None:
    replies = fake_dispatcher().handle(bodies)
    assert len(replies) == len(bodies)
    for body, raw in zip(bodies, replies, strict=True):
        check_against_body(valid_reply(raw), body)


# --- arbitrary parameters for every command ------------------------------------------

OWNER = "prop-owner"
UNKNOWN_SID = "0" * 16 + "." + "A" * 22  # well formed, names no session
PARTS = ("workspace_context", "inspector_state", "object_registry", "evaluation_history")
short_text = st.text(max_size=30)
part_values: dict[str, st.SearchStrategy[Any]] = {
    "workspace_context": st.none() | json_objects,
    "inspector_state": st.none() | json_objects,
    "object_registry": st.none()
    | st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4),
    "evaluation_history": st.none() | st.lists(json_values, max_size=4),
}
context_parts = st.lists(st.sampled_from(PARTS), min_size=1, max_size=4, unique=True).flatmap(
    lambda parts: st.fixed_dictionaries({part: part_values[part] for part in parts})
)


def valid_values(key: str, sid: str) -> st.SearchStrategy[Any]:
    """Values of the right type for a parameter (some of them still refused:
    another client's id, an unknown session, a stale version)."""
    table: dict[str, st.SearchStrategy[Any]] = {
        "session_id": st.sampled_from([sid] * 6 + [UNKNOWN_SID, sid[:-1], "x"]),
        "client_id": st.sampled_from([OWNER] * 6 + ["someone-else", "x.Y:z@w-1"]),
        "timeout": st.integers(1, 2_592_000),
        "client_info": json_objects,
        "state_data": json_objects,
        "metadata": st.none() | json_objects,
        "expected_version": st.none() | st.integers(2, 4) | st.integers(0, 2**53),
        "replace": st.booleans(),
        "save_state": st.booleans(),
        "has_error": st.booleans(),
        "context": context_parts,
        "parts": st.none() | st.lists(st.sampled_from(PARTS), max_size=5),
        "code": short_text,
        "description": short_text,
        "result": json_values,
        "result_type": st.none() | short_text,
        "tool_id": st.none() | short_text,
        "execution_time": st.none()
        | st.integers(0, 10**6)
        | st.floats(0, 1e9, allow_nan=False, allow_infinity=False),
        "object_id": st.sampled_from(["obj-1", "obj-2"]) | st.text(min_size=1, max_size=20),
        "message": st.none() | short_text,
    }
    return table.get(key, json_values)


def nearly_valid_values(key: str) -> st.SearchStrategy[Any]:
    """The right container with wrong contents, for the parameters that have
    structure: the error is then about a nested field."""
    table: dict[str, st.SearchStrategy[Any]] = {
        "context": st.dictionaries(
            st.sampled_from(PARTS) | st.text(max_size=6), json_values, min_size=1, max_size=4
        ),
        "parts": st.lists(st.sampled_from(PARTS) | json_values, min_size=1, max_size=4),
    }
    return table.get(key, json_values)


@st.composite
def parameters_for(draw: st.DrawFn, command: str, sid: str) -> dict[str, Any]:
    """Half the time every parameter is valid (optional ones may be left out);
    a quarter of the time one of them is arbitrary JSON, left out or joined by
    an unknown key; otherwise each one independently is valid, arbitrary JSON
    (mostly of the wrong type) or left out."""
    fields = list(COMMANDS[command].params.model_fields)
    mode = draw(st.sampled_from(["valid", "valid", "one", "chaos"]))
    spoilt = draw(st.sampled_from(fields)) if mode == "one" and fields else None
    params: dict[str, Any] = {}
    for key in fields:
        required = COMMANDS[command].params.model_fields[key].is_required()
        if mode == "chaos":
            how = draw(st.sampled_from(["valid", "valid", "any", "omit"]))
        elif key == spoilt:
            how = draw(st.sampled_from(["any", "any", "omit", "unknown"]))
        else:
            how = "valid" if required or draw(st.booleans()) else "omit"
        if how == "unknown":
            params[draw(st.text(max_size=10))] = draw(json_values)
            how = "valid"
        if how == "valid":
            params[key] = draw(valid_values(key, sid))
        elif how == "any":
            params[key] = draw(json_values | nearly_valid_values(key))
    if mode == "chaos" and draw(st.integers(0, 3)) == 0:
        params[draw(st.text(max_size=10))] = draw(json_values)
    return params


def seeded_session(d: Dispatcher) -> str:
    """A session of OWNER with state, context, history and registry."""
    created = valid_reply(ask(d, "create_session", client_id=OWNER, timeout=600))
    assert created.code is None, created
    sid: str = created.result["session_id"]
    steps: tuple[tuple[str, dict[str, Any]], ...] = (
        ("update_session_state", {"state_data": {"a": 1, "b": [], "c": {}}}),
        (
            "save_context",
            {
                "context": {
                    "workspace_context": {"variables": {"x": 1}},
                    "inspector_state": {"history": [1], "selected_object": "obj-1"},
                    "object_registry": {"obj-1": {"class": "Point"}},
                    "evaluation_history": [{"code": "1+1"}],
                }
            },
        ),
    )
    for command, params in steps:
        reply = valid_reply(ask(d, command, session_id=sid, **params))
        assert reply.code is None, reply
    return sid


_request_counter = iter(range(10**9))


def ask(d: Dispatcher, command: str, encoding: Encoding = "command", **params: Any) -> bytes:
    """One request with a fresh id; the raw reply."""
    rid = f"p-{next(_request_counter)}"
    obj: dict[str, Any]
    if encoding == "command":
        obj = {"id": rid, "command": command, "parameters": params}
    else:
        obj = {
            "id": rid,
            "version": "1.0.0",
            "payload": {
                "type": "Request",
                "data": {"request_type": pascal(command), "params": params},
            },
        }
    replies = d.handle([json.dumps(obj, allow_nan=False).encode("utf-8")])
    assert len(replies) == 1
    return replies[0]


def result_of(raw: bytes) -> dict[str, Any]:
    reply = valid_reply(raw)
    assert reply.code is None, raw[:500]
    assert isinstance(reply.result, dict)
    return reply.result


@pytest.mark.parametrize("command", COMMAND_NAMES)
@settings(SETTINGS, max_examples=40)
@given(
    data=st.data(),
    encoding=st.sampled_from(["command", "envelope"]),
    top=st.sampled_from(["absent", "absent", "owner", "arbitrary"]),
)
def test_arbitrary_parameters_never_internal_error(
    fake_dispatcher: MakeDispatcher,
    command: str,
    data: st.DataObject,
    encoding: Encoding,
    top: str,
) -> None:
    d = fake_dispatcher()
    sid = seeded_session(d)
    params = data.draw(parameters_for(command, sid), label="parameters")
    rid = "arbitrary-1"
    name = command if encoding == "command" else pascal(command)
    obj: dict[str, Any]
    if encoding == "command":
        obj = {"id": rid, "command": name, "parameters": params}
    else:
        obj = {
            "id": rid,
            "version": "1.0.0",
            "payload": {"type": "Request", "data": {"request_type": name, "params": params}},
        }
    if top == "owner":
        obj["client_id"] = OWNER
    elif top == "arbitrary":
        obj["client_id"] = data.draw(json_values, label="top-level client_id")
    body = to_body(obj, data.draw(st.booleans(), label="ascii_only"))
    reply = handle_one(d, body)
    event(reply.code or "success")
    assert reply.encoding == encoding
    assert reply.code != "InternalError", body[:500]
    if reply.code is None:
        assert reply.response_type in (None, pascal(command))
    if reply.code == "InvalidRequest":
        field = reply.details["field"]
        assert isinstance(field, str), (field, body[:500])
        roots = {*params, *COMMANDS[command].params.model_fields, "client_id", "parameters"}
        assert any(field == r or field.startswith(r + ".") for r in roots), (field, body[:500])
    # The dispatcher still serves, and the seeded session is intact unless the
    # request was a successful write to it.
    assert result_of(ask(d, "ping", message="ok"))["message"] == "ok"


# --- state round trip ---------------------------------------------------------------

state_values = st.recursive(
    exact_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
).filter(lambda v: v is not None)
state_objects = st.dictionaries(st.text(max_size=12), state_values, max_size=8)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


@settings(SETTINGS, max_examples=150)
@given(
    state=state_objects,
    update_encoding=st.sampled_from(["command", "envelope"]),
    restore_encoding=st.sampled_from(["command", "envelope"]),
)
def test_state_round_trips_exactly(
    fake_dispatcher: MakeDispatcher,
    state: dict[str, Any],
    update_encoding: Encoding,
    restore_encoding: Encoding,
) -> None:
    d = fake_dispatcher()
    sid = result_of(ask(d, "create_session", client_id=OWNER))["session_id"]
    updated = result_of(
        ask(d, "update_session_state", update_encoding, session_id=sid, state_data=state)
    )
    assert updated["update_successful"] is True and updated["version"] == 2
    assert canonical(updated["session_state"]) == canonical(state)
    restored = result_of(ask(d, "restore_session", restore_encoding, session_id=sid))
    assert canonical(restored["session_state"]) == canonical(state)
    assert restored["version"] == 2


# --- merge semantics against a model -------------------------------------------------

MODEL_KEYS = ("a", "b", "c", "", "d.e", "\u00e9", "\U0001f600")


@st.composite
def update_ops(draw: st.DrawFn) -> tuple[bool, dict[str, Any], str]:
    """(replace, state_data, which expected_version: none, right or wrong)."""
    replace = draw(st.integers(0, 4)) == 0
    state_data = draw(
        st.dictionaries(st.sampled_from(MODEL_KEYS), st.none() | exact_values, max_size=5)
    )
    version = draw(st.sampled_from(["none", "none", "right", "wrong"]))
    return replace, state_data, version


@settings(SETTINGS, max_examples=100)
@given(ops=st.lists(update_ops(), min_size=1, max_size=12), wrong_by=st.integers(-3, 3))
def test_updates_match_a_dict_model(
    fake_dispatcher: MakeDispatcher,
    ops: list[tuple[bool, dict[str, Any], str]],
    wrong_by: int,
) -> None:
    d = fake_dispatcher()
    sid = result_of(ask(d, "create_session", client_id=OWNER))["session_id"]
    model: dict[str, Any] = {}
    version = 1
    for replace, state_data, which in ops:
        params: dict[str, Any] = {"session_id": sid, "state_data": state_data}
        if replace:
            params["replace"] = True
        if which == "right":
            params["expected_version"] = version
        elif which == "wrong":
            params["expected_version"] = max(0, version + (wrong_by or 1))
        reply = valid_reply(ask(d, "update_session_state", **params))
        if which == "wrong":
            assert reply.code == "VersionConflict", reply
            assert reply.details["current_version"] == version
            continue
        assert reply.code is None, reply
        if replace:
            model = {k: v for k, v in state_data.items() if v is not None}
        else:
            for key, value in state_data.items():
                if value is None:
                    model.pop(key, None)
                else:
                    model[key] = value
        version += 1
        assert reply.result["version"] == version
        assert canonical(reply.result["session_state"]) == canonical(model)
    restored = result_of(ask(d, "restore_session", session_id=sid))
    assert canonical(restored["session_state"]) == canonical(model)
    assert restored["version"] == version


@settings(SETTINGS, max_examples=100)
@given(
    wide=st.integers(min_value=U64_MAX + 1) | st.integers(max_value=I64_MIN - 1),
    encoding=st.sampled_from(["command", "envelope"]),
)
def test_wide_integers_are_refused_not_rounded(
    fake_dispatcher: MakeDispatcher, wide: int, encoding: Encoding
) -> None:
    """An integer orjson would turn into a float is InvalidRequest naming its
    field, with the request's id; the state is unchanged."""
    d = fake_dispatcher()
    sid = result_of(ask(d, "create_session", client_id=OWNER))["session_id"]
    reply = valid_reply(
        ask(d, "update_session_state", encoding, session_id=sid, state_data={"n": [1, wide]})
    )
    assert reply.code == "InvalidRequest", reply
    assert reply.details["field"] == "state_data.n.1"
    assert reply.encoding == encoding
    restored = result_of(ask(d, "restore_session", session_id=sid))
    assert restored["session_state"] == {} and restored["version"] == 1
