"""Backups are not trusted blindly: the attacks of the issue, on a real Redis.

An edited file with a recomputed plain SHA-256 is refused; a legacy (unsigned)
file restores only with --allow-unsigned; a signed file's sessions are still
re-validated one by one (timeout, version, sizes, counts, layout, JSON, the
client's session limit); a gzip bomb is refused in bounded memory; files are
0600 in directories 0700; keys are made 0600 and never overwritten.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import redis
from pydantic import SecretStr

from service import backup, keys, layout, limits, restore
from service.backup_format import BackupError, SessionRecord
from service.dispatch import Dispatcher
from service.settings import MIB, Settings
from service.store import Store
from tests.test_backup import (
    TEST_KEY,
    TEST_KEY_TEXT,
    cli,
    lines_of,
    make_legacy,
    make_sessions,
    rewrite_sum,
    run,
    snapshot,
)
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

SECRET = "SECRET-DATA-never-in-a-log"  # in the data of every refused session


def everything(client: redis.Redis) -> dict[bytes, tuple[bytes | None, int]]:
    """Every key's DUMP and whether it has a TTL: 'nothing changed' means this is equal."""
    return {k: (client.dump(k), int(client.pttl(k) > 0)) for k in client.scan_iter()}


def sign(path: Path, key: bytes = TEST_KEY) -> None:
    digest = hmac.new(key, path.read_bytes(), hashlib.sha256).hexdigest()
    backup.mac_sidecar(path).write_text(f"hmac-sha256 {digest}  {path.name}\n")


def write_file(path: Path, records: list[SessionRecord], created_ms: int) -> None:
    """A well-formed backup of `records`, signed with TEST_KEY (a key holder's file)."""
    with gzip.open(path, "wb") as f:
        header = {"format": backup.FORMAT, "version": 1, "created_ms": created_ms, "token": 1}
        f.write(orjson.dumps(header) + b"\n")
        for rec in records:
            f.write(backup.encode_record(rec))
        f.write(orjson.dumps({"end": True, "sessions": len(records)}) + b"\n")
    sign(path)


def session(client_id: str, now_ms: int, **fields: str) -> SessionRecord:
    """A session of `client_id` as a backup line holds it; `fields` override or
    add fields, a value of "" removes one. Counters are deliberately wrong
    (restore recomputes them)."""
    base = {
        "c": client_id,
        "ca": str(now_ms - 5000),
        "lm": str(now_ms - 1000),
        "to": "600",
        "v": "3",
        "a": "1",
        "ci": '{"host":"pharo"}',
        "s:work": json.dumps({"x": [1, 2]}),
        "w": '{"variables":{"x":1}}',
        "wv": "1",
        "e:1": '{"code":"1+1"}',
        "e:2": '{"code":"2+2"}',
        "o:obj-1": '{"class":"Point"}',
        "sb": "0",
        "xb": "0",
        "cn": "0,0,0,0,1",
        "rn": "0",
        "en": "0",
        "eo": "1",
    }
    base.update(fields)
    pairs = [(k.encode(), v.encode()) for k, v in base.items() if v != ""]
    sid = keys.new_session_id(keys.client_hash(client_id))
    return SessionRecord(sid, pairs, 600_000, now_ms)


@pytest.fixture
def dispatcher(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Dispatcher]:
    settings = Settings(redis_url=redis_server.url, rate_limit=0, create_rate_limit=0)
    client = redis.Redis.from_url(redis_server.url)
    yield Dispatcher(settings, Store(client))
    client.close()


def now_of(client: redis.Redis) -> int:
    return backup.redis_now_ms(client)


# -- authentication -------------------------------------------------------------


