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
    kh         the checkpoints' heads, see below (absent: none ever taken)
    k:<id>     a checkpoint's snapshot
    kl:<id>    a checkpoint's label (absent: none)

`m` is the numbers of META, then the client id, as consecutive MessagePack
values (packed and read in C by Redis' cmsgpack, unpack_meta here; an
earlier build wrote them as text, comma-separated, which is still read):

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

Checkpoints live in the session hash, so they expire, go and are backed up
with it, and a script reaches them through KEYS[1]. `kh` is
`n;id,v,at,bytes,auto;...`: n the last id given (ids are never reused while
the session lives), then one head per checkpoint, newest first: its id, the
version it captured, when it was taken (ms), its snapshot's bytes, 1 when
automatic. A snapshot (`k:<id>`) is three MessagePack arrays, written and
read in C by Redis' cmsgpack (building one long string in Lua costs five
times as much): the counters `sn,sb,sd,rn,ob,en,eo,hb,wb,ib`, then the names
of every content field of state and context (s:*, w, wv, i, ih, so, o:*,
e:*), then their values (pack_snapshot, parse_snapshot). Checkpoints do not
count toward max_state_bytes; they have caps of their own (max_checkpoints,
max_checkpoint_bytes, counted in snapshot bytes).

A client index hash (keys.client_index_key) holds, per session, the entry
`xe|ke-xe|ca|lm-ca|to|v|a` (what list_client_sessions answers, short enough
that a small index stays a listpack) under the session id's random part
(index_field: every session of the index shares the client hash that the id
starts with, so it is left out; a session the previous release wrote keeps
its full id there until its next write), and fields that start with `!`,
which no session id does:

    !r          the client's rate-limit buckets: 'g,gt,c,ct'
    !x          when the index key expires (ms)
    !c          the client's score in its bucket's clients zset (ms)
    !q<digest>  replay record of a create_session or close_session (the
                digest binary, keys.replay_id)

The previous release stored the metadata as separate fields (LEGACY_META):
scripts read such a session as it is and rewrite it in this layout at its
next write (scripts.py, legacy_meta).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from service.keys import CLIENT_HASH_LEN

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
# What a checkpoint holds: the content above but client_info.
SNAPSHOT_FIELDS = frozenset(b"w wv i ih so".split())
CHECKPOINT_HEADS = b"kh"
CHECKPOINT_PREFIX = b"k:"
CHECKPOINT_LABEL_PREFIX = b"kl:"
SNAPSHOT_COUNTERS = ("sn", "sb", "sd", "rn", "ob", "en", "eo", "hb", "wb", "ib")


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
    """`m` as the scripts pack it (MessagePack: the numbers of META, then
    the client id) or as an earlier build wrote it (text, `n,n,...,client`,
    which starts with a digit). ValueError when it is neither."""
    if isinstance(packed, str):
        packed = packed.encode("utf-8")
    if packed[:1].isdigit():
        parts = packed.split(b",", len(META))
        numbers = [int(x) for x in parts[: len(META)]]
        return Meta(*numbers, c=parts[len(META)].decode("utf-8"))  # type: ignore[arg-type, misc]
    reader = _Reader(packed)
    numbers = [reader.number() for _ in META]
    client = reader.string().decode("utf-8")
    if reader.pos != len(packed):
        raise ValueError("the metadata has bytes after the client id")
    return Meta(*numbers, c=client)  # type: ignore[arg-type, misc]


def pack_meta(meta: Meta) -> bytes:
    """`m` as the scripts write it with cmsgpack (for tests and tools)."""
    numbers = [getattr(meta, name) for name in META]
    return b"".join([*map(_mp_uint, numbers), _mp_str(meta.c.encode("utf-8"))])


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


def index_field(session_id: str) -> bytes:
    """A session's field in its client index: its id after the client
    hash and the dot."""
    return session_id[CLIENT_HASH_LEN + 1:].encode("ascii")


def session_of_field(field: bytes | str, chash: str) -> str:
    """The session id of a client index field (is_session_entry): this
    release's short field, or the full id under which the previous release
    kept it."""
    text = field.decode("ascii") if isinstance(field, bytes) else field
    return text if "." in text else f"{chash}.{text}"


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


@dataclass(frozen=True, slots=True)
class CheckpointHead:
    """One checkpoint as `kh` lists it."""

    id: int
    version: int
    at: int  # ms
    bytes: int  # of its snapshot
    automatic: bool


def parse_heads(packed: bytes | None) -> tuple[int, list[CheckpointHead]]:
    """`kh`: the last id given and the heads, newest first ((0, []) when absent).
    ValueError when it is not of that form."""
    if not packed:
        return 0, []
    first, *rest = packed.split(b";")
    heads = []
    for part in rest:
        cid, v, at, size, auto = (int(x) for x in part.split(b","))
        if auto not in (0, 1):
            raise ValueError("automatic is 0 or 1")
        heads.append(CheckpointHead(cid, v, at, size, bool(auto)))
    return int(first), heads


