"""One client whole, and its erasure: what `stui-sessions clients show` and
`clients purge` do (workers/cli_clients.py is their command line).

Everything Redis holds of a client is in its bucket's hash slot, found from
the client id alone: its index (keys.client_index_key: session entries, rate
buckets '!r', replay records '!q...'), its sessions (each id starts with the
client hash, and a session hash holds its checkpoints and replay records),
its members of the bucket's expiry and clients zsets, and the previous
release's rl:<h>. Outside the slot there are only its CURVE key
(keys.curve_clients_key) and its exact plan assignment (keys.plan_exact_key).
The previous release's replay records (r:<digest>) name no client and
expire within that release's replay window.

A purge takes three steps. The client is denied first (an exact policy rule,
which every front applies within policy_refresh), so that its requests are
refused rather than racing with the removal. Then passes of PURGE_CLIENT
remove what a scan of the slot finds, until a pass finds nothing. Then the
rule goes again, unless an operator had already denied the client.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service import auth, keys, layout, limits, plans, policy, scripts
from service.backup import primaries, redis_now_ms, write_records
from service.backup_files import sync_dir
from service.backup_format import BackupError, BackupInfo, SessionRecord
from service.backup_read import read_verified, verify_backup
from service.backup_sign import sidecar
from service.settings import Settings
from service.store import Call, RedisClient, Store

PURGE_BATCH = 256  # sessions per PURGE_CLIENT call: each call holds the shard briefly
MAX_PASSES = 20  # a client still writing after this many passes is not being refused


class PurgeIncomplete(RuntimeError):
    """Keys of the client kept appearing: its requests are not being refused."""


@dataclass(frozen=True, slots=True)
class SessionView:
    session_id: str
    created_ms: int
    last_modified_ms: int
    expires_ms: int
    version: int
    active: bool
    bytes: int | None  # as max_state_bytes counts them; None for a previous release's layout
    checkpoints: int


@dataclass(frozen=True, slots=True)
class ClientView:
    client_id: str
    plan: str | None
    limits: dict[str, int | float]
    sessions: list[SessionView]
    rate_tokens: float | None  # requests the client may send now; None: rate limiting off
    create_tokens: float | None  # create_session requests it may send now
    curve_keys: int  # CURVE public keys registered for it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def effective_limits(client: RedisClient, settings: Settings, client_id: str) -> plans.Limits:
    """The client's plan and its limits, as every front resolves them."""
    table = plans.read_table(client)
    name = table.plan_for(client_id)
    return plans.Limits.of(settings, name, table.plans[name] if name else {})


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _level(bucket: list[bytes], at: int, now: int, rate: float, cap: int) -> float | None:
    """A token bucket's level now, as the scripts' level() computes it."""
    if rate <= 0:
        return None
    if len(bucket) < at + 2 or bucket[at] == b"":
        return float(cap)
    tokens, since = float(bucket[at]), int(bucket[at + 1])
    return min(float(cap), tokens + (now - since) * rate / 1000)


def show(client: RedisClient, settings: Settings, client_id: str) -> ClientView:
    """The client as Redis holds it now: its live sessions (newest first),
    its rate-limit levels, its CURVE keys."""
    chash = keys.client_hash(client_id)
    own = effective_limits(client, settings, client_id)
    settings = own.settings
    index = {_raw(f): _raw(v) for f, v in client.hgetall(keys.client_index_key(chash)).items()}
    now = redis_now_ms(primaries(client)[0])
    entries = {
        layout.session_of_field(f, chash): layout.parse_entry(v)
        for f, v in index.items()
        if layout.is_session_entry(f)
    }
    live = sorted(
        ((f, e) for f, e in entries.items() if e.expires > now),
        key=lambda fe: fe[1].created,
        reverse=True,
    )
    pipe = client.pipeline(transaction=False)
    for f, _ in live:
        pipe.hmget(keys.session_key(f), [layout.META_FIELD, layout.CHECKPOINT_HEADS])
    sessions = []
    for (f, e), (packed, heads) in zip(live, pipe.execute() if live else [], strict=True):
        size = None
        if packed:
            m = layout.unpack_meta(packed)
            entries_n = m.sn + m.rn + m.en - m.eo + 1
            size = limits.session_cost(m.sb, m.context_bytes, m.cb, entries_n)
        sessions.append(
            SessionView(
                session_id=f,
                created_ms=e.created,
                last_modified_ms=e.modified,
                expires_ms=e.expires,
                version=e.version,
                active=bool(e.active),
                bytes=size,
                checkpoints=len(layout.parse_heads(heads)[1]),
            )
        )
    bucket = (index.get(b"!r") or b",,,").split(b",")
    create_rate = settings.create_rate_limit
    return ClientView(
        client_id=client_id,
        plan=own.plan,
        limits=own.report(),
        sessions=sessions,
        rate_tokens=_level(bucket, 0, now, settings.rate_limit, settings.rate_burst),
        create_tokens=_level(bucket, 2, now, create_rate, settings.create_burst),
        curve_keys=sum(1 for cid in auth.read_client_keys(client).values() if cid == client_id),
    )


