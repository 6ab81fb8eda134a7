"""The upgrade from the previous release's Redis layout (separate metadata
fields, replay records and rate buckets in keys of their own) to this one's
(service/layout.py).

Sessions are written by the previous release's own scripts, kept verbatim in
tests/previous_release/scripts.py and called with that release's calling
convention, on a real redis-server. This release's dispatcher must then read
them as they are, convert each at its first write, keep every cap, and list,
count, back up and restore them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service import backup, keys, layout, restore
from service.backup_read import verify_backup
from service.dispatch import Dispatcher
from service.housekeeping import housekeep
from service.settings import Settings
from service.store import Store, connect
from tests.previous_release import scripts as old
from workers.launchers.redis import EmbeddedRedis

KEY = b"k" * 32
WINDOW_MS = 300_000


@pytest.fixture
def dispatcher(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Dispatcher]:
    settings = Settings(redis_url=redis_server.url, max_state_keys=20, stats_max_age=0)
    client = connect(redis_server.url, 10.0)
    yield Dispatcher(settings, Store(client))
    client.close()


def ask(d: Dispatcher, command: str, **params: Any) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(
        d.handle([json.dumps({"command": command, "parameters": params}).encode()])[0]
    )
    return reply


def ok(d: Dispatcher, command: str, **params: Any) -> dict[str, Any]:
    reply = ask(d, command, **params)
    assert reply["status"] == "success", reply
    result: dict[str, Any] = reply["result"]
    return result


class PreviousRelease:
    """The previous release's scripts, called as its handlers called them."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.n = 0

    def _keys(self, sid: str, chash: str) -> list[str]:
        tag = f"stui:{{b{int(chash, 16) % keys.NUM_BUCKETS:02d}}}"
        self.n += 1
        replay = f"{tag}:r:{hashlib.sha256(str(self.n).encode()).hexdigest()[:32]}"
        return [f"{tag}:s:{sid}", f"{tag}:c:{chash}", f"{tag}:exp", f"{tag}:clients", replay,
                f"{tag}:rl:{chash}"]

    def run(self, script: old.Script, sid: str, client_id: str, extra: list[Any]) -> list[Any]:
        chash = keys.client_hash(client_id)
        fp = f"{self.n:032x}"
        args = [client_id, fp, WINDOW_MS, sid, chash, "100,200,10,20,0", *extra]
        reply: list[Any] = self.r.eval(
            script.source, 6, *self._keys(sid, chash), *args
        )
        assert reply[0] == b"OK", reply
        return reply

    def create(self, client_id: str, timeout: int, client_info: bytes = b"") -> str:
        sid = keys.new_session_id(keys.client_hash(client_id))
        self.run(old.CREATE, sid, client_id, [timeout, client_info, 5])
        return sid

    def update(self, sid: str, client_id: str, state: dict[str, Any]) -> None:
        pairs: list[Any] = []
        for k, v in state.items():
            pairs += [k, json.dumps(v, separators=(",", ":"))]
        self.run(old.UPDATE, sid, client_id, ["", "0", 1 << 20, 20, *pairs])

    def save_registry(self, sid: str, client_id: str, registry: dict[str, Any]) -> None:
        pairs: list[Any] = []
        for k, v in registry.items():
            pairs += [k, json.dumps(v, separators=(",", ":"))]
        self.run(old.SAVE_CONTEXT, sid, client_id,
                 ["", 1 << 20, "-", 0, "-", 0, "", len(registry), *pairs, -1])

    def record(self, sid: str, client_id: str, entry: dict[str, Any]) -> None:
        self.run(old.RECORD_EVALUATION, sid, client_id,
                 [json.dumps(entry, separators=(",", ":")), 50, 1 << 20])


