"""Wire format: detect the encoding of each message, decode it, encode replies."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from service import codec
from service.errors import (
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    StuiError,
    UnsupportedVersion,
)
from service.models import CommandRequest, EnvelopeRequest

Encoding = Literal["command", "envelope"]
PROTOCOL_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ["1.x"]
MAX_ID_LENGTH = 256


@dataclass(slots=True)
class ReplyTo:
    """What an error reply needs to know, even about a request that failed to decode."""

    encoding: Encoding = "command"
    id: str | int | None = None


@dataclass(slots=True)
class Request:
    reply_to: ReplyTo
    command: str  # as the client wrote it: snake_case or PascalCase
    params: dict[str, Any]
    client_id: Any  # a top-level client_id (command form), validated later


class DecodeError(Exception):
    def __init__(self, error: StuiError, reply_to: ReplyTo) -> None:
        super().__init__(error.message)
        self.error = error
        self.reply_to = reply_to


@functools.lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso(ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a Z suffix."""
    seconds, millis = divmod(ms, 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def now_iso() -> str:
    return iso(now_ms())


def first_error(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    err = exc.errors(include_url=False, include_input=False)[0]
    field = prefix + ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return InvalidRequest(f"missing required field '{field}'", field=field)
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"unknown field '{field}'", field=field)
    return InvalidRequest(f"invalid field '{field}': {err['msg']}", field=field)


def validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc, prefix) from None


def request_id(obj: dict[str, Any]) -> str | int | None:
    """The request's id: a string of at most 256 characters, a 64-bit integer,
    or null. Anything else is refused (and the reply's id is then null)."""
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    raise InvalidRequest("id must be a string of at most 256 characters or an integer", field="id")


def _guess(body: bytes) -> ReplyTo:
    """Before the body parses, a reply can only guess its encoding from the bytes."""
    return ReplyTo("envelope" if b'"payload"' in body[:65536] else "command")


def _param_path(path: str) -> str:
    """A path inside the parameters is named as validation errors name them."""
    for prefix in ("parameters.", "payload.data.params."):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def decode(body: bytes, max_bytes: int) -> Request:
    if len(body) > max_bytes:
        too_large = PayloadTooLarge(f"request larger than {max_bytes} bytes", limit_bytes=max_bytes)
        raise DecodeError(too_large, _guess(body))
    wide: InvalidRequest | None = None
    try:
        obj = codec.loads(body)
    except codec.WideInteger as exc:
        # Refused, but the message parsed: the reply can still carry its id.
        obj = exc.value
        wide = InvalidRequest(str(exc)[:300], field=_param_path(exc.path)[:256])
    except codec.JSONError as exc:
        invalid = InvalidRequest(f"not valid JSON: {exc}"[:300])
        raise DecodeError(invalid, _guess(body)) from None
    if not isinstance(obj, dict):
        raise DecodeError(InvalidRequest("a request must be a JSON object"), _guess(body))
    reply_to = ReplyTo("envelope" if "payload" in obj else "command")
    try:
        reply_to.id = request_id(obj)
        if wide is not None:
            raise wide
        if reply_to.encoding == "envelope" and ("command" in obj or "parameters" in obj):
            # Serving it as either would let two readers of one message
            # (a proxy, a log, this service) disagree about what it asks.
            raise InvalidRequest(
                "a request is either the command form or the envelope form, not both",
                field="payload",
            )
    except StuiError as exc:
        raise DecodeError(exc, reply_to) from None
    if reply_to.encoding == "envelope":
        try:
            # The version decides how to read the rest, so it is checked first.
            version = obj.get("version")
            if isinstance(version, str) and version.split(".", 1)[0] != "1":
                raise UnsupportedVersion(
                    f"protocol version {version[:32]!r} is not supported",
                    supported=SUPPORTED_VERSIONS,
                )
            env: EnvelopeRequest = validate(EnvelopeRequest, obj)
        except StuiError as exc:
            raise DecodeError(exc, reply_to) from None
        return Request(
            reply_to, env.payload.data.request_type, env.payload.data.params, obj.get("client_id")
        )
    # The well-formed request, checked by hand: what CommandRequest accepts.
    # Anything else goes through the model, whose error names the field.
    command = obj.get("command")
    params = obj.get("parameters", {})  # a new dict each time: callers may fill it
    if type(command) is str and 0 < len(command) <= 64 and type(params) is dict:
        return Request(reply_to, command, params, obj.get("client_id"))
    try:
        req: CommandRequest = validate(CommandRequest, obj)
    except StuiError as exc:
        raise DecodeError(exc, reply_to) from None
    return Request(reply_to, req.command, req.parameters, req.client_id)


def encode_success(reply_to: ReplyTo, pascal: str, result: dict[str, Any]) -> bytes:
    if reply_to.encoding == "envelope":
        return codec.dumps(
            {
                "id": reply_to.id,
                "version": PROTOCOL_VERSION,
                "timestamp": now_iso(),
                "payload": {
                    "type": "Response",
                    "data": {"response_type": pascal, "data": result},
                },
            }
        )
    return codec.dumps(
        {"id": reply_to.id, "status": "success", "result": result, "timestamp": now_iso()}
    )


def encode_error(reply_to: ReplyTo, error: StuiError) -> bytes:
    try:
        details = dict(error.details)
        codec.dumps(details)
    except (codec.JSONError, TypeError):
        error, details = InternalError(), {}
    if reply_to.encoding == "envelope":
        return codec.dumps(
            {
                "id": reply_to.id,
                "version": PROTOCOL_VERSION,
                "timestamp": now_iso(),
                "payload": {
                    "type": "Response",
                    "data": {
                        "response_type": "Error",
                        "data": {"code": error.code, "message": error.message, "details": details},
                    },
                },
            }
        )
    return codec.dumps(
        {
            "id": reply_to.id,
            "status": "error",
            "error": error.message,
            "error_type": error.code,
            "details": details,
            "timestamp": now_iso(),
        }
    )
