"""Fuzzing a live front worker (real redis-server, ZeroMQ over real TCP).

`test_fuzz_100k_messages` sends over a hundred thousand generated messages:
valid requests for all 16 commands in both encodings, mutated by bit flips,
truncation, type swaps, huge numbers, deep nesting, non-strict JSON, random
JSON and random bytes, a share of them with extra or missing frames. Many are
in flight at once over several DEALER sockets. Every message must get exactly
one reply that is strict JSON, well formed, without a stack trace and with an
error code from PROTOCOL.md's table; the worker must survive, keep serving and
keep its memory bounded. Valid mutating requests may succeed, and limits may
refuse them: only the shape of a reply is judged, not its verdict.

`test_idle_and_half_open_connections_do_not_block_others` holds hundreds of
silent TCP connections, stalled ZMTP greetings and silent DEALERs open while
a normal client works.

Messages come from a seeded random.Random, so a failure reproduces.
"""

from __future__ import annotations

import json
import random
import re
import resource
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import redis
import zmq

from tests.conftest import FrontProcess
from tests.test_properties import check_reply, expected_reply_id, pascal
from workers.client import Client

pytestmark = [pytest.mark.slow, pytest.mark.integration]

Ctx = zmq.Context[zmq.Socket[bytes]]
MIB = 1024 * 1024

SEED = 20260107
WARMUP_MESSAGES = 5_000
FUZZ_MESSAGES = 100_000
DEALERS = 4
IN_FLIGHT = 256  # across all DEALERs
STALL_TIMEOUT = 30.0  # seconds without a reply before the run is given up
RSS_GROWTH_LIMIT = 64 * MIB

CLIENTS = ("fuzz-alice", "fuzz-bob", "fuzz-carol")
PARTS = ("workspace_context", "inspector_state", "object_registry", "evaluation_history")
COMMANDS = (
    "create_session", "restore_session", "update_session_state", "close_session",
    "get_session_info", "list_client_sessions", "get_session_statistics", "save_context",
    "load_context", "get_context_summary", "clear_context", "record_evaluation",
    "register_object", "release_object", "ping", "describe",
)  # fmt: skip
FUZZ_ID = re.compile(rb"fz-[0-9]+")
RAW = "@@RAW@@"  # a string value replaced by raw (often invalid) JSON text after dumping
RAW_TEXTS = (
    "NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1E+309", "0.1e-99999", "01",
    "-", "1.", ".5", "+1", "0x1F", "1_000", "tru", "nul", "True", "None", "undefined",
    '"\\ud800"', '"\\udfff\\ud800"', '"a\\ud83d"', '"\\x41"', '"\\u12"', '"a\x01b"', '"\x1f"',
    "'single'", '{"a":1,"a":2}', "[1,]", '{"a":1,}', "{a:1}", "[1 2]", "// c\n1", "/**/1",
    '"\u2028\u2029"', '"\\u0000"', "[[[[", "}}}", "-0", "-0.0", "1e-400", "4.9e-324",
)  # fmt: skip
TEXT_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.:@/\\\"'\t\n{}[],"
    "\u00e9\u00df\u4e2d\u0416\U0001f600\u2028\u0000\u001f\u007f\ufeff\u200b"
)
CLIENT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789._:@-"


# --- message generation --------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    kind: str
    frames: list[bytes]
    id_known: bool  # a strict parser reads the body: the reply's id must be `rid`
    rid: Any
    encoding: str | None  # the reply's encoding when the body is a readable object


