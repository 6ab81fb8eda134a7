"""Restore from a backup file: verified whole before the first write (its
signature, every line), then each session re-validated and put back through
one script call (scripts.RESTORE_BACKUP) that skips expired sessions, keeps
newer versions unless forced, enforces the client's session limit and
rebuilds the indexes so statistics and listings stay exact.

A signature says who wrote the file, not that what it holds is sane, so every
session line is checked again against the running settings, whatever the
signature says (check_session): the known field layout only, timeout, version,
client_info size, state keys, registry and history counts, the session's
cost (service/limits.py), every stored JSON value. A line that fails is
skipped, counted (RestoreResult.invalid) and logged with its session id's
first characters and the reason, never its data. The size counters (layout.META)
are recomputed from the fields themselves, so a tampered
counter cannot make a session look smaller or make a script loop over a
forged history range.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import redis

from service import keys, layout, limits, models, scripts
from service.backup import BATCH_BYTES, _size
from service.backup_format import BATCH, BackupInfo, Progress, SessionRecord, max_line_for
from service.backup_read import read_verified, verify_backup
from service.errors import StorageUnavailable
from service.settings import Settings
from service.store import Call, RedisClient, Store

log = logging.getLogger(__name__)

# The fixed fields of a backup line (service/backup_format.py): the metadata
# as c, ca, lm, to, v, a, the content fields, and the counters the previous
# release stored (sb, xb, cn, rn, en, eo: recomputed, never trusted); the
# others are s:<key>, o:<id> and e:<n>.
KNOWN_FIELDS = frozenset(b"c ca lm to v a ci sb xb cn w wv i ih so rn en eo".split())
# The content fields' prefixes (state, registry, history).
PREFIXES = frozenset(layout.CONTENT_PREFIXES)
MAX_MS = 2**53  # timestamps, TTLs and counts beyond this are not numbers Redis' Lua keeps
MAX_OBJECT_ID = 256  # characters (models.ObjectId)
LOG_ID = 20  # characters of a session id a log line shows
_CLIENT_ID = re.compile(models.CLIENT_ID_PATTERN)
_CANONICAL = re.compile(rb"0|[1-9][0-9]{0,15}")


class Invalid(Exception):
    """Why restore refuses one session line (no data in the message)."""


@dataclass(slots=True)
class RestoreResult:
    restored: int = 0
    expired: int = 0  # expired since the backup: skipped
    newer: int = 0  # Redis holds the same or a newer version: skipped (unless force)
    over_limit: int = 0  # the client already has its maximum of live sessions: skipped
    invalid: int = 0  # refused by check_session (see the log): skipped


def _number(meta: dict[bytes, bytes], name: bytes, low: int, high: int) -> int:
    value = meta[name]
    if not _CANONICAL.fullmatch(value) or not low <= int(value) <= high:
        shown = value[:24].decode("ascii", "replace")
        raise Invalid(f"field {name.decode()!r} is {shown!r}, not a number in {low}..{high}")
    return int(value)


def _json(value: bytes, what: str) -> None:
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        raise Invalid(f"{what} is not valid JSON") from None


def check_session(rec: SessionRecord, settings: Settings) -> SessionRecord:
    """The record as restore writes it, its counters recomputed from its
    fields; Invalid(reason) when it is not a session this service could hold
    under `settings`."""
    if why := rec.problem():  # id, required fields, owner (iter_backup checked them too)
        raise Invalid(why)
    if len({name for name, _ in rec.fields}) != len(rec.fields):
        raise Invalid("a field appears twice")
    meta: dict[bytes, bytes] = {}
    state: list[tuple[bytes, bytes]] = []
    registry: list[tuple[bytes, bytes]] = []
    history: dict[int, bytes] = {}
    for name, value in rec.fields:
        if name in KNOWN_FIELDS:
            meta[name] = value
        elif name.startswith(b"s:"):
            state.append((name[2:], value))
        elif name.startswith(b"o:"):
            try:
                oid = name[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise Invalid("a registry id is not UTF-8") from None
            if not 1 <= len(oid) <= MAX_OBJECT_ID:
                raise Invalid(f"a registry id is not 1..{MAX_OBJECT_ID} characters")
            registry.append((name[2:], value))
        elif name.startswith(b"e:") and _CANONICAL.fullmatch(name[2:]) and name != b"e:0":
            history[int(name[2:])] = value
        else:
            raise Invalid(f"unknown field {name[:32].decode('utf-8', 'replace')!r}")

    try:
        client_id = meta[b"c"].decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("the client id is not UTF-8") from None
    if not _CLIENT_ID.fullmatch(client_id):
        raise Invalid("the client id is not of the protocol's form")
    _number(meta, b"to", models.MIN_TIMEOUT, models.MAX_TIMEOUT)
    _number(meta, b"v", 1, limits.MAX_VERSION)
    _number(meta, b"a", 0, 1)
    _number(meta, b"ca", 0, MAX_MS)
    _number(meta, b"lm", 0, MAX_MS)
    if not 0 <= rec.read_ms <= MAX_MS or not (rec.ttl_ms is None or 0 <= rec.ttl_ms <= MAX_MS):
        raise Invalid("read_ms or ttl_ms out of range")
    for name, part in ((b"wv", b"w"), (b"ih", b"i"), (b"so", b"i")):
        if name in meta and part not in meta:
            raise Invalid(f"field {name.decode()!r} without {part.decode()!r}")
    for name in (b"wv", b"ih"):
        if name in meta:
            _number(meta, name, 0, MAX_MS)

    ci = meta.get(b"ci", b"")
    if len(ci) > settings.client_info_cap:
        raise Invalid(f"client_info is {len(ci)} bytes, over {settings.client_info_cap}")
    if len(state) > settings.max_state_keys:
        raise Invalid(f"{len(state)} state keys, over max_state_keys {settings.max_state_keys}")
    if len(registry) > settings.max_registry_size:
        raise Invalid(
            f"{len(registry)} registry entries, over max_registry_size {settings.max_registry_size}"
        )
    if len(history) > settings.history_limit:
        raise Invalid(
            f"{len(history)} history entries, over history_limit {settings.history_limit}"
        )
    if history:
        newest, oldest = max(history), min(history)
        if newest - oldest + 1 != len(history):
            raise Invalid("the history entries are not numbered consecutively")
    else:
        newest, oldest = 0, 1

    # Counted as the scripts count (klen is limits.key_weight).
    state_bytes = sum(limits.key_weight(k) + len(v) for k, v in state)
    registry_bytes = sum(limits.key_weight(k) + len(v) for k, v in registry)
    history_bytes = sum(len(v) for v in history.values())
    context_bytes = (
        len(meta.get(b"w", b""))
        + len(meta.get(b"i", b""))
        + registry_bytes
        + history_bytes
    )
    entries = len(state) + len(registry) + len(history)
    cost = limits.session_cost(state_bytes, context_bytes, len(ci), entries)
    if cost > settings.max_state_bytes:
        raise Invalid(f"costs {cost} bytes, over max_state_bytes {settings.max_state_bytes}")

    # Only now that the sizes are known to be small: every stored JSON value.
    for what, name in (("client_info", b"ci"), ("workspace_context", b"w")):
        if name in meta:
            _json(meta[name], what)
    for what, name in (("inspector_state", b"i"), ("the selected object", b"so")):
        if name in meta:
            _json(meta[name], what)
    if b"so" in meta and len(meta[b"so"]) > len(meta[b"i"]):
        raise Invalid("the selected object is larger than the inspector state")
    for _, value in state:
        _json(value, "a state value")
    for _, value in registry:
        _json(value, "a registry entry")
    for value in history.values():
        _json(value, "a history entry")

    template = layout.pack_template(
        v=int(meta[b"v"]), lm=int(meta[b"lm"]), ca=int(meta[b"ca"]), to=int(meta[b"to"]),
        a=int(meta[b"a"]), sn=len(state), sb=state_bytes, cb=len(ci), rn=len(registry),
        ob=registry_bytes, en=newest, eo=oldest, hb=history_bytes,
        wb=len(meta.get(b"w", b"")), ib=len(meta.get(b"i", b"")), c=client_id,
    )
    # The metadata as this release stores it (its first pair: the template
    # that restore_backup completes with the clock), then the content only.
    fields = [(layout.META_FIELD, template)]
    fields += [(n, v) for n, v in rec.fields if n in layout.CONTENT or n[:2] in PREFIXES]
    return replace(rec, fields=fields)


def restore_backup(
    client: RedisClient,
    path: Path,
    *,
    key: bytes | None,
    allow_unsigned: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    settings: Settings | None = None,
) -> RestoreResult:
    """The whole file is verified before the first write: a cut, corrupted or
    forged file raises BackupError and changes nothing. Running it twice is
    harmless."""
    limits_ = settings or Settings()
    verified = verify_backup(
        path, key=key, allow_unsigned=allow_unsigned, max_line=max_line_for(limits_)
    )
    return restore_verified(client, verified, force=force, progress=progress, settings=limits_)


def restore_verified(
    client: RedisClient,
    verified: BackupInfo,
    *,
    force: bool = False,
    progress: Progress | None = None,
    settings: Settings | None = None,
) -> RestoreResult:
    """restore_backup for a file that verify_backup has just checked (a file
    replaced since raises BackupError before the first write). The limits are
    those of `settings` (the defaults when None)."""
    limits_ = settings or Settings()
    result = RestoreResult()
    batch: list[SessionRecord] = []
    done = size = 0
    for _, rec in read_verified(verified):
        if rec is not None:
            done += 1
            try:
                checked = check_session(rec, limits_)
            except Invalid as why:
                result.invalid += 1
                log.warning("restore: refused session %s...: %s", rec.session_id[:LOG_ID], why)
            else:
                batch.append(checked)
                size += _size(checked)
        if batch and (rec is None or len(batch) >= BATCH or size >= BATCH_BYTES):
            _restore_batch(client, batch, force, limits_, result)
            batch, size = [], 0
            if progress:
                progress(done)
    if progress:
        progress(done)
    return result


def _restore_batch(
    client: RedisClient,
    batch: list[SessionRecord],
    force: bool,
    limits_: Settings,
    result: RestoreResult,
) -> None:
    # Through the Store: one pipeline per master on a Cluster, and scripts
    # (re)loaded on NOSCRIPT, so a Redis restart mid-restore is survived.
    calls = []
    for rec in batch:
        sid = rec.session_id
        template, content = rec.fields[0][1], rec.fields[1:]
        args: list[str | bytes | int] = ["", "", "", sid, keys.chash_of_session(sid), ""]
        args += [rec.expires_ms, "1" if force else "0", limits_.max_sessions_per_client, template]
        for name, value in content:
            args += [name, value]
        calls.append(Call(scripts.RESTORE_BACKUP, keys.session_keys(sid), args))
    try:
        replies = Store(client).run(calls)
    except StorageUnavailable:
        raise redis.ConnectionError("Redis became unavailable during the restore") from None
    for reply in replies:
        if isinstance(reply, StorageUnavailable):
            raise redis.ConnectionError("Redis refused a restore write (try again)")
        if isinstance(reply, Exception):
            raise reply
        status = reply[0]
        if status == b"OK":
            result.restored += 1
        elif status == b"EXPIRED":
            result.expired += 1
        elif status == b"NEWER":
            result.newer += 1
        elif status == b"LIMIT":
            result.over_limit += 1
        else:
            raise RuntimeError(f"unexpected restore reply {reply!r}")
