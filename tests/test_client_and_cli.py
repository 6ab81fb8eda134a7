"""The client library's retries and failover, and the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from service import codec
from tests.conftest import FrontProcess
from workers.client import Client, NoReply
from workers.launchers.process import free_port

pytestmark = pytest.mark.integration

Ctx = zmq.Context[zmq.Socket[bytes]]


@pytest.fixture
def flaky_server(zmq_context: Ctx) -> Iterator[tuple[str, list[bytes]]]:
    """A ROUTER that ignores the first request it gets and answers the rest."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    seen: list[bytes] = []
    stop = threading.Event()
    sock = zmq_context.socket(zmq.ROUTER)
    sock.bind(endpoint)

    def serve() -> None:
        while not stop.is_set():
            if sock.poll(50):
                frames = sock.recv_multipart()
                seen.append(frames[-1])
                if len(seen) > 1:
                    rid = codec.loads(frames[-1])["id"]
                    reply = {
                        "id": rid,
                        "status": "success",
                        "result": {"n": len(seen)},
                        "timestamp": "2026-01-01T00:00:00.000Z",
                    }
                    sock.send_multipart([*frames[:-1], codec.dumps(reply)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield endpoint, seen
    stop.set()
    thread.join(2)
    sock.close(0)


def test_retry_resends_the_same_request_id(
    flaky_server: tuple[str, list[bytes]], zmq_context: Ctx
) -> None:
    endpoint, seen = flaky_server
    with Client(endpoint, timeout=0.3, retries=2, context=zmq_context) as c:
        assert c.call("ping") == {"n": 2}
        assert c.stats.retries == 1 and c.stats.timeouts == 1
    assert len(seen) == 2
    assert seen[0] == seen[1]  # byte for byte: same id, same parameters


def test_gives_up_after_the_retry_budget(zmq_context: Ctx) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    with Client(dead, timeout=0.2, retries=2, context=zmq_context) as c, pytest.raises(NoReply):
        c.call("ping")


def test_failover_to_the_next_endpoint(front: FrontProcess, zmq_context: Ctx) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    with Client([dead, front.endpoint], timeout=0.5, retries=2, context=zmq_context) as c:
        sid = c.call("create_session", client_id="fo")["session_id"]
        assert c.stats.retries == 1
        assert c.stats.endpoints_tried == [dead, front.endpoint]
        assert c.call("get_session_info", session_id=sid)["client_id"] == "fo"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_call_prints_the_json_reply(front: FrontProcess) -> None:
    done = _cli(
        "call",
        "create_session",
        "client_id=cli",
        "timeout=60",
        'client_info={"x": []}',
        "--endpoint",
        front.endpoint,
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["result"]["timeout"] == 60 and reply["status"] == "success"
    sid = reply["result"]["session_id"]
    info = json.loads(
        _cli("call", "get_session_info", f"session_id={sid}", "--endpoint", front.endpoint).stdout
    )
    assert info["result"]["client_info"] == {"x": []}
    failed = _cli("call", "get_session_info", "session_id=nope", "--endpoint", front.endpoint)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error_type"] == "SessionNotFound"
    assert _cli("call", "ping", "oops", "--endpoint", front.endpoint).returncode == 2


def test_call_takes_restores_and_lists_checkpoints(front: FrontProcess) -> None:
    """`call` with the checkpoint commands: a value that parses as JSON is
    sent as JSON, so checkpoint_id=1 is the integer the protocol asks for."""

    def call(*args: str) -> dict[str, Any]:
        done = _cli("call", *args, "--endpoint", front.endpoint)
        assert done.returncode == 0, done.stdout + done.stderr
        reply: dict[str, Any] = json.loads(done.stdout)
        return reply

    sid = call("create_session", "client_id=cli-ck")["result"]["session_id"]
    call("update_session_state", f"session_id={sid}", 'state_data={"w": "3 + 4", "v": []}')
    made = call("create_checkpoint", f"session_id={sid}", "label=before the edit")["result"]
    assert made["checkpoint_id"] == 1 and made["label"] == "before the edit"
    assert made["automatic"] is False and made["version"] == 2
    call("update_session_state", f"session_id={sid}", 'state_data={"w": ""}', "replace=true")

    listed = call("list_checkpoints", f"session_id={sid}")["result"]["checkpoints"]
    assert [(c["checkpoint_id"], c["label"], c["automatic"]) for c in listed] == [
        (2, "before update_session_state", True),
        (1, "before the edit", False),
    ]
    restored = call("restore_checkpoint", f"session_id={sid}", "checkpoint_id=1")["result"]
    assert restored["restored_from"] == 1 and restored["version"] == 4
    assert restored["session_state"] == {"w": "3 + 4", "v": []}

    # The envelope encoding, with the command named in PascalCase as the
    # server also accepts it.
    enveloped = call("--encoding", "envelope", "ListCheckpoints", f"session_id={sid}")
    data = enveloped["payload"]["data"]
    assert data["response_type"] == "ListCheckpoints"
    assert [c["checkpoint_id"] for c in data["data"]["checkpoints"]] == [3, 2, 1]

    # "1" quoted stays a string, which the protocol refuses (no coercion).
    quoted = _cli(
        "call", "delete_checkpoint", f"session_id={sid}", 'checkpoint_id="1"',
        "--endpoint", front.endpoint,
    )  # fmt: skip
    assert quoted.returncode == 1
    refused = json.loads(quoted.stdout)
    assert refused["error_type"] == "InvalidRequest"
    assert refused["details"] == {"field": "checkpoint_id"}
    missing = _cli(
        "call", "restore_checkpoint", f"session_id={sid}", "checkpoint_id=9",
        "--endpoint", front.endpoint,
    )  # fmt: skip
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["details"] == {"checkpoint_id": 9}


def test_envelope_client_keeps_a_pascal_case_command_name(zmq_context: Ctx) -> None:
    client = Client("tcp://127.0.0.1:1", encoding="envelope", context=zmq_context)
    for name in ("create_checkpoint", "CreateCheckpoint"):
        body = codec.loads(client.encode(name, {}, "r-1"))
        assert body["payload"]["data"]["request_type"] == "CreateCheckpoint"


def _serve(data_dir: Path, endpoint: str, http_port: int = 0) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STUI_REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
    env["STUI_HTTP_BIND"] = f"127.0.0.1:{http_port or free_port()}"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--bind",
            endpoint,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_ping(endpoint: str, ctx: Ctx) -> None:
    with Client(endpoint, timeout=1, retries=20, context=ctx) as c:
        c.call("ping")


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_serve_persists_sessions_across_a_restart(tmp_path: Path, zmq_context: Ctx) -> None:
    """The one-command run: embedded Redis, front, scheduler and HTTP together."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    http_port = free_port()
    proc = _serve(tmp_path, endpoint, http_port)
    try:
        _wait_ping(endpoint, zmq_context)
        with Client(endpoint, timeout=5, context=zmq_context) as c:
            sid = c.call("create_session", client_id="dev")["session_id"]
            c.call("update_session_state", session_id=sid, state_data={"work": "precious"})
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 20
        while _get(f"{base}/readyz")[0] != 200:
            assert time.monotonic() < deadline, _get(f"{base}/readyz")
            time.sleep(0.2)
        while 'command="create_session",outcome="success"' not in _get(f"{base}/metrics")[1]:
            assert time.monotonic() < deadline, "front metrics never showed up"
            time.sleep(0.2)
        while "stui_sessions_scheduler_is_leader 1.0" not in _get(f"{base}/metrics")[1]:
            assert time.monotonic() < deadline, "the scheduler never led"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert list((tmp_path / "redis").rglob("*.aof"))
    proc = _serve(tmp_path, endpoint)
    try:
        _wait_ping(endpoint, zmq_context)
        with Client(endpoint, timeout=5, context=zmq_context) as c:
            restored = c.call("restore_session", session_id=sid)
        assert restored["session_state"] == {"work": "precious"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_front_without_redis_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "STUI_REDIS_URL"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "front",
            "--workers",
            "2",
            "--bind",
            f"tcp://127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode != 0
    assert "no Redis configured" in done.stderr