def test_sessions_of_the_previous_release_are_read_then_converted(
    dispatcher: Dispatcher, redis_client: redis.Redis
) -> None:
    prev = PreviousRelease(redis_client)
    info = {"editor": "stui", "pad": "p" * 100}
    sid = prev.create("up", 600, json.dumps(info, separators=(",", ":")).encode())
    other = prev.create("up", 900)
    prev.update(sid, "up", {f"k{n:02d}": n for n in range(17)})
    prev.save_registry(sid, "up", {"o1": {"class": "Point"}})
    prev.record(sid, "up", {"code": "3 + 4", "result": "7"})
    key = keys.session_key(sid)
    assert redis_client.hget(key, "m") is None and redis_client.hget(key, "v") == b"4"

    # Read as it is: nothing converted by a read.
    got = ok(dispatcher, "get_session_info", session_id=sid)
    assert (got["client_id"], got["version"], got["timeout"]) == ("up", 4, 600)
    assert json.loads(json.dumps(got["client_info"])) == info
    assert 590 <= got["time_until_expiry"] <= 600
    summary = ok(dispatcher, "get_context_summary", session_id=sid)
    assert summary["registry_size"] == 1 and summary["evaluation_count"] == 1
    assert redis_client.hget(key, "m") is None
    listing = ok(dispatcher, "list_client_sessions", client_id="up")
    assert sorted(s["session_id"] for s in listing["sessions"]) == sorted([sid, other])
    assert ok(dispatcher, "get_session_statistics")["total_sessions"] == 2

    # The key cap holds on the old session: 17 keys, the cap is 20.
    refused = ask(dispatcher, "update_session_state", session_id=sid,
                  state_data={"a": 1, "b": 2, "c": 3, "d": 4})
    assert refused["error_type"] == "PayloadTooLarge", refused
    done = ok(dispatcher, "update_session_state", session_id=sid, state_data={"a": 1})
    assert done["version"] == 5 and len(done["session_state"]) == 18

    # Converted at that write: this release's layout, the old fields gone.
    fields = redis_client.hgetall(key)
    assert b"m" in fields and not {f.encode() for f in layout.LEGACY_META} & set(fields)
    meta = layout.unpack_meta(fields[b"m"])
    assert (meta.c, meta.v, meta.to, meta.sn, meta.rn, meta.en, meta.eo) == (
        "up", 5, 600, 18, 1, 1, 1)
    assert meta.cb == len(json.dumps(info, separators=(",", ":")))
    # Its index entry moved from its full id to this release's short field;
    # the session not written yet keeps the previous release's.
    index = redis_client.hgetall(keys.client_index_key(keys.client_hash("up")))
    assert layout.index_field(sid) in index and sid.encode() not in index
    assert other.encode() in index and layout.index_field(other) not in index
    # Its bucket's expiry member too: one member per session, whatever its name.
    members = redis_client.zrange(keys.bucket_expiry_key(keys.bucket_of(keys.client_hash("up"))),
                                  0, -1)
    assert layout.index_field(sid) in members and sid.encode() not in members
    assert other.encode() in members and layout.index_field(other) not in members
    restored = ok(dispatcher, "restore_session", session_id=sid)
    assert restored["session_state"]["k16"] == 16 and restored["session_state"]["a"] == 1
    assert restored["object_registry"] == {"o1": {"class": "Point"}}
    assert restored["evaluation_history"] == [{"code": "3 + 4", "result": "7"}]
    assert ok(dispatcher, "list_client_sessions", client_id="up")["session_count"] == 2
    # Each session counts once toward the limit (5), whichever field it is under.
    extra = [ok(dispatcher, "create_session", client_id="up")["session_id"] for _ in range(3)]
    assert ask(dispatcher, "create_session", client_id="up")["error_type"] == "SessionLimitExceeded"
    for new_sid in extra:
        assert ok(dispatcher, "close_session", session_id=new_sid)["closed"] is True
    assert ok(dispatcher, "close_session", session_id=other)["closed"] is True
    index = redis_client.hgetall(keys.client_index_key(keys.client_hash("up")))
    assert [f for f in index if layout.is_session_entry(f)] == [layout.index_field(sid)]
    assert ok(dispatcher, "get_session_statistics")["total_sessions"] == 1


