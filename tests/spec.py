"""PROTOCOL.md's error table, written out once for the tests: every code, and
the details key each one promises. Kept literal (not derived from
service.errors) so that the tests compare the code against the spec."""

from __future__ import annotations

SPEC_CODES = frozenset(
    {
        "InvalidRequest",
        "UnknownCommand",
        "UnsupportedVersion",
        "SessionNotFound",
        "SessionLimitExceeded",
        "ClientNotAllowed",
        "RateLimited",
        "VersionConflict",
        "PayloadTooLarge",
        "RegistryFull",
        "CheckpointNotFound",
        "CheckpointLimitExceeded",
        "StorageUnavailable",
        "InternalError",
    }
)
DETAILS_KEY = {
    "InvalidRequest": "field",
    "UnknownCommand": "command",
    "UnsupportedVersion": "supported",
    "SessionLimitExceeded": "limit",
    "RateLimited": "retry_after",
    "VersionConflict": "current_version",
    "PayloadTooLarge": "limit_bytes",
    "RegistryFull": "limit",
    "CheckpointNotFound": "checkpoint_id",
    "CheckpointLimitExceeded": "limit",
}
