"""From a batch of request bodies to a batch of reply bodies.

Decoding, validation and planning happen per request; the script calls of the
whole batch go to Redis as one pipeline; then each request's plan finishes
its own reply. Whatever goes wrong with one request becomes its error reply
and touches no other.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from service import audit, keys
from service.auth import ClientKeyCache
from service.errors import (
    ClientNotAllowed,
    InternalError,
    InvalidRequest,
    RateLimited,
    StorageUnavailable,
    StuiError,
    UnknownCommand,
)
from service.handlers import COMMANDS, Command, lookup
from service.handlers.base import Ctx, Plan
from service.metrics import INVALID, SUCCESS, UNKNOWN, front_metrics
from service.models import CLIENT_ID_PATTERN
from service.plans import CEILINGS, Limits, PlanCache
from service.policy import Policy, PolicyCache
from service.protocol import DecodeError, ReplyTo, decode, encode_error, encode_success, validate
from service.settings import Settings
from service.statistics import StatsCache
from service.store import Call, Store

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


@dataclass(slots=True)
class _Pending:
    n: int  # the request's place in the batch
    reply_to: ReplyTo
    command: Command
    plan: Plan
    client_id: str | None
    bound: int  # its reply's largest size (reply_bounds)
    body: bytes  # kept for a second plan once the session's owner is known
    identity: str | None
    peer: str
    first_call: int = 0


# handle_iter's marker: a round trip's calls are at Redis (never modified).
AT_REDIS: Sequence[tuple[int, bytes]] = ()

_OWNER = b"OWNER"  # a script's answer when the owner's plan must be resolved by id


class _Refused(DecodeError):
    """A request refused while planning; `command` is its metrics label."""

    def __init__(self, error: StuiError, reply_to: ReplyTo, command: str) -> None:
        super().__init__(error, reply_to)
        self.command = command


def reply_bounds(settings: Settings) -> dict[str, int]:
    """The most bytes each command's reply can take, what a batch budgets
    for it before Redis is asked. Not by the client's plan: a client's data
    may have been written under another plan (more sessions, a larger state
    cap) than the one it has now, so sessions and checkpoints are counted up
    to the largest any plan may set (plans.CEILINGS), and state by the
    service's own cap, which no plan can raise (plans.Limits.of)."""
    sized = settings.model_copy(update={
        "max_sessions_per_client": max(settings.max_sessions_per_client,
                                       int(CEILINGS["max_sessions_per_client"])),
        "max_checkpoints": max(settings.max_checkpoints, int(CEILINGS["max_checkpoints"])),
    })
    return {c.name: c.reply_bound(sized) for c in COMMANDS.values()}


