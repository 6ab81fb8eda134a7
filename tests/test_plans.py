"""Plans (PROTOCOL.md, "Plans"): named limits assigned to a client id or an
id prefix, enforced by real fronts on a real Redis (standalone and Cluster)
exactly as the defaults are, precedence exact > longest prefix > defaults,
a change live on two front processes within a second, and `describe` per
client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from service import backup, plans, restore
from service.dispatch import Dispatcher
from service.settings import Settings
from service.store import Store, connect
from tests.conftest import FrontProcess
from tests.helpers import wait_for
from tests.test_backup import TEST_KEY, cli, run
from tests.test_clients import Topology, topology
from workers.client import Client, RemoteError
from workers.launchers.redis import EmbeddedRedis

__all__ = ["topology"]  # the fixture, shared with tests/test_clients.py

DEFAULTS = Settings()


def error_of(call: Callable[[], Any]) -> tuple[str, dict[str, Any]]:
    try:
        call()
    except RemoteError as exc:
        return str(exc.code), dict(exc.details)
    return "ok", {}


# Unit: the table and its checks --------------------------------------------


def test_exact_beats_the_longest_prefix_which_beats_the_defaults() -> None:
    table = plans.PlanTable(
        plans={"a": {}, "b": {}, "c": {}},
        exact={"team-lead-boss": "c", "team-x2": "missing"},
        prefixes={"team-": "a", "team-lead-": "b", "gone-": "missing", "team-lead-g": "missing"},
    )
    assert table.plan_for("team-x") == "a"
    assert table.plan_for("team-lead-x") == "b"
    assert table.plan_for("team-lead-boss") == "c"
    assert table.plan_for("other") is None
    assert table.plan_for("gone-1") is None  # assigned to a plan that is gone: none
    assert table.plan_for("team") is None
    # An assignment to a plan that is gone counts as none: the next one applies.
    assert table.plan_for("team-x2") == "a"
    assert table.plan_for("team-lead-gx") == "b"


def test_limits_are_checked() -> None:
    assert plans.check_limits({"rate_limit": 2, "max_sessions_per_client": 3}) == {
        "rate_limit": 2.0, "max_sessions_per_client": 3}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max_sessions": 3}, "unknown limit"),
        ({"max_sessions_per_client": 0}, "at least 1"),
        ({"max_state_bytes": 1.5}, "whole number"),
        ({"max_timeout": 2_592_001}, "at most"),
        ({"history_limit": True}, "a number"),
        # float('nan') < 0 is false: without the check a NaN rate would
        # switch the plan's rate limit off in the scripts.
        ({"rate_limit": "nan"}, "finite"),
        ({"rate_limit": float("inf")}, "finite"),
        ({"rate_limit": [1]}, "a number"),
    ]
    for bad, why in cases:
        with pytest.raises(ValueError, match=why):
            plans.check_limits(bad)
    with pytest.raises(ValueError, match="plan name"):
        plans.check_name("no spaces")


def test_a_plan_lowers_the_state_cap_but_never_raises_it() -> None:
    low = plans.Limits.of(DEFAULTS, "p", {"max_state_bytes": 4096, "history_limit": 3})
    assert low.settings.max_state_bytes == 4096 and low.settings.history_limit == 3
    assert low.settings.rate_limit == DEFAULTS.rate_limit  # unset: the settings
    high = plans.Limits.of(DEFAULTS, "p", {"max_state_bytes": DEFAULTS.max_state_bytes * 8})
    assert high.settings.max_state_bytes == DEFAULTS.max_state_bytes


# Through real fronts --------------------------------------------------------


@pytest.fixture
def plan_front(topology: Topology) -> Iterator[FrontProcess]:
    # The rate limiter at its defaults, so that a plan's rate is what limits.
    env = {**topology.env, "STUI_RATE_BURST": str(DEFAULTS.rate_burst),
           "STUI_CREATE_BURST": "1000"}
    front = FrontProcess(topology.url, env=env).start()
    yield front
    front.stop()


def plans_cli(topology: Topology, *args: str) -> dict[str, Any]:
    done = cli("plans", *args, *topology.flags, env=topology.env)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def set_up(topology: Topology) -> None:
    plans_cli(topology, "set", "tiny", "--max-sessions", "1")
    plans_cli(topology, "set", "small", "--max-sessions", "2", "--max-state-bytes", "2048",
              "--history-limit", "3", "--max-checkpoints", "2", "--max-timeout", "600",
              "--rate-limit", "1", "--rate-burst", "30")
    plans_cli(topology, "set", "big", "--max-sessions", "7")
    plans_cli(topology, "assign", "team-", "tiny", "--prefix")
    plans_cli(topology, "assign", "team-lead-", "small", "--prefix")
    shown = plans_cli(topology, "assign", "team-lead-boss", "big")
    assert shown["assignments"] == {"team-lead-boss": "big"}
    assert shown["prefix_assignments"] == {"team-": "tiny", "team-lead-": "small"}
    assert shown["plans"]["small"]["max_state_bytes"] == 2048


def creates_until_refused(c: Client, client_id: str) -> tuple[int, dict[str, Any]]:
    for n in range(20):
        code, details = error_of(lambda: c.call("create_session", client_id=client_id))
        if code != "ok":
            assert code == "SessionLimitExceeded", code
            return n, details
    raise AssertionError("never refused")


def test_plan_limits_are_enforced_by_exact_and_prefix_assignment(
    topology: Topology, plan_front: FrontProcess
) -> None:
    set_up(topology)
    time.sleep(2 * DEFAULTS.policy_refresh + 0.2)  # every front has the table
    with Client(plan_front.endpoint, timeout=5, retries=0) as c:
        # Sessions per client, with the client's own limit in the details.
        assert creates_until_refused(c, "team-x") == (1, {"limit": 1})
        assert creates_until_refused(c, "team-lead-x") == (2, {"limit": 2})
        assert creates_until_refused(c, "team-lead-boss") == (7, {"limit": 7})
        assert creates_until_refused(c, "someone-else") == (5, {"limit": 5})

        # The rest on a session of "small" (by prefix), in requests that name
        # the client and in requests that name only the session (whose owner
        # the front must learn: the OWNER round trip).
        c.call("close_session", session_id=c.call(
            "list_client_sessions", client_id="team-lead-x")["sessions"][0]["session_id"])
        sid = c.call("create_session", client_id="team-lead-x")["session_id"]
        big = {"pad": "x" * 3000}
        for named in ({"client_id": "team-lead-x"}, {}):
            code, details = error_of(lambda named=named: c.call(  # type: ignore[misc]
                "update_session_state", session_id=sid, state_data=big, **named))
            assert (code, details.get("limit_bytes")) == ("PayloadTooLarge", 2048), named
        for n in range(5):
            c.call("record_evaluation", session_id=sid, code=f"{n} + 1", result=n + 1)
        assert c.call("get_context_summary", session_id=sid)["evaluation_count"] == 3
        c.call("create_checkpoint", session_id=sid)
        c.call("create_checkpoint", session_id=sid, client_id="team-lead-x")
        code, details = error_of(lambda: c.call("create_checkpoint", session_id=sid))
        assert (code, details) == ("CheckpointLimitExceeded", {"limit": 2})
        code, details = error_of(
            lambda: c.call("create_session", client_id="team-lead-y", timeout=601))
        assert (code, details) == ("InvalidRequest", {"field": "timeout", "limit": 600})
        made = c.call("create_session", client_id="team-lead-y")
        assert made["timeout"] == 600  # the default, held to the plan's largest
        assert c.call("create_session", client_id="someone-new", timeout=601)["timeout"] == 601

        # The plan's rate (1/s, burst 30) limits, named or not.
        refused = 0
        for _ in range(40):
            code, _details = error_of(lambda: c.call("get_session_info", session_id=sid))
            refused += code == "RateLimited"
        assert refused >= 5
        code, _details = error_of(lambda: c.call("ping", client_id="team-lead-x"))
        assert code == "RateLimited"
        # Another client of the service's own rate is not limited.
        for _ in range(40):
            c.call("ping", client_id="someone-else")


def describe_of(front: FrontProcess, client_id: str | None) -> dict[str, Any]:
    with Client(front.endpoint, timeout=5, retries=0) as c:
        if client_id is None:
            out: dict[str, Any] = c.call("describe")
        else:
            out = c.call("describe", client_id=client_id)
        return out


def test_describe_reports_a_clients_plan_and_limits(
    topology: Topology, plan_front: FrontProcess
) -> None:
    set_up(topology)
    wait_for(lambda: describe_of(plan_front, "team-lead-q").get("plan") == "small", 2)
    mine = describe_of(plan_front, "team-lead-q")
    assert mine["limits"]["max_sessions_per_client"] == 2
    assert mine["limits"]["max_state_bytes"] == 2048
    assert mine["limits"]["max_timeout"] == 600
    assert mine["limits"]["rate_limit"] == 1.0 and mine["limits"]["rate_burst"] == 30
    assert mine["limits"]["max_checkpoint_bytes"] == DEFAULTS.max_checkpoint_bytes  # unset
    free = describe_of(plan_front, "someone-else")
    assert free["plan"] is None
    assert free["limits"]["max_sessions_per_client"] == DEFAULTS.max_sessions_per_client
    anonymous = describe_of(plan_front, None)
    assert "plan" not in anonymous
    assert anonymous["limits"]["max_timeout"] == DEFAULTS.max_timeout
    shown = cli("clients", "show", "team-lead-q", "--json", *topology.flags, env=topology.env)
    view = json.loads(shown.stdout)
    assert view["plan"] == "small" and view["limits"]["history_limit"] == 3


def test_a_plan_change_is_live_on_two_fronts_within_a_second(
    redis_server: EmbeddedRedis, redis_client: redis.Redis,
    start_front: Callable[..., FrontProcess],
) -> None:
    fronts = [start_front(), start_front()]
    flags = ["--redis-url", redis_server.url]

    def run(*args: str) -> None:
        done = cli("plans", *args, *flags)
        assert done.returncode == 0, done.stderr

    run("set", "p1", "--max-sessions", "3")
    run("assign", "live-client", "p1")
    def plan_on(front: FrontProcess) -> Any:
        return describe_of(front, "live-client").get("plan")

    def sessions_on(front: FrontProcess) -> Any:
        return describe_of(front, "live-client")["limits"]["max_sessions_per_client"]

    def on_every_front(check: Callable[[FrontProcess], bool], what: str) -> None:
        for front in fronts:
            wait_for(partial(check, front), 1.0, what=what)

    on_every_front(lambda f: plan_on(f) == "p1", "the assignment")
    # A change of the plan itself, then of the assignment, each within a second.
    run("set", "p1", "--max-sessions", "4")
    on_every_front(lambda f: sessions_on(f) == 4, "the new limit")
    run("unassign", "live-client")
    on_every_front(lambda f: plan_on(f) is None, "the unassignment")
    # Removing a plan that is assigned is refused, and changes nothing.
    run("set", "p2")
    run("assign", "x-", "p2", "--prefix")
    refused = cli("plans", "remove", "p2", *flags)
    assert refused.returncode == 2 and "unassign it first" in refused.stderr
    run("unassign", "x-", "--prefix")
    run("remove", "p2")
    missing = cli("plans", "remove", "p2", *flags)
    assert missing.returncode == 1
    listed = json.loads(cli("plans", "list", *flags).stdout)
    assert listed == {"plans": {"p1": {"max_sessions_per_client": 4}}, "assignments": {},
                      "prefix_assignments": {}}
    bad = cli("plans", "assign", "y", "nope", *flags)
    assert bad.returncode == 2 and "no plan" in bad.stderr


def test_a_restore_honours_each_clients_plan(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    d = Dispatcher(Settings(redis_url=redis_server.url, rate_limit=0, create_rate_limit=0),
                   Store(connect(redis_server.url, 10.0)))
    run(d, [("create_session", {"client_id": "team-a"})] * 3)
    run(d, [("create_session", {"client_id": "other"})] * 3)
    path = tmp_path / "b.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    redis_client.flushall()
    plans.set_plan(redis_client, "tiny", {"max_sessions_per_client": 1})
    plans.assign(redis_client, "team-", "tiny", prefix=True)
    result = restore.restore_backup(redis_client, path, key=TEST_KEY)
    assert (result.restored, result.over_limit) == (4, 2)  # team-a: 1 of 3; other: 3


def test_an_unknown_session_is_rate_limited_alike_with_prefix_plans(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    """With prefix assignments the front defers a session-only request's rate
    limit to the script (it must learn the owner first). A session that is
    gone is still refused by an empty bucket, as without prefixes."""
    settings = Settings(redis_url=redis_server.url, rate_limit=0.001, rate_burst=2)
    store = Store(connect(redis_server.url, 10.0))

    def answer(d: Dispatcher, sid: str) -> str:
        (raw,) = d.handle([json.dumps({"command": "get_session_info",
                                       "parameters": {"session_id": sid}}).encode()])
        reply = json.loads(raw)
        return str(reply.get("error_type", reply["status"]))

    for with_prefixes in (False, True):
        redis_client.flushall()
        cache = plans.PlanCache(redis_client, settings)
        if with_prefixes:
            plans.set_plan(redis_client, "p", {"rate_limit": 5})
            plans.assign(redis_client, "team-", "p", prefix=True)
            cache.refresh()
            assert cache.for_owner("0" * 16)[1] == "team-"  # deferred: prefixes sent
        d = Dispatcher(settings, store, plans=cache)
        (made,) = run(d, [("create_session", {"client_id": "solo"})])
        sid = made["session_id"]
        run(d, [("get_session_info", {"session_id": sid})])  # the second token
        gone = sid[:-4] + ("AAAA" if not sid.endswith("AAAA") else "BBBB")
        assert answer(d, gone) == "RateLimited", with_prefixes
