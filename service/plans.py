"""Plans: named sets of limits, assigned to a client id or to an id prefix.

An exact assignment beats the longest matching prefix, which beats the
service's own settings; a limit a plan leaves unset follows the settings.
Plans and assignments live in Redis (keys.plan_*), written by the
`stui-sessions plans` commands, which bump a version counter. Every front
re-reads them when that counter moves (PlanCache.refresh, on the policy
refresher's timer), so a change is in force everywhere within
`policy_refresh` (at most a second), without a restart.

The front resolves a request's plan before its one script call and hands
the scripts that plan's limits, exactly as it hands them the defaults. A
request that names a client (or comes authenticated) is resolved by its id.
One that names only a session is resolved by the owner's hash, which exact
assignments match; prefixes cannot be matched against a hash, so when
prefix assignments exist and the owner's hash matches no exact one (and the
front has not met that owner before), the front sends the prefixes along
(after a ';' in the rate-limit ARGV) and the script answers {'OWNER',
client_id} before it writes anything if the owner matches one. The front
then learns the owner's id and asks again with that plan's limits: two
round trips, once per owner and front process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service import keys, models
from service.settings import Settings
from service.store import REDIS_FAILURES, RedisClient

PLAN_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
_PLAN_NAME = re.compile(PLAN_NAME_PATTERN)
_CLIENT_ID = re.compile(models.CLIENT_ID_PATTERN)
MAX_PLANS = 100
# Prefix assignments travel with some requests (see above): a bound on them
# bounds those requests' ARGV and the script's loop over them.
MAX_PREFIXES = 64

# What a plan may set: the limit, and the lowest value it may take. Each is
# a Settings field of the same name.
LIMITS: dict[str, float] = {
    "max_sessions_per_client": 1,
    "rate_limit": 0,
    "rate_burst": 1,
    "max_state_bytes": 1024,
    "max_timeout": models.MIN_TIMEOUT,
    "history_limit": 1,
    "max_checkpoints": 1,
    "max_checkpoint_bytes": 1024,
}
FLOATS = frozenset({"rate_limit"})
# A plan's value may not exceed these: the protocol's timeout bound, and the
# session and checkpoint counts that the front's reply bounds are sized for
# (service/dispatch.py), whatever plan wrote a client's data.
CEILINGS: dict[str, float] = {
    "max_timeout": models.MAX_TIMEOUT,
    "max_sessions_per_client": 1000,
    "max_checkpoints": 1000,
}


def check_name(name: str) -> str:
    if not _PLAN_NAME.fullmatch(name):
        raise ValueError(f"{name!r} does not match the plan name pattern {PLAN_NAME_PATTERN}")
    return name


def check_limits(limits: Mapping[str, Any]) -> dict[str, int | float]:
    """The limits of a plan, checked: known names, numbers in range."""
    out: dict[str, int | float] = {}
    for name, value in limits.items():
        if name not in LIMITS:
            raise ValueError(f"unknown limit {name!r} (one of {', '.join(LIMITS)})")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{name} must be a number")
        try:
            number = float(value) if name in FLOATS else value
        except ValueError:
            raise ValueError(f"{name} must be a number") from None
        if not isinstance(number, int | float):
            raise ValueError(f"{name} must be a number")
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number")
        if name not in FLOATS and not isinstance(number, int):
            raise ValueError(f"{name} must be a whole number")
        if number < LIMITS[name]:
            raise ValueError(f"{name} must be at least {LIMITS[name]:g}")
        if name in CEILINGS and number > CEILINGS[name]:
            raise ValueError(f"{name} must be at most {CEILINGS[name]:g}")
        out[name] = number
    return out


@dataclass(frozen=True, eq=False)  # by identity: the dispatcher keys caches by it
class Limits:
    """A client's effective limits: the settings with its plan's values over
    them, and what the dispatcher derives from them once per plan."""

    plan: str | None
    settings: Settings
    rate_spec: str
    create_rate_spec: str

    @classmethod
    def of(cls, base: Settings, plan: str | None, values: Mapping[str, int | float]) -> Limits:
        update = dict(values)
        # The front's memory bounds (reply and outbox sizes) are set at start
        # from the service's own cap: a plan may lower it, never raise it.
        if "max_state_bytes" in update:
            update["max_state_bytes"] = min(int(update["max_state_bytes"]), base.max_state_bytes)
        settings = base.model_copy(update=update)
        return cls(plan, settings, settings.rate_spec(), settings.rate_spec(create=True))

    def report(self) -> dict[str, int | float]:
        """The limits a plan may set, as they hold for this client."""
        return {name: getattr(self.settings, name) for name in LIMITS}


@dataclass(frozen=True)
class PlanTable:
    """Plans and assignments as read from Redis at one version."""

    plans: dict[str, dict[str, int | float]] = field(default_factory=dict)
    exact: dict[str, str] = field(default_factory=dict)  # client id -> plan
    prefixes: dict[str, str] = field(default_factory=dict)  # id prefix -> plan
    version: int = 0

    def plan_for(self, client_id: str) -> str | None:
        """Exact, else the longest matching prefix, else None. An assignment
        to a plan that is gone counts as none."""
        name = self.exact.get(client_id)
        if name not in self.plans:  # none, or a plan removed under it (a race, a hand edit)
            name, best = None, -1
            for prefix, plan in self.prefixes.items():
                if len(prefix) > best and client_id.startswith(prefix) and plan in self.plans:
                    best, name = len(prefix), plan
        return name


class PlanCache:
    """The plan table as last read, with every plan's Limits made once.
    resolve() is called per request and costs dictionary lookups."""

    LEARNED_MAX = 65_536  # owners met through an OWNER reply (hash -> id)

    def __init__(self, client: RedisClient | None, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.defaults = Limits.of(settings, None, {})
        self._apply(PlanTable())
        self.learned: dict[str, str] = {}

    def _apply(self, table: PlanTable) -> None:
        limits = {name: Limits.of(self.settings, name, v) for name, v in table.plans.items()}
        by_hash = {
            keys.client_hash(cid): limits[name]
            for cid, name in table.exact.items()
            if name in limits
        }
        # Swapped whole, the memo of resolved ids with it: a request reads one
        # consistent table, and what it resolves lands in that table's memo
        # (never in a newer table's, where it would outlive the change).
        by_id: dict[str, Limits] = {}
        self.state = (table, limits, by_hash, "\t".join(sorted(table.prefixes)), by_id)

    @property
    def table(self) -> PlanTable:
        return self.state[0]

    def refresh(self) -> None:
        """Re-reads the table when its version moved; keeps the last one if
        Redis does not answer (requests that need Redis fail anyway)."""
        if self.client is None:
            return
        try:
            version = int(self.client.get(keys.plan_version_key()) or 0)
            if version == self.table.version:
                return
            self._apply(read_table(self.client))
        except REDIS_FAILURES:
            return

    def for_client(self, client_id: str) -> Limits:
        table, limits, _, _, by_id = self.state
        if not limits:
            return self.defaults  # no plans: nothing to look up
        found = by_id.get(client_id)
        if found is None:
            name = table.plan_for(client_id)  # a loop over the prefixes: once per id
            found = self.defaults if name is None else limits[name]
            if len(by_id) >= self.LEARNED_MAX:
                by_id.clear()
            by_id[client_id] = found
        return found

    def for_owner(self, chash: str) -> tuple[Limits, str]:
        """The limits of a session's owner known by its hash, and the
        prefixes the script must check ('' when none need checking)."""
        _, _, by_hash, prefixes, _ = self.state
        found = by_hash.get(chash)
        if found is not None:
            return found, ""
        known = self.learned.get(chash)
        if known is not None:
            return self.for_client(known), ""
        return self.defaults, prefixes

    def learn(self, client_id: str) -> None:
        if len(self.learned) >= self.LEARNED_MAX:
            self.learned.clear()  # rare, and only costs a second round trip each
        self.learned[keys.client_hash(client_id)] = client_id


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def read_table(client: RedisClient) -> PlanTable:
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.plan_version_key())
    pipe.hgetall(keys.plan_defs_key())
    pipe.hgetall(keys.plan_exact_key())
    pipe.hgetall(keys.plan_prefix_key())
    version, defs, exact, prefixes = pipe.execute()
    plans: dict[str, dict[str, int | float]] = {}
    for name, raw in defs.items():
        try:
            plans[_text(name)] = check_limits(json.loads(raw))
        except (ValueError, TypeError):
            continue  # written by hand, wrongly: that plan counts as absent
    return PlanTable(
        plans,
        {_text(k): _text(v) for k, v in exact.items()},
        {_text(k): _text(v) for k, v in prefixes.items()},
        int(version or 0),
    )


# The `stui-sessions plans` commands ---------------------------------------


def _bump(pipe: Any) -> None:
    pipe.incr(keys.plan_version_key())


def set_plan(client: RedisClient, name: str, limits: Mapping[str, Any]) -> dict[str, int | float]:
    """Creates or replaces a plan: what it leaves unset follows the settings."""
    check_name(name)
    values = check_limits(limits)
    if name not in read_table(client).plans and len(read_table(client).plans) >= MAX_PLANS:
        raise ValueError(f"at most {MAX_PLANS} plans")
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.plan_defs_key(), name, json.dumps(values, sort_keys=True))
    _bump(pipe)
    pipe.execute()
    return values


def remove_plan(client: RedisClient, name: str) -> bool:
    """False when there is no such plan. Refused while assignments name it."""
    table = read_table(client)
    users = [c for c, p in table.exact.items() if p == name]
    users += [f"{c}* (prefix)" for c, p in table.prefixes.items() if p == name]
    if users:
        shown = ", ".join(sorted(users)[:5]) + (" ..." if len(users) > 5 else "")
        raise ValueError(f"plan {name!r} is assigned ({shown}): unassign it first")
    pipe = client.pipeline(transaction=True)
    pipe.hdel(keys.plan_defs_key(), name)
    _bump(pipe)
    removed, _ = pipe.execute()
    return bool(removed)


def assign(client: RedisClient, client_id: str, plan: str, *, prefix: bool = False) -> None:
    if not _CLIENT_ID.fullmatch(client_id):
        raise ValueError(f"{client_id!r} does not match the client id pattern")
    table = read_table(client)
    if plan not in table.plans:
        raise ValueError(f"no plan {plan!r}: create it with `plans set` first")
    if prefix and client_id not in table.prefixes and len(table.prefixes) >= MAX_PREFIXES:
        raise ValueError(f"at most {MAX_PREFIXES} prefix assignments")
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.plan_prefix_key() if prefix else keys.plan_exact_key(), client_id, plan)
    _bump(pipe)
    pipe.execute()


def unassign(client: RedisClient, client_id: str, *, prefix: bool = False) -> bool:
    """False, and nothing changed (no version bump), when it was not assigned.
    The removal and its bump are one transaction, as for every change here:
    a removal the fronts never hear of would stay out of force."""
    table_key = keys.plan_prefix_key() if prefix else keys.plan_exact_key()
    if not client.hexists(table_key, client_id):
        return False
    pipe = client.pipeline(transaction=True)
    pipe.hdel(table_key, client_id)
    _bump(pipe)
    removed, _ = pipe.execute()
    return bool(removed)


def describe(table: PlanTable) -> dict[str, Any]:
    return {
        "plans": {name: table.plans[name] for name in sorted(table.plans)},
        "assignments": dict(sorted(table.exact.items())),
        "prefix_assignments": dict(sorted(table.prefixes.items())),
    }
