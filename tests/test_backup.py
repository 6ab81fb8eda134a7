"""Backups: the file format, restore, verify and the one-off commands, on a real Redis.

Every backup here is signed with TEST_KEY; `cli` hands it to the commands
(STUI_BACKUP_KEY). Signing, legacy files, restore's re-validation, bounded
reading and file modes are in tests/test_backup_trust.py."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import hmac
import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service import backup, keys, layout, restore
from service.backup_format import BackupError
from service.dispatch import Dispatcher
from service.housekeeping import Pruned, global_figures, housekeep
from service.settings import Settings
from service.store import Store, connect
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

# The backup key of these tests (STUI_BACKUP_KEY): its text, and the bytes that sign.
TEST_KEY_TEXT = "test-backup-key-0123456789abcdef0123456789abcdef"
TEST_KEY = TEST_KEY_TEXT.encode()
KEY_ENV = {"STUI_BACKUP_KEY": TEST_KEY_TEXT}

# Fields that move with time or with restore_session itself.
MOVING = ("expires_at", "time_until_expiry")


@pytest.fixture
def dispatcher(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Dispatcher]:
    settings = Settings(
        redis_url=redis_server.url, rate_limit=0, create_rate_limit=0, max_sessions_per_client=5
    )
    client = connect(redis_server.url, 10.0)
    yield Dispatcher(settings, Store(client))
    client.close()


def run(d: Dispatcher, requests: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """A batch of requests through the real dispatcher; every reply must succeed."""
    # No request id: no replay record, and nothing to collide across batches.
    bodies = [json.dumps({"command": c, "parameters": p}).encode() for c, p in requests]
    replies = [json.loads(r) for r in d.handle(bodies)]
    for reply in replies:
        assert reply["status"] == "success", reply
    return [r["result"] for r in replies]


def in_batches(
    d: Dispatcher, requests: list[tuple[str, dict[str, Any]]], size: int = 500
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(requests), size):
        out += run(d, requests[start : start + size])
    return out


def make_sessions(d: Dispatcher, clients: int, per_client: int = 1, prefix: str = "c") -> list[str]:
    """Sessions with state, context, registry and history, some closed (inactive)."""
    creates = [
        (
            "create_session",
            {
                "client_id": f"{prefix}{n}",
                "timeout": 600 + n % 7,
                "client_info": {"n": n, "tags": [], "meta": {}},
            },
        )
        for n in range(clients)
        for _ in range(per_client)
    ]
    sids = [r["session_id"] for r in in_batches(d, creates)]
    fill: list[tuple[str, dict[str, Any]]] = []
    for n, sid in enumerate(sids):
        fill.append(
            (
                "update_session_state",
                {
                    "session_id": sid,
                    "state_data": {
                        "n": n,
                        "empty": [],
                        "obj": {},
                        "text": f"é{n}\u2603",
                        "big": 2**64 - 1,  # the widest integer kept exactly (service/codec.py)
                    },
                },
            )
        )
        fill.append(
            (
                "save_context",
                {
                    "session_id": sid,
                    "context": {
                        "workspace_context": {"variables": {"x": n}},
                        "inspector_state": {"history": [n], "selected_object": f"o{n}"},
                        "evaluation_history": [{"code": "1+1"}, {"code": f"{n} printString"}],
                        "object_registry": {f"obj-{n}": {"class": "Point", "x": []}},
                    },
                },
            )
        )
        if n % 10 != 5:  # the other commands, on a tenth of the sessions
            continue
        fill.append(
            (
                "register_object",
                {
                    "session_id": sid,
                    "object_id": f"obj-{n}",
                    "description": "a Point",
                    "metadata": {"k": [1, {}]},
                },
            )
        )
        fill.append(("record_evaluation", {"session_id": sid, "code": "3+4", "result": 7}))
        fill.append(("close_session", {"session_id": sid, "save_state": True}))
    in_batches(d, fill)
    return sids


def snapshot(client: redis.Redis, sids: list[str]) -> dict[str, tuple[dict[bytes, bytes], int]]:
    """Each session's fields in the layout-free form a backup holds
    (layout.to_logical: the metadata as c, ca, lm, to, v, a, without the
    counters and replay records, which restore recounts and leaves out), and
    its time to live by its exact expiry (its key may outlive that a little)."""
    pipe = client.pipeline(transaction=False)
    for sid in sids:
        pipe.hgetall(keys.session_key(sid))
    now = time.time() * 1000
    out = {}
    for sid, raw in zip(sids, pipe.execute(), strict=True):
        fields, exact = layout.to_logical(list(raw.items()))
        assert exact is not None, sid
        out[sid] = (dict(fields), int(exact - now))
    return out


def views(d: Dispatcher, sids: list[str], clients: list[str]) -> dict[str, Any]:
    """What clients see: statistics and listings (without the moving expiry fields)."""
    stats = run(d, [("get_session_statistics", {})])[0]
    listings = in_batches(d, [("list_client_sessions", {"client_id": c}) for c in clients])
    for listing in listings:
        for s in listing["sessions"]:
            for k in MOVING:
                s.pop(k)
    return {"stats": stats, "listings": listings}


def restored_json(d: Dispatcher, sids: list[str]) -> list[str]:
    results = in_batches(d, [("restore_session", {"session_id": s}) for s in sids])
    for r in results:
        for k in MOVING:
            r.pop(k)
    return [json.dumps(r, sort_keys=True) for r in results]


@pytest.mark.slow
def test_round_trip_of_10000_sessions(
    dispatcher: Dispatcher, redis_client: redis.Redis, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    sids = make_sessions(dispatcher, 9_990)
    sids += make_sessions(dispatcher, 2, per_client=5, prefix="full")  # at the per-client limit
    clients = [f"c{n}" for n in range(9_990)] + ["full0", "full1"]
    assert len(sids) == 10_000
    before_at = [time.time()]
    before = snapshot(redis_client, sids)
    before_at.append(time.time())
    seen = views(dispatcher, sids, clients)
    assert seen["stats"]["total_sessions"] == 10_000 and seen["stats"]["active_clients"] == 9_992
    t1 = time.monotonic()

    path = tmp_path / "b.jsonl.gz"
    info = backup.write_backup([redis_client], path, key=TEST_KEY)
    assert info.sessions == 10_000
    assert backup.verify_backup(path, key=TEST_KEY).sessions == 10_000
    t2 = time.monotonic()
    json_before = restored_json(dispatcher, sids)  # reactivates; compared after the restore

    redis_client.flushall()
    result = restore.restore_backup(redis_client, path, key=TEST_KEY)
    assert (result.restored, result.expired, result.newer) == (10_000, 0, 0)
    assert (result.over_limit, result.invalid) == (0, 0)
    t3 = time.monotonic()

    after_at = [time.time()]
    after = snapshot(redis_client, sids)
    after_at.append(time.time())
    for sid in sids:
        fields, ttl = after[sid]
        assert fields == before[sid][0], sid  # byte for byte, every field
        # The same absolute expiry, within the time each snapshot took.
        low, high = before_at[0] * 1000 + before[sid][1], before_at[1] * 1000 + before[sid][1]
        assert low - 5 <= after_at[1] * 1000 + ttl and after_at[0] * 1000 + ttl <= high + 5, sid
    assert views(dispatcher, sids, clients) == seen
    assert restored_json(dispatcher, sids) == json_before
    # The per-client limit counts restored sessions exactly.
    reply = json.loads(
        dispatcher.handle(
            [
                json.dumps(
                    {"id": 1, "command": "create_session", "parameters": {"client_id": "full0"}}
                ).encode()
            ]
        )[0]
    )
    assert reply["error_type"] == "SessionLimitExceeded"
    print(f"create {t1 - t0:.1f} s, backup+verify {t2 - t1:.1f} s, restore {t3 - t2:.1f} s")


@pytest.fixture
def small_backup(dispatcher: Dispatcher, redis_client: redis.Redis, tmp_path: Path) -> Path:
    make_sessions(dispatcher, 50)
    path = tmp_path / "small.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    return path


def resign(path: Path, key: bytes = TEST_KEY) -> None:
    """Sign the file's bytes as they are now (what only a key holder can do)."""
    digest = hmac.new(key, path.read_bytes(), hashlib.sha256).hexdigest()
    backup.mac_sidecar(path).write_text(f"hmac-sha256 {digest}  {path.name}\n")


