"""The handler table: one entry per protocol command."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from service import models
from service.handlers import checkpoints, context, sessions, system
from service.handlers.base import Ctx, Plan
from service.settings import Settings

# What a command's reply may hold at most, beside fixed fields: nothing
# large, client_info, a client's session list, or a whole session.
Reply = Literal["small", "info", "list", "session", "checkpoints"]
SMALL_REPLY = 4096
LIST_ENTRY = 512
# One entry of list_checkpoints: its numbers and names, and a label of 128
# characters, each up to 6 bytes once JSON-escaped.
CHECKPOINT_ENTRY = 256 + 6 * models.CHECKPOINT_LABEL_MAX


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    params: type[BaseModel]
    handler: Callable[[Any, Ctx], Plan]
    reply: Reply = "small"
    # The envelope form's name (CreateSession): every reply carries it.
    pascal: str = field(init=False)

    def __post_init__(self) -> None:
        pascal = "".join(part.capitalize() for part in self.name.split("_"))
        object.__setattr__(self, "pascal", pascal)

    def reply_bound(self, settings: Settings) -> int:
        """The most bytes this command's reply can take under these settings:
        what a batch budgets for it before Redis is asked."""
        if self.reply == "session":
            return settings.max_reply_bytes
        if self.reply == "info":
            return settings.client_info_cap + SMALL_REPLY
        if self.reply == "list":
            return settings.max_sessions_per_client * LIST_ENTRY + SMALL_REPLY
        if self.reply == "checkpoints":
            return settings.max_checkpoints * CHECKPOINT_ENTRY + SMALL_REPLY
        return SMALL_REPLY


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("create_session", models.CreateSession, sessions.create_session),
        Command("restore_session", models.SessionRef, sessions.restore_session, "session"),
        Command(
            "update_session_state",
            models.UpdateSessionState,
            sessions.update_session_state,
            "session",
        ),
        Command("close_session", models.CloseSession, sessions.close_session),
        Command("get_session_info", models.SessionRef, sessions.get_session_info, "info"),
        Command(
            "list_client_sessions", models.ListClientSessions, sessions.list_client_sessions, "list"
        ),
        Command("get_session_statistics", models.NoParams, sessions.get_session_statistics),
        Command("save_context", models.SaveContext, context.save_context),
        Command("load_context", models.SessionRef, context.load_context, "session"),
        Command("get_context_summary", models.SessionRef, context.get_context_summary),
        Command("clear_context", models.ClearContext, context.clear_context),
        Command("record_evaluation", models.RecordEvaluation, context.record_evaluation),
        Command("register_object", models.RegisterObject, context.register_object),
        Command("release_object", models.ReleaseObject, context.release_object),
        Command("create_checkpoint", models.CreateCheckpoint, checkpoints.create_checkpoint),
        Command(
            "list_checkpoints", models.SessionRef, checkpoints.list_checkpoints, "checkpoints"
        ),
        Command(
            "restore_checkpoint",
            models.RestoreCheckpoint,
            checkpoints.restore_checkpoint,
            "session",
        ),
        Command("delete_checkpoint", models.DeleteCheckpoint, checkpoints.delete_checkpoint),
        Command("ping", models.Ping, system.ping),
        Command("describe", models.NoParams, system.describe),
    )
}

# Envelope clients name commands in PascalCase; either spelling is accepted.
_BY_ANY_NAME: dict[str, Command] = {**COMMANDS, **{c.pascal: c for c in COMMANDS.values()}}


def lookup(name: str) -> Command | None:
    return _BY_ANY_NAME.get(name)
