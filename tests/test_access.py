"""Client policy, rate limits and audit lines, through live front workers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import zmq

from service.policy import Policy
from tests.conftest import FrontProcess
from tests.helpers import code_of
from workers.client import Client, RemoteError
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

Ctx = zmq.Context[zmq.Socket[bytes]]


def policy_cli(url: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "policy", *args, "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def wait_for(predicate: Callable[[], bool], within: float) -> float:
    """Seconds until predicate() held; fails after `within`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_policy_unit_rules() -> None:
    p = Policy.from_members(
        allow=["alice"], allow_prefixes=["team-"], deny=["team-x"], deny_prefixes=["bot-"]
    )
    assert p.allows("alice") and p.allows("team-a")
    assert not p.allows("team-x")  # deny wins
    assert not p.allows("bob") and not p.allows("bot-1")
    assert not p.allows(None)  # an allow list keeps anonymous requests out
    only_deny = Policy.from_members(deny=["mallory"])
    assert only_deny.allows(None) and only_deny.allows("alice")
    from service import keys

    assert not only_deny.allows(None, keys.client_hash("mallory"))
    assert only_deny.allows(None, keys.client_hash("alice"))
    # prefix rules cannot judge a bare session id: the request must name its client
    assert not Policy.from_members(deny_prefixes=["x"]).allows(None, keys.client_hash("a"))


def test_deny_and_allow_lists_apply_to_every_worker_within_a_second(
    start_front: Callable[..., FrontProcess],
    redis_client: redis.Redis,
    redis_server: EmbeddedRedis,
    zmq_context: Ctx,
) -> None:
    fronts = [start_front(), start_front(workers=2)]
    clients = [Client(f.endpoint, timeout=5, retries=0, context=zmq_context) for f in fronts]
    try:
        sid = clients[0].call("create_session", client_id="mallory")["session_id"]
        clients[0].call("create_session", client_id="alice")

        policy_cli(redis_server.url, "deny", "mallory")
        changed = time.monotonic()  # the change is in Redis by now
        for c in clients:
            took = wait_for(
                lambda c=c: (
                    code_of(  # type: ignore[misc]
                        c, "ping", client_id="mallory"
                    )
                    == "ClientNotAllowed"
                ),
                within=1.0,
            )
            assert took <= 1.0
        commands: list[tuple[str, dict[str, Any]]] = [
            ("create_session", {"client_id": "mallory"}),
            ("list_client_sessions", {"client_id": "mallory"}),
            ("get_session_info", {"session_id": sid}),  # names no client: judged by the owner
            ("get_session_info", {"session_id": sid, "client_id": "mallory"}),
            ("update_session_state", {"session_id": sid, "state_data": {"a": 1}}),
            ("describe", {"client_id": "mallory"}),
            ("get_session_statistics", {"client_id": "mallory"}),
        ]
        # One second after the change every worker process applies it, the
        # two behind the multi-process front included (each has its own cache).
        time.sleep(max(0.0, 1.0 - (time.monotonic() - changed)))
        for command, params in commands:
            assert code_of(clients[1], command, **params) == "ClientNotAllowed", command
        assert code_of(clients[1], "ping", client_id="alice") == "ok"

        policy_cli(redis_server.url, "allow", "team-", "--prefix")
        changed = time.monotonic()
        for c in clients:
            wait_for(
                lambda c=c: (
                    code_of(c, "ping", client_id="alice")  # type: ignore[misc]
                    == "ClientNotAllowed"
                ),
                within=1.0,
            )
        time.sleep(max(0.0, 1.0 - (time.monotonic() - changed)))
        assert code_of(clients[0], "create_session", client_id="team-7") == "ok"
        assert code_of(clients[0], "ping") == "ClientNotAllowed"  # anonymous, allow list on

        shown = policy_cli(redis_server.url, "remove", "mallory")
        assert shown["deny"] == [] and shown["allow-prefix"] == ["team-"]
        policy_cli(redis_server.url, "remove", "team-", "--prefix")
        for c in clients:
            wait_for(
                lambda c=c: (
                    code_of(
                        c,
                        "get_session_info",  # type: ignore[misc]
                        session_id=sid,
                    )
                    == "ok"
                ),
                within=1.0,
            )
    finally:
        for c in clients:
            c.close()


def test_policy_cli_refuses_bad_ids(redis_server: EmbeddedRedis) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "policy",
            "deny",
            "a b{c}",
            "--redis-url",
            redis_server.url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "client id pattern" in done.stderr


@pytest.mark.parametrize("command", [["policy", "show"], ["keys", "list"]])
def test_admin_commands_with_redis_down_fail_in_one_line(command: list[str]) -> None:
    down = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *command, "--redis-url", down],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3, done
    assert done.stderr.startswith("error: redis: ") and "Traceback" not in done.stderr


