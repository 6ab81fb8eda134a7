"""Replay records hold binary ids (service/keys.py, replay_id): an 8-byte
digest and an 8-byte fingerprint that may contain any byte, ';' (the
separator of a session's records) and a zero byte (where Lua's
string.format('%s') would stop) included. Against a real redis-server, whose
Lua 5.1 is the one production runs (fakeredis' Lua is another).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from service import codec, keys, layout
from service.dispatch import Dispatcher
from service.settings import Settings
from service.store import Store, connect
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration


def hostile_replay_id(scope: str, parameters: bytes) -> bytes:
    """keys.replay_id with ';' and zero bytes at the places a parser that
    split on ';' or stopped at a zero byte would get wrong."""
    digest = hashlib.blake2b(scope.encode("utf-8", "surrogatepass"), digest_size=5).digest()
    fp = hashlib.blake2b(parameters, digest_size=5).digest()
    return b";\x00;" + digest + b"\x00;;" + fp


@pytest.fixture(params=["blake2b", "hostile"])
def dispatcher(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
    redis_server: EmbeddedRedis, redis_client: redis.Redis,
) -> Iterator[tuple[Dispatcher, bool]]:
    hostile = request.param == "hostile"
    if hostile:
        monkeypatch.setattr(keys, "replay_id", hostile_replay_id)
    client = connect(redis_server.url, 10.0)
    yield Dispatcher(Settings(redis_url=redis_server.url), Store(client)), hostile
    client.close()


def ask(d: Dispatcher, rid: str, command: str, **params: Any) -> dict[str, Any]:
    body = codec.dumps({"id": rid, "command": command, "parameters": params})
    reply = codec.loads(d.handle([body])[0])
    assert isinstance(reply, dict)
    return reply


def test_retries_are_answered_from_records_whatever_bytes_their_ids_hold(
    dispatcher: tuple[Dispatcher, bool], redis_client: redis.Redis,
) -> None:
    d, hostile = dispatcher
    created = ask(d, "c1", "create_session", client_id="rb")["result"]
    assert ask(d, "c1", "create_session", client_id="rb")["result"] == created
    sid = created["session_id"]

    def update(rid: str, n: int) -> dict[str, Any]:
        return ask(d, rid, "update_session_state", session_id=sid, state_data={"n": n})

    first = [update(f"u{n}", n)["result"] for n in range(layout.REPLAY_MAX + 1)]
    # The session keeps REPLAY_MAX records, newest first: each is found by
    # position, past records whose ids hold ';'.
    q = redis_client.hget(keys.session_key(sid), layout.REPLAY_FIELD)
    assert isinstance(q, bytes) and q.count(b";") >= layout.REPLAY_MAX - 1
    if hostile:  # splitting q on ';' would cut every record in three
        assert q.startswith(b";\x00;") and q.count(b";") >= 4 * layout.REPLAY_MAX
    for n in range(1, layout.REPLAY_MAX + 1):
        assert update(f"u{n}", n)["result"] == first[n]
    assert update("u0", 0)["result"]["version"] == first[-1]["version"] + 1  # dropped: runs again
    reused = update(f"u{layout.REPLAY_MAX}", 99)  # an id kept, other parameters
    assert reused["error_type"] == "InvalidRequest" and reused["details"]["field"] == "id"
    # The index's records (create, close) too.
    assert ask(d, "c1", "create_session", client_id="rb", timeout=99)["error_type"] \
        == "InvalidRequest"
    closed = ask(d, "x1", "close_session", session_id=sid)
    assert closed["status"] == "success"
    assert ask(d, "x1", "close_session", session_id=sid)["result"] == closed["result"]
    info = ask(d, "i", "get_session_info", session_id=sid)
    assert info["error_type"] == "SessionNotFound"
