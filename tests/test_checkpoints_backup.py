"""Checkpoints are part of backups (issue 13): backup, verify and restore
carry them byte for byte, on a real Redis through real fronts; restore
re-validates them as it does the rest of a session (service/restore.py), and
the line cap holds a session with all its checkpoints
(service/backup_format.py)."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from service import backup, backup_format, keys, layout, restore
from service.backup_format import SessionRecord
from service.settings import MIB, Settings
from tests.test_backup import TEST_KEY, cli
from tests.test_backup_trust import _valid, write_file
from tests.test_checkpoints import CONTEXT, STATE, whole
from workers.client import Client
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

SECRET = "SECRET-DATA-never-in-a-reason"
OLD_MAX_LINE = 5 * MIB  # the cap before checkpoints: 4 x max_state_bytes + 1 MiB


def checkpoint_fields(client: redis.Redis, sid: str) -> dict[bytes, bytes]:
    """kh, k:<id> and kl:<id> as Redis holds them."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.session_key(sid)))
    return {name: value for name, value in raw.items() if layout.is_checkpoint_field(name)}


def logical(client: redis.Redis, sid: str) -> dict[bytes, bytes]:
    """Every field as a backup holds it (layout.to_logical)."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.session_key(sid)))
    fields, _ = layout.to_logical(list(raw.items()))
    return dict(fields)


def seeded(c: Client, client_id: str, state: dict[str, Any] = STATE) -> str:
    sid: str = c.call("create_session", client_id=client_id, client_info={"host": "pharo ✓"})[
        "session_id"
    ]
    c.call("update_session_state", session_id=sid, state_data=state)
    c.call("save_context", session_id=sid, context=CONTEXT)
    return sid


def taken(c: Client) -> tuple[list[str], dict[tuple[str, int], dict[str, Any]]]:
    """Sessions with manual and automatic checkpoints (and one without any),
    and what each checkpoint holds: the state and context when it was taken."""
    held: dict[tuple[str, int], dict[str, Any]] = {}
    sid = seeded(c, "ckb")
    held[sid, c.call("create_checkpoint", session_id=sid, label="good ✓ 日本")["checkpoint_id"]] = (
        whole(c, sid)
    )
    c.call("update_session_state", session_id=sid, state_data={"n": 1, "deep": {"a": [{}, []]}})
    before_replace = whole(c, sid)
    c.call("update_session_state", session_id=sid, state_data={"replaced": []}, replace=True)
    c.call("record_evaluation", session_id=sid, code="1+1", result=2)
    before_clear = whole(c, sid)
    c.call("clear_context", session_id=sid)
    listed = c.call("list_checkpoints", session_id=sid)["checkpoints"]
    assert [(x["label"], x["automatic"]) for x in listed][:2] == [
        ("before clear_context", True),
        ("before update_session_state", True),
    ]
    held[sid, listed[0]["checkpoint_id"]] = before_clear
    held[sid, listed[1]["checkpoint_id"]] = before_replace
    # After the clear: no history left, its numbering past 0 (eo = en + 1).
    held[sid, c.call("create_checkpoint", session_id=sid)["checkpoint_id"]] = whole(c, sid)
    # A deleted one: kh's last id is above every id left.
    gone = c.call("create_checkpoint", session_id=sid, label="to delete")["checkpoint_id"]
    c.call("delete_checkpoint", session_id=sid, checkpoint_id=gone)

    # An empty session's checkpoint, its label with characters JSON escapes.
    empty: str = c.call("create_session", client_id="ckb-empty")["session_id"]
    label = 'ctl \u0001 "q" \\ é'
    made = c.call("create_checkpoint", session_id=empty, label=label)
    held[empty, made["checkpoint_id"]] = whole(c, empty)

    plain = seeded(c, "ckb-plain", {"only": "state", "empty": {}, "list": []})
    return [sid, empty, plain], held


def seen(c: Client, sids: list[str]) -> dict[str, Any]:
    """What a client sees of the checkpoints."""
    return {
        sid: (
            c.call("list_checkpoints", session_id=sid)["checkpoints"],
            c.call("get_session_info", session_id=sid)["checkpoint_count"],
        )
        for sid in sids
    }


def test_checkpoints_round_trip_a_backup_byte_for_byte(
    client: Client, redis_client: redis.Redis, tmp_path: Path
) -> None:
    sids, held = taken(client)
    views = seen(client, sids)
    assert [count for _, count in views.values()] == [4, 1, 0]
    assert views[sids[1]][0][0]["label"] == 'ctl \u0001 "q" \\ é'
    raw = {sid: checkpoint_fields(redis_client, sid) for sid in sids}
    assert raw[sids[0]][b"kh"].startswith(b"5;") and raw[sids[2]] == {}
    fields_before = {sid: logical(redis_client, sid) for sid in sids}

    path = tmp_path / "ck.jsonl.gz"
    info = backup.write_backup([redis_client], path, key=TEST_KEY)
    assert (info.sessions, info.checkpoints) == (3, 5)
    s = Settings()
    verified = backup.verify_backup(
        path,
        key=TEST_KEY,
        max_line=backup.max_line_for(s),
        check=lambda rec: None if _valid(rec, s) else "refused",
    )
    assert (verified.sessions, verified.checkpoints, verified.invalid) == (3, 5, 0)
    # Every line passes restore's checks, its checkpoints written back unchanged.
    for _, rec in backup.iter_backup(path):
        if rec is not None:
            checked = restore.check_session(rec, s)
            assert {n: v for n, v in checked.fields if layout.is_checkpoint_field(n)} == raw[
                rec.session_id
            ]
    done = cli("verify", str(path))
    assert done.returncode == 0 and "OK, 3 sessions" in done.stdout, done
    assert "would refuse" not in done.stdout

    redis_client.flushall()
    result = restore.restore_backup(redis_client, path, key=TEST_KEY)
    assert (result.restored, result.invalid, result.checkpoints) == (3, 0, 5)

    for sid in sids:
        assert checkpoint_fields(redis_client, sid) == raw[sid], sid  # byte for byte
        assert logical(redis_client, sid) == fields_before[sid], sid
    assert seen(client, sids) == views
    # Each checkpoint brings back exactly what it held when it was taken.
    for (sid, cid), what in held.items():
        back = client.call("restore_checkpoint", session_id=sid, checkpoint_id=cid)
        assert back["session_state"] == what["state"], (sid, cid)
        assert whole(client, sid) == what, (sid, cid)
    # And the service goes on from them: history numbering continues.
    first = sids[0]
    client.call("restore_checkpoint", session_id=first, checkpoint_id=1)
    client.call("record_evaluation", session_id=first, code="3+3", result="6")
    assert client.call("get_context_summary", session_id=first)["evaluation_count"] == 3
    # Ids go on past the restored kh's last: 5, then four automatic ones of
    # the restores above and one of this one's.
    assert client.call("create_checkpoint", session_id=first)["checkpoint_id"] == 11


def test_a_session_beyond_the_old_line_cap_round_trips(
    client: Client, redis_client: redis.Redis, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A session at max_state_bytes, all escapes, with three checkpoints of it:
    its line is longer than the cap before checkpoints, and reads, verifies
    and restores (through the command line) under the defaults."""
    big = '"' * ((MIB - 400) // 2)  # stored as \" each: max_state_bytes, nearly
    sid = client.call("create_session", client_id="ckb-big")["session_id"]
    client.call("update_session_state", session_id=sid, state_data={"big": big})
    ids = [client.call("create_checkpoint", session_id=sid)["checkpoint_id"] for _ in range(3)]
    client.call("update_session_state", session_id=sid, state_data={"big": "small"}, replace=True)
    raw = checkpoint_fields(redis_client, sid)
    assert sum(len(v) for n, v in raw.items() if n.startswith(b"k:")) > 3 * (MIB - 1000)

    path = tmp_path / "big.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    with gzip.open(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert OLD_MAX_LINE < len(lines[1]) < backup.MAX_LINE
    done = cli("verify", str(path))
    assert done.returncode == 0 and "OK, 1 sessions" in done.stdout, done

    redis_client.flushall()
    restored = cli("restore", str(path), "--redis-url", redis_server.url)
    assert restored.returncode == 0, restored
    assert checkpoint_fields(redis_client, sid) == raw
    back = client.call("restore_checkpoint", session_id=sid, checkpoint_id=ids[0])
    assert back["session_state"] == {"big": big}


# -- restore's checks ----------------------------------------------------------------


@pytest.fixture
def genuine(client: Client, redis_client: redis.Redis, tmp_path: Path) -> SessionRecord:
    """A backup line of a session with two checkpoints (one labelled, one
    automatic), its state holding SECRET."""
    sid = seeded(client, "ckb-check", {"secret": SECRET, "pad": "p" * 700, "e": {}, "l": []})
    client.call("record_evaluation", session_id=sid, code="1", result=1)
    client.call("create_checkpoint", session_id=sid, label="mine")
    client.call("clear_context", session_id=sid)
    path = tmp_path / "one.jsonl.gz"
    backup.write_backup([redis_client], path, key=TEST_KEY)
    records = [rec for _, rec in backup.iter_backup(path) if rec is not None]
    assert len(records) == 1 and records[0].checkpoints == 2
    return records[0]


def edited(rec: SessionRecord, **changes: bytes | None) -> SessionRecord:
    """`rec` with fields set (None: removed); names with ':' given as k_1 -> k:1."""
    fields = dict(rec.fields)
    for name, value in changes.items():
        key = name.replace("_", ":", 1).encode()
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return replace(rec, fields=list(fields.items()))


def with_snapshot(rec: SessionRecord, cid: int, blob: bytes) -> SessionRecord:
    """`rec` with checkpoint cid's snapshot replaced, and its head's bytes to match."""
    fields = dict(rec.fields)
    last, heads = layout.parse_heads(fields[b"kh"])
    heads = [replace(h, bytes=len(blob)) if h.id == cid else h for h in heads]
    fields[b"kh"] = layout.pack_heads(last, heads)
    fields[b"k:%d" % cid] = blob
    return replace(rec, fields=list(fields.items()))


def with_heads(rec: SessionRecord, packed: bytes) -> SessionRecord:
    return edited(rec, kh=packed)


def test_restore_refuses_tampered_checkpoints_with_a_clear_reason(genuine: SessionRecord) -> None:
    s = Settings()
    rec = genuine
    checked = restore.check_session(rec, s)
    assert {n: v for n, v in checked.fields if layout.is_checkpoint_field(n)} == {
        n: v for n, v in rec.fields if layout.is_checkpoint_field(n)
    }
    fields = dict(rec.fields)
    last, heads = layout.parse_heads(fields[b"kh"])
    assert last == 2 and [h.id for h in heads] == [2, 1]
    kh = fields[b"kh"]
    counters, content = layout.parse_snapshot(fields[b"k:1"])
    assert dict(content)[b"s:secret"] == json.dumps(SECRET).encode()

    def pack(**changes: int) -> dict[str, int]:
        return {**counters, **changes}

    off_by_one = [replace(h, bytes=h.bytes + 1) if h.id == 1 else h for h in heads]
    cases: dict[str, tuple[SessionRecord, Settings, str]] = {
        "head bytes off": (
            with_heads(rec, layout.pack_heads(last, off_by_one)), s, "kh says .* bytes"),
        "client_info in a snapshot": (
            with_snapshot(rec, 1, layout.pack_snapshot(counters, [(b"ci", b"{}")])),
            s, "not state or context"),
        "e:0 in a snapshot": (
            with_snapshot(rec, 1, layout.pack_snapshot(counters, [(b"e:0", b"{}")])),
            s, "unknown field 'e:0'"),
        "a field twice in a snapshot": (
            with_snapshot(rec, 1, layout.pack_snapshot(counters, [*content, content[0]])),
            s, "appears twice"),
        "not JSON in a snapshot": (
            with_snapshot(
                rec, 1, layout.pack_snapshot(counters, [(b"s:x", b"{" + SECRET.encode())])
            ),
            s, "a state value is not valid JSON"),
        "state understated": (
            with_snapshot(rec, 1, layout.pack_snapshot(pack(sb=0), content)),
            s, "look smaller"),
        "forged history range": (
            with_snapshot(rec, 1, layout.pack_snapshot(pack(en=10**12), content)),
            s, "history range"),
        "counts off": (
            with_snapshot(rec, 1, layout.pack_snapshot(pack(sn=counters["sn"] + 1), content)),
            s, "counts do not match"),
        "a counter beyond 2^53": (
            with_snapshot(rec, 1, layout.pack_snapshot(pack(sd=2**60), content)),
            s, "out of range"),
        "a cut snapshot": (with_snapshot(rec, 1, fields[b"k:1"][:-1]), s, "cut"),
        "a snapshot over max_state_bytes": (
            with_snapshot(
                rec, 1, layout.pack_snapshot(counters, [(b"s:big", json.dumps("x" * MIB).encode())])
            ),
            Settings(max_checkpoint_bytes=8 * MIB), "over max_state_bytes"),
        "a snapshot without its head": (edited(rec, k_9=fields[b"k:1"]), s, "without its head"),
        "a label without its head": (edited(rec, kl_9=b"x"), s, "'kl:9' without its head"),
        "a snapshot id not canonical": (edited(rec, k_01=b"x"), s, "'k:01' without its head"),
        "a head without its snapshot": (edited(rec, k_2=None), s, "checkpoint 2 has no snapshot"),
        "checkpoints without kh": (edited(rec, kh=None), s, "without kh"),
        "an id twice": (
            with_heads(rec, layout.pack_heads(last, [heads[0], heads[0]])), s, "twice in kh"),
        "an id over kh's last": (
            with_heads(rec, layout.pack_heads(1, heads)), s, r"not in 1\.\.1"),
        "kh not canonical": (with_heads(rec, b"+" + kh), s, "form the scripts write"),
        "kh garbage": (with_heads(rec, b"2;1,2,3"), s, "not a list of checkpoint heads"),
        "automatic neither 0 nor 1": (
            with_heads(rec, kh[:-1] + b"7"), s, "not a list of checkpoint heads"),
        "version 0": (
            with_heads(rec, layout.pack_heads(last, [replace(heads[0], version=0), heads[1]])),
            s, "out of range"),
        "a label not UTF-8": (edited(rec, kl_1=b"\xff\xfe"), s, "label is not UTF-8"),
        "a label too long": (edited(rec, kl_1=b"x" * 129), s, "over 128 characters"),
        "too many": (rec, Settings(max_checkpoints=1), "2 checkpoints, over max_checkpoints 1"),
        "too many bytes": (rec, Settings(max_checkpoint_bytes=1024), "over max_checkpoint_bytes"),
        "an unknown field still": (edited(rec, kx=b"1"), s, "unknown field 'kx'"),
    }  # fmt: skip
    for what, (bad, settings, reason) in cases.items():
        with pytest.raises(restore.Invalid, match=reason) as err:
            restore.check_session(bad, settings)
        assert SECRET not in str(err.value), what
    # The label's own limit is characters, not bytes.
    assert restore.check_session(edited(rec, kl_1=("日" * 128).encode()), s)


def test_tampered_lines_are_skipped_and_the_rest_restored(
    genuine: SessionRecord, redis_client: redis.Redis, tmp_path: Path
) -> None:
    raw = checkpoint_fields(redis_client, genuine.session_id)
    fields = dict(genuine.fields)
    other = keys.new_session_id(keys.client_hash("ckb-check"))
    forged = replace(
        with_snapshot(genuine, 1, layout.pack_snapshot(layout.parse_snapshot(fields[b"k:1"])[0],
                                                      [(b"s:x", b"[")])),
        session_id=other,
    )  # fmt: skip
    path = tmp_path / "mixed.jsonl.gz"
    write_file(path, [genuine, forged], backup.redis_now_ms(redis_client))
    s = Settings()
    info = backup.verify_backup(
        path, key=TEST_KEY, check=lambda r: None if _valid(r, s) else "refused"
    )
    assert (info.sessions, info.invalid, info.checkpoints) == (2, 1, 4)
    redis_client.flushall()
    result = restore.restore_backup(redis_client, path, key=TEST_KEY)
    assert (result.restored, result.invalid, result.checkpoints) == (1, 1, 2)
    assert checkpoint_fields(redis_client, genuine.session_id) == raw
    assert not redis_client.exists(keys.session_key(other))


# -- the line cap ---------------------------------------------------------------------


def test_the_line_cap_holds_a_session_with_all_its_checkpoints() -> None:
    assert backup.MAX_LINE == 4 * MIB + 2 * 4 * MIB + 10 * 1024 + MIB
    assert backup.max_line_for(Settings()) == backup.MAX_LINE
    assert backup.max_line_for(Settings(max_checkpoint_bytes=1024)) == backup.MAX_LINE
    bigger = Settings(max_checkpoint_bytes=16 * MIB, max_checkpoints=1000)
    assert backup.max_line_for(bigger) == 4 * MIB + 32 * MIB + 1000 * 1024 + MIB
    # The worst line of the defaults: content at the cap, all escapes (twice
    # as long in the line), ten checkpoints of 4 MiB in all with the longest
    # ids and labels that escape the most.
    value = json.dumps('"' * ((MIB - 300) // 2)).encode()
    counters = dict.fromkeys(layout.SNAPSHOT_COUNTERS, 2**53)
    n, each = 10, 4 * MIB // 10
    blob = layout.pack_snapshot(counters, [(b"s:k", b"x" * each)])
    blob = layout.pack_snapshot(counters, [(b"s:k", b"x" * (2 * each - len(blob)))])
    assert len(blob) == each
    last = 2**53
    heads = [layout.CheckpointHead(last - i, 2**40, 2**53 - 1, each, False) for i in range(n)]
    sid = keys.new_session_id(keys.client_hash("q"))

    def line_of(heads: list[layout.CheckpointHead]) -> bytes:
        fields = [(b"c", b"q"), (b"s:k", value), (b"kh", layout.pack_heads(last, heads))]
        for h in heads:
            fields += [(b"k:%d" % h.id, blob), (b"kl:%d" % h.id, b"\x1f" * 128)]
        return backup.encode_record(SessionRecord(sid, fields, 1, 1))

    line = line_of(heads)
    assert OLD_MAX_LINE < len(line) < backup.MAX_LINE
    # Beyond its snapshot's base64, each checkpoint (its head, label and
    # names) takes at most CHECKPOINT_LINE_BYTES of the line.
    extra = (len(line) - len(line_of(heads[:1]))) / (n - 1) - 4 * each / 3
    assert 700 < extra <= backup_format.CHECKPOINT_LINE_BYTES
