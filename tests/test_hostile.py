"""Hostile input against a live front worker (real redis-server, ZeroMQ over TCP).

Every message here is malformed, mistyped, oversized or otherwise hostile, and
none of them is a valid request that could change anything. Each must get
exactly one error reply that is strict JSON, carries a code from PROTOCOL.md's
table and no stack trace, and has a fresh timestamp. Afterwards Redis must be
exactly as before (every key, its type and value; TTLs ignored) and the worker
must still serve. Cases are generated from seeded random.Random instances, so
a failure reproduces.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import pytest
import redis
import zmq

from tests.conftest import FrontProcess
from tests.spec import DETAILS_KEY, SPEC_CODES
from workers.client import Client

pytestmark = pytest.mark.integration

Ctx = zmq.Context[zmq.Socket[bytes]]
Encoding = Literal["command", "envelope"]
Snapshot = dict[bytes, tuple[Any, Any]]
ENCODINGS: tuple[Encoding, ...] = ("command", "envelope")

SEED = 20260105
MIB = 1024 * 1024
MAX_REQUEST_BYTES = 10 * MIB  # default max_request_bytes
MAX_STATE_BYTES = MIB  # default cap on state plus context
CLIENT_A = "hostile-alice"
CLIENT_B = "hostile-bob"
# 19 digits: the service then looks for integers wider than 64 bits
LONG_DIGITS = 1234567890123456789

CODES = SPEC_CODES
INVALID = frozenset({"InvalidRequest"})
NOT_FOUND = frozenset({"SessionNotFound"})
TOO_LARGE = frozenset({"PayloadTooLarge"})
CLOCK_SLACK = 1.0  # seconds a reply timestamp may lie outside the exchange
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


# --- the protocol, as PROTOCOL.md states it -----------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    required: bool = False


SID = Param("session_id", "session_id", required=True)
CID = Param("client_id", "client_id")
SIGNATURES: dict[str, tuple[Param, ...]] = {
    "create_session": (
        Param("client_id", "client_id", required=True),
        Param("timeout", "timeout"),
        Param("client_info", "object"),
    ),
    "restore_session": (SID, CID),
    "update_session_state": (
        SID,
        Param("state_data", "object", required=True),
        Param("expected_version", "version"),
        Param("replace", "bool"),
        CID,
    ),
    "close_session": (SID, Param("save_state", "bool"), CID),
    "get_session_info": (SID, CID),
    "list_client_sessions": (Param("client_id", "client_id", required=True),),
    "get_session_statistics": (CID,),
    "save_context": (
        SID,
        Param("context", "context", required=True),
        Param("expected_version", "version"),
        CID,
    ),
    "load_context": (SID, CID),
    "get_context_summary": (SID, CID),
    "clear_context": (SID, Param("parts", "parts"), CID),
    "record_evaluation": (
        SID,
        Param("code", "text", required=True),
        Param("result_type", "short_text"),
        Param("has_error", "bool"),
        Param("execution_time", "duration"),
        Param("tool_id", "short_text"),
        CID,
    ),
    "register_object": (
        SID,
        Param("object_id", "object_id", required=True),
        Param("description", "text", required=True),
        Param("metadata", "object"),
        CID,
    ),
    "release_object": (SID, Param("object_id", "object_id", required=True), CID),
    "ping": (Param("message", "message"), CID),
    "describe": (CID,),
}
SESSION_COMMANDS = tuple(name for name, sig in SIGNATURES.items() if SID in sig)
# Commands that write or refresh: a hostile request carrying one must not run.
WRITES = (
    "update_session_state",
    "save_context",
    "close_session",
    "create_session",
    "clear_context",
    "record_evaluation",
    "register_object",
    "release_object",
    "restore_session",
    "load_context",
)

NOT_STRINGS: tuple[Any, ...] = (0, 1, -7, 1.5, True, False, [], ["x"], {}, {"a": "b"})
# Values of the wrong type (or out of range) for each kind of parameter. null is
# added for required parameters only: for an optional one it may mean "absent".
WRONG: dict[str, tuple[Any, ...]] = {
    "session_id": (*NOT_STRINGS, "", "s" * 129),
    "client_id": (
        *NOT_STRINGS,
        "",
        "a b",
        "c" * 129,
        "alice\n",
        "al/ice",
        "caf\u00e9",
        "*",
        "a\u0000b",
    ),
    "text": NOT_STRINGS,
    "short_text": (*NOT_STRINGS, "t" * 257),
    "object_id": (*NOT_STRINGS, "", "o" * 257),
    "message": (*NOT_STRINGS, "m" * 4097),
    "timeout": (
        "3600",
        "60",
        60.0,
        1.5,
        True,
        False,
        [],
        [60],
        {},
        {"seconds": 60},
        0,
        -1,
        2_592_001,
        10**20,
    ),
    "version": ("1", "2", 1.0, 2.0, True, False, [], [1], {}, {"v": 1}, -1, 2**53 + 1, 10**30),
    "bool": ("true", "false", 1, 0, 1.0, "yes", [], [True], {}, {"b": True}),
    "object": ([], [1, 2], "x", "{}", 1, 0.5, True, False),
    "context": (
        [],
        "x",
        1,
        True,
        {},
        {"workspace_context": []},
        {"workspace_context": "x"},
        {"inspector_state": 1},
        {"object_registry": []},
        {"object_registry": {"": 1}},
        {"object_registry": {"o" * 257: 1}},
        {"evaluation_history": {}},
        {"evaluation_history": "x"},
        {"bogus_part": {}},
    ),
    "parts": (
        "workspace_context",
        {},
        [1],
        ["bogus"],
        [None],
        True,
        1,
        [["workspace_context"]],
        ["workspace_context", "Workspace_Context"],
    ),
    "duration": ("12", True, [], {}, -1, -0.5, [1.5], "NaN", "Infinity"),
}
UNKNOWN_PARAMS = ("expected_versoin", "sessionId", "", "__proto__", "client-id", "id", "state")
UNKNOWN_COMMANDS = (
    "PING",
    "pIng",
    "ping ",
    " ping",
    "ping\n",
    "ping\u0000",
    "p\u0131ng",
    "\uff50\uff49\uff4e\uff47",
    "pi\u200bng",
    "createSession",
    "create-session",
    "Create_Session",
    "CREATE_SESSION",
    "create_sessions",
    "get_session",
    "delete_session",
    "flushall",
    "FLUSHALL",
    "EVAL",
    "KEYS",
    "__init__",
    "__class__",
    "__proto__",
    "constructor",
    "toString",
    "lookup",
    "handle",
    "../describe",
    "describe;",
    "*",
    "null",
    "0",
    "x" * 64,
)


def pascal(command: str) -> str:
    return "".join(part.capitalize() for part in command.split("_"))


KNOWN_NAMES = frozenset(SIGNATURES) | {pascal(n) for n in SIGNATURES}


def dumps(value: Any) -> bytes:
    """Strict JSON; ensure_ascii turns lone surrogates into \\uXXXX escapes."""
    return json.dumps(value, allow_nan=False).encode("ascii")


def command_form(rid: Any, name: Any, params: Any, **top: Any) -> dict[str, Any]:
    return {"id": rid, "command": name, "parameters": params, **top}


def envelope_form(
    rid: Any, request_type: Any, params: Any, *, version: Any = "1.0.0", ptype: Any = "Request"
) -> dict[str, Any]:
    return {
        "id": rid,
        "version": version,
        "timestamp": "2026-01-05T10:30:00Z",
        "payload": {"type": ptype, "data": {"request_type": request_type, "params": params}},
    }


def wire_name(encoding: Encoding, command: str) -> str:
    return command if encoding == "command" else pascal(command)


def request_body(encoding: Encoding, rid: Any, command: str, params: Any) -> bytes:
    if encoding == "command":
        return dumps(command_form(rid, command, params))
    return dumps(envelope_form(rid, pascal(command), params))


# --- the live service and its state --------------------------------------------


def snapshot(r: redis.Redis) -> Snapshot:
    """Every key with its type and value, TTLs ignored. Rate-limit buckets
    (a client index's fields !r, and !x, its expiry, which they extend) are
    left out: they are accounting, and the valid requests sent alongside the
    hostile ones rightly take tokens."""
    out: Snapshot = {}
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        value: Any
        if kind == b"string":
            value = r.get(key)
        elif kind == b"hash":
            value = sorted(
                (f, v) for f, v in r.hgetall(key).items() if f not in (b"!r", b"!x")
            )
        elif kind == b"zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            value = sorted(r.smembers(key))
        elif kind == b"list":
            value = r.lrange(key, 0, -1)
        else:
            value = r.dump(key)
        out[key] = (kind, value)
    return out


@dataclass
class World:
    """Sessions with state and context, created through the client, and the
    Redis snapshot that every test must leave untouched."""

    front: FrontProcess
    ctx: Ctx
    redis: redis.Redis
    sa: str  # CLIENT_A's, with state, context, history and registry
    sb: str  # CLIENT_B's, with state
    sc: str  # CLIENT_B's, closed with save_state (inactive, restorable)
    versions: dict[str, int]
    before: Snapshot
    created_at: float  # wall clock, after the worker was ready

    @property
    def sessions(self) -> tuple[str, str, str]:
        return (self.sa, self.sb, self.sc)

    def other_client(self, sid: str) -> str:
        return CLIENT_B if sid == self.sa else CLIENT_A


@pytest.fixture
def world(
    front: FrontProcess, redis_client: redis.Redis, client: Client, zmq_context: Ctx
) -> Iterator[World]:
    created_at = time.time()
    call = client.call
    sa = call(
        "create_session",
        client_id=CLIENT_A,
        timeout=900,
        client_info={"terminal": "xterm-256color", "tags": []},
    )["session_id"]
    call(
        "update_session_state",
        session_id=sa,
        state_data={"workspace": "3 + 4", "variables": [], "nested": {"a": [1, {"b": None}]}},
    )
    call(
        "save_context",
        session_id=sa,
        context={
            "workspace_context": {"variables": {"x": 1}, "text": "x + 1"},
            "inspector_state": {"history": [1, 2], "selected_object": "obj-1"},
            "object_registry": {"obj-1": {"class": "OrderedCollection"}},
            "evaluation_history": [{"code": "1 + 1", "result": "2"}],
        },
    )
    call("record_evaluation", session_id=sa, code="3 + 4", result="7", result_type="SmallInteger")
    call("register_object", session_id=sa, object_id="obj-2", description="a Point")
    sb = call("create_session", client_id=CLIENT_B)["session_id"]
    call("update_session_state", session_id=sb, state_data={"n": 1, "empty": {}})
    sc = call("create_session", client_id=CLIENT_B, timeout=600)["session_id"]
    call("update_session_state", session_id=sc, state_data={"kept": [[], {}]})
    call("close_session", session_id=sc, save_state=True)
    versions = {sid: call("get_session_info", session_id=sid)["version"] for sid in (sa, sb, sc)}
    before = snapshot(redis_client)
    assert len([k for k in before if b":s:" in k]) == 3
    yield World(front, zmq_context, redis_client, sa, sb, sc, versions, before, created_at)


def changed_keys(world: World) -> list[bytes]:
    after = snapshot(world.redis)
    keys = world.before.keys() | after.keys()
    return sorted(k for k in keys if world.before.get(k) != after.get(k))


def assert_unharmed(world: World) -> None:
    """No state changed, the worker is alive and still answers real requests."""
    assert world.front.proc is not None and world.front.proc.poll() is None, "worker died"
    changed = changed_keys(world)
    assert not changed, f"hostile input changed Redis keys: {changed[:10]}"
    with Client(world.front.endpoint, timeout=5.0, retries=0, context=world.ctx) as c:
        assert c.call("ping", message="still serving")["message"] == "still serving"
        for sid, version in world.versions.items():
            info = c.call("get_session_info", session_id=sid)
            assert info["session_id"] == sid and info["version"] == version
        assert c.call("get_session_info", session_id=world.sa)["is_active"] is True


# --- cases, exchanges and reply checks ------------------------------------------


@dataclass(frozen=True)
class Case:
    label: str
    body: bytes
    codes: frozenset[str] = INVALID
    reply_id: str | int | None = None  # the id the reply must carry
    # The reply's encoding; None: either (a body that does not parse has none).
    encoding: Encoding | None = "command"
    field: str | None = None  # details.field is this or starts with this + "."
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # must be a subset of details
    via: Literal["any", "req"] = "any"
    id_optional: bool = False  # the reply may carry the id or null (ordered checks only)


class Cases:
    """A seeded generator's output: cases with unique request ids."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.items: list[Case] = []
        self._n = 0

    def rid(self) -> str:
        self._n += 1
        return f"hostile-{self._n:05d}"

    def add(self, label: str, body: bytes, **kw: Any) -> None:
        self.items.append(Case(label, body, **kw))

    def request(
        self,
        label: str,
        encoding: Encoding,
        name: str,
        params: Any,
        *,
        codes: frozenset[str] = INVALID,
        field: str | None = None,
        details: dict[str, Any] | None = None,
        **top: Any,
    ) -> None:
        """One request with a valid, unique id; name is sent as given."""
        rid = self.rid()
        if encoding == "command":
            obj = command_form(rid, name, params, **top)
        else:
            obj = {**envelope_form(rid, name, params), **top}
        self.add(
            label,
            dumps(obj),
            codes=codes,
            reply_id=rid,
            encoding=encoding,
            field=field,
            details=details or {},
        )

    def anonymous(self, label: str, body: bytes, **kw: Any) -> None:
        """A case whose reply cannot carry an id (the id is unreadable or refused)."""
        kw.setdefault("encoding", None)
        self.add(label, body, reply_id=None, **kw)


@dataclass(frozen=True)
class ErrorReply:
    encoding: Encoding
    id: Any
    code: str
    details: dict[str, Any]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_error_reply(raw: bytes, t0: float, t1: float) -> ErrorReply | str:
    """The reply if it is a well-formed error reply, else what is wrong with it."""
    if b"Traceback" in raw or b'File "' in raw:
        return f"stack trace in reply: {raw[:300]!r}"
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        # Lone surrogate escapes parse in Python but not in serde_json or JSON.parse.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except ValueError as exc:
        return f"reply is not strict JSON ({exc}): {raw[:300]!r}"
    if not isinstance(obj, dict):
        return f"reply is not an object: {raw[:300]!r}"
    try:
        encoding: Encoding
        if "payload" in obj:
            encoding = "envelope"
            if obj["version"] != "1.0.0" or obj["payload"]["type"] != "Response":
                return f"bad envelope: {raw[:300]!r}"
            data = obj["payload"]["data"]
            if data["response_type"] != "Error":
                return f"not an error: {raw[:300]!r}"
            error = data["data"]
            code, message, details = error["code"], error["message"], error["details"]
        else:
            encoding = "command"
            if obj["status"] != "error" or "result" in obj:
                return f"not an error: {raw[:300]!r}"
            code, message, details = obj["error_type"], obj["error"], obj["details"]
        rid, stamp = obj["id"], obj["timestamp"]
    except (KeyError, TypeError) as exc:
        return f"reply lacks {exc}: {raw[:300]!r}"
    if code not in CODES:
        return f"error code {code!r} is not in the protocol's table"
    if not isinstance(message, str) or not message:
        return f"error message {message!r} is not a non-empty string"
    if not isinstance(details, dict):
        return f"details {details!r} is not an object"
    if code in DETAILS_KEY and DETAILS_KEY[code] not in details:
        return f"{code} reply without details.{DETAILS_KEY[code]}: {raw[:300]!r}"
    if not isinstance(stamp, str) or not TIMESTAMP.fullmatch(stamp):
        return f"timestamp {stamp!r} is not ISO-8601 UTC with Z"
    when = datetime.fromisoformat(stamp).timestamp()
    if not t0 - CLOCK_SLACK <= when <= t1 + CLOCK_SLACK:
        return f"{code} reply timestamp {stamp} is not within the exchange ({t0:.3f}-{t1:.3f})"
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        return f"reply id {rid!r} is neither a string, an integer nor null"
    return ErrorReply(encoding, rid, code, details)


def check_case(case: Case, reply: ErrorReply) -> list[str]:
    problems: list[str] = []
    where = f"{case.label} (id {case.reply_id!r})"
    if reply.code not in case.codes:
        expected = sorted(case.codes)
        problems.append(f"{where}: got {reply.code} {reply.details}, expected one of {expected}")
    if case.encoding is not None and reply.encoding != case.encoding:
        problems.append(f"{where}: reply in {reply.encoding} form, expected {case.encoding}")
    if reply.code == "InvalidRequest" and case.field is not None:
        got = reply.details.get("field")
        if not isinstance(got, str) or not (got == case.field or got.startswith(case.field + ".")):
            problems.append(f"{where}: details.field {got!r}, expected {case.field!r}")
    if reply.code in case.codes:
        for key, value in case.details.items():
            if reply.details.get(key) != value:
                problems.append(f"{where}: details.{key} {reply.details.get(key)!r} != {value!r}")
    return problems


def _open(ctx: Ctx, kind: int, endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def exchange_dealers(
    ctx: Ctx,
    endpoint: str,
    groups: Sequence[Sequence[bytes]],
    windows: Sequence[int],
    timeout: float = 30,
) -> list[list[bytes]]:
    """Each group from its own DEALER, with up to its window of requests in
    flight; the reply bodies of each group, in arrival order."""
    socks = [_open(ctx, zmq.DEALER, endpoint) for _ in groups]
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    sent = [0] * len(groups)
    replies: list[list[bytes]] = [[] for _ in groups]
    deadline = time.monotonic() + timeout
    try:
        while any(len(r) < len(g) for r, g in zip(replies, groups, strict=True)):
            for n, (sock, group) in enumerate(zip(socks, groups, strict=True)):
                while sent[n] < len(group) and sent[n] - len(replies[n]) < windows[n]:
                    sock.send_multipart([b"", group[sent[n]]])
                    sent[n] += 1
            if time.monotonic() > deadline:
                break
            for sock, _ in poller.poll(200):
                n = socks.index(sock)
                while sock.poll(0, zmq.POLLIN):
                    frames = sock.recv_multipart()
                    assert len(frames) == 2 and frames[0] == b"", f"reply frames {frames!r:.200}"
                    replies[n].append(frames[1])
        time.sleep(0.05)
        for n, sock in enumerate(socks):  # nothing is answered twice
            while sock.poll(50, zmq.POLLIN):
                replies[n].append(sock.recv_multipart()[-1])
    finally:
        for sock in socks:
            sock.close(linger=0)
    return replies


def exchange_req(
    ctx: Ctx, endpoint: str, bodies: Sequence[bytes], timeout: float = 10
) -> list[bytes]:
    """Lock-step over one REQ socket: replies in request order."""
    sock = _open(ctx, zmq.REQ, endpoint)
    replies: list[bytes] = []
    try:
        for body in bodies:
            sock.send(body)
            assert sock.poll(int(timeout * 1000), zmq.POLLIN), f"no reply to {body[:120]!r}"
            replies.append(sock.recv())
    finally:
        sock.close(linger=0)
    return replies


def check_unordered(
    cases: Sequence[Case], raws: Sequence[bytes], t0: float, t1: float
) -> list[str]:
    """Replies matched to cases by id; id-less replies as a multiset of codes."""
    problems: list[str] = []
    if len(raws) != len(cases):
        problems.append(f"{len(cases)} requests got {len(raws)} replies")
    by_id: dict[tuple[type, Any], Case] = {}
    expected_anon: Counter[str] = Counter()
    for case in cases:
        if case.reply_id is None:
            assert len(case.codes) == 1, f"{case.label}: an id-less case needs one expected code"
            expected_anon[next(iter(case.codes))] += 1
        else:
            key = (type(case.reply_id), case.reply_id)
            assert key not in by_id, f"duplicate request id {case.reply_id!r}"
            by_id[key] = case
    got_anon: Counter[str] = Counter()
    for raw in raws:
        reply = parse_error_reply(raw, t0, t1)
        if isinstance(reply, str):
            problems.append(reply)
        elif reply.id is None:
            got_anon[reply.code] += 1
        elif (key := (type(reply.id), reply.id)) not in by_id:
            problems.append(f"reply with unexpected or repeated id {reply.id!r}: {reply}")
        else:
            problems += check_case(by_id.pop(key), reply)
    problems += [f"{c.label}: no reply with id {c.reply_id!r}" for c in by_id.values()]
    if got_anon != expected_anon:
        problems.append(f"id-less replies {dict(got_anon)} != expected {dict(expected_anon)}")
    return problems


def check_ordered(cases: Sequence[Case], raws: Sequence[bytes], t0: float, t1: float) -> list[str]:
    problems: list[str] = []
    for case, raw in zip(cases, raws, strict=True):
        reply = parse_error_reply(raw, t0, t1)
        if isinstance(reply, str):
            problems.append(f"{case.label}: {reply}")
            continue
        same = reply.id == case.reply_id and type(reply.id) is type(case.reply_id)
        if not same and not (case.id_optional and reply.id is None):
            problems.append(f"{case.label}: reply id {reply.id!r}, expected {case.reply_id!r}")
        problems += check_case(case, reply)
    return problems


def run_cases(
    world: World, cases: Sequence[Case], rng: random.Random, req_share: float = 0.15
) -> None:
    """Send every case (most through two DEALERs with many in flight, a seeded
    share and the cases marked "req" through a REQ socket), check every reply,
    then check that nothing changed and the worker still serves."""
    req = [c for c in cases if c.via == "req" or rng.random() < req_share]
    req_ids = {id(c) for c in req}
    rest = [c for c in cases if id(c) not in req_ids]
    groups = [rest[0::2], rest[1::2]]
    endpoint = world.front.endpoint
    problems: list[str] = []
    bodies = [[c.body for c in g] for g in groups]
    # A third DEALER trickles real requests in between: they must all succeed.
    bystanders = bystander_requests(world, 2 * len(rest) // 64 + 4)
    bodies.append(list(bystanders.values()))
    t0 = time.time()
    *replies, served = exchange_dealers(world.ctx, endpoint, bodies, windows=[64, 64, 2])
    t1 = time.time()
    for group, raws in zip(groups, replies, strict=True):
        problems += check_unordered(group, raws, t0, t1)
    problems += check_bystanders(world, bystanders, served)
    t0 = time.time()
    raws = exchange_req(world.ctx, endpoint, [c.body for c in req])
    problems += check_ordered(req, raws, t0, time.time())
    if problems and (changed := changed_keys(world)):
        problems.insert(0, f"hostile input changed Redis keys: {changed[:10]}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(p[:600] for p in problems[:25])
    assert_unharmed(world)


def bystander_requests(world: World, count: int) -> dict[str, bytes]:
    """Valid requests that change nothing (ping, get_session_info), by id."""
    out: dict[str, bytes] = {}
    for n in range(count):
        rid = f"bystander-{n}"
        if n % 2:
            out[rid] = dumps(command_form(rid, "ping", {"message": rid}))
        else:
            sid = world.sessions[n // 2 % 3]
            out[rid] = dumps(envelope_form(rid, "GetSessionInfo", {"session_id": sid}))
    return out


def check_bystanders(world: World, sent: dict[str, bytes], raws: Sequence[bytes]) -> list[str]:
    problems: list[str] = []
    if len(raws) != len(sent):
        problems.append(f"{len(sent)} bystander requests got {len(raws)} replies")
    for raw in raws:
        reply = json.loads(raw)
        rid = reply.get("id")
        if rid not in sent:
            problems.append(f"bystander reply with unexpected id: {raw[:300]!r}")
            continue
        request = json.loads(sent.pop(rid))
        if "payload" in request:
            data = reply["payload"]["data"]
            sid = request["payload"]["data"]["params"]["session_id"]
            ok = data["response_type"] == "GetSessionInfo" and data["data"]["session_id"] == sid
            ok = ok and data["data"]["version"] == world.versions[sid]
        else:
            ok = reply["status"] == "success" and reply["result"]["message"] == rid
        if not ok:
            problems.append(f"bystander {rid} failed: {raw[:300]!r}")
    return problems


# --- generators -----------------------------------------------------------------


def valid_params(world: World, command: str, rng: random.Random) -> dict[str, Any]:
    """Parameters that make a valid request (for mutating commands: a real write)."""
    sid = rng.choice(world.sessions)
    if command == "create_session":
        return {"client_id": "hostile-newcomer", "timeout": 60, "client_info": {"x": 1}}
    if command == "list_client_sessions":
        return {"client_id": CLIENT_A}
    if command in ("ping", "describe", "get_session_statistics"):
        return {}
    params: dict[str, Any] = {"session_id": sid}
    if command == "update_session_state":
        params["state_data"] = {"workspace": "overwritten", "variables": None}
    elif command == "save_context":
        params["context"] = {"workspace_context": {"variables": {}}, "object_registry": None}
    elif command == "record_evaluation":
        params.update(code="Smalltalk at: #Hostile put: 1", result="1")
    elif command == "register_object":
        params.update(object_id="obj-hostile", description="d", metadata={"m": 1})
    elif command == "release_object":
        params["object_id"] = "obj-1"
    elif command == "close_session":
        params["save_state"] = False
    return params


def mutating_bodies(world: World, rid: Callable[[], str]) -> list[bytes]:
    """Valid writes to the real sessions, in both encodings (the seeds that
    byte-level corruption turns into garbage)."""
    out: list[bytes] = []
    rng = random.Random(SEED)
    for command in WRITES:
        for e in ENCODINGS:
            out.append(request_body(e, rid(), command, valid_params(world, command, rng)))
    return out


def garbage_cases(world: World, seed: int) -> Cases:
    cs = Cases(seed)
    rng = cs.rng
    seeds = mutating_bodies(world, cs.rid)

    # Random bytes, empty body included.
    for n in range(160):
        size = rng.choice([0, 1, 2, 3, 8, 16, 64, 256, 1024, rng.randrange(4096)])
        cs.anonymous(f"random bytes #{n}", rng.randbytes(size))
    cs.anonymous("empty body", b"")

    # Valid writes, corrupted: truncated, invalid UTF-8, raw control characters.
    bad_utf8 = (
        b"\x80",
        b"\xbf",
        b"\xc0\xaf",
        b"\xc1\x81",
        b"\xed\xa0\x80",
        b"\xed\xbf\xbf",
        b"\xf5\x80\x80\x80",
        b"\xf8\x88\x80\x80\x80",
        b"\xfe",
        b"\xff",
        b"\xe2\x82",
        b"\xf0\x9f\x98",
    )
    controls = [bytes([c]) for c in range(32) if c not in (9, 10, 13)]  # not JSON whitespace
    for n in range(80):
        body = rng.choice(seeds)
        cs.anonymous(f"truncated write #{n}", body[: rng.randrange(len(body))])
    for n in range(100):
        body = rng.choice(seeds)
        at = rng.randrange(len(body) + 1)
        cs.anonymous(f"invalid UTF-8 #{n}", body[:at] + rng.choice(bad_utf8) + body[at:])
    for n in range(60):
        body = rng.choice(seeds)
        at = rng.randrange(1, len(body))
        cs.anonymous(f"control byte #{n}", body[:at] + rng.choice(controls) + body[at:])
    for n in range(40):
        mutable = bytearray(rng.choice(seeds))
        mutable[rng.randrange(len(mutable))] = rng.randrange(0x80, 0x100)
        cs.anonymous(f"high byte #{n}", bytes(mutable))

    # Not strict JSON, around a real write. Each value also goes the other
    # parser's way (a 19-digit number elsewhere in the message).
    values = (
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "inf",
        "1e999",
        "-1e999",
        "1E400",
        "+1",
        ".5",
        "1.",
        "01",
        "0x10",
        "1_000",
        "True",
        "None",
        "undefined",
        "'single'",
        '"unterminated',
        '"bad \\x escape"',
        '"short \\u12 escape"',
        '"\\ud800"',
        '"\\udc00"',
        '"\\ud800\\u0041"',
        '"\\ude00\\ud83d"',
        '"raw \x01 control"',
        '"raw \x1f control"',
        "[1,]",
        '{"a":1,}',
        "{a:1}",
        "[1 2]",
        '{"a" 1}',
        "1 // comment",
        "/* comment */ 1",
        "[" * 3,
        "1" * 5000,
    )
    for value in values:
        for extra in ("", f',"big":{LONG_DIGITS}'):
            rid = cs.rid()
            text = (
                f'{{"id":"{rid}","command":"update_session_state","parameters":'
                f'{{"session_id":"{world.sa}","state_data":{{"k":{value}{extra}}}}}}}'
            )
            label = f"state_data value {value[:20]!r}{' (long digits)' * bool(extra)}"
            cs.anonymous(label, text.encode())
    for where, template in (
        ("id", '{"id":VALUE,"command":"ping"}'),
        (
            "timeout",
            '{"command":"create_session","parameters":{"client_id":"nan-1","timeout":VALUE}}',
        ),
        (
            "expected_version",
            f'{{"command":"update_session_state","parameters":{{"session_id":"{world.sb}",'
            '"state_data":{"z":1},"expected_version":VALUE}}',
        ),
        (
            "envelope version",
            '{"id":"e","version":VALUE,"payload":{"type":"Request","data":'
            '{"request_type":"Ping","params":{}}}}',
        ),
    ):
        for value in ("NaN", "Infinity", "-Infinity", "1e999", "1" * 5000):
            cs.anonymous(f"{value[:10]} as {where}", template.replace("VALUE", value).encode())

    # Lone surrogates in every kind of place, both parsers.
    sur = ("\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ud800x", "\\udc00\\ud800")
    for s in sur:
        for extra in ("", f',"big":{LONG_DIGITS}'):
            for text in (
                f'{{"id":"a{s}","command":"ping"{extra}}}',
                f'{{"id":"a","command":"ping{s}"{extra}}}',
                f'{{"id":"a","command":"ping","parameters":{{"message":"{s}"}}{extra}}}',
                f'{{"command":"create_session","parameters":{{"client_id":"x{s}"}}{extra}}}',
                f'{{"command":"update_session_state","parameters":{{"session_id":"{world.sa}",'
                f'"state_data":{{"{s}":1}}}}{extra}}}',
                f'{{"command":"update_session_state","parameters":{{"session_id":"{world.sa}",'
                f'"state_data":{{"k":["{s}"]}}}}{extra}}}',
                f'{{"command":"save_context","parameters":{{"session_id":"{world.sa}",'
                f'"context":{{"object_registry":{{"{s}":1}}}}}}{extra}}}',
                f'{{"id":"e","version":"1.0.0","payload":{{"type":"Request","data":'
                f'{{"request_type":"UpdateSessionState","params":{{"session_id":"{world.sb}",'
                f'"state_data":{{"k":"{s}"}}}}}}}}{extra}}}',
            ):
                cs.anonymous(f"lone surrogate {s} in {text[:60]}", text.encode())

    # Strict JSON that is not one request object; other framings of JSON.
    ping = b'{"command":"ping"}'
    for label, body in (
        ("whitespace", b" \n\t "),
        ("null", b"null"),
        ("true", b"true"),
        ("number", b"0"),
        ("negative", b"-1"),
        ("float", b"1.5"),
        ("string", b'"ping"'),
        ("array", b"[]"),
        ("array of request", b"[" + ping + b"]"),
        ("empty object", b"{}"),
        ("two objects", ping + b" " + ping),
        ("trailing garbage", ping + b"x"),
        ("trailing NUL", ping + b"\x00"),
        ("extra brace", ping + b"}"),
        ("unclosed", ping[:-1]),
        ("single quotes", b"{'command':'ping'}"),
        ("unquoted key", b'{command:"ping"}'),
        ("trailing comma", b'{"command":"ping",}'),
        ("BOM", b"\xef\xbb\xbf" + ping),
        ("UTF-16LE", ping.decode().encode("utf-16-le")),
        ("UTF-16BE", ping.decode().encode("utf-16-be")),
        ("UTF-16 with BOM", ping.decode().encode("utf-16")),
        ("UTF-32", ping.decode().encode("utf-32")),
        ("latin-1 in string", b'{"command":"ping","parameters":{"message":"caf\xe9"}}'),
        ("overlong slash", b'{"command":"ping","parameters":{"message":"\xc0\xaf"}}'),
        ("CESU surrogate pair", b'{"command":"ping","parameters":{"message":"\xed\xa0\xbd"}}'),
    ):
        cs.anonymous(label, body)

    # Deep nesting, far past any parser's limit, both parsers.
    deep = 100_000
    cs.anonymous("100k [", b"[" * deep)
    cs.anonymous("100k [ closed", b"[" * deep + b"]" * deep)
    cs.anonymous("100k {", b'{"a":' * deep)
    cs.anonymous("100k [ long digits", b"[%d," % LONG_DIGITS + b"[" * deep + b"]" * deep + b"]")
    cs.anonymous("100k { long digits", b'{"n":%d,"a":' % LONG_DIGITS + b'{"a":' * deep)
    nest = '{"d":' * 2000 + "1" + "}" * 2000
    for extra in ("", f',"big":{LONG_DIGITS}'):
        sa, sb = world.sa, world.sb
        for command, params in (
            ("update_session_state", f'{{"session_id":"{sa}","state_data":{{"k":{nest}}}}}'),
            ("create_session", f'{{"client_id":"deep","client_info":{{"k":{nest}}}}}'),
            ("save_context", f'{{"session_id":"{sa}","context":{{"workspace_context":{nest}}}}}'),
            ("record_evaluation", f'{{"session_id":"{sb}","code":"x","result":{nest}}}'),
            (
                "register_object",
                f'{{"session_id":"{sa}","object_id":"o","description":"d","metadata":{nest}}}',
            ),
        ):
            text = f'{{"id":"{cs.rid()}","command":"{command}","parameters":{params}{extra}}}'
            cs.anonymous(f"2000-deep {command}{' (long digits)' * bool(extra)}", text.encode())
    cs.anonymous("2000-deep id", f'{{"id":{"[" * 2000}{"]" * 2000},"command":"ping"}}'.encode())
    return cs


def huge_cases(world: World, seed: int) -> Cases:
    cs = Cases(seed)
    big = "x" * (3 * MIB)
    sa, sb = world.sa, world.sb
    too_large: dict[str, Any] = {"codes": TOO_LARGE, "details": {"limit_bytes": MAX_STATE_BYTES}}
    registry: dict[str, Any] = {f"o{i}": {} for i in range(1001)}  # the default cap is 1000
    full: dict[str, Any] = {"codes": frozenset({"RegistryFull"}), "details": {"limit": 1000}}
    either: dict[str, Any] = {"codes": frozenset({"InvalidRequest", "SessionNotFound"})}
    table: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
        ("3 MB ping message", "ping", {"message": big}, {"field": "message"}),
        ("3 MB client id", "create_session", {"client_id": big}, {"field": "client_id"}),
        ("3 MB session id", "close_session", {"session_id": big}, either),
        ("3 MB unknown parameter", "get_session_info", {"session_id": sa, big: 1}, {"field": big}),
        (
            "3 MB state value",
            "update_session_state",
            {"session_id": sa, "state_data": {"b": big}},
            too_large,
        ),
        (
            "3 MB workspace",
            "save_context",
            {"session_id": sb, "context": {"workspace_context": {"b": big}}},
            too_large,
        ),
        ("3 MB evaluation", "record_evaluation", {"session_id": sa, "code": big}, too_large),
        (
            "3 MB object",
            "register_object",
            {"session_id": sa, "object_id": "big", "description": big},
            too_large,
        ),
        (
            "registry over its cap",
            "save_context",
            {"session_id": sa, "context": {"object_registry": registry}},
            full,
        ),
    ]
    for e in ENCODINGS:
        for label, command, params, expect in table:
            cs.request(f"{e} {label}", e, wire_name(e, command), params, **expect)
    # 140k keys: over the key cap (1000 by default), refused before Redis.
    keys_cap: dict[str, Any] = {
        "codes": TOO_LARGE,
        "details": {"limit": 1000, "limit_bytes": MAX_STATE_BYTES},
    }
    many = {"session_id": sb, "state_data": {f"k{i:06d}": 1 for i in range(140_000)}}
    cs.request("140k state keys", "command", "update_session_state", many, **keys_cap)
    nulls = {"session_id": sb, "state_data": {f"k{i:06d}": None for i in range(140_000)}}
    cs.request("140k state keys removed", "command", "update_session_state", nulls, **keys_cap)
    cs.request("3 MB command", "command", big, {}, field="command")
    cs.request("3 MB request type", "envelope", big, {}, field="payload")
    body = dumps(command_form(big, "ping", {}))
    cs.anonymous("3 MB id", body, encoding="command", field="id", via="req")
    body = dumps(envelope_form(big, "Ping", {}))
    cs.anonymous("3 MB envelope id", body, encoding="envelope", field="id", via="req")
    return cs


def parameter_cases(world: World, seed: int) -> Cases:
    """Every parameter of every command, wrongly typed, missing or misspelt; the
    rest of each request is valid (for writes: a real write to a real session)."""
    cs = Cases(seed)
    rng = cs.rng
    either = frozenset({"InvalidRequest", "VersionConflict"})
    for command, signature in SIGNATURES.items():
        names = {p.name for p in signature}
        for e in ENCODINGS:
            name = wire_name(e, command)
            for param in signature:
                wrong = (*WRONG[param.kind], None) if param.required else WRONG[param.kind]
                for value in wrong:
                    params = valid_params(world, command, rng)
                    params[param.name] = value
                    # An integer expected_version of no real version may be refused either way.
                    codes = either if param.kind == "version" and type(value) is int else INVALID
                    label = f"{e} {command}.{param.name}={value!r:.40}"
                    cs.request(label, e, name, params, codes=codes, field=param.name)
                if param.required:
                    params = valid_params(world, command, rng)
                    del params[param.name]
                    label = f"{e} {command} without {param.name}"
                    cs.request(label, e, name, params, field=param.name)
            for unknown in UNKNOWN_PARAMS:
                if unknown not in names:
                    params = {**valid_params(world, command, rng), unknown: 1}
                    label = f"{e} {command} with unknown {unknown!r}"
                    cs.request(label, e, name, params, field=unknown)

    # "A client_id may also stand at the top level of any request; it means the
    # same as a client_id parameter."
    for command in SIGNATURES:
        for e in ENCODINGS:
            name = wire_name(e, command)
            for value in (1, 1.5, True, [], {}, "", "a b", "c" * 129):
                params = valid_params(world, command, rng)
                params.pop("client_id", None)
                label = f"{e} {command} with top-level client_id={value!r:.20}"
                cs.request(label, e, name, params, field="client_id", client_id=value)
            params = {**valid_params(world, command, rng), "client_id": CLIENT_B}
            label = f"{e} {command} with two client ids"
            cs.request(label, e, name, params, field="client_id", client_id=CLIENT_A)

    # Real sessions named with another client's id (as a parameter or at the
    # top level): invisible, so untouched.
    for command in SESSION_COMMANDS:
        for e in ENCODINGS:
            params = valid_params(world, command, rng)
            other = world.other_client(params["session_id"])
            name = wire_name(e, command)
            label = f"{e} {command} as another client"
            cs.request(label, e, name, {**params, "client_id": other}, codes=NOT_FOUND)
            label = f"{e} {command} as another client, at the top level"
            cs.request(label, e, name, params, codes=NOT_FOUND, client_id=other)

    # Session ids that are no session (traversal, glob, injection, near misses).
    sa = world.sa
    bad_sids = [
        "../../etc/passwd",
        "*",
        "stui:{b00}:s:*",
        f"{sa}\n",
        f"{sa} ",
        f" {sa}",
        f"{sa}\u0000",
        sa[:-1],
        f"{sa}A",
        sa.replace(".", ":"),
        sa[:16],
        "0" * 16 + "." + "A" * 22,
        "\r\nFLUSHALL\r\n",
        "' OR '1'='1",
        "%2e%2e%2f",
        sa.upper() if sa.upper() != sa else f"Z{sa[1:]}",
    ]
    either_missing = frozenset({"SessionNotFound", "InvalidRequest"})
    for command in SESSION_COMMANDS:
        for e in ENCODINGS:
            for sid in rng.sample(bad_sids, 4):
                params = {**valid_params(world, command, rng), "session_id": sid}
                label = f"{e} {command} session_id={sid!r:.30}"
                name = wire_name(e, command)
                cs.request(label, e, name, params, codes=either_missing, field="session_id")
    return cs


def structure_cases(world: World, seed: int) -> Cases:
    """Broken envelopes and command objects, bad request ids, unknown commands,
    each wrapped around a real write."""
    cs = Cases(seed)
    rng = cs.rng
    writes = [(c, valid_params(world, c, rng)) for c in WRITES]

    def env(label: str, mutate: Callable[[dict[str, Any]], None], **kw: Any) -> None:
        command, params = rng.choice(writes)
        rid = cs.rid()
        obj = envelope_form(rid, pascal(command), json.loads(dumps(params)))
        mutate(obj)
        cs.add(f"envelope {label}", dumps(obj), reply_id=rid, encoding="envelope", **kw)

    def cmd(label: str, mutate: Callable[[dict[str, Any]], None], **kw: Any) -> None:
        command, params = rng.choice(writes)
        rid = cs.rid()
        obj = command_form(rid, command, json.loads(dumps(params)))
        mutate(obj)
        cs.add(f"command {label}", dumps(obj), reply_id=rid, **kw)

    def setter(*path: str, value: Any) -> Callable[[dict[str, Any]], None]:
        def mutate(obj: dict[str, Any]) -> None:
            for key in path[:-1]:
                obj = obj[key]
            obj[path[-1]] = value

        return mutate

    def remover(*path: str) -> Callable[[dict[str, Any]], None]:
        def mutate(obj: dict[str, Any]) -> None:
            for key in path[:-1]:
                obj = obj[key]
            del obj[path[-1]]

        return mutate

    unsupported = frozenset({"UnsupportedVersion"})
    for version in ("2.0.0", "2", "2.0", "3.1.4", "0.9.0", "0.1", "10.0.0", "2.0.0-rc.1", "99"):
        for command, params in writes:
            rid = cs.rid()
            body = dumps(envelope_form(rid, pascal(command), params, version=version))
            cs.add(
                f"envelope version {version} {command}",
                body,
                codes=unsupported,
                reply_id=rid,
                encoding="envelope",
            )
    either = frozenset({"InvalidRequest", "UnsupportedVersion"})
    for value in (1, 1.0, 2, 2.5, None, True, [], ["1.0.0"], {}, {"major": 1}, "", "1." + "0" * 40):
        env(f"version={value!r}", setter("version", value=value), codes=either)
    env("without version", remover("version"), codes=either)
    for value in ("Response", "request", "REQUEST", "Request ", "", None, 1, True, [], {}):
        env(f"payload.type={value!r}", setter("payload", "type", value=value), field="payload")
    env("without payload.type", remover("payload", "type"), field="payload")
    for value in ([], "Request", 1, None, True, ""):
        env(f"payload={value!r}", setter("payload", value=value), field="payload")
    for value in ([], "x", 1, None, True, {}):
        env(f"payload.data={value!r}", setter("payload", "data", value=value), field="payload")
    env("without payload.data", remover("payload", "data"), field="payload")
    for value in (None, 1, [], {}, True, "", "X" * 65, ["Ping"]):
        mutate = setter("payload", "data", "request_type", value=value)
        env(f"request_type={value!r:.20}", mutate, field="payload")
    env("without request_type", remover("payload", "data", "request_type"), field="payload")
    for value in ([], "x", 1, True, ["session_id"]):
        env(f"params={value!r}", setter("payload", "data", "params", value=value), field="payload")
    env("params=null", setter("payload", "data", "params", value=None))
    # Without a payload the message is read as command form: no command.
    rid = cs.rid()
    body = dumps({"id": rid, "version": "1.0.0", "timestamp": "2026-01-05T10:30:00Z"})
    cs.add("envelope without payload", body, reply_id=rid, field="command")

    for value in (None, 1, 1.5, True, [], {}, ["ping"], ""):
        cmd(f"command={value!r}", setter("command", value=value), field="command")
    cmd("without command", remover("command"), field="command")
    either_unknown = frozenset({"InvalidRequest", "UnknownCommand"})
    cmd("command of 65 chars", setter("command", value="c" * 65), codes=either_unknown)
    for value in ([], "x", 1, True, ["session_id"]):
        cmd(f"parameters={value!r}", setter("parameters", value=value), field="parameters")
    cmd("parameters=null", setter("parameters", value=None))
    cmd("payload junk makes it an envelope", setter("payload", value=1), encoding="envelope")

    # Request ids of the wrong type or size: refused, so the reply's id is null.
    bad_ids: tuple[Any, ...] = (1.5, 1.0, -0.0, 1e300, True, False, [], ["a"], {}, {"id": 1})
    bad_ids += ("i" * 257, 2**63, -(2**63) - 1, 10**40)
    for value in bad_ids:
        for e in ENCODINGS:
            for command, params in (rng.choice(writes), ("ping", {})):
                if e == "command":
                    obj = command_form(value, command, params)
                else:
                    obj = envelope_form(value, pascal(command), params)
                label = f"{e} {command} id={value!r:.20}"
                cs.anonymous(label, dumps(obj), encoding=e, field="id", via="req")

    # Odd but valid request ids come back exactly, in strict JSON.
    odd_ids: tuple[str | int, ...] = (
        "",
        "\u0000\u001f\u007f",
        "\u2028\u2029",
        "\U0001f600" * 10,
        "\\\"'<>&{}",
        "\ufeff",
        "x" * 256,
        "\u00e9" * 256,
        0,
        -1,
        2**63 - 1,
        -(2**63),
    )
    for value in odd_ids:
        for e in ENCODINGS:
            command, params = rng.choice(writes)
            params = {**params, "unknown_param": 1}
            if e == "command":
                obj = command_form(value, command, params)
            else:
                obj = envelope_form(value, pascal(command), params)
            label = f"{e} {command} with odd id {value!r:.20}"
            cs.add(label, dumps(obj), reply_id=value, encoding=e, field="unknown_param", via="req")

    # Unknown commands, hand-picked and random, around real write parameters.
    alphabet = string.ascii_letters + string.digits + "_-.:/$ \u00e9\u0416\u4e2d"
    names = list(UNKNOWN_COMMANDS)
    while len(names) < len(UNKNOWN_COMMANDS) + 40:
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 64)))
        if name not in KNOWN_NAMES:
            names.append(name)
    unknown = frozenset({"UnknownCommand"})
    for name in names:
        assert name not in KNOWN_NAMES
        for e in ENCODINGS:
            params = rng.choice(writes)[1]
            label = f"{e} unknown command {name!r}"
            cs.request(label, e, name, params, codes=unknown, details={"command": name})
    return cs


# --- the tests ------------------------------------------------------------------


def test_garbage_bodies_are_refused(world: World) -> None:
    """Random bytes, corrupted writes, non-strict JSON (NaN, Infinity, lone
    surrogates, comments...), non-objects and nesting far beyond any limit."""
    cases = garbage_cases(world, SEED + 1)
    assert len(cases.items) >= 600
    run_cases(world, cases.items, cases.rng)


def test_huge_values_are_refused(world: World) -> None:
    """Strings of a few MB in every kind of place, 140k state keys, a registry
    over its cap: refused, and a refused write changes nothing."""
    cases = huge_cases(world, SEED + 2)
    run_cases(world, cases.items, cases.rng, req_share=0.3)


def test_wrong_parameters_for_every_command(world: World) -> None:
    cases = parameter_cases(world, SEED + 3)
    assert len(cases.items) >= 1000
    run_cases(world, cases.items, cases.rng)


def test_broken_envelopes_ids_and_unknown_commands(world: World) -> None:
    cases = structure_cases(world, SEED + 4)
    assert len(cases.items) >= 250
    run_cases(world, cases.items, cases.rng)


def test_request_over_max_request_bytes(world: World) -> None:
    """At exactly the limit a request is read; one byte more is PayloadTooLarge
    with details.limit_bytes, whatever the body, a real write included."""
    cs = Cases(SEED + 6)
    head = b'{"id":"at-limit","command":"ping","parameters":{"message":"'
    tail = b'"}}'
    at_limit = head + b"x" * (MAX_REQUEST_BYTES - len(head) - len(tail)) + tail
    assert len(at_limit) == MAX_REQUEST_BYTES
    cs.add("ping at the limit", at_limit, reply_id="at-limit", field="message")
    over = at_limit.replace(b'"at-limit"', b'"over-limit"', 1) + b" "
    update = "update_session_state"
    write = request_body("command", cs.rid(), update, valid_params(world, update, cs.rng))
    limit = {"limit_bytes": MAX_REQUEST_BYTES}
    for label, body in (
        ("ping one byte over", over),
        ("real write padded over", write + b" " * (MAX_REQUEST_BYTES + 1 - len(write))),
        # Up to the transport cap a message arrives and is answered; beyond it
        # libzmq drops the peer (tests/test_bounds.py).
        ("random bytes up to the transport cap", cs.rng.randbytes(MAX_REQUEST_BYTES + 65536)),
        ("envelope over", dumps(envelope_form("e", "Ping", {"message": "y" * MAX_REQUEST_BYTES}))),
    ):
        assert len(body) > MAX_REQUEST_BYTES
        cs.anonymous(label, body, codes=TOO_LARGE, details=limit)
    cs.anonymous("REQ one byte over", over, codes=TOO_LARGE, details=limit, via="req")
    run_cases(world, cs.items, cs.rng, req_share=0.0)


def test_malformed_frames(world: World) -> None:
    """Extra frames, doubled delimiters and frames without a body, from DEALER
    and REQ sockets, around real writes: each gets one error reply on the
    sender's framing and executes nothing."""
    # A reply timestamp made ahead of time (rather than at reply time) must show:
    # let the worker's clock move well past its start first.
    time.sleep(max(0.0, world.created_at + 3 * CLOCK_SLACK - time.time()))
    rng = random.Random(SEED + 7)
    rid = Cases(SEED + 7).rid
    bodies = [
        request_body("command", rid(), "ping", {}),
        request_body("envelope", rid(), "ping", {}),
        *(
            request_body(e, rid(), c, valid_params(world, c, rng))
            for e in ENCODINGS
            for c in ("update_session_state", "close_session", "create_session", "save_context")
        ),
    ]
    delimited: list[Callable[[bytes], list[bytes]]] = [
        lambda b: [b"", b, b"extra"],
        lambda b: [b"", b"", b],
        lambda b: [b"", b"", b"", b],
        lambda b: [b"", b, b"", b],
        lambda b: [b"", b, *([b"x"] * 20)],
        lambda b: [b"", b, b""],
        lambda b: [b""],
        lambda b: [b"", b"", b""],
    ]
    bare: list[Callable[[bytes], list[bytes]]] = [
        lambda b: [b, b"extra"],
        lambda b: [b, b""],
        lambda b: [b"x", b"", b],
    ]
    endpoint = world.front.endpoint
    problems: list[str] = []
    sent = 0
    t0 = time.time()
    for shapes, with_delimiter in ((delimited, True), (bare, False)):
        for shape in shapes:
            sock = _open(world.ctx, zmq.DEALER, endpoint)
            try:
                for body in bodies:
                    sock.send_multipart(shape(body))
                    sent += 1
                for _ in bodies:
                    if not sock.poll(10_000, zmq.POLLIN):
                        problems.append(f"no reply to {shape(b'BODY')!r}")
                        break
                    frames = sock.recv_multipart()
                    want = 2 if with_delimiter else 1
                    if len(frames) != want or (with_delimiter and frames[0] != b""):
                        problems.append(f"{shape(b'BODY')!r}: reply frames {frames!r:.200}")
                    problems += check_frames_reply(frames[-1], shape(b"BODY"), t0)
                if sock.poll(100, zmq.POLLIN):
                    problems.append(f"{shape(b'BODY')!r}: more replies than requests")
            finally:
                sock.close(linger=0)
    # REQ: the socket adds the delimiter; the application adds frames.
    for shape_req in (
        lambda b: [b, b"extra"],
        lambda b: [b"", b],
        lambda b: [b, b"", b],
        lambda b: [b"", b""],
    ):
        sock = _open(world.ctx, zmq.REQ, endpoint)
        try:
            for body in bodies:
                sock.send_multipart(shape_req(body))
                sent += 1
                if not sock.poll(10_000, zmq.POLLIN):
                    problems.append(f"REQ {shape_req(b'BODY')!r}: no reply")
                    break
                problems += check_frames_reply(sock.recv(), shape_req(b"BODY"), t0)
        finally:
            sock.close(linger=0)
    assert sent >= 100
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(p[:400] for p in problems[:25])
    assert_unharmed(world)


def check_frames_reply(raw: bytes, shape: list[bytes], t0: float) -> list[str]:
    reply = parse_error_reply(raw, t0, time.time())
    if isinstance(reply, str):
        return [f"{shape!r}: {reply}"]
    if reply.code != "InvalidRequest":
        return [f"{shape!r}: got {reply.code}, expected InvalidRequest"]
    return []


def test_nesting_near_the_parser_limit_is_never_an_internal_error(world: World) -> None:
    """Values nested just below and above the parser's depth limit, in every
    parameter that takes any JSON value. The session id is well formed but no
    session's, so a request that is accepted finds nothing to change; what a
    request must never get is an InternalError."""
    cs = Cases(SEED + 5)
    token = "".join(cs.rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(22))
    sid = f"{'0' * 16}.{token}"
    templates = (
        ("update_session_state", f'{{"session_id":"{sid}","state_data":{{"k":DEEP}}}}'),
        ("record_evaluation", f'{{"session_id":"{sid}","code":"x","result":DEEP}}'),
        (
            "register_object",
            f'{{"session_id":"{sid}","object_id":"o","description":"d","metadata":{{"m":DEEP}}}}',
        ),
        (
            "save_context",
            f'{{"session_id":"{sid}","context":{{"workspace_context":{{"w":DEEP}}}}}}',
        ),
    )
    ok = frozenset({"SessionNotFound", "InvalidRequest"})
    for depth in range(900, 1030):
        deep = "[" * depth + "]" * depth
        for command, params in templates:
            rid = cs.rid()
            filled = params.replace("DEEP", deep)
            body = f'{{"id":"{rid}","command":"{command}","parameters":{filled}}}'
            # Past the parser's limit the id is unreadable: the reply's id is then null.
            label = f"{command} value {depth} deep"
            kw: dict[str, Any] = {"codes": ok, "reply_id": rid, "id_optional": True}
            cs.add(label, body.encode(), via="req", **kw)
    run_cases(world, cs.items, cs.rng)
