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

Checkpoints (kh, k:<id>, kl:<id>, service/layout.py) are written back byte
for byte, so each is checked as thoroughly: kh in the form the scripts
write, every head with its snapshot and no snapshot or label without one,
ids unique and at most kh's last id, the caps (max_checkpoints,
max_checkpoint_bytes; they do not count toward max_state_bytes), labels.
A snapshot's counters are not recomputed (restore_checkpoint applies them
as they are), so they must agree with its fields: counts and the history
range exact, bytes at least what the fields hold (sb is an upper bound).
Its content passes the checks of the session's own (what restore_checkpoint
puts back must be a session this service could hold), JSON included.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson
import redis

from service import keys, layout, limits, models, plans, scripts
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
    checkpoints: int = 0  # that the restored sessions hold


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


@dataclass(slots=True)
class _Content:
    """The state and context fields of a session or of a checkpoint's snapshot,
    sorted (_sort), and what _check_content counted of them."""

    parts: dict[bytes, bytes] = field(default_factory=dict)  # w, wv, i, ih, so (and the metadata)
    state: list[tuple[bytes, bytes]] = field(default_factory=list)
    registry: list[tuple[bytes, bytes]] = field(default_factory=list)
    history: dict[int, bytes] = field(default_factory=dict)
    state_bytes: int = 0
    registry_bytes: int = 0
    history_bytes: int = 0
    newest: int = 0  # en
    oldest: int = 1  # eo


