"""The session hash's and the client index's field vocabulary, in one place.

The Lua scripts (service/scripts.py) and the Python that reads what they
store (the replies, backups, housekeeping) share these names and formats.

A session hash (keys.session_key) holds:

    m          the metadata, packed (META, then the client id), see below
    q          replay records of the session's mutating requests, packed
    ci         client_info JSON
    s:<key>    a state entry (JSON)
    w, wv      workspace_context JSON and its variable count
    i, ih, so  inspector_state JSON, its history length, its selected object
    o:<id>     a registry entry (JSON)
    e:<n>      an evaluation history entry (JSON), n from eo to en

`m` is the numbers of META, comma-separated, then the client id (which the
protocol's pattern keeps free of commas):

    xe  the exact expiry (ms): last activity + timeout. A session whose xe
        has passed is gone, whatever its key's TTL says.
    ke  when the key itself expires (ms): xe plus up to EXPIRY_SLACK_MS (and
        at most a twentieth of the timeout). The
        key's TTL moves only when xe passes ke, so a session touched within
        ten seconds of the last move spares its PEXPIREAT. The index scores
        are always exact: statistics count by them.
    v, lm, ca, to, a   version, last modified, created (ms), timeout (s), active
    sn, sb   state key count (exact) and bytes (keys counted as a reply
             writes them; an upper bound, see sd)
    sd       bytes a merge added to sb without subtracting what it replaced,
             since sb was last counted exactly (0: sb is exact)
    cb       client_info bytes
    rn, ob   registry entry count and bytes
    en, eo   newest and oldest history entry number (eo = en + 1: empty)
    hb       history bytes
    wb, ib   workspace_context and inspector_state bytes

A client index hash (keys.client_index_key) holds, per session id, the entry
`xe|ke-xe|ca|lm-ca|to|v|a` (what list_client_sessions answers, short enough
that a small index stays a listpack), and fields that start with `!`, which
no session id does:

    !r          the client's rate-limit buckets: 'g,gt,c,ct'
    !x          when the index key expires (ms)
    !c          the client's score in its bucket's clients zset (ms)
    !q<digest>  replay record of a create_session or close_session

The previous release stored the metadata as separate fields (LEGACY_META):
scripts read such a session as it is and rewrite it in this layout at its
next write (scripts.py, legacy_meta).
"""

from __future__ import annotations

from dataclasses import dataclass

META = ("xe", "ke", "v", "lm", "ca", "to", "a", "sn", "sb", "sd", "cb", "rn", "ob", "en", "eo",
        "hb", "wb", "ib")
META_FIELD = b"m"
REPLAY_FIELD = b"q"
INDEX_PRIVATE = b"!"  # the first byte of every index field that is not a session id
EXPIRY_SLACK_MS = 10_000  # how far a key may outlive its session's exact expiry
REPLAY_MAX = 4  # replay records kept per session (and their window): each costs Lua time per write
INDEX_HEADROOM_MS = 600_000  # how far past its last session a client index may live

# Fields of the previous release's layout, gone at a session's first write.
LEGACY_META = ("c", "ca", "lm", "to", "v", "a", "sb", "xb", "rn", "en", "eo", "cn")
# Fields that are the session's content, in both layouts.
CONTENT = frozenset(b"ci w wv i ih so".split())
CONTENT_PREFIXES = (b"s:", b"o:", b"e:")


@dataclass(frozen=True, slots=True)
class Meta:
    """A session's metadata, as `m` packs it."""

    xe: int
    ke: int
    v: int
    lm: int
    ca: int
    to: int
    a: int
    sn: int
    sb: int
    sd: int
    cb: int
    rn: int
    ob: int
    en: int
    eo: int
    hb: int
    wb: int
    ib: int
    c: str

    @property
    def context_bytes(self) -> int:
        return self.wb + self.ib + self.ob + self.hb


def unpack_meta(packed: bytes | str) -> Meta:
    if isinstance(packed, str):
        packed = packed.encode("utf-8")
    parts = packed.split(b",", len(META))
    numbers = [int(x) for x in parts[: len(META)]]
    return Meta(*numbers, c=parts[len(META)].decode("utf-8"))  # type: ignore[arg-type, misc]


def pack_template(
    *, v: int, lm: int, ca: int, to: int, a: int, sn: int, sb: int, cb: int, rn: int, ob: int,
    en: int, eo: int, hb: int, wb: int, ib: int, c: str,
) -> bytes:
    """`m` without its first two numbers (xe, ke), which only the Redis clock
    can give: what a restore sends to scripts.RESTORE_BACKUP."""
    numbers = (v, lm, ca, to, a, sn, sb, 0, cb, rn, ob, en, eo, hb, wb, ib)
    return ",".join([*map(str, numbers), c]).encode("utf-8")


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """A client index entry: what list_client_sessions answers for a session."""

    expires: int  # exact (xe)
    created: int
    modified: int
    timeout: int
    version: int
    active: int


def parse_entry(packed: bytes) -> IndexEntry:
    """This release's entry (7 parts) or the previous release's
    (`exp|ca|lm|to|v|a`)."""
    p = [int(x) for x in packed.split(b"|")]
    if len(p) == 7:
        xe, _slack, ca, since, to, v, a = p
        return IndexEntry(xe, ca, ca + since, to, v, a)
    exp, ca, lm, to, v, a = p
    return IndexEntry(exp, ca, lm, to, v, a)


def is_session_entry(field: bytes | str) -> bool:
    raw = field.encode("utf-8") if isinstance(field, str) else field
    return not raw.startswith(INDEX_PRIVATE)


def to_logical(fields: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """A session hash as a backup file holds it, whatever its layout: the
    content fields and c, ca, lm, to, v, a (the file format of
    service/backup_format.py, which both layouts restore from); replay
    records and counters are left out (restore recounts). Also returns the
    exact expiry (xe) when the hash has one."""
    out: list[tuple[bytes, bytes]] = []
    xe: int | None = None
    for name, value in fields:
        if name == META_FIELD:
            try:
                meta = unpack_meta(value)
            except (ValueError, TypeError, IndexError, UnicodeDecodeError):
                out.append((name, value))  # malformed: the backup's checks report it
                continue
            xe = meta.xe
            out += [(b"c", meta.c.encode("utf-8")), (b"ca", b"%d" % meta.ca),
                    (b"lm", b"%d" % meta.lm), (b"to", b"%d" % meta.to), (b"v", b"%d" % meta.v),
                    (b"a", b"%d" % meta.a)]
        elif name == REPLAY_FIELD:
            continue
        else:
            out.append((name, value))
    return out, xe
