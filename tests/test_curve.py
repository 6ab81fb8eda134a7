"""CurveZMQ authentication: ZAP lets in registered keys only, and the key's
client id is the client id of every request."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import zmq

from tests.conftest import FrontProcess
from tests.helpers import code_of
from workers.client import Client, CurveKeys, NoReply
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

Ctx = zmq.Context[zmq.Socket[bytes]]


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def keys_for(tmp: Path, name: str) -> Path:
    cli("keys", "generate", "--dir", str(tmp), "--name", name)
    return tmp / f"{name}.key_secret"


def public_of(secret_file: Path) -> str:
    public, _ = zmq.auth.load_certificate(str(secret_file))
    return public.decode()


@pytest.fixture(params=[1, 2], ids=["one-worker", "two-workers"])
def curve_front(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_front: Callable[..., FrontProcess],
    redis_client: redis.Redis,
    redis_server: EmbeddedRedis,
) -> tuple[FrontProcess, Path, dict[str, Path]]:
    server_secret = keys_for(tmp_path, "server")
    clients = {name: keys_for(tmp_path, name) for name in ("alice", "bob", "stranger")}
    for name in ("alice", "bob"):
        # "--": a Z85 key may start with "-"
        cli("keys", "add", "--redis-url", redis_server.url, "--", name, public_of(clients[name]))
    probe = CurveKeys.from_files(str(tmp_path / "server.key"), str(clients["bob"]))
    front = start_front(
        workers=request.param,
        curve=probe,
        env={"STUI_CURVE": "true", "STUI_CURVE_KEY_FILE": str(server_secret)},
    )
    return front, tmp_path / "server.key", clients


def connect(
    front: FrontProcess, server_key: Path, client_secret: Path, ctx: Ctx, timeout: float = 3
) -> Client:
    curve = CurveKeys.from_files(str(server_key), str(client_secret))
    return Client(front.endpoint, timeout=timeout, retries=0, context=ctx, curve=curve)


def test_identity_is_the_key(
    curve_front: tuple[FrontProcess, Path, dict[str, Path]], zmq_context: Ctx
) -> None:
    front, server_key, clients = curve_front
    with (
        connect(front, server_key, clients["alice"], zmq_context) as alice,
        connect(front, server_key, clients["bob"], zmq_context) as bob,
    ):
        created = alice.call("create_session")  # no client_id: the key says who
        assert created["client_id"] == "alice"
        sid = created["session_id"]
        assert alice.call("get_session_info", session_id=sid)["client_id"] == "alice"
        assert code_of(alice, "create_session", client_id="bob") == "ClientNotAllowed"
        # bob knows the session id, and still cannot see it
        for command, extra in [
            ("get_session_info", {}),
            ("restore_session", {}),
            ("update_session_state", {"state_data": {"x": 1}}),
            ("close_session", {}),
        ]:
            assert code_of(bob, command, session_id=sid, **extra) == "SessionNotFound"
        assert bob.call("list_client_sessions")["session_count"] == 0
        assert alice.call("list_client_sessions")["session_count"] == 1


def test_unknown_or_plain_clients_get_no_reply(
    curve_front: tuple[FrontProcess, Path, dict[str, Path]], zmq_context: Ctx
) -> None:
    front, server_key, clients = curve_front
    with (
        connect(front, server_key, clients["stranger"], zmq_context, timeout=1) as stranger,
        pytest.raises(NoReply),
    ):
        stranger.call("ping")
    with (
        Client(front.endpoint, timeout=1, retries=0, context=zmq_context) as plain,
        pytest.raises(NoReply),
    ):
        plain.call("ping")


def test_removing_a_key_cuts_the_client_off_within_a_second(
    curve_front: tuple[FrontProcess, Path, dict[str, Path]],
    zmq_context: Ctx,
    redis_server: EmbeddedRedis,
) -> None:
    front, server_key, clients = curve_front
    with connect(front, server_key, clients["alice"], zmq_context) as alice:
        assert alice.call("ping")["status"] == "ready"
        cli("keys", "remove", "alice", "--redis-url", redis_server.url)
        removed = time.monotonic()
        while code_of(alice, "ping") == "ok":  # the open connection
            assert time.monotonic() - removed < 1.0
            time.sleep(0.02)
        # every worker's cache has caught up one second after the removal
        time.sleep(max(0.0, 1.0 - (time.monotonic() - removed)))
        for _ in range(6):
            assert code_of(alice, "create_session") == "ClientNotAllowed"
            assert code_of(alice, "ping") == "ClientNotAllowed"
    with (
        connect(front, server_key, clients["alice"], zmq_context, timeout=1) as again,
        pytest.raises(NoReply),
    ):
        again.call("ping")  # a new connection: ZAP refuses the handshake
    with connect(front, server_key, clients["bob"], zmq_context) as bob:
        assert bob.call("ping")["status"] == "ready"


def test_keys_cli_lists_public_keys_only(
    redis_server: EmbeddedRedis, tmp_path: Path, redis_client: redis.Redis
) -> None:
    secret = keys_for(tmp_path, "carol")
    cli("keys", "add", "--redis-url", redis_server.url, "--", "carol", public_of(secret))
    listed = cli("keys", "list", "--redis-url", redis_server.url)
    assert public_of(secret) in listed and "carol" in listed
    secret_text = secret.read_text()
    secret_key = secret_text.split('secret-key = "')[1].split('"')[0]
    assert secret_key not in listed
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "keys",
            "add",
            "--redis-url",
            redis_server.url,
            "dave",
            "short",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "40 characters" in bad.stderr
