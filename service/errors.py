"""The protocol's error codes. Every domain error carries its wire code."""

from __future__ import annotations

from typing import Any, ClassVar


class StuiError(Exception):
    """Root of every error that becomes an error reply."""

    code: ClassVar[str] = "InternalError"
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or self.default_message
        self.details: dict[str, Any] = details
        super().__init__(self.message)


class InvalidRequest(StuiError):
    code = "InvalidRequest"
    default_message = "invalid request"

    def __init__(self, message: str, field: str | None = None, **details: Any) -> None:
        super().__init__(message, field=field, **details)


class UnknownCommand(StuiError):
    code = "UnknownCommand"
    default_message = "unknown command"


class UnsupportedVersion(StuiError):
    code = "UnsupportedVersion"
    default_message = "unsupported protocol version"


class SessionNotFound(StuiError):
    code = "SessionNotFound"
    default_message = "session not found"


class SessionLimitExceeded(StuiError):
    code = "SessionLimitExceeded"
    default_message = "client already has the maximum number of live sessions"


class ClientNotAllowed(StuiError):
    code = "ClientNotAllowed"
    default_message = "client not allowed"


class RateLimited(StuiError):
    code = "RateLimited"
    default_message = "rate limited"


class VersionConflict(StuiError):
    code = "VersionConflict"
    default_message = "expected_version does not match the session's version"


class PayloadTooLarge(StuiError):
    code = "PayloadTooLarge"
    default_message = "payload too large"


class RegistryFull(StuiError):
    code = "RegistryFull"
    default_message = "object registry is full"


class CheckpointNotFound(StuiError):
    code = "CheckpointNotFound"
    default_message = "no such checkpoint in this session"


class CheckpointLimitExceeded(StuiError):
    code = "CheckpointLimitExceeded"
    default_message = "the session's checkpoints are at their cap"


class StorageUnavailable(StuiError):
    code = "StorageUnavailable"
    default_message = "session store unavailable; safe to retry"


class InternalError(StuiError):
    code = "InternalError"
    default_message = "internal error"


ALL_ERRORS: tuple[type[StuiError], ...] = (
    InvalidRequest,
    UnknownCommand,
    UnsupportedVersion,
    SessionNotFound,
    SessionLimitExceeded,
    ClientNotAllowed,
    RateLimited,
    VersionConflict,
    PayloadTooLarge,
    RegistryFull,
    CheckpointNotFound,
    CheckpointLimitExceeded,
    StorageUnavailable,
    InternalError,
)