def _sort(content: _Content, name: bytes, value: bytes) -> bool:
    """Files a state, registry or history field; False when it is none of them."""
    if name.startswith(b"s:"):
        content.state.append((name[2:], value))
    elif name.startswith(b"o:"):
        try:
            oid = name[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("a registry id is not UTF-8") from None
        if not 1 <= len(oid) <= MAX_OBJECT_ID:
            raise Invalid(f"a registry id is not 1..{MAX_OBJECT_ID} characters")
        content.registry.append((name[2:], value))
    elif name.startswith(b"e:") and _CANONICAL.fullmatch(name[2:]) and name != b"e:0":
        content.history[int(name[2:])] = value
    else:
        return False
    return True


def _check_content(content: _Content, ci_bytes: int, settings: Settings) -> None:
    """The checks of state and context that a session and a snapshot share:
    layout, counts, cost (with ci_bytes of client_info), every JSON value.
    Fills in the byte counts and the history range."""
    parts = content.parts
    for name, part in ((b"wv", b"w"), (b"ih", b"i"), (b"so", b"i")):
        if name in parts and part not in parts:
            raise Invalid(f"field {name.decode()!r} without {part.decode()!r}")
    for name in (b"wv", b"ih"):
        if name in parts:
            _number(parts, name, 0, MAX_MS)
    state, registry, history = content.state, content.registry, content.history
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
        content.newest, content.oldest = max(history), min(history)
        if content.newest - content.oldest + 1 != len(history):
            raise Invalid("the history entries are not numbered consecutively")

    # Counted as the scripts count (klen is limits.key_weight).
    content.state_bytes = sum(limits.key_weight(k) + len(v) for k, v in state)
    content.registry_bytes = sum(limits.key_weight(k) + len(v) for k, v in registry)
    content.history_bytes = sum(len(v) for v in history.values())
    context_bytes = (
        len(parts.get(b"w", b""))
        + len(parts.get(b"i", b""))
        + content.registry_bytes
        + content.history_bytes
    )
    entries = len(state) + len(registry) + len(history)
    cost = limits.session_cost(content.state_bytes, context_bytes, ci_bytes, entries)
    if cost > settings.max_state_bytes:
        raise Invalid(f"costs {cost} bytes, over max_state_bytes {settings.max_state_bytes}")

    # Only now that the sizes are known to be small: every stored JSON value.
    for what, name in (
        ("workspace_context", b"w"),
        ("inspector_state", b"i"),
        ("the selected object", b"so"),
    ):
        if name in parts:
            _json(parts[name], what)
    if b"so" in parts and len(parts[b"so"]) > len(parts[b"i"]):
        raise Invalid("the selected object is larger than the inspector state")
    for _, value in state:
        _json(value, "a state value")
    for _, value in registry:
        _json(value, "a registry entry")
    for value in history.values():
        _json(value, "a history entry")


def check_session(rec: SessionRecord, settings: Settings) -> SessionRecord:
    """The record as restore writes it, its counters recomputed from its
    fields; Invalid(reason) when it is not a session this service could hold
    under `settings`."""
    if why := rec.problem():  # id, required fields, owner (iter_backup checked them too)
        raise Invalid(why)
    if len({name for name, _ in rec.fields}) != len(rec.fields):
        raise Invalid("a field appears twice")
    content = _Content()
    meta = content.parts
    checkpoints: dict[bytes, bytes] = {}
    for name, value in rec.fields:
        if name in KNOWN_FIELDS:
            meta[name] = value
        elif layout.is_checkpoint_field(name):
            checkpoints[name] = value
        elif not _sort(content, name, value):
            raise Invalid(f"unknown field {_shown(name)}")

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
    ci = meta.get(b"ci", b"")
    if len(ci) > settings.client_info_cap:
        raise Invalid(f"client_info is {len(ci)} bytes, over {settings.client_info_cap}")
    _check_content(content, len(ci), settings)
    if b"ci" in meta:
        _json(ci, "client_info")
    if checkpoints:
        _check_checkpoints(checkpoints, len(ci), settings)

    template = layout.pack_template(
        v=int(meta[b"v"]), lm=int(meta[b"lm"]), ca=int(meta[b"ca"]), to=int(meta[b"to"]),
        a=int(meta[b"a"]), sn=len(content.state), sb=content.state_bytes, cb=len(ci),
        rn=len(content.registry), ob=content.registry_bytes, en=content.newest,
        eo=content.oldest, hb=content.history_bytes, wb=len(meta.get(b"w", b"")),
        ib=len(meta.get(b"i", b"")), c=client_id,
    )
    # The metadata as this release stores it (its first pair: the template
    # that restore_backup completes with the clock), then the content and
    # the checkpoints, as they are.
    fields = [(layout.META_FIELD, template)]
    fields += [
        (n, v)
        for n, v in rec.fields
        if n in layout.CONTENT or n[:2] in PREFIXES or n in checkpoints
    ]
    return replace(rec, fields=fields)


def _shown(name: bytes) -> str:
    return repr(name[:32].decode("utf-8", "replace"))


def _check_checkpoints(fields: dict[bytes, bytes], ci_bytes: int, settings: Settings) -> None:
    """Invalid unless kh, k:<id> and kl:<id> are checkpoints the scripts could
    have written and restore_checkpoint can apply (see the module docstring)."""
    packed = fields.get(layout.CHECKPOINT_HEADS)
    if packed is None:
        raise Invalid("checkpoint fields without kh")
    try:
        last, heads = layout.parse_heads(packed)
    except ValueError:
        raise Invalid("kh is not a list of checkpoint heads") from None
    # The scripts read kh with a Lua pattern: only the form they write passes.
    if layout.pack_heads(last, heads) != packed or not 0 <= last <= MAX_MS:
        raise Invalid("kh is not of the form the scripts write")
    if len(heads) > settings.max_checkpoints:
        raise Invalid(f"{len(heads)} checkpoints, over max_checkpoints {settings.max_checkpoints}")
    ids = {h.id for h in heads}
    if len(ids) != len(heads):
        raise Invalid("a checkpoint id appears twice in kh")
    for h in heads:
        if not 1 <= h.id <= last:
            raise Invalid(f"checkpoint id {h.id} is not in 1..{last} (kh's last id)")
        if not 1 <= h.version <= limits.MAX_VERSION or not 0 <= h.at <= MAX_MS:
            raise Invalid(f"checkpoint {h.id}: its version or time is out of range")

    snapshots: dict[int, bytes] = {}
    labels: dict[int, bytes] = {}
    for name, value in fields.items():
        if name == layout.CHECKPOINT_HEADS:
            continue
        if name.startswith(layout.CHECKPOINT_PREFIX):
            into, digits = snapshots, name[len(layout.CHECKPOINT_PREFIX) :]
        else:
            into, digits = labels, name[len(layout.CHECKPOINT_LABEL_PREFIX) :]
        if not _CANONICAL.fullmatch(digits) or int(digits) not in ids:
            raise Invalid(f"checkpoint field {_shown(name)} without its head in kh")
        into[int(digits)] = value
    total = 0
    for h in heads:
        blob = snapshots.get(h.id)
        if blob is None:
            raise Invalid(f"checkpoint {h.id} has no snapshot")
        if h.bytes != len(blob):
            raise Invalid(
                f"checkpoint {h.id}: kh says {h.bytes} bytes, its snapshot is {len(blob)}"
            )
        total += len(blob)
    if total > settings.max_checkpoint_bytes:
        raise Invalid(
            f"checkpoints of {total} bytes, over max_checkpoint_bytes "
            f"{settings.max_checkpoint_bytes}"
        )
    for cid, label in labels.items():
        try:
            text = label.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"checkpoint {cid}: its label is not UTF-8") from None
        if len(text) > models.CHECKPOINT_LABEL_MAX:
            raise Invalid(
                f"checkpoint {cid}: its label is over {models.CHECKPOINT_LABEL_MAX} characters"
            )
    for h in heads:
        try:
            _check_snapshot(snapshots[h.id], ci_bytes, settings)
        except Invalid as why:
            raise Invalid(f"checkpoint {h.id}: {why}") from None


