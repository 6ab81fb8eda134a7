"""Housekeeping: prune what the TTLs left behind in the indexes, and the global figures.

Counting never depends on it (statistics count members scored after now, and
the scripts prune as they go); it bounds index memory and repairs entries whose
session hash is gone although their expiry is not (an eviction, or a key
deleted by hand), which the figures would otherwise count until that expiry.

Every write is conditional on what it removes: expired members by score at
Redis' own time, client index entries inside a WATCH on that index (a script
touching the client makes the transaction fail, and the next run tries again).
So a stale leader could at worst remove what was already dead; `guard` stops
it before each write all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from service import keys, layout
from service.backup import BATCH, redis_now_ms

Guard = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Figures:
    sessions: int  # live sessions, inactive ones included
    clients: int  # clients with at least one live session


@dataclass(slots=True)
class Pruned:
    expiry_members: int = 0  # expired members of the bucket zsets
    index_entries: int = 0  # expired entries of client index hashes
    orphans: int = 0  # live-looking entries whose session hash is gone


def global_figures(client: redis.Redis | redis.RedisCluster) -> Figures:
    """The numbers get_session_statistics reports, from the same 64 buckets."""
    bound = f"({redis_now_ms(_any_node(client))}"
    pipe = client.pipeline(transaction=False)
    for b in range(keys.NUM_BUCKETS):
        pipe.zcount(keys.bucket_expiry_key(b), bound, "+inf")
        pipe.zcount(keys.bucket_clients_key(b), bound, "+inf")
    counts = [int(n) for n in pipe.execute()]
    return Figures(sum(counts[0::2]), sum(counts[1::2]))


def _any_node(client: redis.Redis | redis.RedisCluster) -> redis.Redis:
    if isinstance(client, redis.RedisCluster):
        return client.get_redis_connection(client.get_random_node())  # type: ignore[no-untyped-call]
    return client


def housekeep(
    client: redis.Redis | redis.RedisCluster,
    nodes: Sequence[redis.Redis],
    guard: Guard | None = None,
) -> Pruned:
    """One pass over every bucket (through `client`) and every client index
    (SCAN on each master in `nodes`)."""
    pruned = Pruned()
    now = redis_now_ms(nodes[0])
    if guard:
        guard()
    pipe = client.pipeline(transaction=False)
    for b in range(keys.NUM_BUCKETS):
        pipe.zremrangebyscore(keys.bucket_expiry_key(b), "-inf", now)
        pipe.zremrangebyscore(keys.bucket_clients_key(b), "-inf", now)
    pruned.expiry_members = sum(int(n) for n in pipe.execute())
    for node in nodes:
        batch: list[bytes] = []
        for key in node.scan_iter(match=keys.client_index_scan_pattern(), count=BATCH):
            batch.append(key)
            if len(batch) >= BATCH:
                _prune_indexes(node, batch, pruned, guard)
                batch = []
        if batch:
            _prune_indexes(node, batch, pruned, guard)
    return pruned


def _chash_of_index(index_key: bytes) -> str:
    return index_key.decode().rsplit(":", 1)[1]


def _split(
    entries: dict[bytes, bytes], now: int, chash: str
) -> tuple[list[bytes], dict[bytes, tuple[str, int]]]:
    """(dead entries' fields, {live entry's field: (session id, expiry)})."""
    dead, live = [], {}
    for f, packed in entries.items():
        if not layout.is_session_entry(f):
            continue  # the index's own fields (rate buckets, replay records)
        exp = int(packed.split(b"|", 1)[0])
        if exp <= now:
            dead.append(f)
        else:
            live[f] = (layout.session_of_field(f, chash), exp)
    return dead, live


def _gone(node: redis.Redis, sids: Sequence[str]) -> set[str]:
    pipe = node.pipeline(transaction=False)
    for sid in sids:
        pipe.exists(keys.session_key(sid))
    return {sid for sid, n in zip(sids, pipe.execute(), strict=True) if not n}


def _prune_indexes(
    node: redis.Redis, batch: list[bytes], pruned: Pruned, guard: Guard | None
) -> None:
    """A pipelined look at the whole batch first; a transaction only for the
    few indexes that need a change."""
    pipe = node.pipeline(transaction=False)
    for key in batch:
        pipe.hgetall(key)
    now = redis_now_ms(node)
    suspects: list[bytes] = []
    live_all: list[str] = []
    owners: list[bytes] = []
    for key, entries in zip(batch, pipe.execute(), strict=True):
        dead, live = _split(entries, now, _chash_of_index(key))
        if dead:
            suspects.append(key)
        live_all += [sid for sid, _ in live.values()]
        owners += [key] * len(live)
    gone = _gone(node, live_all)
    suspects += [k for k, sid in zip(owners, live_all, strict=True) if sid in gone]
    for key in dict.fromkeys(suspects):
        if guard:
            guard()
        _repair(node, key, pruned)


def _repair(node: redis.Redis, index_key: bytes, pruned: Pruned) -> None:
    chash = _chash_of_index(index_key)
    bucket = keys.bucket_of(chash)
    exp_key, clients_key = keys.bucket_expiry_key(bucket), keys.bucket_clients_key(bucket)
    with node.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(index_key)  # type: ignore[no-untyped-call]
            now = redis_now_ms(node)
            entries: dict[bytes, bytes] = pipe.hgetall(index_key)  # type: ignore[assignment]
            dead, live = _split(entries, now, chash)
            orphans = _gone(node, [sid for sid, _ in live.values()])
            orphan_fields = [f for f, (sid, _) in live.items() if sid in orphans]
            for f in orphan_fields:
                del live[f]
            pipe.multi()
            if dead or orphan_fields:
                pipe.hdel(index_key, *dead, *orphan_fields)
            if orphans:  # expiry members: the short name, or the previous release's full id
                pipe.zrem(exp_key, *orphans, *(layout.index_field(sid) for sid in orphans))
            # The client's score, with the key's slack, as the scripts keep it.
            latest = max((exp for _, exp in live.values()), default=0)
            if live:
                pipe.zadd(clients_key, {chash: latest + layout.EXPIRY_SLACK_MS})
            else:
                pipe.zrem(clients_key, chash)
            pipe.hset(index_key, "!c", latest + layout.EXPIRY_SLACK_MS if live else 0)
            pipe.execute()
        except redis.WatchError:
            return  # a script touched this client meanwhile: next run
    pruned.index_entries += len(dead)
    pruned.orphans += len(orphans)