class Generator:
    """Seeded mutations of valid requests; sids are real sessions."""

    def __init__(self, seed: int, sids: list[str]) -> None:
        self.rng = random.Random(seed)
        self.sids = sids
        self.n = 0
        self.recent: list[dict[str, Any]] = []  # valid requests, for replays
        self.kinds: list[tuple[str, Callable[[], bytes]]] = [
            ("valid", self.valid),
            ("type_swap", self.type_swap),
            ("type_swap", self.type_swap),
            ("type_swap", self.type_swap),
            ("drop_key", self.drop_key),
            ("unknown_key", self.unknown_key),
            ("huge_number", self.huge_number),
            ("raw_json", self.raw_json),
            ("deep", self.deep),
            ("random_json", self.random_json),
            ("random_bytes", self.random_bytes),
            ("bit_flip", self.bit_flip),
            ("bit_flip", self.bit_flip),
            ("truncate", self.truncate),
            ("splice", self.splice),
            ("command_name", self.command_name),
            ("odd_strings", self.odd_strings),
            ("long_values", self.long_values),
            ("replay", self.replay),
        ]

    # values

    def text(self, size: int = 12) -> str:
        return "".join(self.rng.choice(TEXT_ALPHABET) for _ in range(self.rng.randint(0, size)))

    def number(self) -> Any:
        r = self.rng
        return r.choice(
            [
                r.randint(-5, 5),
                r.randint(-(2**63), 2**63),
                r.choice([-1, 1]) * 10 ** r.randint(18, 400),
                r.choice([-1, 1]) * 2 ** r.randint(53, 300),
                r.uniform(-1e6, 1e6),
                r.choice([-0.0, 5e-324, 1.7976931348623157e308, -1.7976931348623157e308]),
            ]
        )

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.randrange(8 if depth < 3 else 6)
        if pick == 0:
            return None
        if pick == 1:
            return r.random() < 0.5
        if pick in (2, 3):
            return self.number()
        if pick in (4, 5):
            return self.text()
        if pick == 6:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.text(6): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def obj(self) -> dict[str, Any]:
        return {self.text(6): self.value(1) for _ in range(self.rng.randint(0, 4))}

    def client_id(self) -> str:
        r = self.rng
        if r.random() < 0.7:
            return r.choice(CLIENTS)
        return "".join(r.choice(CLIENT_ALPHABET) for _ in range(r.randint(1, 24)))

    def session_id(self) -> str:
        r = self.rng
        sid = r.choice(self.sids)
        return sid if r.random() < 0.85 else r.choice(["0" * 16 + "." + "A" * 22, sid[:-1], "x"])

    # valid requests

    def params(self, command: str) -> dict[str, Any]:
        r = self.rng
        p: dict[str, Any] = {}
        if command in ("create_session", "list_client_sessions"):
            p["client_id"] = self.client_id()
            if command == "create_session":
                if r.random() < 0.5:
                    p["timeout"] = r.randint(1, 2_592_000)
                if r.random() < 0.5:
                    p["client_info"] = self.obj()
            return p
        if command == "ping":
            return {"message": self.text(40)} if r.random() < 0.5 else {}
        if command in ("describe", "get_session_statistics"):
            return {}
        p["session_id"] = self.session_id()
        if r.random() < 0.2:
            p["client_id"] = self.client_id()
        if command == "update_session_state":
            p["state_data"] = {self.text(6): r.choice([None, self.value(1)]) for _ in range(3)}
            if r.random() < 0.2:
                p["replace"] = r.random() < 0.5
            if r.random() < 0.2:
                p["expected_version"] = r.randint(0, 50)
        elif command == "close_session":
            p["save_state"] = True  # keeps the sessions alive for the rest of the run
        elif command == "save_context":
            p["context"] = {
                part: r.choice([None, self.obj()])
                if part in ("workspace_context", "inspector_state")
                else r.choice([None, {f"o{i}": self.value(1) for i in range(r.randint(0, 3))}])
                if part == "object_registry"
                else r.choice([None, [self.value(1) for _ in range(r.randint(0, 3))]])
                for part in r.sample(PARTS, r.randint(1, 4))
            }
        elif command == "clear_context":
            if r.random() < 0.7:
                p["parts"] = r.sample(PARTS, r.randint(0, 4))
        elif command == "record_evaluation":
            p.update(code=self.text(30), result=self.value(1), has_error=r.random() < 0.2)
            if r.random() < 0.5:
                p.update(result_type="SmallInteger", execution_time=r.uniform(0, 100), tool_id="t")
        elif command == "register_object":
            p.update(object_id=f"o{r.randint(0, 20)}", description=self.text(20))
            if r.random() < 0.5:
                p["metadata"] = self.obj()
        elif command == "release_object":
            p["object_id"] = f"o{r.randint(0, 20)}"
        return p

    def request(self) -> dict[str, Any]:
        r = self.rng
        command = r.choice(COMMANDS)
        rid = f"fz-{self.n}"
        params = self.params(command)
        req: dict[str, Any]
        if r.random() < 0.5:
            req = {"id": rid, "command": command, "parameters": params}
        else:
            req = {
                "id": rid,
                "version": r.choice(["1.0.0", "1.0.0", "1.2.3", "1"]),
                "timestamp": "2026-01-05T10:30:00Z",
                "payload": {
                    "type": "Request",
                    "data": {"request_type": pascal(command), "params": params},
                },
            }
        if r.random() < 0.05:
            req["client_id"] = self.client_id()
        return req

    def dumps(self, value: Any) -> bytes:
        text = json.dumps(value, ensure_ascii=self.rng.random() < 0.5, allow_nan=False)
        return text.encode("utf-8", "surrogatepass")

    @staticmethod
    def params_of(req: dict[str, Any]) -> Any:
        if "payload" in req:
            return req["payload"]["data"]["params"]
        return req["parameters"]

    def slots(self, req: dict[str, Any]) -> list[tuple[Any, Any]]:
        """(container, key) of every value in the request, nested ones included."""
        out: list[tuple[Any, Any]] = []
        stack: list[Any] = [req]
        while stack:
            node = stack.pop()
            pairs = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in pairs:
                out.append((node, key))
                if isinstance(value, dict | list):
                    stack.append(value)
        return out

    def set_somewhere(self, value: Any) -> bytes:
        req = self.request()
        params = self.params_of(req)
        if params and self.rng.random() < 0.7:
            container, key = params, self.rng.choice(list(params))
        else:
            container, key = self.rng.choice(self.slots(req))
        container[key] = value
        return self.dumps(req)

    # mutations: each returns a body

    def valid(self) -> bytes:
        req = self.request()
        body = self.dumps(req)
        self.recent = [*self.recent[-499:], req]
        return body

    def replay(self) -> bytes:
        """An earlier valid request again, with its id: as it was (a retry,
        answered from the replay record) or with other parameters (refused)."""
        if not self.recent:
            return self.valid()
        req = json.loads(json.dumps(self.rng.choice(self.recent)))
        params = self.params_of(req)
        if self.rng.random() < 0.5:
            if "state_data" in params:
                params["state_data"] = {"changed": self.text()}
            elif texts := [
                k for k, v in params.items() if isinstance(v, str) and k != "session_id"
            ]:
                params[self.rng.choice(texts)] += "-changed"
            else:
                params["unknown"] = 1
        return self.dumps(req)

    def type_swap(self) -> bytes:
        return self.set_somewhere(self.value())

    def drop_key(self) -> bytes:
        req = self.request()
        container, key = self.rng.choice(self.slots(req))
        del container[key]
        return self.dumps(req)

    def unknown_key(self) -> bytes:
        req = self.request()
        params = self.params_of(req)
        target = params if isinstance(params, dict) and self.rng.random() < 0.7 else req
        target[
            self.rng.choice(["expected_versoin", "sessionId", "", "__proto__", self.text(8)])
        ] = self.value()
        return self.dumps(req)

    def huge_number(self) -> bytes:
        r = self.rng
        big = r.choice(
            [
                10 ** r.randint(19, 1000),
                -(10 ** r.randint(19, 1000)),
                2**64,
                2**63,
                -(2**63) - 1,
                2**53 + 1,
                1.7976931348623157e308,
                5e-324,
            ]
        )
        return self.set_somewhere(big)

    def raw_json(self) -> bytes:
        raw = self.rng.choice(RAW_TEXTS)
        if self.rng.random() < 0.3:
            raw = "1" * self.rng.randint(19, 5000)
        return self.set_somewhere(RAW).replace(f'"{RAW}"'.encode(), raw.encode(), 1)

    def deep(self) -> bytes:
        depth = self.rng.choice([50, 500, 990, 1000, 1010, 1020, 1030, 1100, 2000, 3000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        raw = opener * depth + "1" + closer * depth
        return self.set_somewhere(RAW).replace(f'"{RAW}"'.encode(), raw.encode(), 1)

    def random_json(self) -> bytes:
        r = self.rng
        value = r.choice([self.value(), self.obj(), [self.value()], self.text(), self.number()])
        return self.dumps(value)

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 2, 8, 64, 256, self.rng.randrange(2048)]))

    def bit_flip(self) -> bytes:
        body = bytearray(self.valid())
        for _ in range(self.rng.randint(1, 4)):
            body[self.rng.randrange(len(body))] ^= 1 << self.rng.randrange(8)
        return bytes(body)

    def truncate(self) -> bytes:
        body = self.valid()
        return body[: self.rng.randrange(len(body))]

    def splice(self) -> bytes:
        body = self.valid()
        at = self.rng.randrange(len(body) + 1)
        if self.rng.random() < 0.5:
            return body[:at] + self.rng.randbytes(self.rng.randint(1, 16)) + body[at:]
        return body[:at] + body[at + self.rng.randint(1, 16) :]

    def command_name(self) -> bytes:
        req = self.request()
        r = self.rng
        name = r.choice(COMMANDS)
        variant = r.choice(
            [name.upper(), name.title(), name + " ", name.replace("_", "-"), name[:-1], self.text()]
        )
        if "payload" in req:
            req["payload"]["data"]["request_type"] = variant
        else:
            req["command"] = variant
        return self.dumps(req)

    def odd_strings(self) -> bytes:
        odd = self.rng.choice(
            ["", "\u0000", "\ud800", "\udfff", "\U0001f600" * 50, "\\", '"', "\u2028", "a\nb"]
        )
        return self.set_somewhere(odd)

    def long_values(self) -> bytes:
        r = self.rng
        size = r.choice([257, 257, 4097, 4097, 20_000]) if r.random() < 0.98 else 300_000
        return self.set_somewhere(r.choice(["x" * size, ["y"] * (size // 8), {"k": "z" * size}]))

    def message(self) -> Message:
        self.n += 1
        kind, make = self.rng.choice(self.kinds)
        body = make()
        r = self.rng.random()
        if r < 0.02:
            extra = self.rng.choice([[b"", body, b"extra"], [b"", b"", body], [b"", body, b""]])
            return Message(kind + "+extra_frames", extra, True, None, "command")
        if r < 0.025:
            return Message(kind + "+no_body", [b""], True, None, "command")
        frames = [body] if r < 0.05 and body != b"" else [b"", body]
        known, rid = expected_reply_id(body)
        encoding = None
        if known and body.lstrip().startswith(b"{"):
            encoding = "envelope" if "payload" in json.loads(body) else "command"
        return Message(kind, frames, known, rid, encoding)


# --- running and checking -------------------------------------------------------------


def id_key(rid: Any) -> tuple[str, Any]:
    return (type(rid).__name__, rid)


@dataclass
class Outcome:
    sent: int = 0
    replies: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    got_ids: Counter[tuple[str, Any]] = field(default_factory=Counter)
    want_ids: Counter[tuple[str, Any]] = field(default_factory=Counter)
    unknown: int = 0
    encodings: dict[tuple[str, Any], str | None] = field(default_factory=dict)
    rss_samples: list[int] = field(default_factory=list)


def exchange(
    ctx: Ctx, endpoint: str, messages: list[Message], outcome: Outcome, proc: psutil.Process
) -> None:
    """Send every message over DEALERS sockets with IN_FLIGHT in flight in all,
    and check every reply as it arrives."""
    socks = []
    for _ in range(DEALERS):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(endpoint)
        socks.append(sock)
    window = IN_FLIGHT // DEALERS
    queues = [messages[n::DEALERS] for n in range(DEALERS)]
    sent = [0] * DEALERS
    got = [0] * DEALERS
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    last_progress = time.monotonic()
    next_sample = 0.0
    # The reply's encoding is checked where one readable request alone may carry
    # its id: a mutation can turn one message's id into another's, and a body
    # that Python's parser refuses (nesting just past its limit) may still be
    # read by the service and answered with the id it carries.
    ambiguous: set[tuple[str, Any]] = set()
    for m in messages:
        outcome.kinds[m.kind] += 1
        if not m.id_known:
            outcome.unknown += 1
            for frame in m.frames:
                ambiguous.update(("str", t.decode()) for t in FUZZ_ID.findall(frame))
            continue
        key = id_key(m.rid) if m.rid is not None else ("null", None)
        outcome.want_ids[key] += 1
        outcome.encodings[key] = m.encoding if key not in outcome.encodings else None
    for key in ambiguous:
        outcome.encodings[key] = None
    try:
        while any(g < len(q) for g, q in zip(got, queues, strict=True)):
            for n, sock in enumerate(socks):
                while sent[n] < len(queues[n]) and sent[n] - got[n] < window:
                    sock.send_multipart(queues[n][sent[n]].frames)
                    sent[n] += 1
                    outcome.sent += 1
            events = poller.poll(200)
            now = time.monotonic()
            if now >= next_sample:
                outcome.rss_samples.append(rss(proc))
                next_sample = now + 1.0
            if not events:
                if now - last_progress > STALL_TIMEOUT:
                    missing = sum(len(q) for q in queues) - sum(got)
                    outcome.problems.insert(0, f"no reply for {STALL_TIMEOUT}s; {missing} missing")
                    break
                continue
            last_progress = now
            for sock, _ in events:
                n = socks.index(sock)
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    got[n] += 1
                    check_frames(frames, outcome)
        time.sleep(0.1)  # anything more would be a second reply
        for n, sock in enumerate(socks):
            while sock.poll(50, zmq.POLLIN):
                got[n] += 1
                check_frames(sock.recv_multipart(), outcome)
    finally:
        for sock in socks:
            sock.close(linger=0)


def check_frames(frames: list[bytes], outcome: Outcome) -> None:
    outcome.replies += 1
    if not (len(frames) == 1 or (len(frames) == 2 and frames[0] == b"")):
        outcome.problems.append(f"reply frames {frames!r:.300}")
    raw = frames[-1]
    reply = check_reply(raw)
    if isinstance(reply, str):
        outcome.problems.append(reply)
        return
    outcome.codes[reply.code or "success"] += 1
    key = id_key(reply.id) if reply.id is not None else ("null", None)
    outcome.got_ids[key] += 1
    expected = outcome.encodings.get(key)
    if expected is not None and reply.encoding != expected:
        outcome.problems.append(f"{reply.encoding} reply to a {expected} request: {raw[:300]!r}")
    if reply.code == "InternalError":
        outcome.problems.append(f"InternalError (a bug): {raw[:300]!r}")


def check_ids(outcome: Outcome) -> None:
    """Every readable message got its own id back exactly once; the unreadable
    ones account for the rest (with null or whatever id they carried)."""
    if outcome.replies != outcome.sent:
        outcome.problems.insert(0, f"{outcome.sent} messages got {outcome.replies} replies")
    extra = 0
    for key in outcome.want_ids.keys() | outcome.got_ids.keys():
        want, got = outcome.want_ids[key], outcome.got_ids[key]
        if got < want:
            outcome.problems.append(f"id {key[1]!r:.80}: {want} requests, {got} replies")
        extra += got - want if got > want else 0
    if extra > outcome.unknown:
        outcome.problems.append(f"{extra} unexpected replies, only {outcome.unknown} unreadable")


def rss(proc: psutil.Process) -> int:
    """The worker's resident set size; 0 once it is gone."""
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


def setup_sessions(client: Client) -> list[str]:
    """Three sessions per client, with state and context to fuzz against."""
    sids: list[str] = []
    for cid in CLIENTS:
        for n in range(3):
            sid = client.call("create_session", client_id=cid, timeout=3600)["session_id"]
            client.call("update_session_state", session_id=sid, state_data={"n": n, "l": []})
            client.call(
                "save_context",
                session_id=sid,
                context={
                    "workspace_context": {"variables": {"x": 1}},
                    "object_registry": {"o1": {"class": "Point"}},
                    "evaluation_history": [{"code": "1 + 1"}],
                },
            )
            sids.append(sid)
    return sids


def test_fuzz_100k_messages(
    front: FrontProcess, client: Client, zmq_context: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    assert front.proc is not None
    proc = psutil.Process(front.proc.pid)
    sids = setup_sessions(client)
    gen = Generator(SEED, sids)
    t0 = time.monotonic()
    warmup = [gen.message() for _ in range(WARMUP_MESSAGES)]
    messages = [gen.message() for _ in range(FUZZ_MESSAGES)]
    generated_in = time.monotonic() - t0

    warm = Outcome()
    exchange(zmq_context, front.endpoint, warmup, warm, proc)
    check_ids(warm)
    assert front.proc.poll() is None, f"the front worker died in the warm-up: {warm.problems[:5]}"
    rss_before = rss(proc)

    outcome = Outcome()
    t1 = time.monotonic()
    exchange(zmq_context, front.endpoint, messages, outcome, proc)
    seconds = time.monotonic() - t1
    check_ids(outcome)
    rss_after = rss(proc)

    alive = front.proc is not None and front.proc.poll() is None
    pong = client.call("ping", message="after the fuzz")["message"] if alive else None
    info = None
    if alive:  # the fuzz may have closed the sessions it was given: a fresh one
        sid = client.call("create_session", client_id="fuzz-after")["session_id"]
        info = client.call("get_session_info", session_id=sid)
    peak = max(outcome.rss_samples, default=rss_after)
    total = warm.sent + outcome.sent
    summary = (
        f"fuzz: {total} messages ({WARMUP_MESSAGES} warm-up + {outcome.sent}), "
        f"{warm.replies + outcome.replies} replies, {seconds:.1f}s for the main run "
        f"({outcome.sent / seconds:.0f} msg/s, generated in {generated_in:.1f}s), "
        f"by code {dict((warm.codes + outcome.codes).most_common())}, "
        f"rss before {rss_before / MIB:.1f} MiB after {rss_after / MIB:.1f} MiB "
        f"peak {peak / MIB:.1f} MiB, problems {len(warm.problems) + len(outcome.problems)}"
    )
    with capsys.disabled():
        print(f"\n{summary}\nfuzz: by mutation {dict(sorted(outcome.kinds.items()))}")
    problems = warm.problems + outcome.problems
    logged = front.log.read_text(errors="replace").count("Traceback")
    if logged:
        problems.append(f"the worker logged {logged} stack traces (see {front.log})")
    assert alive, "the front worker died"
    assert pong == "after the fuzz" and info is not None
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(p[:400] for p in problems[:30])
    assert outcome.sent == FUZZ_MESSAGES and total >= 100_000
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, summary
    # The run exercised the service, not only its parser.
    assert outcome.codes["success"] > 1000 and outcome.codes["InvalidRequest"] > 10_000, summary


# --- idle and half-open connections ------------------------------------------------------

RAW_IDLE = 500
RAW_HALF_GREETING = 100
IDLE_DEALERS = 200
ZMTP_SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
PARTIAL_GREETINGS = (
    b"\xff",
    ZMTP_SIGNATURE[:5],
    ZMTP_SIGNATURE,
    ZMTP_SIGNATURE + b"\x03",
    ZMTP_SIGNATURE + b"\x03\x00NU",
    ZMTP_SIGNATURE + b"\x03\x01NULL" + b"\x00" * 16,
)


@pytest.fixture
def nofile() -> Iterator[None]:
    """Room for ~1,000 sockets on each side (the worker inherits the limit)."""
    need = 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"SKIPPED LOUDLY: RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def busy_front(
    nofile: None, start_front: Callable[..., FrontProcess], redis_client: redis.Redis
) -> FrontProcess:
    return start_front()


@pytest.fixture
def raw_sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def established(proc: psutil.Process, port: int) -> int:
    return sum(
        1
        for c in proc.net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_idle_and_half_open_connections_do_not_block_others(
    busy_front: FrontProcess,
    zmq_context: Ctx,
    raw_sockets: list[socket.socket],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert busy_front.proc is not None
    proc = psutil.Process(busy_front.proc.pid)
    port = busy_front.port
    fds_before = proc.num_fds()
    rng = random.Random(SEED + 1)

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw_sockets.append(s)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        return s

    for _ in range(RAW_IDLE):
        connect()
    for n in range(RAW_HALF_GREETING):
        connect().sendall(PARTIAL_GREETINGS[n % len(PARTIAL_GREETINGS)])
    dealers: list[zmq.Socket[bytes]] = []
    try:
        for _ in range(IDLE_DEALERS):
            sock = zmq_context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(busy_front.endpoint)
            dealers.append(sock)
        hostile = RAW_IDLE + RAW_HALF_GREETING + IDLE_DEALERS
        assert wait_for(lambda: established(proc, port) >= hostile, 20), (
            f"only {established(proc, port)} of {hostile} connections reached the worker"
        )
        held = established(proc, port)

        latencies: list[float] = []
        with Client(busy_front.endpoint, timeout=5.0, retries=0, context=zmq_context) as c:
            for n in range(40):
                t = time.monotonic()
                c.encoding = "command" if n % 2 else "envelope"
                sid = c.call("create_session", client_id="idle-bystander", timeout=60)["session_id"]
                state = {"n": n, "v": rng.random()}
                updated = c.call("update_session_state", session_id=sid, state_data=state)
                assert updated["session_state"] == state and updated["version"] == 2
                info = c.call("get_session_info", session_id=sid)
                assert info["version"] == 2 and info["is_active"] is True
                c.call("close_session", session_id=sid)
                latencies.append((time.monotonic() - t) / 4)
            assert c.call("ping", message="busy")["message"] == "busy"
        # still all held: the worker did not drop them to serve the client
        assert established(proc, port) >= hostile
    finally:
        for sock in dealers:
            sock.close(linger=0)
        for s in raw_sockets:
            s.close()
        raw_sockets.clear()

    # Closing them all gives the worker its descriptors back, and it still serves.
    assert wait_for(lambda: proc.num_fds() <= fds_before + 16, 20), (
        f"worker holds {proc.num_fds()} fds, {fds_before} before"
    )
    with Client(busy_front.endpoint, timeout=5.0, retries=0, context=zmq_context) as c:
        assert c.call("ping", message="after")["message"] == "after"
    p50 = statistics.median(latencies)
    with capsys.disabled():
        print(
            f"\nidle: {held} connections held ({RAW_IDLE} silent TCP, {RAW_HALF_GREETING} "
            f"stalled greetings, {IDLE_DEALERS} silent DEALERs); 160 requests, latency p50 "
            f"{p50 * 1000:.1f} ms max {max(latencies) * 1000:.1f} ms; worker fds "
            f"{fds_before} before, {proc.num_fds()} after"
        )
    assert max(latencies) < 1.0, f"a request took {max(latencies):.2f}s"
