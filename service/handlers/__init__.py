"""The handler table: one entry per protocol command."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from service import models
from service.handlers import context, sessions, system
from service.handlers.base import Ctx, Plan


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    params: type[BaseModel]
    handler: Callable[[Any, Ctx], Plan]

    @property
    def pascal(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("create_session", models.CreateSession, sessions.create_session),
        Command("restore_session", models.SessionRef, sessions.restore_session),
        Command("update_session_state", models.UpdateSessionState, sessions.update_session_state),
        Command("close_session", models.CloseSession, sessions.close_session),
        Command("get_session_info", models.SessionRef, sessions.get_session_info),
        Command("list_client_sessions", models.ListClientSessions, sessions.list_client_sessions),
        Command("get_session_statistics", models.NoParams, sessions.get_session_statistics),
        Command("save_context", models.SaveContext, context.save_context),
        Command("load_context", models.SessionRef, context.load_context),
        Command("get_context_summary", models.SessionRef, context.get_context_summary),
        Command("clear_context", models.ClearContext, context.clear_context),
        Command("record_evaluation", models.RecordEvaluation, context.record_evaluation),
        Command("register_object", models.RegisterObject, context.register_object),
        Command("release_object", models.ReleaseObject, context.release_object),
        Command("ping", models.Ping, system.ping),
        Command("describe", models.NoParams, system.describe),
    )
}

# Envelope clients name commands in PascalCase; either spelling is accepted.
_BY_ANY_NAME: dict[str, Command] = {**COMMANDS, **{c.pascal: c for c in COMMANDS.values()}}


def lookup(name: str) -> Command | None:
    return _BY_ANY_NAME.get(name)
