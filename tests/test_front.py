"""The front worker as a process: sockets, batching, shutdown, Redis failures."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import zmq

from service import codec, keys, layout
from tests.conftest import FrontProcess
from workers.client import Client, RemoteError
from workers.launchers.process import free_port
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

Ctx = zmq.Context[zmq.Socket[bytes]]


def dealer_burst(ctx: Ctx, endpoint: str, bodies: list[bytes], timeout: float = 20) -> list[Any]:
    """Send every body at once from one DEALER; collect the replies by id."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    for body in bodies:
        sock.send_multipart([b"", body])
    replies: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(replies) < len(bodies) and time.monotonic() < deadline:
        if sock.poll(200):
            frames = sock.recv_multipart()
            assert frames[0] == b""
            replies.append(codec.loads(frames[-1]))
    sock.close()
    return replies


def body(command: str, rid: str, **params: Any) -> bytes:
    return codec.dumps({"id": rid, "command": command, "parameters": params})


def test_dealer_many_in_flight_and_req(front: FrontProcess, zmq_context: Ctx) -> None:
    with Client(front.endpoint, context=zmq_context) as c:
        sid = c.call("create_session", client_id="d")["session_id"]
    bodies = [body("record_evaluation", f"r{i}", session_id=sid, code=str(i)) for i in range(300)]
    replies = dealer_burst(zmq_context, front.endpoint, bodies)
    assert len(replies) == 300
    assert {r["id"] for r in replies} == {f"r{i}" for i in range(300)}
    assert all(r["status"] == "success" for r in replies)
    with Client(front.endpoint, context=zmq_context) as c:
        assert c.call("get_session_info", session_id=sid)["version"] == 301


def test_dealer_without_delimiter_is_answered(front: FrontProcess, zmq_context: Ctx) -> None:
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(front.endpoint)
    sock.send(body("ping", "bare"))
    assert sock.poll(5000)
    frames = sock.recv_multipart()
    assert len(frames) == 1 and codec.loads(frames[0])["id"] == "bare"
    sock.close(0)


def test_workers_option_runs_processes_behind_one_endpoint(
    start_front: Callable[..., FrontProcess], redis_client: redis.Redis, zmq_context: Ctx
) -> None:
    front = start_front(workers=3)
    bodies = [body("ping", f"p{i}") for i in range(200)]
    assert len(dealer_burst(zmq_context, front.endpoint, bodies)) == 200
    import psutil

    assert front.proc is not None
    children = psutil.Process(front.proc.pid).children()
    assert len([p for p in children if "python" in p.name().lower()]) >= 3
    with Client(front.endpoint, context=zmq_context) as c:
        sid = c.call("create_session", client_id="multi")["session_id"]
        assert c.call("get_session_info", session_id=sid)["client_id"] == "multi"


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_answers_everything_in_flight(
    start_front: Callable[..., FrontProcess],
    redis_client: redis.Redis,
    zmq_context: Ctx,
    workers: int,
) -> None:
    front = start_front(workers=workers, env={"STUI_SHUTDOWN_GRACE": "5"})
    with Client(front.endpoint, context=zmq_context) as c:
        sid = c.call("create_session", client_id="term")["session_id"]
    sock = zmq_context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(front.endpoint)
    n = 400
    for i in range(n):
        sock.send_multipart([b"", body("record_evaluation", f"t{i}", session_id=sid, code="x")])
    assert front.proc is not None
    started = time.monotonic()
    front.proc.send_signal(signal.SIGTERM)
    replies: list[Any] = []
    while len(replies) < n and sock.poll(3000):
        replies.append(codec.loads(sock.recv_multipart()[-1]))
    code = front.proc.wait(10)
    assert time.monotonic() - started < 7
    assert code == 0
    assert len(replies) == n
    assert all(r["status"] == "success" for r in replies)
    sock.close()
    front.proc = None
    packed = redis_client.hget(keys.session_key(sid), "m")
    assert isinstance(packed, bytes) and layout.unpack_meta(packed).v == n + 1