def rewrite(path: Path, lines: list[bytes]) -> None:
    """A well-formed gzip file holding `lines`, signed with TEST_KEY."""
    with gzip.open(path, "wb") as f:
        f.writelines(lines)
    resign(path)


def lines_of(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as f:
        return list(f)


def damage_cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_cut_resigned(path: Path) -> None:
    damage_cut(path)
    resign(path)


def rewrite_sum(path: Path) -> None:
    """A plain SHA-256 sidecar for the file as it is now: what anyone can write."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    backup.sidecar(path).write_text(f"{digest}  {path.name}\n")


def make_legacy(path: Path) -> None:
    """The file as the release before signing wrote it: a .sha256 sidecar only."""
    backup.mac_sidecar(path).unlink()
    rewrite_sum(path)


def edit_version(path: Path) -> None:
    """The attack of the issue: a session's version raised to 2^53 so that it
    wins over the live one, the gzip rewritten."""
    lines = lines_of(path)
    obj = json.loads(lines[3])
    obj["fields"]["v"] = str(2**53)
    lines[3] = json.dumps(obj).encode() + b"\n"
    with gzip.open(path, "wb") as f:
        f.writelines(lines)


def damage_edited_resummed(path: Path) -> None:
    """Edited, the plain checksum recomputed, the signature left as it was."""
    edit_version(path)
    rewrite_sum(path)


def damage_edited_unsigned(path: Path) -> None:
    """Edited, the plain checksum recomputed, the signature removed."""
    edit_version(path)
    make_legacy(path)


def damage_signature_line(path: Path) -> None:
    backup.mac_sidecar(path).write_text("sha256 " + "0" * 64 + "\n")


def damage_bad_line(path: Path) -> None:
    lines = lines_of(path)
    lines[7] = lines[7][:40] + b"\n"
    rewrite(path, lines)


def damage_lines_dropped(path: Path) -> None:
    rewrite(path, lines_of(path)[:-3])  # no end line


def damage_count(path: Path) -> None:
    lines = lines_of(path)
    del lines[5]
    rewrite(path, lines)


def damage_foreign_session(path: Path) -> None:
    lines = lines_of(path)
    obj = json.loads(lines[3])
    obj["fields"]["c"] = "someone-else"
    lines[3] = json.dumps(obj).encode() + b"\n"
    rewrite(path, lines)


def damage_trailing_line(path: Path) -> None:
    rewrite(path, [*lines_of(path), b'{"session_id": "x"}\n'])


def damage_no_sidecar(path: Path) -> None:
    backup.mac_sidecar(path).unlink()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (damage_cut, "signature mismatch"),
        (damage_flip, "signature mismatch"),
        (damage_edited_resummed, "signature mismatch"),
        (damage_edited_unsigned, "not signed, only a plain SHA-256"),
        (damage_signature_line, "not a hmac-sha256 signature line"),
        (damage_cut_resigned, "not a whole gzip file"),
        (damage_bad_line, "line 8: not JSON"),
        (damage_lines_dropped, "no end line"),
        (damage_count, "does not count"),
        (damage_foreign_session, "does not belong to its client"),
        (damage_trailing_line, "data after the end line"),
        (damage_no_sidecar, "no signature file"),
    ],
)
def test_a_bad_file_is_refused_and_nothing_is_written(
    small_backup: Path, redis_client: redis.Redis, damage: Callable[[Path], None], message: str
) -> None:
    damage(small_backup)
    redis_client.flushall()
    with pytest.raises(BackupError, match=message):
        backup.verify_backup(small_backup, key=TEST_KEY)
    with pytest.raises(BackupError, match=message):
        restore.restore_backup(redis_client, small_backup, key=TEST_KEY)
    assert redis_client.dbsize() == 0


def test_a_signed_file_is_refused_under_another_key_or_none(
    small_backup: Path, redis_client: redis.Redis
) -> None:
    redis_client.flushall()
    other = b"another-key-" + b"x" * 32
    with pytest.raises(BackupError, match="signature mismatch"):
        backup.verify_backup(small_backup, key=other)
    with pytest.raises(backup.KeyNeeded, match="STUI_BACKUP_KEY or STUI_BACKUP_KEY_FILE"):
        backup.verify_backup(small_backup, key=None)
    with pytest.raises(backup.KeyNeeded):
        restore.restore_backup(redis_client, small_backup, key=None, allow_unsigned=True)
    assert redis_client.dbsize() == 0


def test_restore_skips_expired_and_never_overwrites_newer_unless_forced(
    dispatcher: Dispatcher, redis_client: redis.Redis, tmp_path: Path
) -> None:
    short = run(dispatcher, [("create_session", {"client_id": "short", "timeout": 1})])[0]
    sid = make_sessions(dispatcher, 1, prefix="keep")[0]
    path = tmp_path / "b.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    run(dispatcher, [("update_session_state", {"session_id": sid, "state_data": {"n": "new"}})])
    newer = redis_client.hgetall(keys.session_key(sid))
    time.sleep(1.1)  # `short` has expired since the backup (its key 50 ms later)

    result = restore.restore_backup(redis_client, path, key=TEST_KEY)
    assert (result.restored, result.expired, result.newer) == (0, 1, 1)
    assert redis_client.hgetall(keys.session_key(sid)) == newer
    assert not redis_client.exists(keys.session_key(short["session_id"]))

    again = restore.restore_backup(redis_client, path, key=TEST_KEY)  # equal: kept too
    assert (again.restored, again.newer) == (0, 1)

    forced = restore.restore_backup(redis_client, path, key=TEST_KEY, force=True)
    assert (forced.restored, forced.expired) == (1, 1)
    state = run(dispatcher, [("get_session_info", {"session_id": sid})])[0]
    assert state["version"] == layout.unpack_meta(newer[b"m"]).v - 1  # the backup's version is back
    assert redis_client.hget(keys.session_key(sid), "s:n") == b"0"
    figures = global_figures(redis_client)
    assert (figures.sessions, figures.clients) == (1, 1)


def test_backup_is_consistent_while_clients_write(
    dispatcher: Dispatcher, redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    sids = [
        r["session_id"]
        for r in in_batches(
            dispatcher, [("create_session", {"client_id": f"w{n}"}) for n in range(2000)]
        )
    ]
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        settings = Settings(redis_url=redis_server.url, rate_limit=0, create_rate_limit=0)
        client = connect(redis_server.url, 10.0)
        d = Dispatcher(settings, Store(client))
        k = 0
        while not stop.is_set():
            k += 1
            batch = [
                (
                    "update_session_state",
                    {
                        "session_id": sid,
                        "state_data": {"k": k, "mirror": [k, k], "pad": "x" * (k % 50)},
                    },
                )
                for sid in sids[k % 7 :: 7]
            ]
            run(d, batch)
            writes[0] += len(batch)
        client.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        paths = []
        for n in range(3):
            paths.append(tmp_path / f"{n}.jsonl.gz")
            backup.write_backup([redis_client], paths[-1], key=TEST_KEY)
    finally:
        stop.set()
        thread.join()
    assert writes[0] > 2000
    updated = 0
    for path in paths:
        records = [r for _, r in backup.iter_backup(path) if r is not None]
        assert len(records) == 2000
        for rec in records:
            f = dict(rec.fields)
            if b"s:k" not in f:
                assert f[b"v"] == b"1"
                continue
            updated += 1
            k = int(f[b"s:k"])
            assert json.loads(f[b"s:mirror"]) == [k, k]
            assert f[b"s:pad"] == json.dumps("x" * (k % 50)).encode()
            # No counters in the file: restore recounts them from the fields.
            assert b"m" not in f and b"sb" not in f and b"q" not in f
    assert updated > 0


def test_keys_that_are_not_sessions_are_skipped(
    dispatcher: Dispatcher,
    redis_client: redis.Redis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_sessions(dispatcher, 3)
    redis_client.hset(keys.session_key(keys.new_session_id("0" * 16)), "c", "x")
    redis_client.set(keys.session_key(keys.new_session_id("1" * 16)), "not a hash")
    info = backup.write_backup([redis_client], tmp_path / "b.jsonl.gz", key=TEST_KEY)
    assert (info.sessions, info.skipped) == (3, 2)
    assert backup.verify_backup(info.path, key=TEST_KEY).sessions == 3
    assert "field 'ca' missing" in caplog.text


def test_housekeeping_prunes_what_ttls_left(
    dispatcher: Dispatcher, redis_client: redis.Redis
) -> None:
    short = in_batches(dispatcher, [("create_session", {"client_id": "hk", "timeout": 1})] * 2)
    live = run(dispatcher, [("create_session", {"client_id": "hk", "timeout": 600})])[0]
    other = run(dispatcher, [("create_session", {"client_id": "gone", "timeout": 600})])[0]
    redis_client.delete(keys.session_key(other["session_id"]))  # as an eviction would
    time.sleep(1.1)
    assert global_figures(redis_client).sessions == 2  # the orphan still counts
    pruned = housekeep(redis_client, [redis_client])
    assert pruned.expiry_members == 2 and pruned.index_entries == 2 and pruned.orphans == 1
    figures = global_figures(redis_client)
    assert (figures.sessions, figures.clients) == (1, 1)
    index = redis_client.hgetall(keys.client_index_key(keys.client_hash("hk")))
    entries = [f for f in index if layout.is_session_entry(f)]
    assert entries == [layout.index_field(live["session_id"])]
    assert all(layout.index_field(s["session_id"]) not in index for s in short)
    assert housekeep(redis_client, [redis_client]) == Pruned()


def cli(
    *args: str, env: dict[str, str] | None = None, key: bool = True
) -> subprocess.CompletedProcess[str]:
    """The command line, given TEST_KEY (STUI_BACKUP_KEY) unless key=False."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(env, key=key),
    )


