"""Client policy: allow and deny lists of client ids, exact or by prefix.

Deny wins over allow. An empty allow list allows everyone not denied; a
non-empty one allows only the clients it lists.

A request that names no client id (for example `get_session_info` with only
a session id) is judged by the session's owner: the session id starts with
the owner's client hash, which matches exact ids through their hashes.
Prefix rules cannot be matched against a hash, so while any prefix rule is
in force such a request must name its client id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from service import keys
from service.models import CLIENT_ID_PATTERN
from service.store import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    allow: frozenset[str] = frozenset()
    allow_prefixes: tuple[str, ...] = ()
    deny: frozenset[str] = frozenset()
    deny_prefixes: tuple[str, ...] = ()
    allow_hashes: frozenset[str] = field(init=False)
    deny_hashes: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow_hashes", frozenset(map(keys.client_hash, self.allow)))
        object.__setattr__(self, "deny_hashes", frozenset(map(keys.client_hash, self.deny)))

    @classmethod
    def from_members(
        cls,
        allow: Iterable[str] = (),
        allow_prefixes: Iterable[str] = (),
        deny: Iterable[str] = (),
        deny_prefixes: Iterable[str] = (),
    ) -> Policy:
        return cls(
            frozenset(allow),
            tuple(sorted(allow_prefixes)),
            frozenset(deny),
            tuple(sorted(deny_prefixes)),
        )

    @property
    def empty(self) -> bool:
        return not (self.allow or self.allow_prefixes or self.deny or self.deny_prefixes)

    @property
    def restricts_listing(self) -> bool:
        return bool(self.allow or self.allow_prefixes)

    def allows(self, client_id: str | None, owner_hash: str | None = None) -> bool:
        """client_id: the id the request names (or that authenticated);
        owner_hash: the client hash in the session id, when it names none."""
        if self.empty:
            return True
        if client_id is not None:
            if client_id in self.deny or client_id.startswith(self.deny_prefixes):
                return False
            if not self.restricts_listing:
                return True
            return client_id in self.allow or client_id.startswith(self.allow_prefixes)
        if owner_hash is None:
            # Nothing names a client (ping, describe, statistics): only an
            # allow list keeps such requests out.
            return not self.restricts_listing
        if self.allow_prefixes or self.deny_prefixes:
            return False
        if owner_hash in self.deny_hashes:
            return False
        return not self.restricts_listing or owner_hash in self.allow_hashes


POLICY_LISTS = ("allow", "allow-prefix", "deny", "deny-prefix")


def read_policy(client: RedisClient) -> Policy:
    pipe = client.pipeline(transaction=False)
    for name in POLICY_LISTS:
        pipe.smembers(keys.policy_key(name))
    allow, allow_prefixes, deny, deny_prefixes = (
        {m.decode("utf-8") for m in members} for members in pipe.execute()
    )
    return Policy.from_members(allow, allow_prefixes, deny, deny_prefixes)


class PolicyCache:
    """The policy as last read from Redis. The runtime calls refresh() on a
    timer (workers/refresher.py), off the request path, so that a Redis that
    hangs never delays a request here; if Redis does not answer, the last
    policy stays in force (requests that need Redis fail anyway)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.policy = Policy()
        self.failing = False  # log the change of state, not every failed read

    def current(self) -> Policy:
        return self.policy

    def refresh(self) -> None:
        try:
            self.policy = read_policy(self.client)
        except REDIS_FAILURES as exc:
            if not self.failing:
                log.warning("policy not refreshed (keeping the last one): %s", type(exc).__name__)
            self.failing = True
        else:
            if self.failing:
                log.info("policy refreshed again")
            self.failing = False


_RULE = re.compile(CLIENT_ID_PATTERN)


def _list_name(kind: str, prefix: bool) -> str:
    return f"{kind}-prefix" if prefix else kind


def add_rule(client: RedisClient, kind: str, value: str, prefix: bool = False) -> None:
    """kind: allow or deny. Values follow the client id pattern."""
    if kind not in ("allow", "deny"):
        raise ValueError("kind is allow or deny")
    if not _RULE.fullmatch(value):
        raise ValueError(f"{value!r} does not match the client id pattern {CLIENT_ID_PATTERN}")
    client.sadd(keys.policy_key(_list_name(kind, prefix)), value)


def remove_rule(client: RedisClient, value: str, prefix: bool = False) -> int:
    """Remove value from both lists; the number of lists it was in."""
    pipe = client.pipeline(transaction=False)
    for kind in ("allow", "deny"):
        pipe.srem(keys.policy_key(_list_name(kind, prefix)), value)
    return sum(int(n) for n in pipe.execute())


def add_deny(client: RedisClient, client_id: str) -> bool:
    """An exact deny rule for client_id; False when it was already there."""
    return bool(client.sadd(keys.policy_key(_list_name("deny", False)), client_id))


def remove_deny(client: RedisClient, client_id: str) -> None:
    """Only the exact deny rule: an allow rule for the same id stays."""
    client.srem(keys.policy_key(_list_name("deny", False)), client_id)


def describe_policy(policy: Policy) -> dict[str, list[str]]:
    return {
        "allow": sorted(policy.allow),
        "allow-prefix": list(policy.allow_prefixes),
        "deny": sorted(policy.deny),
        "deny-prefix": list(policy.deny_prefixes),
    }