def pack_heads(last_id: int, heads: list[CheckpointHead]) -> bytes:
    parts = [b"%d" % last_id]
    parts += [b"%d,%d,%d,%d,%d" % (h.id, h.version, h.at, h.bytes, h.automatic) for h in heads]
    return b";".join(parts)


def _mp_str(value: bytes) -> bytes:
    n = len(value)
    if n < 32:
        return bytes([0xA0 | n]) + value
    if n <= 0xFF:
        return b"\xd9" + struct.pack(">B", n) + value
    if n <= 0xFFFF:
        return b"\xda" + struct.pack(">H", n) + value
    return b"\xdb" + struct.pack(">I", n) + value


def _mp_array(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n <= 0xFFFF:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def _mp_uint(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    for code, fmt, top in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 0xFFFFFFFF)):
        if n <= top:
            return bytes([code]) + struct.pack(fmt, n)
    return b"\xcf" + struct.pack(">Q", n)


def pack_snapshot(counters: dict[str, int], fields: list[tuple[bytes, bytes]]) -> bytes:
    """A checkpoint's snapshot as the scripts write it with Redis' cmsgpack:
    three MessagePack arrays, the counters (SNAPSHOT_COUNTERS), the field
    names and their values (for tests and tools)."""
    out = [_mp_array(len(SNAPSHOT_COUNTERS))]
    out += [_mp_uint(counters[name]) for name in SNAPSHOT_COUNTERS]
    for column in ([n for n, _ in fields], [v for _, v in fields]):
        out.append(_mp_array(len(column)))
        out += [_mp_str(x) for x in column]
    return b"".join(out)


class _Reader:
    """Just the MessagePack a snapshot or `m` holds: arrays, integers and
    strings (str or bin); anything else is malformed."""

    _WIDTH: ClassVar[dict[int, int]] = {0: 1, 1: 2, 2: 4, 3: 8}

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("a snapshot is cut")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _size(self, width: int) -> int:
        return int.from_bytes(self._take(width), "big")

    def array(self) -> int:
        code = self._take(1)[0]
        if 0x90 <= code <= 0x9F:
            return code & 0x0F
        if code in (0xDC, 0xDD):
            return self._size(2 if code == 0xDC else 4)
        raise ValueError("a snapshot part is not an array")

    def uint(self) -> int:
        code = self._take(1)[0]
        if code < 0x80:
            return code
        if 0xCC <= code <= 0xCF:
            return self._size(self._WIDTH[code - 0xCC])
        raise ValueError("a snapshot counter is not a whole number")

    def number(self) -> int:
        """A whole number as cmsgpack packs a Lua number: unsigned, signed,
        or (were a script ever to compute a fraction) a double, truncated as
        the text form's '%d' did."""
        code = self.data[self.pos] if self.pos < len(self.data) else -1
        if code >= 0xE0:  # a negative fixint
            self.pos += 1
            return code - 0x100
        if 0xD0 <= code <= 0xD3:
            self.pos += 1
            width = self._WIDTH[code - 0xD0]
            return int.from_bytes(self._take(width), "big", signed=True)
        if code == 0xCB:
            self.pos += 1
            value = struct.unpack(">d", self._take(8))[0]
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("a number is not finite")
            return int(value)
        return self.uint()

    def string(self) -> bytes:
        code = self._take(1)[0]
        if 0xA0 <= code <= 0xBF:
            return self._take(code & 0x1F)
        if 0xD9 <= code <= 0xDB:
            return self._take(self._size(self._WIDTH[code - 0xD9]))
        if 0xC4 <= code <= 0xC6:
            return self._take(self._size(self._WIDTH[code - 0xC4]))
        raise ValueError("a snapshot name or value is not a string")


def parse_snapshot(blob: bytes) -> tuple[dict[str, int], list[tuple[bytes, bytes]]]:
    """The counters and the fields of a snapshot; ValueError when malformed."""
    reader = _Reader(blob)
    if reader.array() != len(SNAPSHOT_COUNTERS):
        raise ValueError("a snapshot starts with its counters")
    counters = {name: reader.uint() for name in SNAPSHOT_COUNTERS}
    names = [reader.string() for _ in range(reader.array())]
    values = [reader.string() for _ in range(reader.array())]
    if reader.pos != len(blob) or len(names) != len(values):
        raise ValueError("a snapshot has names and values that do not pair")
    for name in names:
        if name not in SNAPSHOT_FIELDS and name[:2] not in CONTENT_PREFIXES:
            raise ValueError("a snapshot holds a field that is not state or context")
    return counters, list(zip(names, values, strict=True))


def is_checkpoint_field(name: bytes) -> bool:
    return (
        name == CHECKPOINT_HEADS
        or name.startswith(CHECKPOINT_PREFIX)
        or name.startswith(CHECKPOINT_LABEL_PREFIX)
    )