def test_one_client_floods_another_is_served(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    front = start_front(
        env={
            "STUI_RATE_LIMIT": "20",
            "STUI_RATE_BURST": "20",
            "STUI_CREATE_RATE_LIMIT": "0.5",
            "STUI_CREATE_BURST": "2",
        }
    )
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        flood_sid = c.call("create_session", client_id="flood")["session_id"]
        calm_sid = c.call("create_session", client_id="calm")["session_id"]
    limited: list[dict[str, Any]] = []
    calm_codes: list[str] = []
    stop = threading.Event()

    def flood() -> None:
        with Client(
            front.endpoint, timeout=5, retries=0, retry_unavailable=False, context=zmq_context
        ) as f:
            while not stop.is_set():
                try:
                    f.call("update_session_state", session_id=flood_sid, state_data={"n": 1})
                except RemoteError as exc:
                    if exc.code == "RateLimited":
                        limited.append(exc.details)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as calm:
            for i in range(15):  # 15 requests over ~1.5 s: under 20/s
                calm_codes.append(
                    code_of(calm, "update_session_state", session_id=calm_sid, state_data={"i": i})
                )
                time.sleep(0.1)
    finally:
        stop.set()
        thread.join(10)
    assert calm_codes == ["ok"] * 15
    assert len(limited) > 50
    assert all(d["retry_after"] >= 1 and isinstance(d["retry_after"], int) for d in limited)

    # create_session has its own, stricter bucket (burst 2, then 1 per 2 s)
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        codes = [code_of(c, "create_session", client_id="maker") for _ in range(4)]
        assert codes == ["ok", "ok", "RateLimited", "RateLimited"]
        assert code_of(c, "list_client_sessions", client_id="maker") == "ok"


def test_rate_limits_are_reported_by_describe(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    front = start_front(
        env={
            "STUI_RATE_LIMIT": "7.5",
            "STUI_RATE_BURST": "30",
            "STUI_CREATE_RATE_LIMIT": "0.25",
            "STUI_CREATE_BURST": "3",
        }
    )
    with Client(front.endpoint, context=zmq_context) as c:
        limits = c.call("describe")["limits"]
    assert (limits["rate_limit"], limits["rate_burst"]) == (7.5, 30)
    assert (limits["create_rate_limit"], limits["create_burst"]) == (0.25, 3)


def test_refusals_are_audited_as_json_lines(
    start_front: Callable[..., FrontProcess],
    redis_client: redis.Redis,
    redis_server: EmbeddedRedis,
    zmq_context: Ctx,
) -> None:
    front = start_front(env={"STUI_CREATE_RATE_LIMIT": "0.1", "STUI_CREATE_BURST": "1"})
    policy_cli(redis_server.url, "deny", "eve")
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        wait_for(lambda: code_of(c, "ping", client_id="eve") == "ClientNotAllowed", 1.0)
        c.call("create_session", client_id="quick")
        assert code_of(c, "create_session", client_id="quick") == "RateLimited"
    lines = [
        json.loads(line)  # audit lines are bare JSON objects
        for line in front.log.read_text().splitlines()
        if line.startswith('{"ts"')
    ]
    reasons = {(a["reason"], a["client_id"]) for a in lines}
    assert ("policy", "eve") in reasons and ("rate_limit", "quick") in reasons
    assert all(a["event"] == "refused" for a in lines)
    text = front.log.read_text()
    assert "Traceback" not in text


def test_other_requests_do_not_refill_the_create_bucket(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    """The buckets' key lives until both would be full: a cheap request must
    not shorten it and hand back spent create tokens."""
    front = start_front(env={"STUI_RATE_LIMIT": "100", "STUI_RATE_BURST": "100",
                             "STUI_CREATE_RATE_LIMIT": "0.1", "STUI_CREATE_BURST": "2"})
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        assert [code_of(c, "create_session", client_id="saver") for _ in range(3)] == [
            "ok", "ok", "RateLimited"]
        c.call("ping", client_id="saver")  # the general bucket refills in 1 s
        time.sleep(2.2)
        assert code_of(c, "create_session", client_id="saver") == "RateLimited"


def test_malformed_client_id_is_invalid_even_under_an_allow_list(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis,
    redis_server: EmbeddedRedis, zmq_context: Ctx,
) -> None:
    front = start_front()
    policy_cli(redis_server.url, "allow", "friend")
    with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
        wait_for(lambda: code_of(c, "ping", client_id="stranger") == "ClientNotAllowed", 1.0)
        reply = c.request("create_session", {"client_id": "x" * 300})
        assert reply["error_type"] == "InvalidRequest"
        assert reply["details"] == {"field": "client_id"}
    assert "x" * 300 not in front.log.read_text()