class Dispatcher:
    """Requests in, replies out. `identities`, when given, are the client ids
    that transport authentication (CURVE) bound to each request; None for a
    request whose key is unknown or was removed. `peers`, when given, are the
    network addresses the requests came from (the replay scope with CURVE
    off)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        policy: PolicyCache | None = None,
        authenticated: bool = False,
        curve_clients: ClientKeyCache | None = None,
        plans: PlanCache | None = None,
    ) -> None:
        """curve_clients: on a front without CURVE, the registered CURVE keys;
        a client that has one is served by CURVE fronts only. plans: the plan
        table (service/plans.py); without one every client has the settings."""
        self.settings = settings
        self.store = store
        self.policy = policy
        self.plans = plans if plans is not None else PlanCache(None, settings)
        self.authenticated = authenticated
        self.curve_clients = curve_clients
        self.started_at = time.monotonic()
        self.command_names = tuple(COMMANDS)
        self.metrics = front_metrics(settings)
        self._checkpoint_event = (
            self.metrics.checkpoint_event if self.metrics is not None else None
        )
        self.stats = StatsCache(settings.stats_max_age)
        self.reply_bounds = reply_bounds(settings)

    def handle(
        self,
        bodies: Sequence[bytes],
        identities: Sequence[str | None] | None = None,
        outcomes: list[tuple[str, str]] | None = None,
        peers: Sequence[str] | None = None,
    ) -> list[bytes]:
        """Every reply, in request order (see handle_iter)."""
        replies: list[bytes | None] = [None] * len(bodies)
        for ready in self.handle_iter(bodies, identities, outcomes, peers):
            for n, reply in ready:
                replies[n] = reply
        return [r if r is not None else encode_error(ReplyTo(), InternalError()) for r in replies]

    def handle_iter(
        self,
        bodies: Sequence[bytes],
        identities: Sequence[str | None] | None = None,
        outcomes: list[tuple[str, str]] | None = None,
        peers: Sequence[str] | None = None,
    ) -> Generator[Sequence[tuple[int, bytes]], None, None]:
        """The replies, as (index, reply) pairs, a list at a time as they are
        ready: refusals and answers that need no Redis first (always yielded,
        if empty: the first step decodes and plans the whole batch and sends
        nothing), then round trip by round trip. Before each round trip's
        replies comes AT_REDIS, an empty marker, once its calls are written:
        until the next step the caller may do work that does not use this
        dispatcher's store, such as planning the next batch (workers/front.py).
        A round trip carries calls whose replies may total
        batch_reply_bytes at most (by each command's largest possible reply),
        so what Redis sends back at once, and what this process holds of it,
        stays bounded whatever the sessions hold. With `outcomes`, each
        request's (command, outcome) is appended to it in request order once
        the iterator is exhausted: the labels of its metrics."""
        policy = self.policy.current() if self.policy is not None else None
        if policy is not None and policy.empty:
            policy = None  # allows everything: nothing to judge per request
        labels: list[tuple[str, str]] = [(INVALID, InternalError.code)] * len(bodies)
        pending: list[_Pending] = []
        ready: list[tuple[int, bytes]] = []
        for n, body in enumerate(bodies):
            identity = identities[n] if identities is not None else None
            peer = peers[n] if peers is not None else ""
            planned = self._planned(n, body, identity, peer, policy, labels)
            if isinstance(planned, _Pending):
                pending.append(planned)
            else:
                ready.append(planned)
        yield ready
        # Requests whose session owner the front had to learn go round once
        # more, planned with that owner's limits (service/plans.py). Once
        # learned the owner needs no second look, so two rounds are enough.
        for _ in range(2):
            again: list[_Pending] = []
            yield from self._round_trips(pending, labels, again, policy)
            pending = again
            if not pending:
                break
        if pending:
            log.error("%d requests still had no known owner after two rounds", len(pending))
            yield [(p.n, encode_error(p.reply_to, InternalError())) for p in pending]
        if outcomes is not None:
            outcomes.extend(labels)

    def _planned(
        self, n: int, body: bytes, identity: str | None, peer: str, policy: Policy | None,
        labels: list[tuple[str, str]],
    ) -> _Pending | tuple[int, bytes]:
        """A request to send to Redis, or its reply when it needs none."""
        try:
            command, plan, reply_to, client_id, bound = self._plan(body, identity, peer, policy)
        except DecodeError as exc:
            command_label = exc.command if isinstance(exc, _Refused) else INVALID
            labels[n] = (command_label, exc.error.code)
            return n, encode_error(exc.reply_to, exc.error)
        if not plan.calls and not (plan.needs_stats and not self.stats.fresh()):
            reply, labels[n] = self._finish(reply_to, command, plan, [], client_id)
            return n, reply
        return _Pending(n, reply_to, command, plan, client_id, bound, body, identity, peer)

    def _round_trips(
        self, pending: list[_Pending], labels: list[tuple[str, str]], again: list[_Pending],
        policy: Policy | None,
    ) -> Iterator[Sequence[tuple[int, bytes]]]:
        budget, group = self.settings.batch_reply_bytes, list[_Pending]()
        used = 0
        for p in pending:
            if group and used + p.bound > budget:
                yield from self._round_trip(group, labels, again, policy)
                group, used = [], 0
            group.append(p)
            used += p.bound
        if group:
            yield from self._round_trip(group, labels, again, policy)

    def _round_trip(
        self, group: list[_Pending], labels: list[tuple[str, str]], again: list[_Pending],
        policy: Policy | None,
    ) -> Iterator[Sequence[tuple[int, bytes]]]:
        """Yields AT_REDIS once the calls are written, then the replies."""
        calls: list[Call] = []
        refresh = 0
        if any(p.plan.needs_stats for p in group) and not self.stats.fresh():
            calls = self.stats.refresh_calls()
            refresh = len(calls)
        for p in group:
            p.first_call = len(calls)
            calls.extend(p.plan.calls)
        try:
            if calls:
                flight = self.store.send(calls)
                try:
                    yield AT_REDIS
                except GeneratorExit:  # given up while at Redis (the front failed)
                    flight.abandon()
                    raise
                results = flight.results()
            else:  # e.g. statistics requests whose refresh an earlier batch made
                results = []
        except Exception as exc:  # one batch's failure must not end the worker
            error = exc if isinstance(exc, StuiError) else InternalError()
            if not isinstance(exc, StuiError):
                log.exception("store failed")
            # Raised while handling a Redis exception: Redis failed just
            # now (not the store's short hold after a failure).
            elif self.metrics is not None and exc.__context__ is not None:
                self.metrics.redis_error()
            if refresh:
                self.stats.fail(error)
            failed = []
            for p in group:
                labels[p.n] = (p.command.name, error.code)
                failed.append((p.n, encode_error(p.reply_to, error)))
            yield failed
            return
        if refresh:
            self.stats.absorb(results[:refresh])
        if self.metrics is not None:
            refused = sum(1 for r in results if isinstance(r, StorageUnavailable))
            if refused:
                self.metrics.redis_error(refused)
        done = []
        for p in group:
            end = p.first_call + len(p.plan.calls)
            own = results[p.first_call : end]
            # Let go of Redis' reply as soon as this one is encoded: a round
            # trip may carry batch_reply_bytes of them, and holding every raw
            # reply beside every encoded one doubles what the front holds.
            results[p.first_call : end] = [None] * (end - p.first_call)
            if own and isinstance(own[0], list) and own[0] and own[0][0] == _OWNER:
                # Nothing was written: plan it again with the owner's limits.
                self.plans.learn(own[0][1].decode("utf-8"))
                planned = self._planned(p.n, p.body, p.identity, p.peer, policy, labels)
                if isinstance(planned, _Pending):
                    again.append(planned)
                else:
                    done.append(planned)
                continue
            reply, labels[p.n] = self._finish(p.reply_to, p.command, p.plan, own, p.client_id)
            del own
            done.append((p.n, reply))
        yield done

    def _limits(self, client_id: str | None, session_id: Any) -> tuple[Limits, str]:
        """The request's client's limits, and the prefixes its script must
        check (service/plans.py)."""
        if client_id is not None:
            return self.plans.for_client(client_id), ""
        if isinstance(session_id, str) and keys.is_session_id(session_id):
            return self.plans.for_owner(keys.chash_of_session(session_id))
        return self.plans.defaults, ""

    def _plan(
        self, body: bytes, identity: str | None, peer: str, policy: Policy | None
    ) -> tuple[Command, Plan, ReplyTo, str | None, int]:
        request = decode(body, self.settings.max_request_bytes)
        reply_to = request.reply_to
        client_id: str | None = None
        label = UNKNOWN
        try:
            command = lookup(request.command)
            if command is None:
                raise UnknownCommand(
                    f"unknown command {request.command!r}"[:200], command=request.command[:64]
                )
            label = command.name
            params = dict(request.params)
            if request.client_id is not None:
                named = params.setdefault("client_id", request.client_id)
                if named != request.client_id:
                    raise InvalidRequest(
                        "client_id given twice with different values", field="client_id"
                    )
            if self.authenticated:
                self._bind_identity(params, identity, command.name)
            named = params.get("client_id")
            # A malformed id is left to validation (InvalidRequest, naming the
            # field); only well-formed ids are judged and written to the audit log.
            client_id = named if isinstance(named, str) and _CLIENT_ID.fullmatch(named) else None
            if named is not None and client_id is None:
                policy = None
            if policy is not None:
                self._apply_policy(policy, client_id, params.get("session_id"), command.name)
            if self.curve_clients is not None and self.curve_clients.keys:
                self._curve_only(client_id, params.get("session_id"), command.name)
            validated = validate(command.params, params)
            limits, prefixes = self._limits(client_id, params.get("session_id"))
            rate_spec = limits.rate_spec
            if prefixes:
                rate_spec = f"{rate_spec};{prefixes}"
            ctx = Ctx(
                settings=limits.settings,
                command=command.name,
                request_id=reply_to.id,
                params=params,
                started_at=self.started_at,
                command_names=self.command_names,
                rate_spec=rate_spec,
                create_rate_spec=limits.create_rate_spec,
                plan=limits.plan,
                requester=f"key:{identity}" if self.authenticated else f"addr:{peer}",
                stats=self.stats,
                checkpoint_event=self._checkpoint_event,
            )
            bound = self.reply_bounds[command.name]
            return command, command.handler(validated, ctx), reply_to, client_id, bound
        except StuiError as exc:
            raise _Refused(exc, reply_to, label) from None
        except Exception:  # a bug answers InternalError; the stack goes to the log
            log.exception("planning %r failed", request.command[:64])
            raise _Refused(InternalError(), reply_to, label) from None

    @staticmethod
    def _bind_identity(params: dict[str, Any], identity: str | None, command: str) -> None:
        """With authentication on, the key's client id is the client id."""
        if identity is None:
            audit.refused("authentication", None, command)
            raise ClientNotAllowed("client key unknown or removed")
        named = params.setdefault("client_id", identity)
        if named != identity:
            audit.refused("authentication", identity, command, claimed=str(named)[:128])
            raise ClientNotAllowed("client_id does not match the authenticated client")

    def _curve_only(self, client_id: str | None, session_id: Any, command: str) -> None:
        """On a front without CURVE: a client with a registered CURVE key is
        served by CURVE fronts only, so that plain fronts running beside
        CURVE ones (a migration) cannot be used to claim its id or reach its
        sessions."""
        assert self.curve_clients is not None
        owner = None
        if isinstance(session_id, str) and keys.is_session_id(session_id):
            owner = keys.chash_of_session(session_id)
        if self.curve_clients.registered(client_id, owner):
            audit.refused("curve_only", client_id, command, session_owner_hash=owner)
            raise ClientNotAllowed("this client authenticates with CURVE: use a CURVE endpoint")

    @staticmethod
    def _apply_policy(policy: Policy, client_id: str | None, session_id: Any, command: str) -> None:
        owner = None
        if client_id is None and isinstance(session_id, str) and keys.is_session_id(session_id):
            owner = keys.chash_of_session(session_id)
        if not policy.allows(client_id, owner):
            audit.refused("policy", client_id, command, session_owner_hash=owner)
            raise ClientNotAllowed()

    @staticmethod
    def _finish(
        reply_to: ReplyTo, command: Command, plan: Plan, raw: list[Any], client_id: str | None
    ) -> tuple[bytes, tuple[str, str]]:
        """The reply, and its (command, outcome) label."""
        try:
            reply = encode_success(reply_to, command.pascal, plan.finish(raw))
            return reply, (command.name, SUCCESS)
        except RateLimited as exc:
            audit.refused("rate_limit", client_id, command.name, **exc.details)
            return encode_error(reply_to, exc), (command.name, exc.code)
        except StuiError as exc:
            return encode_error(reply_to, exc), (command.name, exc.code)
        except Exception:  # a bug: log it with its stack, answer without one
            log.exception("finishing %s failed", command.name)
            return encode_error(reply_to, InternalError()), (command.name, InternalError.code)