@dataclass(slots=True)
class Purged:
    """What a purge removed."""

    sessions: int = 0
    checkpoints: int = 0
    replay_records: int = 0  # fields that hold them: '!q...' of the index, 'q' of sessions
    index_keys: int = 0  # the client index, the previous release's rate-limit key
    rate_buckets: int = 0
    expiry_members: int = 0
    clients_members: int = 0
    curve_keys: int = 0
    plan_assignments: int = 0  # its exact assignment (prefixes are not the client's)
    passes: int = 0
    denied_during: bool = field(default=False)  # a deny rule was added for the purge

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _scan_sessions(client: RedisClient, chash: str) -> set[str]:
    """Every session id of the client that Redis holds: its session hashes,
    its index entries, and the expiry zset members the previous release
    named by full id (this release's members are the ids' random parts,
    which only the two others lead to; PURGE_CLIENT removes both names)."""
    found: set[str] = set()
    prefix = f"{chash}."
    pattern = keys.client_sessions_scan_pattern(chash)
    for node in primaries(client):
        for key in node.scan_iter(match=pattern, count=1000):
            found.add(_text(key).rsplit(":", 1)[1])
    for f in client.hkeys(keys.client_index_key(chash)):
        if layout.is_session_entry(f):
            found.add(layout.session_of_field(_raw(f), chash))
    expiry = keys.bucket_expiry_key(keys.bucket_of(chash))
    for member, _ in client.zscan_iter(expiry, match=f"{prefix}*", count=1000):
        found.add(_text(member))
    return {sid for sid in found if sid.startswith(prefix)}


def _count(client: RedisClient, chash: str, sids: Sequence[str], into: Purged) -> None:
    """What is about to go, for the report: checkpoints, replay records, rate buckets."""
    pipe = client.pipeline(transaction=False)
    pipe.hkeys(keys.client_index_key(chash))
    for sid in sids:
        pipe.hmget(keys.session_key(sid), [layout.CHECKPOINT_HEADS, layout.REPLAY_FIELD])
    index_fields, *sessions = pipe.execute()
    into.replay_records += sum(1 for f in index_fields if f.startswith(b"!q"))
    into.rate_buckets += 1 if b"!r" in index_fields else 0
    for heads, replay in sessions:
        with contextlib.suppress(ValueError):  # a damaged head goes all the same
            into.checkpoints += len(layout.parse_heads(heads)[1])
        into.replay_records += 1 if replay else 0


def _pass(client: RedisClient, chash: str, into: Purged) -> bool:
    """One sweep of the client's slot; False when it found nothing left."""
    bucket = keys.bucket_of(chash)
    index = keys.client_index_key(chash)
    legacy = keys.legacy_rate_key(chash)
    sids = sorted(_scan_sessions(client, chash))
    pipe = client.pipeline(transaction=False)
    pipe.exists(index, legacy)
    pipe.zscore(keys.bucket_clients_key(bucket), chash)
    held, member = pipe.execute()
    if not sids and not held and member is None:
        return False
    _count(client, chash, sids, into)
    if client.exists(legacy):
        into.rate_buckets += 1
    fixed = [index, keys.bucket_expiry_key(bucket), keys.bucket_clients_key(bucket), legacy]
    calls = [
        Call(
            scripts.PURGE_CLIENT,
            fixed + [keys.session_key(s) for s in batch],
            [chash, *batch],
        )
        for batch in (sids[i : i + PURGE_BATCH] for i in range(0, max(len(sids), 1), PURGE_BATCH))
    ]
    for reply in Store(client).run(calls):
        if isinstance(reply, Exception):
            raise reply
        deleted, index_keys, expiry, clients = (int(x) for x in reply)
        into.sessions += deleted
        into.index_keys += index_keys
        into.expiry_members += expiry
        into.clients_members += clients
    return True


def purge(
    client: RedisClient,
    client_id: str,
    *,
    keep_key: bool = False,
    settle: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    before_lifting: Callable[[], None] | None = None,
) -> Purged:
    """Removes everything Redis holds of the client (see the module's
    docstring). `settle`: how long the fronts take to apply a policy change
    (2 x policy_refresh and some); the removal starts after it.
    `before_lifting` is called once the removal is done, while the client is
    still denied (the tests look at Redis then)."""
    chash = keys.client_hash(client_id)
    done = Purged()
    done.denied_during = policy.add_deny(client, client_id)
    try:
        if done.denied_during and settle > 0:
            sleep(settle)
        while _pass(client, chash, done):
            done.passes += 1
            if done.passes >= MAX_PASSES:
                raise PurgeIncomplete(
                    f"keys of the client were still appearing after {MAX_PASSES} passes"
                )
        if not keep_key:
            done.curve_keys = auth.remove_client_key(client, client_id)
        done.plan_assignments = int(plans.unassign(client, client_id))
        if before_lifting is not None:
            before_lifting()
    finally:
        if done.denied_during:
            policy.remove_deny(client, client_id)
    return done


