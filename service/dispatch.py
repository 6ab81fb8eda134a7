"""From a batch of request bodies to a batch of reply bodies.

Decoding, validation and planning happen per request; the script calls of the
whole batch go to Redis as one pipeline; then each request's plan finishes
its own reply. Whatever goes wrong with one request becomes its error reply
and touches no other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.errors import InternalError, InvalidRequest, StuiError, UnknownCommand
from service.handlers import COMMANDS, Command, lookup
from service.handlers.base import Ctx, Plan
from service.protocol import DecodeError, ReplyTo, decode, encode_error, encode_success, validate
from service.settings import Settings
from service.store import Call, Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    reply_to: ReplyTo
    command: Command
    plan: Plan
    first_call: int


class Dispatcher:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.started_at = time.monotonic()
        self.command_names = tuple(COMMANDS)

    def handle(self, bodies: Sequence[bytes]) -> list[bytes]:
        replies: list[bytes | None] = [None] * len(bodies)
        pending: list[tuple[int, _Pending]] = []
        calls: list[Call] = []
        for n, body in enumerate(bodies):
            try:
                command, plan, reply_to = self._plan(body)
            except DecodeError as exc:
                replies[n] = encode_error(exc.reply_to, exc.error)
                continue
            if not plan.calls:
                replies[n] = self._finish(reply_to, command, plan, [])
                continue
            pending.append((n, _Pending(reply_to, command, plan, len(calls))))
            calls.extend(plan.calls)
        if pending:
            try:
                results = self.store.run(calls)
            except Exception as exc:  # one batch's failure must not end the worker
                error = exc if isinstance(exc, StuiError) else InternalError()
                if not isinstance(exc, StuiError):
                    log.exception("store failed")
                for n, p in pending:
                    replies[n] = encode_error(p.reply_to, error)
            else:
                for n, p in pending:
                    own = results[p.first_call : p.first_call + len(p.plan.calls)]
                    replies[n] = self._finish(p.reply_to, p.command, p.plan, own)
        return [r if r is not None else encode_error(ReplyTo(), InternalError()) for r in replies]

    def _plan(self, body: bytes) -> tuple[Command, Plan, ReplyTo]:
        request = decode(body, self.settings.max_request_bytes)
        reply_to = request.reply_to
        try:
            command = lookup(request.command)
            if command is None:
                raise UnknownCommand(
                    f"unknown command {request.command!r}"[:200], command=request.command[:64]
                )
            params = dict(request.params)
            if request.client_id is not None:
                named = params.setdefault("client_id", request.client_id)
                if named != request.client_id:
                    raise InvalidRequest(
                        "client_id given twice with different values", field="client_id"
                    )
            validated = validate(command.params, params)
            ctx = Ctx(
                settings=self.settings,
                command=command.name,
                request_id=reply_to.id,
                params=params,
                started_at=self.started_at,
                command_names=self.command_names,
            )
            return command, command.handler(validated, ctx), reply_to
        except StuiError as exc:
            raise DecodeError(exc, reply_to) from None
        except Exception:  # a bug answers InternalError; the stack goes to the log
            log.exception("planning %r failed", request.command[:64])
            raise DecodeError(InternalError(), reply_to) from None

    @staticmethod
    def _finish(reply_to: ReplyTo, command: Command, plan: Plan, raw: list[Any]) -> bytes:
        try:
            return encode_success(reply_to, command.pascal, plan.finish(raw))
        except StuiError as exc:
            return encode_error(reply_to, exc)
        except Exception:  # a bug: log it with its stack, answer without one
            log.exception("finishing %s failed", command.name)
            return encode_error(reply_to, InternalError())