def cli_env(env: dict[str, str] | None = None, *, key: bool = True) -> dict[str, str]:
    """The environment of `cli`: this one's without its backup keys, then
    TEST_KEY unless key=False, then env."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STUI_BACKUP_KEY")}
    return {**base, **(KEY_ENV if key else {}), **(env or {})}


def test_commands_end_to_end(
    dispatcher: Dispatcher, redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    sids = make_sessions(dispatcher, 300)
    before = snapshot(redis_client, sids)
    path = tmp_path / "cli.jsonl.gz"

    done = cli("backup", "--redis-url", redis_server.url, "--output", str(path))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")  # quiet in a pipe
    checked = cli("verify", str(path))
    assert checked.returncode == 0 and "OK, 300 sessions" in checked.stdout, checked
    assert "signed" in checked.stdout and checked.stderr == "", checked

    redis_client.flushall()
    restored = cli("restore", str(path), "--redis-url", redis_server.url)
    assert (restored.returncode, restored.stdout, restored.stderr) == (0, "", "")
    assert {sid: f for sid, (f, _) in snapshot(redis_client, sids).items()} == {
        sid: f for sid, (f, _) in before.items()
    }

    damage_flip(path)
    redis_client.flushall()
    for args in (("verify", str(path)), ("restore", str(path), "--redis-url", redis_server.url)):
        failed = cli(*args)
        assert failed.returncode == 1 and "signature mismatch" in failed.stderr, failed
        assert failed.stderr.count("\n") == 1, failed  # one line
    assert redis_client.dbsize() == 0

    assert cli("backup", "--output", str(path), env={"STUI_REDIS_URL": ""}).returncode == 2
    down = cli("backup", "--redis-url", "redis://127.0.0.1:1", "--output", str(tmp_path / "x"))
    assert down.returncode == 3 and "redis" in down.stderr


def test_progress_shows_on_a_terminal(
    dispatcher: Dispatcher, redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    make_sessions(dispatcher, 20)
    path = tmp_path / "tty.jsonl.gz"
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "backup",
                "--redis-url",
                redis_server.url,
                "--output",
                str(path),
            ],
            stderr=terminal,
            stdout=subprocess.PIPE,
            timeout=60,
            env={**os.environ, **KEY_ENV},
        )
        os.close(terminal)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's last writer is gone
            while chunk := os.read(controller, 4096):
                shown += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0 and done.stdout == b""
    assert b"\rbackup: 20 sessions" in shown, shown