def test_redis_down_gives_storage_unavailable_then_recovers(
    start_front: Callable[..., FrontProcess], zmq_context: Ctx
) -> None:
    server = EmbeddedRedis().start()
    try:
        front = start_front(redis_url=server.url)
        with Client(
            front.endpoint, timeout=6, retries=0, retry_unavailable=False, context=zmq_context
        ) as c:
            sid = c.call("create_session", client_id="down")["session_id"]
            port = server.port
            server.stop()
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as err:
                c.call("get_session_info", session_id=sid)
            assert err.value.code == "StorageUnavailable"
            assert time.monotonic() - t0 < 3
            assert c.call("ping")["status"] == "ready"  # the worker still serves
            server = EmbeddedRedis(port=port).start()  # empty, without the scripts
            time.sleep(0.6)
            with pytest.raises(RemoteError) as err:
                c.call("get_session_info", session_id=sid)
            assert err.value.code == "SessionNotFound"  # data gone, service back
            assert c.call("create_session", client_id="down")["version"] == 1
    finally:
        server.stop()


def test_redis_hanging_answers_within_timeout(
    start_front: Callable[..., FrontProcess], zmq_context: Ctx
) -> None:
    server = EmbeddedRedis().start()
    assert server.process is not None
    try:
        front = start_front(redis_url=server.url, env={"STUI_STORAGE_TIMEOUT": "1.0"})
        with Client(
            front.endpoint, timeout=8, retries=0, retry_unavailable=False, context=zmq_context
        ) as c:
            sid = c.call("create_session", client_id="hang")["session_id"]
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                results: list[float] = []

                def ask() -> None:
                    with Client(
                        front.endpoint,
                        timeout=8,
                        retries=0,
                        retry_unavailable=False,
                        context=zmq_context,
                    ) as c2:
                        t = time.monotonic()
                        try:
                            c2.call("get_session_info", session_id=sid)
                        except RemoteError as exc:
                            assert exc.code == "StorageUnavailable"
                            results.append(time.monotonic() - t)

                threads = [threading.Thread(target=ask) for _ in range(5)]
                for t in threads:
                    t.start()
                    time.sleep(0.1)
                for t in threads:
                    t.join(10)
                assert len(results) == 5
                # the configured 1 s bound, plus scheduling slack on a shared machine
                assert max(results) < 2.5
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            time.sleep(0.6)
            assert c.call("get_session_info", session_id=sid)["client_id"] == "hang"
    finally:
        server.stop()


def test_scripts_reload_after_script_flush(client: Client, redis_client: redis.Redis) -> None:
    sid = client.call("create_session", client_id="flush")["session_id"]
    redis_client.script_flush()
    assert client.call("get_session_info", session_id=sid)["version"] == 1
    redis_client.script_flush()
    assert client.call("update_session_state", session_id=sid, state_data={"a": 1})["version"] == 2


# What redis-py sends once on each new connection, before any command.
_HANDSHAKE = ("HELLO", "CLIENT SETINFO", "AUTH", "SELECT", "CLIENT MAINT_NOTIFICATIONS")


def _monitor(redis_client: redis.Redis, stop: threading.Event, seen: list[dict[str, Any]]) -> None:
    try:
        with redis_client.monitor() as m:  # type: ignore[no-untyped-call]
            for cmd in m.listen():
                if cmd.get("client_type") != "lua":
                    seen.append(cmd)
                if stop.is_set():
                    return
    except (redis.RedisError, OSError, ValueError):
        return  # the test closed the connection


