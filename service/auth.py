"""CURVE client keys: which public key belongs to which client id.

Kept in Redis (one hash: public key in Z85 -> client id) so that every front
worker sees a new or removed key within `policy_refresh` seconds. Only
public keys are stored; a client's secret key never leaves the client.
"""

from __future__ import annotations

import logging
import re

from service import keys
from service.models import CLIENT_ID_PATTERN
from service.store import REDIS_FAILURES, RedisClient

log = logging.getLogger(__name__)

Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


def check_public_key(key: str) -> str:
    if not Z85_KEY.fullmatch(key):
        raise ValueError("a CURVE public key is 40 characters of Z85")
    return key


def add_client_key(client: RedisClient, client_id: str, public_key: str) -> None:
    if not _CLIENT_ID.fullmatch(client_id):
        raise ValueError(f"{client_id!r} does not match the client id pattern")
    client.hset(keys.curve_clients_key(), check_public_key(public_key), client_id)


def remove_client_key(client: RedisClient, client_id_or_key: str) -> int:
    """Remove one public key, or every key of a client id; how many went."""
    registry = keys.curve_clients_key()
    mapping = read_client_keys(client)
    doomed = [k for k, cid in mapping.items() if client_id_or_key in (k, cid)]
    if doomed:
        client.hdel(registry, *doomed)
    return len(doomed)


def read_client_keys(client: RedisClient) -> dict[str, str]:
    raw = client.hgetall(keys.curve_clients_key())
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class ClientKeyCache:
    """Public key -> client id as last read from Redis; refreshed by the
    runtime off the request path. Unknown or removed keys map to None."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.keys: dict[str, str] = {}
        # The client ids that have a key, and their hashes (the prefix of
        # their session ids): what a plain front refuses to serve.
        self.clients: frozenset[str] = frozenset()
        self.hashes: frozenset[str] = frozenset()
        self.failing = False  # log the change of state, not every failed read

    def client_for(self, public_key: str | None) -> str | None:
        return self.keys.get(public_key) if public_key else None

    def registered(self, client_id: str | None, session_owner_hash: str | None) -> bool:
        """True when the client, or the owner of the session, has a key."""
        return (client_id is not None and client_id in self.clients) or (
            session_owner_hash is not None and session_owner_hash in self.hashes
        )

    def refresh(self) -> None:
        try:
            found = read_client_keys(self.client)
            ids = frozenset(found.values())
            hashes = frozenset(keys.client_hash(c) for c in ids)
            self.keys, self.clients, self.hashes = found, ids, hashes
        except REDIS_FAILURES as exc:
            if not self.failing:
                log.warning("client keys not refreshed (keeping the last): %s", type(exc).__name__)
            self.failing = True
        else:
            if self.failing:
                log.info("client keys refreshed again")
            self.failing = False