def test_a_backup_of_the_previous_release_restores_into_this_layout(
    dispatcher: Dispatcher, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A backup file holds the layout-free fields (c, ca, lm, to, v, a, the
    content) and, written by the previous release, its counters too: both
    restore, and this release's backups read back the same."""
    prev = PreviousRelease(redis_client)
    sid = prev.create("bk", 600)
    prev.update(sid, "bk", {"x": [1, 2], "y": {"z": None}})
    path = tmp_path / "previous.jsonl.gz"
    backup.write_backup([redis_client], path, key=KEY)  # the old hash, as the old release did
    lines = verify_backup(path, key=KEY)
    assert lines.sessions == 1
    redis_client.flushall()
    result = restore.restore_backup(redis_client, path, key=KEY)
    assert result.restored == 1 and result.invalid == 0
    fields = redis_client.hgetall(keys.session_key(sid))
    assert b"m" in fields and b"sb" not in fields and b"cn" not in fields
    state = ok(dispatcher, "restore_session", session_id=sid)["session_state"]
    assert state == {"x": [1, 2], "y": {"z": None}}
    # A backup of the converted session restores the same.
    again = tmp_path / "current.jsonl.gz"
    backup.write_backup([redis_client], again, key=KEY)
    redis_client.flushall()
    assert restore.restore_backup(redis_client, again, key=KEY).restored == 1
    assert ok(dispatcher, "restore_session", session_id=sid)["session_state"] == state
    assert ok(dispatcher, "list_client_sessions", client_id="bk")["session_count"] == 1


def test_housekeeping_reads_the_previous_release_index_entries(
    dispatcher: Dispatcher, redis_client: redis.Redis
) -> None:
    """An index the previous release wrote keeps each session under its full
    id: housekeeping finds an orphan there (its hash gone, as an eviction
    would leave it) and leaves the live one, under either form."""
    prev = PreviousRelease(redis_client)
    kept, orphan, moved = (prev.create("hk-up", 600) for _ in range(3))
    ok(dispatcher, "update_session_state", session_id=moved, state_data={"a": 1})
    redis_client.delete(keys.session_key(orphan))
    pruned = housekeep(redis_client, [redis_client])
    assert pruned.orphans == 1
    index = redis_client.hgetall(keys.client_index_key(keys.client_hash("hk-up")))
    assert sorted(f for f in index if layout.is_session_entry(f)) == sorted(
        [kept.encode(), layout.index_field(moved)])
    expiry = keys.bucket_expiry_key(keys.bucket_of(keys.client_hash("hk-up")))
    assert sorted(redis_client.zrange(expiry, 0, -1)) == sorted(
        [kept.encode(), layout.index_field(moved)])  # the orphan's member went too
    assert ok(dispatcher, "get_session_statistics")["total_sessions"] == 2
    listing = ok(dispatcher, "list_client_sessions", client_id="hk-up")
    assert sorted(s["session_id"] for s in listing["sessions"]) == sorted([kept, moved])


def text_meta(meta: layout.Meta) -> bytes:
    """`m` as builds before the MessagePack form wrote it: the numbers, then
    the client id, comma-separated."""
    numbers = [b"%d" % getattr(meta, name) for name in layout.META]
    return b",".join([*numbers, meta.c.encode("utf-8")])


def test_text_metadata_of_an_earlier_build_is_read_then_packed(
    dispatcher: Dispatcher, redis_client: redis.Redis
) -> None:
    sid = ok(dispatcher, "create_session", client_id="texty", timeout=600)["session_id"]
    ok(dispatcher, "update_session_state", session_id=sid, state_data={"a": 1, "b": "x" * 50})
    key = keys.session_key(sid)
    packed = redis_client.hget(key, "m")
    assert isinstance(packed, bytes) and not packed[:1].isdigit()  # MessagePack
    meta = layout.unpack_meta(packed)
    assert layout.pack_meta(meta) == packed  # the Python writer agrees with cmsgpack
    text = text_meta(meta)
    assert layout.unpack_meta(text) == meta
    redis_client.hset(key, "m", text)

    # Read as it is: every counter and the owner come through.
    info = ok(dispatcher, "get_session_info", session_id=sid)
    assert info["version"] == meta.v and info["client_id"] == "texty"
    assert redis_client.hget(key, "m") == text  # a read writes nothing
    assert ok(dispatcher, "restore_session", session_id=sid)["session_state"] == {
        "a": 1, "b": "x" * 50}
    # restore_session slides the expiry: that write packs it already.
    assert not (redis_client.hget(key, "m") or b"0")[:1].isdigit()
    redis_client.hset(key, "m", text)

    # Packed at the next write, with the same counters moved on by the write.
    ok(dispatcher, "update_session_state", session_id=sid, state_data={"c": 2})
    after = redis_client.hget(key, "m")
    assert isinstance(after, bytes) and not after[:1].isdigit()
    moved = layout.unpack_meta(after)
    assert (moved.v, moved.sn, moved.c) == (meta.v + 1, meta.sn + 1, "texty")
    assert ok(dispatcher, "restore_session", session_id=sid)["session_state"] == {
        "a": 1, "b": "x" * 50, "c": 2}