def test_one_redis_command_per_protocol_command(
    client: Client, redis_client: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    """MONITOR shows every command a client sends (and, tagged 'lua', what
    scripts run); we count the front's own commands for each request."""
    mon_client = redis.Redis.from_url(redis_server.url)
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    sid = client.call("create_session", client_id="count")["session_id"]
    client.call("get_session_info", session_id=sid)  # scripts loaded by now
    thread = threading.Thread(target=_monitor, args=(mon_client, stop, seen), daemon=True)
    thread.start()
    time.sleep(0.3)
    marker = 0

    def wait_for(text: str) -> int:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for i, c in enumerate(seen):
                if c["command"] == f"ECHO {text}":
                    return i
            time.sleep(0.02)
        raise AssertionError(f"monitor did not see {text}")

    def count(command: str, **params: Any) -> int:
        """Commands that reached Redis between two markers around one request."""
        nonlocal marker
        marker += 1
        redis_client.echo(f"start-{marker}")
        client.call(command, **params)
        redis_client.echo(f"end-{marker}")
        start, end = wait_for(f"start-{marker}"), wait_for(f"end-{marker}")
        # The refresher reads the policy lists, the CURVE key registry and
        # the plans' version every 0.5 s on its own connection, off the
        # request path; on a slow machine one read can land between the
        # markers, and it is not the request's.
        # A new connection's handshake (HELLO, CLIENT SETINFO) is the
        # connection's, not the request's: the refresher shares the pool,
        # and when it holds the one connection as a request comes, the pool
        # opens a second one, once (seen on a busy machine: 'HELLO 3' before
        # the request's EVALSHA).
        mine = [
            c
            for c in seen[start + 1 : end]
            if not any(tag in c["command"] for tag in ("{policy}", "{auth}", "{plans}"))
            and not c["command"].startswith(_HANDSHAKE)
        ]
        del seen[: end + 1]
        last_seen[:] = [c["command"][:80] for c in mine if "EVALSHA" not in c["command"][:8]]
        between[command] = [c["command"][:80] for c in mine]
        return len(mine)

    last_seen: list[str] = []
    between: dict[str, list[str]] = {}  # each request's commands, for the failure message
    per_command = {
        "create_session": count("create_session", client_id="count2"),
        "restore_session": count("restore_session", session_id=sid),
        "update_session_state": count("update_session_state", session_id=sid, state_data={"a": 1}),
        "get_session_info": count("get_session_info", session_id=sid),
        "list_client_sessions": count("list_client_sessions", client_id="count"),
        "save_context": count(
            "save_context", session_id=sid, context={"workspace_context": {"v": 1}}
        ),
        "load_context": count("load_context", session_id=sid),
        "get_context_summary": count("get_context_summary", session_id=sid),
        "clear_context": count("clear_context", session_id=sid),
        "record_evaluation": count("record_evaluation", session_id=sid, code="1"),
        "register_object": count("register_object", session_id=sid, object_id="o", description="d"),
        "release_object": count("release_object", session_id=sid, object_id="o"),
        "close_session": count("close_session", session_id=sid, save_state=True),
        "ping": count("ping"),
        "describe": count("describe"),
    }
    assert all(n <= 1 for n in per_command.values()), {
        k: between[k] for k, n in per_command.items() if n > 1}
    assert per_command["update_session_state"] == 1

    try:
        time.sleep(1.1)  # older than stats_max_age: the next request reads the buckets
        stats_small = count("get_session_statistics")
        # Within stats_max_age the figures come from the worker's snapshot.
        stats_cached = count("get_session_statistics")
        with Client(client.endpoints, context=client.context) as c:
            for i in range(300):
                c.call("create_session", client_id=f"many-{i}")
        time.sleep(1.1)
        stats_large = count("get_session_statistics")
        # a fixed number, one per bucket, whatever the number of sessions
        # (the message names any command between the markers that is not a
        # script call, for a run where another one lands there)
        assert stats_small == stats_large == 64, last_seen
        assert stats_cached == 0
    finally:
        stop.set()
        redis_client.echo("wake the monitor")
        thread.join(5)
        mon_client.close()


def test_unique_request_ids_do_not_collide_across_clients(client: Client) -> None:
    """Replay records are scoped by command and target: two clients that both
    use the id "create-001" (as the Pharo examples do) get two sessions."""
    a = client.request("create_session", {"client_id": "one"}, request_id="create-001")
    b = client.request("create_session", {"client_id": "two"}, request_id="create-001")
    assert a["result"]["session_id"] != b["result"]["session_id"]


def test_full_or_read_only_redis_is_storage_unavailable_and_changes_nothing(
    start_front: Callable[..., FrontProcess], zmq_context: Ctx
) -> None:
    server = EmbeddedRedis(extra_args=["--maxmemory-policy", "noeviction"]).start()
    admin = redis.Redis.from_url(server.url)
    try:
        front = start_front(redis_url=server.url)
        with Client(
            front.endpoint, timeout=5, retries=0, retry_unavailable=False, context=zmq_context
        ) as c:
            sid = c.call("create_session", client_id="full")["session_id"]
            c.call("update_session_state", session_id=sid, state_data={"keep": 1})
            before = admin.hgetall(keys.session_key(sid))

            admin.config_set("maxmemory", 1)
            for command, params in [
                ("create_session", {"client_id": "full"}),
                (
                    "update_session_state",
                    {"session_id": sid, "state_data": {"x": 1}, "replace": True},
                ),
                ("save_context", {"session_id": sid, "context": {"workspace_context": {"a": 1}}}),
                ("record_evaluation", {"session_id": sid, "code": "1"}),
            ]:
                with pytest.raises(RemoteError) as err:
                    c.call(command, **params)
                assert err.value.code == "StorageUnavailable", command
            admin.config_set("maxmemory", 0)
            assert admin.hgetall(keys.session_key(sid)) == before
            assert c.call("list_client_sessions", client_id="full")["session_count"] == 1

            admin.replicaof("127.0.0.1", free_port())  # a replica of nobody: read-only
            with pytest.raises(RemoteError) as err:
                c.call("update_session_state", session_id=sid, state_data={"x": 1})
            assert err.value.code == "StorageUnavailable"
            admin.replicaof("NO", "ONE")
            assert (
                c.call("update_session_state", session_id=sid, state_data={"x": 1})["version"] == 3
            )
    finally:
        admin.close()
        server.stop()


def test_redis_password_from_the_environment(
    start_front: Callable[..., FrontProcess], zmq_context: Ctx
) -> None:
    server = EmbeddedRedis(extra_args=["--requirepass", "s3cret"]).start()
    url = f"redis://127.0.0.1:{server.port}/0"
    try:
        front = start_front(redis_url=url, env={"STUI_REDIS_PASSWORD": "s3cret"})
        with Client(front.endpoint, timeout=5, retries=0, context=zmq_context) as c:
            assert c.call("create_session", client_id="pw")["version"] == 1
        wrong = start_front(redis_url=url, env={"STUI_REDIS_PASSWORD": "nope"})
        with Client(wrong.endpoint, timeout=5, retries=0, retry_unavailable=False,
                    context=zmq_context) as c:
            with pytest.raises(RemoteError) as err:
                c.call("create_session", client_id="pw")
            assert err.value.code == "StorageUnavailable"
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STUI_REDIS_MODE": "cluster"}, "no Redis Cluster reachable"),
        ({"STUI_REDIS_MODE": "cluster", "STUI_WORKERS": "2"}, "no Redis Cluster reachable"),
        ({"STUI_REDIS_MODE": "sentinel"}, "redis_sentinels"),
        ({"STUI_REDIS_MODE": "sentinel", "STUI_REDIS_SENTINELS": "nohost"}, "host:port"),
        ({"STUI_REDIS_MODE": "replicated"}, "redis_mode"),
    ],
)
def test_an_unusable_redis_setting_fails_at_start_in_one_line(
    redis_server: EmbeddedRedis, env: dict[str, str], expected: str
) -> None:
    """Cluster mode against a plain Redis, sentinel mode without sentinels, an
    unknown mode: the front exits non-zero with one error line, no traceback."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "front", "--redis-url", redis_server.url,
         "--bind", f"tcp://127.0.0.1:{free_port()}"],
        env={**os.environ, **env}, capture_output=True, text=True,
        timeout=30,
    )
    assert done.returncode in (2, 3), done
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
