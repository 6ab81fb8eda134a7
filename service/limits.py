"""How a session's size is counted against `max_state_bytes`, and the other
fixed bounds on stored data. The Lua scripts (service/scripts.py) apply the
same rule; restore (service/restore.py) recomputes it from a backup line.

A session costs

    state bytes + context bytes + client_info bytes + ENTRY_OVERHEAD x entries

where state bytes are each top-level key's name (its key_weight) and JSON
value, context bytes are the workspace and inspector JSON, each registry
entry's id (its key_weight) and JSON and each history entry's JSON, and
entries are the state keys, registry entries
and history entries together. The overhead stands for what Redis spends on a
hash field beyond its bytes, so that many tiny keys cost what they really
take (235,000 three-character keys are not 940 KB).

Keys are weighed as a reply writes them, escapes included, so that a reply
holding a whole session is never larger than the cap plus its fixed fields
(Settings.max_reply_bytes), whatever characters the keys hold.

A write is refused when the session would cost more than the cap and more
than it costs now: a write that shrinks an over-cap session (after the cap
was lowered) is always allowed.
"""

from __future__ import annotations

ENTRY_OVERHEAD = 64

# A restored session's version above this is refused: a session written a
# thousand times a second for thirty years stays below it.
MAX_VERSION = 2**40


def session_cost(
    state_bytes: int, context_bytes: int, client_info_bytes: int, entries: int
) -> int:
    return state_bytes + context_bytes + client_info_bytes + ENTRY_OVERHEAD * entries


def key_weight(key: bytes) -> int:
    """A key's bytes as JSON writes it in a reply, at most: a control
    character takes up to 6 bytes (\\u0001), a quote or backslash 2. The
    scripts' klen() counts the same."""
    control = sum(1 for b in key if b < 0x20)
    escaped = key.count(b'"') + key.count(b"\\")
    return len(key) + 5 * control + escaped
