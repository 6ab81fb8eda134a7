"""A small Python client: request timeout, safe retries, failover.

Retries follow the zguide's Lazy Pirate pattern: on a timeout the REQ socket
is closed (it cannot be reused after an unanswered send), a new one is opened
to the next endpoint, and the *same* request, with the same id, is sent
again. The server's replay window turns that resend into a harmless repeat.
A StorageUnavailable reply is retried the same way, after a short pause.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import zmq
import zmq.auth

from service import codec


class RemoteError(Exception):
    """The server answered with an error."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class NoReply(TimeoutError):
    """No endpoint answered within the retry budget."""


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    unavailable: int = 0
    endpoints_tried: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys in Z85: the server's public key, and this client's pair.
    The secret stays out of repr() and str() (and so out of logs and
    tracebacks that show the object)."""

    server_public: str
    public: str
    secret: str = field(repr=False)

    @classmethod
    def from_files(cls, server_public_file: str, client_secret_file: str) -> CurveKeys:
        """Certificate files as written by `stui-sessions keys generate`."""
        server_public, _ = zmq.auth.load_certificate(server_public_file)
        public, secret = zmq.auth.load_certificate(client_secret_file)
        if not secret:
            raise ValueError(f"{client_secret_file} holds no secret key")
        return cls(server_public.decode(), public.decode(), secret.decode())


def _pascal(command: str) -> str:
    """The envelope's request_type: `create_session` becomes `CreateSession`,
    and a name already in PascalCase (`CreateCheckpoint`) is kept as it is,
    since the server accepts either spelling (str.capitalize would lower the
    rest of each part, making `Createcheckpoint`)."""
    return "".join(part[:1].upper() + part[1:] for part in command.split("_"))


class Client:
    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = 5.0,
        retries: int = 3,
        encoding: Literal["command", "envelope"] = "command",
        retry_unavailable: bool = True,
        backoff: float = 0.2,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveKeys | None = None,
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("at least one endpoint is needed")
        self.timeout = timeout
        self.retries = retries
        self.encoding = encoding
        self.retry_unavailable = retry_unavailable
        self.backoff = backoff
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.stats = ClientStats()
        self._current = 0
        self._sock: zmq.Socket[bytes] | None = None

    # -- public API -----------------------------------------------------------

    def call(self, command: str, /, **params: Any) -> dict[str, Any]:
        """The command's result; a RemoteError for an error reply."""
        return self.result(self.request(command, params))

    def request(
        self, command: str, params: dict[str, Any] | None = None, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """The whole reply (success or error), after retries."""
        body = self.encode(command, params or {}, request_id or uuid.uuid4().hex)
        return self.send_raw(body)

    def send_raw(self, body: bytes) -> dict[str, Any]:
        self.stats.requests += 1
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                self.stats.retries += 1
            reply = self._attempt(body)
            if reply is None:
                self.stats.timeouts += 1
                self._reopen(next_endpoint=True)
                continue
            if self.retry_unavailable and self.error_code(reply) == "StorageUnavailable":
                self.stats.unavailable += 1
                if attempt + 1 < attempts:
                    time.sleep(self.backoff * (attempt + 1))
                    continue
            return reply
        raise NoReply(f"no reply after {attempts} attempts")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- encoding -------------------------------------------------------------

    def encode(self, command: str, params: dict[str, Any], request_id: str) -> bytes:
        if self.encoding == "envelope":
            return codec.dumps(
                {
                    "id": request_id,
                    "version": "1.0.0",
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "payload": {
                        "type": "Request",
                        "data": {"request_type": _pascal(command), "params": params},
                    },
                }
            )
        return codec.dumps({"id": request_id, "command": command, "parameters": params})

    @staticmethod
    def error_code(reply: dict[str, Any]) -> str | None:
        if reply.get("status") == "error":
            return str(reply.get("error_type"))
        data = reply.get("payload", {}).get("data", {})
        if data.get("response_type") == "Error":
            return str(data.get("data", {}).get("code"))
        return None

    @staticmethod
    def result(reply: dict[str, Any]) -> dict[str, Any]:
        if "payload" in reply:
            data = reply["payload"]["data"]
            if data["response_type"] == "Error":
                err = data["data"]
                raise RemoteError(err["code"], err["message"], err.get("details"))
            return dict(data["data"])
        if reply.get("status") == "error":
            raise RemoteError(reply["error_type"], reply["error"], reply.get("details"))
        return dict(reply["result"])

    # -- transport ------------------------------------------------------------

    def _attempt(self, body: bytes) -> dict[str, Any] | None:
        sock = self._socket()
        sock.send(body)
        if sock.poll(int(self.timeout * 1000), zmq.POLLIN):
            reply = _loads_reply(sock.recv())
            if not isinstance(reply, dict):
                raise ValueError("reply is not a JSON object")
            return reply
        return None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            self._reopen(next_endpoint=False)
        assert self._sock is not None
        return self._sock

    def _reopen(self, next_endpoint: bool) -> None:
        self.close()
        if next_endpoint:
            self._current = (self._current + 1) % len(self.endpoints)
        endpoint = self.endpoints[self._current]
        self.stats.endpoints_tried.append(endpoint)
        sock = self.context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public.encode("ascii")
            sock.curve_publickey = self.curve.public.encode("ascii")
            sock.curve_secretkey = self.curve.secret.encode("ascii")
        sock.connect(endpoint)
        self._sock = sock


def _loads_reply(data: bytes) -> Any:
    """A reply may carry a wide integer stored before the service refused
    them: the client reads it exactly rather than failing."""
    try:
        return codec.loads(data)
    except codec.WideInteger:
        return json.loads(data)