@dataclass(frozen=True, slots=True)
class Rewritten:
    path: Path
    removed: int  # the client's sessions taken out
    kept: int
    note: str = ""  # why a file was left as it is, when not for holding nothing of the client


# A backup being written (its temporary file, backup_files.temp_name) that
# has not grown for this long is taken for one whose writer died.
WRITING_IDLE_S = 30.0
# How long a purge waits for backups being written to finish.
BACKUP_WAIT_S = 600.0


def backup_files(directory: Path) -> Iterator[Path]:
    """The backup files of a directory (rotation's names and any other
    *.jsonl.gz), oldest name first."""
    yield from sorted(p for p in Path(directory).glob("*.jsonl.gz") if p.is_file())


def backups_being_written(directory: Path) -> list[Path]:
    """Temporary files of backups that are being written there now."""
    found = []
    for tmp in Path(directory).glob(".*.jsonl.gz.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - tmp.stat().st_mtime < WRITING_IDLE_S:
                found.append(tmp)
    return found


def rewrite_backup(
    path: Path, chash: str, *, key: bytes, allow_unsigned: bool = False,
    begun_before: int | None = None,
) -> Rewritten:
    """The file again without the client's sessions, signed anew with `key`:
    a temporary file, then its signature, then the rename (write_records).
    The file must verify first (BackupError if not: signing it would vouch
    for what nobody checked), and what is rewritten is read back through
    read_verified, so a file swapped or changed after its check is refused
    rather than signed. A legacy unsigned file only with allow_unsigned, and
    its .sha256 goes once it is signed. Left as it is: a file without the
    client's sessions, one begun at or after `begun_before` (Redis ms: a
    backup that started after the purge holds nothing of the purged client),
    and one gone (rotation removed it meanwhile)."""
    try:
        info: BackupInfo = verify_backup(path, key=key, allow_unsigned=allow_unsigned)
    except BackupError:
        if not path.exists():
            return Rewritten(path, 0, 0, "gone: removed by rotation while the purge ran")
        raise
    if begun_before is not None and info.created_ms >= begun_before:
        return Rewritten(path, 0, info.sessions, "begun after the purge")
    prefix = f"{chash}."
    removed = sum(
        1 for _, rec in read_verified(info)
        if rec is not None and rec.session_id.startswith(prefix)
    )
    if not removed:
        return Rewritten(path, 0, info.sessions)

    def kept() -> Iterator[SessionRecord]:
        # read_verified raises after the last line if the bytes changed while
        # read: write_records then removes its temporary file, renames nothing.
        for _, rec in read_verified(info):
            if rec is not None and not rec.session_id.startswith(prefix):
                yield rec

    written = write_records(
        kept(), path, key=key, created_ms=info.created_ms, token=info.token,
    )
    legacy = sidecar(path)
    if legacy.exists():
        os.unlink(legacy)
        sync_dir(path.parent)
    return Rewritten(path, removed, written.sessions)


def rewrite_backups(
    directory: Path, client_id: str, *, key: bytes, allow_unsigned: bool = False,
    purged_ms: int | None = None, wait_s: float = BACKUP_WAIT_S,
    progress: Callable[[str], None] | None = None,
) -> Iterator[Rewritten]:
    """rewrite_backup of every backup file in `directory`, one at a time,
    until none is left that may hold the client. A backup the scheduler was
    writing while the purge ran may have read the client's sessions before
    they went: so files that appear meanwhile are rewritten too (unless begun
    after `purged_ms`, Redis' clock when the purge had removed everything),
    and while a backup is being written there this waits for it, up to
    wait_s (then BackupError: run the purge again once it is done)."""
    chash = keys.client_hash(client_id)
    seen: set[Path] = set()
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        fresh = [p for p in backup_files(directory) if p not in seen]
        for path in fresh:
            seen.add(path)
            if progress is not None:
                progress(f"backup {path.name} ...")
            yield rewrite_backup(path, chash, key=key, allow_unsigned=allow_unsigned,
                                 begun_before=purged_ms)
        if fresh:
            continue
        writing = backups_being_written(directory)
        if not writing:
            return
        if time.monotonic() > deadline:
            raise BackupError(
                f"{directory}: a backup is still being written ({writing[0].name}) after "
                f"{wait_s:.0f} s; run the purge again once it is done")
        if progress is not None and not told:
            progress(f"waiting for a backup being written ({writing[0].name}) ...")
            told = True
        time.sleep(0.2)


def redis_holds_client(client: RedisClient, client_id: str) -> bool:
    """Whether anything of the client is left (what a second purge would find)."""
    chash = keys.client_hash(client_id)
    bucket = keys.bucket_of(chash)
    if _scan_sessions(client, chash):
        return True
    if client.exists(keys.client_index_key(chash), keys.legacy_rate_key(chash)):
        return True
    return client.zscore(keys.bucket_clients_key(bucket), chash) is not None