def _check_snapshot(blob: bytes, ci_bytes: int, settings: Settings) -> None:
    try:
        counters, pairs = layout.parse_snapshot(blob)
    except ValueError as exc:  # its messages say what, never hold data
        raise Invalid(str(exc)) from None
    if len({name for name, _ in pairs}) != len(pairs):
        raise Invalid("a field appears twice in its snapshot")
    content = _Content()
    for name, value in pairs:
        if name in layout.SNAPSHOT_FIELDS:
            content.parts[name] = value
        elif not _sort(content, name, value):
            raise Invalid(f"its snapshot holds an unknown field {_shown(name)}")
    # client_info is not in a snapshot: restoring one keeps the session's.
    _check_content(content, ci_bytes, settings)
    if any(n > MAX_MS for n in counters.values()):
        raise Invalid("a snapshot counter is out of range")
    c = counters
    if (c["sn"], c["rn"]) != (len(content.state), len(content.registry)):
        raise Invalid("its snapshot's counts do not match its fields")
    if content.history:
        in_range = (c["eo"], c["en"]) == (content.oldest, content.newest)
    else:
        in_range = c["eo"] == c["en"] + 1
    if not in_range:
        raise Invalid("its snapshot's history range does not match its entries")
    exact = {
        "sb": content.state_bytes,
        "ob": content.registry_bytes,
        "hb": content.history_bytes,
        "wb": len(content.parts.get(b"w", b"")),
        "ib": len(content.parts.get(b"i", b"")),
    }
    if any(c[name] < n for name, n in exact.items()):
        raise Invalid("its snapshot's counters make it look smaller than it is")


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
    # Each session's client keeps its plan's session limit (service/plans.py).
    table = plans.read_table(client)
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
            _restore_batch(client, batch, force, limits_, result, table)
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
    table: plans.PlanTable,
) -> None:
    # Through the Store: one pipeline per master on a Cluster, and scripts
    # (re)loaded on NOSCRIPT, so a Redis restart mid-restore is survived.
    calls = []
    for rec in batch:
        sid = rec.session_id
        template, content = rec.fields[0][1], rec.fields[1:]
        args: list[str | bytes | int] = ["", "", "", sid, keys.chash_of_session(sid), ""]
        # The template ends with the client id (layout.pack_template).
        owner = template.rsplit(b",", 1)[-1].decode("utf-8", "replace")
        plan = table.plan_for(owner)
        most = table.plans[plan].get("max_sessions_per_client") if plan else None
        most = int(most) if most is not None else limits_.max_sessions_per_client
        args += [rec.expires_ms, "1" if force else "0", most, template]
        for name, value in content:
            args += [name, value]
        calls.append(Call(scripts.RESTORE_BACKUP, keys.session_keys(sid), args))
    try:
        replies = Store(client).run(calls)
    except StorageUnavailable:
        raise redis.ConnectionError("Redis became unavailable during the restore") from None
    for rec, reply in zip(batch, replies, strict=True):
        if isinstance(reply, StorageUnavailable):
            raise redis.ConnectionError("Redis refused a restore write (try again)")
        if isinstance(reply, Exception):
            raise reply
        status = reply[0]
        if status == b"OK":
            result.restored += 1
            result.checkpoints += rec.checkpoints
        elif status == b"EXPIRED":
            result.expired += 1
        elif status == b"NEWER":
            result.newer += 1
        elif status == b"LIMIT":
            result.over_limit += 1
        else:
            raise RuntimeError(f"unexpected restore reply {reply!r}")
