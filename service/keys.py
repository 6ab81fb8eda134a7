"""The only place Redis key names are made.

Every client hashes to one of NUM_BUCKETS buckets, and the bucket is the hash
tag of all that client's keys and of the bucket's own indexes, so one script
call always touches one hash slot (Redis Cluster ready) and the per-client
limit stays atomic. A session id starts with its client's hash, so every key a
session command needs is known from the session id alone.

Layout (b = two-digit bucket, h = 16-hex client hash):

    stui:{b<b>}:s:<session_id>   hash    one session: metadata, state, context
    stui:{b<b>}:c:<h>            hash    a client's sessions: the id's random part ->
                                         packed entry (layout.index_field);
                                         its rate-limit buckets; replay records
                                         of create and close (service/layout.py)
    stui:{b<b>}:exp              zset    the bucket's sessions (the id's random part,
                                         layout.index_field), scored by expiry (ms)
    stui:{b<b>}:clients          zset    the bucket's clients, scored by latest expiry

The previous release also kept stui:{b<b>}:r:<digest> (replay records) and
stui:{b<b>}:rl:<h> (rate-limit buckets); this one never reads them, and
they expire on their own.
    stui:{policy}:<list>         set     client policy: allow, allow-prefix, deny, deny-prefix
    stui:{auth}:curve            hash    CURVE public key (Z85) -> client id
    stui:{plans}:defs|exact|prefix|version   plans, their assignments, a change counter
"""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "stui"
NUM_BUCKETS = 64
CLIENT_HASH_LEN = 16

SESSION_ID_RE = re.compile(r"[0-9a-f]{16}\.[A-Za-z0-9_-]{22}")


def client_hash(client_id: str) -> str:
    return hashlib.sha256(client_id.encode("utf-8")).hexdigest()[:CLIENT_HASH_LEN]


def bucket_of(chash: str) -> int:
    return int(chash, 16) % NUM_BUCKETS


# Every bucket's hash tag, made once: key names are built on every request.
_TAGS = tuple(f"{PREFIX}:{{b{bucket:02d}}}" for bucket in range(NUM_BUCKETS))


def _tag(bucket: int) -> str:
    return _TAGS[bucket]


def new_session_id(chash: str) -> str:
    """128 random bits, URL and file-name safe, prefixed by the client hash."""
    return f"{chash}.{secrets.token_urlsafe(16)}"


def is_session_id(value: str) -> bool:
    return SESSION_ID_RE.fullmatch(value) is not None


def chash_of_session(session_id: str) -> str:
    return session_id[:CLIENT_HASH_LEN]


def session_key(session_id: str) -> str:
    return f"{_tag(bucket_of(chash_of_session(session_id)))}:s:{session_id}"


def client_index_key(chash: str) -> str:
    return f"{_tag(bucket_of(chash))}:c:{chash}"


def legacy_rate_key(chash: str) -> str:
    """The previous release's rate-limit buckets of a client: only erasure
    (service/clients.py) still names it."""
    return f"{_tag(bucket_of(chash))}:rl:{chash}"


def client_sessions_scan_pattern(chash: str) -> str:
    """SCAN MATCH pattern of every session hash of one client (a session id
    starts with its client's hash)."""
    return f"{_tag(bucket_of(chash))}:s:{chash}.*"


def bucket_expiry_key(bucket: int) -> str:
    return f"{_tag(bucket)}:exp"


def bucket_clients_key(bucket: int) -> str:
    return f"{_tag(bucket)}:clients"


def policy_key(list_name: str) -> str:
    """list_name: allow, allow-prefix, deny or deny-prefix (one hash slot for all)."""
    return f"{PREFIX}:{{policy}}:{list_name}"


# Plans (service/plans.py): one hash slot, so that a change and its version
# bump are one transaction.
def plan_defs_key() -> str:
    """hash: plan name -> JSON of the limits it sets."""
    return f"{PREFIX}:{{plans}}:defs"


def plan_exact_key() -> str:
    """hash: client id -> plan name."""
    return f"{PREFIX}:{{plans}}:exact"


def plan_prefix_key() -> str:
    """hash: client id prefix -> plan name."""
    return f"{PREFIX}:{{plans}}:prefix"


def plan_version_key() -> str:
    """string: INCR'd at every change of the three above; fronts re-read on a move."""
    return f"{PREFIX}:{{plans}}:version"


def curve_clients_key() -> str:
    return f"{PREFIX}:{{auth}}:curve"


REPLAY_ID_BYTES = 16  # an 8-byte digest, then an 8-byte fingerprint


def replay_id(scope: str, parameters: bytes) -> bytes:
    """ARGV[2] of a script that keeps a replay record: the 8-byte digest,
    then the 8-byte fingerprint, binary (half the bytes of hex in every
    record the client index and the session hash keep). The digest names
    the request (`scope`: command, target, request id, requester), so no
    client-chosen text reaches Redis; the fingerprint is of the canonical
    parameters."""
    digest = hashlib.blake2b(scope.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return digest + hashlib.blake2b(parameters, digest_size=8).digest()


def session_keys(session_id: str) -> list[str]:
    """KEYS[1..4] of every session-scoped script, with one bucket computation."""
    chash = chash_of_session(session_id)
    tag = _TAGS[int(chash, 16) % NUM_BUCKETS]
    return [f"{tag}:s:{session_id}", f"{tag}:c:{chash}", f"{tag}:exp", f"{tag}:clients"]


# The scheduler's keys share one hash tag, so a fenced write of its records is
# one slot (a transaction that WATCHes the lock works on Redis Cluster too).
def leader_lock_key() -> str:
    """string: '<owner>|<fencing token>' of the scheduler leader, with a TTL."""
    return f"{PREFIX}:{{scheduler}}:leader"


def fencing_counter_key() -> str:
    """string: INCR'd at each lock acquisition; the value is the fencing token."""
    return f"{PREFIX}:{{scheduler}}:fence"


def last_backup_key() -> str:
    """hash: the last successful backup (at, duration, size, file, token)."""
    return f"{PREFIX}:{{scheduler}}:last_backup"


def session_scan_pattern() -> str:
    """SCAN MATCH pattern of every session hash (and nothing else)."""
    return f"{PREFIX}:{{b[0-9][0-9]}}:s:*"


def client_index_scan_pattern() -> str:
    """SCAN MATCH pattern of every client index hash."""
    return f"{PREFIX}:{{b[0-9][0-9]}}:c:*"
