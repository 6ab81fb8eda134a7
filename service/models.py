"""Pydantic models: the two request encodings and every command's parameters.

Parameters are strict (no coercion: "3600" is not a timeout, true is not a
version) and closed (an unknown parameter is refused, naming it), so that a
typo such as `expected_versoin` can never silently turn off a check.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

CLIENT_ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"

ClientId = Annotated[str, StringConstraints(pattern=CLIENT_ID_PATTERN)]
SessionIdText = Annotated[str, StringConstraints(min_length=1, max_length=128)]
ObjectId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MIN_TIMEOUT, MAX_TIMEOUT = 1, 2_592_000  # whole seconds, fixed by the protocol
Timeout = Annotated[int, Field(ge=MIN_TIMEOUT, le=MAX_TIMEOUT)]
Version = Annotated[int, Field(ge=0, le=2**53)]
JSONObject = dict[str, Any]
ContextPart = Literal[
    "workspace_context", "inspector_state", "object_registry", "evaluation_history"
]
CONTEXT_PARTS: tuple[ContextPart, ...] = (
    "workspace_context",
    "inspector_state",
    "object_registry",
    "evaluation_history",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- the two encodings -------------------------------------------------------


class CommandRequest(BaseModel):
    """{"id", "command", "parameters", "client_id"?}: STUI's Pharo form."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: Any = None  # checked by protocol.request_id: a union here would blur error fields
    command: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    parameters: JSONObject = Field(default_factory=dict)
    client_id: Any = None


class EnvelopeData(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    request_type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    params: JSONObject = Field(default_factory=dict)


class EnvelopePayload(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["Request"]
    data: EnvelopeData


class EnvelopeRequest(BaseModel):
    """STUI's Rust protocol crate, version 1.x."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: Any = None  # checked by protocol.request_id: a union here would blur error fields
    version: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    timestamp: Any = None
    payload: EnvelopePayload
    client_id: Any = None


# --- command parameters ------------------------------------------------------


class CreateSession(_Strict):
    client_id: ClientId
    timeout: Timeout | None = None
    client_info: JSONObject | None = None


class SessionRef(_Strict):
    """Commands that take only a session (and optionally the client naming it)."""

    session_id: SessionIdText
    client_id: ClientId | None = None


class UpdateSessionState(SessionRef):
    state_data: JSONObject
    expected_version: Version | None = None
    replace: bool = False


class CloseSession(SessionRef):
    save_state: bool = False


class ListClientSessions(_Strict):
    client_id: ClientId


class NoParams(_Strict):
    client_id: ClientId | None = None


class Context(_Strict):
    """Parts left out stay as they are; a part given as null is cleared."""

    workspace_context: JSONObject | None = None
    inspector_state: JSONObject | None = None
    object_registry: dict[ObjectId, Any] | None = None
    evaluation_history: list[Any] | None = None


class SaveContext(SessionRef):
    context: Context
    expected_version: Version | None = None


class ClearContext(SessionRef):
    parts: list[ContextPart] | None = None


class RecordEvaluation(SessionRef):
    code: str
    result: Any = None
    result_type: Annotated[str, StringConstraints(max_length=256)] | None = None
    has_error: bool = False
    execution_time: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    tool_id: Annotated[str, StringConstraints(max_length=256)] | None = None


class RegisterObject(SessionRef):
    object_id: ObjectId
    description: str
    metadata: JSONObject | None = None


class ReleaseObject(SessionRef):
    object_id: ObjectId


CheckpointId = Annotated[int, Field(ge=1, le=2**53)]
# Characters, as the protocol counts them (a label is stored as it is given).
CHECKPOINT_LABEL_MAX = 128


class CreateCheckpoint(SessionRef):
    label: Annotated[str, StringConstraints(max_length=CHECKPOINT_LABEL_MAX)] | None = None
    expected_version: Version | None = None


class RestoreCheckpoint(SessionRef):
    checkpoint_id: CheckpointId
    expected_version: Version | None = None


class DeleteCheckpoint(SessionRef):
    checkpoint_id: CheckpointId


class Ping(_Strict):
    message: Annotated[str, StringConstraints(max_length=4096)] | None = None
    client_id: ClientId | None = None