def test_an_edited_file_with_a_recomputed_sha256_changes_nothing(
    dispatcher: Dispatcher, redis_client: redis.Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """The issue's attack: a live session's version raised to 2^53 and its state
    replaced, the gzip rewritten and the plain checksum recomputed."""
    sids = make_sessions(dispatcher, 20)
    path = tmp_path / "b.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    lines = lines_of(path)
    obj = json.loads(lines[4])
    victim = obj["session_id"]
    obj["fields"]["v"] = str(2**53)
    obj["fields"]["s:n"] = json.dumps(SECRET)
    lines[4] = json.dumps(obj).encode() + b"\n"
    with gzip.open(path, "wb") as f:
        f.writelines(lines)
    rewrite_sum(path)  # .hmac still the genuine one
    before = everything(redis_client)
    url = ["--redis-url", redis_server.url]

    for keep_signature in (True, False):
        if not keep_signature:
            backup.mac_sidecar(path).unlink()  # the attacker removes the signature too
        message = "signature mismatch" if keep_signature else "not signed"
        with pytest.raises(BackupError, match=message):
            backup.verify_backup(path, key=TEST_KEY)
        with pytest.raises(BackupError, match=message):
            restore.restore_backup(redis_client, path, key=TEST_KEY)
        for args in (("verify", str(path)), ("restore", str(path), *url)):
            done = cli(*args)
            assert done.returncode == 1, done
            assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done
            assert message in done.stderr
        assert everything(redis_client) == before

    # An operator who passes --allow-unsigned anyway: the forged line is still
    # refused (version beyond limits.MAX_VERSION), the live session kept.
    done = cli("restore", str(path), *url, "--allow-unsigned")
    assert done.returncode == 0, done
    assert "is not authenticated" in done.stderr
    assert "1 refused as invalid" in done.stderr and "19 with the same or a newer" in done.stderr
    assert f"refused session {victim[: restore.LOG_ID]}..." in done.stderr
    assert "not a number in 1..1099511627776" in done.stderr
    assert SECRET not in done.stderr
    assert everything(redis_client) == before
    assert len(sids) == 20


def test_a_legacy_file_restores_only_with_allow_unsigned(
    dispatcher: Dispatcher, redis_client: redis.Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    sids = make_sessions(dispatcher, 30)
    before = snapshot(redis_client, sids)
    path = tmp_path / "old.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    make_legacy(path)  # as the previous release wrote it: .sha256 only
    redis_client.flushall()
    url = ["--redis-url", redis_server.url]

    with pytest.raises(backup.Unsigned):
        backup.verify_backup(path, key=TEST_KEY)
    for args in (("verify", str(path)), ("restore", str(path), *url)):
        for key in (True, False):  # whether a key is configured or not
            done = cli(*args, key=key)
            assert (done.returncode, done.stdout) == (1, ""), done
            assert done.stderr.count("\n") == 1 and "pass --allow-unsigned" in done.stderr, done
            assert "plain SHA-256" in done.stderr
    assert redis_client.dbsize() == 0

    checked = cli("verify", str(path), "--allow-unsigned", key=False)
    assert checked.returncode == 0 and "OK, 30 sessions" in checked.stdout, checked
    assert "NOT authenticated" in checked.stdout
    assert checked.stderr.startswith("warning: ") and "not authenticated" in checked.stderr
    info = backup.verify_backup(path, key=None, allow_unsigned=True)
    assert not info.authenticated
    done = cli("restore", str(path), *url, "--allow-unsigned")
    assert done.returncode == 0, done
    assert done.stderr.count("\n") == 1 and "not authenticated" in done.stderr, done
    assert {s: f for s, (f, _) in snapshot(redis_client, sids).items()} == {
        s: f for s, (f, _) in before.items()
    }
    # The legacy checksum is still checked.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="checksum mismatch"):
        backup.verify_backup(path, key=None, allow_unsigned=True)


def test_a_keyed_file_needs_its_key(
    dispatcher: Dispatcher, redis_client: redis.Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    make_sessions(dispatcher, 5)
    path = tmp_path / "b.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    redis_client.flushall()
    for args in (("verify", str(path)), ("restore", str(path), "--redis-url", redis_server.url)):
        done = cli(*args, "--allow-unsigned", key=False)
        assert done.returncode == 2, done
        assert "no backup key is configured" in done.stderr
        assert "STUI_BACKUP_KEY or STUI_BACKUP_KEY_FILE" in done.stderr
        wrong = cli(*args, env={"STUI_BACKUP_KEY": "another-key-of-enough-length"})
        assert wrong.returncode == 1 and "signature mismatch" in wrong.stderr, wrong
    assert redis_client.dbsize() == 0


def test_backup_refuses_to_write_without_a_key(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "b.jsonl.gz"
    done = cli("backup", "--redis-url", redis_server.url, "--output", str(path), key=False)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1
    assert "STUI_BACKUP_KEY" in done.stderr and "STUI_BACKUP_KEY_FILE" in done.stderr
    both = cli(
        "backup",
        "--redis-url",
        redis_server.url,
        "--output",
        str(path),
        env={"STUI_BACKUP_KEY_FILE": str(tmp_path / "k")},
    )
    assert both.returncode == 2 and "not both" in both.stderr, both
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(backup.BackupKeyError):
        backup.write_backup([redis_client], path, key=b"short")


def test_a_file_replaced_after_verify_is_not_restored(
    dispatcher: Dispatcher, redis_client: redis.Redis, tmp_path: Path
) -> None:
    make_sessions(dispatcher, 5)
    path, other = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    info = backup.verify_backup(path, key=TEST_KEY)
    run(dispatcher, [("create_session", {"client_id": "late"})])
    backup.write_backup([redis_client], other, key=TEST_KEY)
    os.replace(other, path)
    redis_client.flushall()
    with pytest.raises(BackupError, match="changed since it was verified"):
        restore.restore_verified(redis_client, info)
    assert redis_client.dbsize() == 0


# -- restore re-validates every line -------------------------------------------


def test_restore_refuses_what_the_service_could_never_hold(
    dispatcher: Dispatcher,
    redis_client: redis.Redis,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A signed file (the key holder, or a leaked key) with the issue's lines
    among valid ones: the bad lines are skipped and counted, the valid ones
    restore, whatever the signature says."""
    live = run(dispatcher, [("create_session", {"client_id": "victim"})])[0]["session_id"]
    run(dispatcher, [("update_session_state", {"session_id": live, "state_data": {"a": 1}})])
    live_before = redis_client.hgetall(keys.session_key(live))
    now = now_of(redis_client)
    s = Settings()
    secret = json.dumps(SECRET)

    good = [session(f"good{n}", now) for n in range(3)]
    greedy = [session("greedy", now) for _ in range(11)]  # the limit is 5
    lying = session("liar", now, en="999999999999", eo="1", sb="0", xb="0", cn="0,0,0,0,1", rn="7")
    forged = dict(session("victim", now, v=str(2**53), **{"s:a": secret}).fields)
    bad = {
        "timeout 999999999": session("t1", now, to="999999999", **{"s:x": secret}),
        "timeout 0": session("t2", now, to="0"),
        "version 0": session("v0", now, v="0"),
        "version 2^53 over a live session": SessionRecord(live, list(forged.items()), 600_000, now),
        "3 MiB of state": session("big", now, **{"s:big": json.dumps(SECRET + "x" * 3 * MIB)}),
        "client_info over its cap": session("ci", now, ci=json.dumps("x" * s.client_info_cap)),
        "too many state keys": session(
            "keys", now, **{f"s:k{n}": "1" for n in range(s.max_state_keys + 1)}
        ),
        "registry too large": session(
            "reg", now, **{f"o:id{n}": "1" for n in range(s.max_registry_size + 1)}
        ),
        "history too long": session(
            "hist", now, **{f"e:{n}": "1" for n in range(1, s.history_limit + 2)}
        ),
        "history not consecutive": session("gap", now, **{"e:2": "", "e:3": "{}"}),
        "unknown field": session("odd", now, zz="1"),
        "not JSON": session("json", now, **{"s:x": "{" + SECRET}),
        "client_info not JSON": session("cij", now, ci=SECRET),
        "selected object without inspector": session("so", now, so="null"),
        "cost over max_state_bytes": session(
            "cost", now, **{f"s:k{n}": json.dumps("y" * 1100) for n in range(950)}
        ),
    }
    path = tmp_path / "mixed.jsonl.gz"
    records = [*good, *greedy[:3], *bad.values(), lying, *greedy[3:]]
    write_file(path, records, now)

    info = backup.verify_backup(
        path,
        key=TEST_KEY,
        max_line=backup.max_line_for(s),
        check=lambda r: None if _valid(r, s) else "refused",
    )
    assert info.authenticated and info.invalid == len(bad)

    result = restore.restore_backup(redis_client, path, key=TEST_KEY, settings=s)
    assert result.invalid == len(bad)
    assert (result.restored, result.over_limit, result.newer, result.expired) == (
        3 + 1 + 5,
        6,
        0,
        0,
    )
    assert redis_client.hgetall(keys.session_key(live)) == live_before
    for rec in bad.values():
        if rec.session_id != live:
            assert not redis_client.exists(keys.session_key(rec.session_id))
    assert caplog.text.count("restore: refused session ") == len(bad)
    assert SECRET not in caplog.text and "x" * 100 not in caplog.text
    for rec in bad.values():
        assert f"{rec.session_id[: restore.LOG_ID]}..." in caplog.text
        assert rec.session_id not in caplog.text  # a prefix, not the id

    # The lying counters were recomputed: what the scripts would hold.
    stored = redis_client.hgetall(keys.session_key(lying.session_id))
    fields = dict(lying.fields)
    meta = layout.unpack_meta(stored[b"m"])
    assert (meta.sb, meta.sd) == (len("work") + len(fields[b"s:work"]), 0)
    assert meta.context_bytes == len(fields[b"w"]) + len("obj-1") + len(fields[b"o:obj-1"]) + 28
    assert (meta.rn, meta.en, meta.eo) == (1, 2, 1)
    assert (meta.sn, meta.cb, meta.ob, meta.hb) == (
        1, 16, len("obj-1") + len(fields[b"o:obj-1"]), 14 + 14)
    assert not {b"sb", b"xb", b"rn", b"en", b"eo", b"cn"} & set(stored)
    # ... and the service goes on from them: one more evaluation is entry 3.
    reply = run(
        dispatcher,
        [("record_evaluation", {"session_id": lying.session_id, "code": "3", "result": 3})],
    )[0]
    assert reply["evaluation_count"] == 3
    live_count = run(dispatcher, [("list_client_sessions", {"client_id": "greedy"})])[0]
    assert len(live_count["sessions"]) == 5

    # The command line says it in its summary, in a pipe too.
    redis_client.flushall()
    done = cli("restore", str(path), "--redis-url", redis_server.url)
    assert done.returncode == 0, done
    assert (
        "restored 9 sessions; skipped 0 expired, 0 with the same or a newer version in "
        "Redis, 6 over their client's session limit, 15 refused as invalid"
    ) in done.stderr
    assert SECRET not in done.stderr
    checked = cli("verify", str(path))
    assert checked.returncode == 0 and "15 that restore would refuse" in checked.stdout, checked


def _valid(rec: SessionRecord, s: Settings) -> bool:
    try:
        restore.check_session(rec, s)
    except restore.Invalid:
        return False
    return True


def test_a_session_with_escaped_keys_round_trips_byte_for_byte(
    dispatcher: Dispatcher, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Recomputed counters equal the scripts' own (keys weighed with escapes)."""
    sid = run(dispatcher, [("create_session", {"client_id": "esc", "client_info": {"a": 1}})])[0][
        "session_id"
    ]
    state = {'q"uo\\te': 1, "ctl\u0001\u001f": [], "é☃": {"x": "\u0002"}, "": None}
    run(
        dispatcher,
        [
            ("update_session_state", {"session_id": sid, "state_data": state}),
            (
                "save_context",
                {
                    "session_id": sid,
                    "context": {
                        "workspace_context": {"variables": {"a": 1, "b": 2}},
                        "inspector_state": {"history": [1, 2, 3], "selected_object": {"k": 1}},
                        "object_registry": {'id"\u0003': {"c": 1}, "plain": {}},
                        "evaluation_history": [{"code": str(n)} for n in range(60)],
                    },
                },
            ),
            ("record_evaluation", {"session_id": sid, "code": "x", "result": 1}),
            ("register_object", {"session_id": sid, "object_id": "new\u0004", "description": "d"}),
        ],
    )
    before = redis_client.hgetall(keys.session_key(sid))
    path = tmp_path / "esc.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    redis_client.flushall()
    result = restore.restore_backup(redis_client, path, key=TEST_KEY)
    assert (result.restored, result.invalid) == (1, 0)
    after = redis_client.hgetall(keys.session_key(sid))
    # Every field byte for byte, the metadata as numbers: the key's own
    # expiry (ke) and sb's drift (sd) are the writer's bookkeeping, and sb
    # an upper bound that restore counts exactly.
    assert {f: v for f, v in after.items() if f != b"m"} == {
        f: v for f, v in before.items() if f not in (b"m", b"q")
    }
    old_meta, new_meta = layout.unpack_meta(before[b"m"]), layout.unpack_meta(after[b"m"])
    assert new_meta.sb <= old_meta.sb and new_meta.sd == 0
    assert replace(new_meta, ke=0, sd=0, sb=0) == replace(old_meta, ke=0, sd=0, sb=0)


# -- bounded reading -------------------------------------------------------------


def _bomb(path: Path, line_mib: int) -> None:
    """A valid gzip of a header line then one line of `line_mib` MiB: each MiB
    is one self-contained deflate block (about 1 KiB), repeated."""
    header = orjson.dumps({"format": backup.FORMAT, "version": 1, "created_ms": 1}) + b"\n"
    block = b"a" * MIB
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    repeat = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(b"\n") + c.flush()
    crc = zlib.crc32(header)
    for _ in range(line_mib):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(b"\n", crc)
    size = (len(header) + line_mib * MIB + 1) & 0xFFFFFFFF
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + head)
        for _ in range(line_mib):
            f.write(repeat)
        f.write(tail + struct.pack("<II", crc, size))


# Peak RSS from /proc (VmHWM, in KiB): ru_maxrss is kept across fork and
# exec on Linux, so it would report the test runner's own peak.
MEASURE = r"""
import json, sys, tracemalloc
from workers.cli import main

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

args = sys.argv[1:]
before = hwm()
tracemalloc.start()
code = main(args)
peak = tracemalloc.get_traced_memory()[1]
after = hwm()
print(json.dumps({"code": code, "peak": peak, "rss_growth": (after - before) * 1024,
                  "rss": after * 1024}))
"""


@pytest.mark.parametrize("signed", [True, False])
def test_a_one_gib_line_is_refused_in_bounded_memory(tmp_path: Path, signed: bool) -> None:
    """The issue's bomb: a 1 MiB gzip holding one 1 GiB line (it made verify
    use 3.2 GB). It is refused once MAX_LINE bytes of the line are read."""
    path = tmp_path / "bomb.jsonl.gz"
    line = 1024 * MIB
    _bomb(path, line // MIB)
    assert path.stat().st_size < 2 * MIB
    if signed:
        sign(path)
        args = ["verify", str(path)]
    else:
        rewrite_sum(path)
        args = ["verify", str(path), "--allow-unsigned"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUI_BACKUP_KEY")}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "STUI_BACKUP_KEY": TEST_KEY_TEXT},
    )
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["code"] == 1, done
    assert f"line 2: longer than {backup.MAX_LINE} bytes" in done.stderr, done
    # Far below the line: a few times MAX_LINE (5 MiB) at most.
    assert measured["peak"] < 4 * backup.MAX_LINE < line // 4, measured
    assert measured["rss_growth"] < 8 * backup.MAX_LINE < line // 4, measured
    assert measured["rss"] < line // 4, measured  # the whole process, imports included
    print(
        f"1 GiB line refused: peak {measured['peak'] / MIB:.1f} MiB (tracemalloc), "
        f"RSS growth {measured['rss_growth'] / MIB:.1f} MiB, "
        f"peak RSS {measured['rss'] / MIB:.0f} MiB"
    )


class Trickle:
    """A stream that hands out at most `step` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self.f = io.BytesIO(data)
        self.step = step

    def read(self, n: int) -> bytes:
        return self.f.read(min(n, self.step))


@pytest.mark.parametrize("step", [1, 3, 7, 64])
def test_lines_are_split_across_reads_and_capped(step: int) -> None:
    data = b"ab\n" + b"x" * 9 + b"\n\n" + b"tail"
    got = list(backup._lines(Trickle(data, step), 10, Path("f")))
    assert got == [b"ab\n", b"x" * 9 + b"\n", b"\n", b"tail"]
    with pytest.raises(BackupError, match="line 2: longer than 9 bytes"):
        list(backup._lines(Trickle(data, step), 9, Path("f")))
    with pytest.raises(BackupError, match="line 1: longer than 3 bytes"):
        list(backup._lines(Trickle(b"abcdef", step), 3, Path("f")))


def test_the_line_cap_follows_max_state_bytes() -> None:
    # 4 x max_state_bytes + 2 x max_checkpoint_bytes (snapshots go in base64)
    # + 1 KiB per checkpoint (head, label, names) + 1 MiB.
    assert backup.MAX_LINE == 13 * MIB + 10 * 1024
    assert backup.max_line_for(Settings()) == backup.MAX_LINE
    small = Settings(max_state_bytes=64 * 1024)
    assert backup.max_line_for(small) == backup.MAX_LINE  # never lower
    assert backup.max_line_for(Settings(max_state_bytes=8 * MIB)) == 41 * MIB + 10 * 1024
    # The worst line the service writes fits: a session at the cap whose
    # stored JSON is all escapes, which the line escapes again (twice as long).
    value = json.dumps('"' * ((MIB - 300) // 2))
    rec = SessionRecord(
        keys.new_session_id(keys.client_hash("q")),
        [(b"c", b"q"), (b"s:k", value.encode())],
        1,
        1,
    )
    assert limits.session_cost(len(value) + 1, 0, 0, 1) <= MIB
    line = backup.encode_record(rec)
    assert 1.9 * MIB < len(line) < backup.MAX_LINE


# -- file modes and keys ------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: a mode that is right now was given at creation, not by the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o777


def test_backups_are_0600_from_their_creation(
    dispatcher: Dispatcher, redis_client: redis.Redis, tmp_path: Path, open_umask: None
) -> None:
    make_sessions(dispatcher, backup.BATCH + 10)
    directory = tmp_path / "backups"
    backup.prepare_dir(directory)
    assert mode(directory) == 0o700
    seen: list[int] = []

    def guard() -> None:  # after each batch and before the rename: the temporary file
        seen.extend(mode(p) for p in directory.iterdir() if ".tmp-" in p.name)

    path = directory / "b.jsonl.gz"
    backup.sidecar(path).write_text("stale")  # a legacy sidecar at the same name
    os.chmod(backup.sidecar(path), 0o600)
    info = backup.write_backup([redis_client], path, key=TEST_KEY, guard=guard)
    assert info.sessions == backup.BATCH + 10
    assert seen and set(seen) == {0o600}
    assert sorted(p.name for p in directory.iterdir()) == ["b.jsonl.gz", "b.jsonl.gz.hmac"]
    assert mode(path) == 0o600 and mode(backup.mac_sidecar(path)) == 0o600
    assert backup.mac_sidecar(path).read_text().startswith("hmac-sha256 ")
    # Written over an existing (looser) file: the new one is 0600 too.
    os.chmod(path, 0o644)
    backup.write_backup([redis_client], path, key=TEST_KEY)
    assert mode(path) == 0o600


def test_key_files(tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STUI_BACKUP_KEY", "STUI_BACKUP_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    path = backup.write_key_file(tmp_path / "k")
    text = path.read_text()
    assert mode(path) == 0o600 and len(text.strip()) == 64 and text.endswith("\n")
    int(text, 16)
    with pytest.raises(FileExistsError):
        backup.write_key_file(path)
    assert path.read_text() == text
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError):  # O_EXCL | O_NOFOLLOW: never through a symlink
        backup.write_key_file(link)
    assert not (tmp_path / "target").exists()
    # Reused, not replaced; the directory made 0700.
    made = backup.ensure_key_file(tmp_path / "data" / "backup.key")
    assert mode(made.parent) == 0o700 and mode(made) == 0o600
    assert backup.ensure_key_file(made).read_text() == made.read_text()
    # The key is the content, stripped: the same as STUI_BACKUP_KEY holding it.
    from_file = backup.load_key(Settings(backup_key_file=made))
    assert from_file == made.read_text().strip().encode()
    assert backup.load_key(Settings(backup_key=SecretStr(made.read_text()))) == from_file
    assert backup.load_key(Settings()) is None
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(backup.BackupKeyError, match="shorter than 16"):
        backup.load_key(Settings(backup_key_file=tmp_path / "short"))


def test_backup_key_generate_command(
    dispatcher: Dispatcher, redis_client: redis.Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    make_sessions(dispatcher, 3)
    key_file = tmp_path / "backup.key"
    made = cli("backup-key", "generate", "--output", str(key_file), key=False)
    assert made.returncode == 0 and str(key_file) in made.stdout, made
    assert mode(key_file) == 0o600
    text = key_file.read_text()
    again = cli("backup-key", "generate", "--output", str(key_file), key=False)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr, again
    assert key_file.read_text() == text

    by_file = {"STUI_BACKUP_KEY_FILE": str(key_file)}
    path = tmp_path / "b.jsonl.gz"
    done = cli("backup", "--redis-url", redis_server.url, "-o", str(path), key=False, env=by_file)
    assert done.returncode == 0, done
    assert cli("verify", str(path), key=False, env=by_file).returncode == 0
    same = {"STUI_BACKUP_KEY": text.strip()}
    assert cli("verify", str(path), key=False, env=same).returncode == 0
    assert cli("verify", str(path)).returncode == 1  # TEST_KEY did not sign it
    written = path.read_bytes() + backup.mac_sidecar(path).read_bytes()
    assert text.strip().encode() not in written  # the key is never written into a backup


def test_serve_makes_one_key_file_and_hands_it_to_its_scheduler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    from workers import cli as cli_module

    started: list[dict[str, str]] = []

    class FakeChild:
        def __init__(self, args: list[str], env: dict[str, str]) -> None:
            started.append(env)

        def poll(self) -> int:
            return 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeChild)  # as workers.cli calls it
    for name in ("STUI_BACKUP_KEY", "STUI_BACKUP_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path / "data", metrics_dir=tmp_path / "metrics")
    with cli_module._companions(settings, "redis://127.0.0.1:1"):
        pass
    key_file = tmp_path / "data" / "backup.key"
    assert all(env["STUI_BACKUP_KEY_FILE"] == str(key_file) for env in started)
    assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
    first = key_file.read_text()
    with cli_module._companions(settings, "redis://127.0.0.1:1"):
        pass
    assert key_file.read_text() == first  # reused on later runs
    # A configured key is used as it is: no file is made.
    started.clear()
    given = Settings(
        data_dir=tmp_path / "other",
        metrics_dir=tmp_path / "metrics",
        backup_key=SecretStr(TEST_KEY_TEXT),
    )
    with cli_module._companions(given, "redis://127.0.0.1:1"):
        pass
    assert started and all("STUI_BACKUP_KEY_FILE" not in env for env in started)
    assert not (tmp_path / "other" / "backup.key").exists()
