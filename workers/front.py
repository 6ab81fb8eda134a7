"""The ZeroMQ front worker: a ROUTER socket in front of the dispatcher.

One thread, one loop: wait for a message, take every message already queued
(up to batch_max), answer them all from one Redis pipeline, repeat. Requests
that arrive while a batch is at Redis form the next batch, so many requests
in flight cost few round trips.

Frames: a ROUTER prepends the peer's routing id. REQ clients and well-behaved
DEALER clients send an empty delimiter frame, then the body; a DEALER that
sends the body alone is answered the same way. Anything but exactly one body
frame after the envelope is an InvalidRequest.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import zmq

from service.auth import ClientKeyCache
from service.dispatch import Dispatcher
from service.errors import InvalidRequest
from service.metrics import INVALID, Heartbeat, heartbeat_path
from service.protocol import ReplyTo, encode_error
from service.settings import Settings
from workers.curve import CurveServer

log = logging.getLogger(__name__)


def _extra_frames_reply() -> bytes:
    error = InvalidRequest("a request is exactly one frame after the envelope", field=None)
    return encode_error(ReplyTo(), error)


class FrontWorker:
    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        endpoint: str,
        *,
        connect: bool = False,
        routing_frames: int = 1,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        client_keys: ClientKeyCache | None = None,
        forwarded_identity: bool = False,
    ) -> None:
        """connect/routing_frames: behind the multi-process proxy the worker
        connects to it, and each message carries the proxy's routing id too.
        client_keys: CURVE is on; with forwarded_identity the proxy did the
        handshake and put the client's public key in the frame after its own
        routing id, else this worker's socket is the CURVE server."""
        self.settings = settings
        self.dispatcher = dispatcher
        self.endpoint = endpoint
        self.connect = connect
        self.routing_frames = routing_frames
        self.context = context or zmq.Context.instance()
        self.client_keys = client_keys
        self.forwarded_identity = forwarded_identity
        self.curve: CurveServer | None = None
        self.metrics = dispatcher.metrics
        beat_path = heartbeat_path(settings)
        self.heartbeat = Heartbeat(beat_path) if beat_path is not None else None
        self.stopping = False
        self.served = 0
        self._drain_deadline = 0.0

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def open_socket(self) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.ROUTER)
        # libzmq drops a peer whose message exceeds this; below it and above
        # max_request_bytes the request is answered with PayloadTooLarge.
        sock.setsockopt(zmq.MAXMSGSIZE, self.settings.transport_max_bytes)
        sock.setsockopt(zmq.LINGER, int(self.settings.shutdown_grace * 1000))
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if self.client_keys is not None and not self.forwarded_identity:
            self.curve = CurveServer(self.context, self.settings, self.client_keys).start()
            self.curve.secure(sock)
        if self.connect:
            sock.connect(self.endpoint)
        else:
            sock.bind(self.endpoint)
        return sock

    def run(self, sock: zmq.Socket[bytes] | None = None) -> None:
        sock = sock or self.open_socket()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        log.info("front worker serving on %s", self.endpoint)
        try:
            while not self.stopping:
                if poller.poll(100):
                    self.serve_available(sock)
                elif self.metrics is not None:
                    self.metrics.idle()
                if self.metrics is not None:
                    self.metrics.tick()
                if self.heartbeat is not None:
                    self.heartbeat.beat()
            self.drain(sock)
        finally:
            if self.metrics is not None:
                self.metrics.idle()
                self.metrics.flush()
            remaining = max(0.0, self._drain_deadline - time.monotonic())
            sock.close(linger=int(remaining * 1000))
            if self.curve is not None:
                self.curve.stop()
            log.info("front worker stopped after %d requests", self.served)

    def drain(self, sock: zmq.Socket[bytes]) -> None:
        """After a stop request: answer what has already arrived, within the grace period."""
        self._drain_deadline = time.monotonic() + self.settings.shutdown_grace
        quiet_since = time.monotonic()
        while time.monotonic() < self._drain_deadline:
            if sock.poll(20, zmq.POLLIN):
                self.serve_available(sock)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.2:
                break

    def serve_available(self, sock: zmq.Socket[bytes]) -> None:
        started = time.perf_counter()
        envelopes: list[list[bytes]] = []
        bodies: list[bytes] = []
        identities: list[str | None] = []
        bad: list[list[bytes]] = []
        for _ in range(self.settings.batch_max):
            try:
                frames, public_key = self._receive(sock)
            except zmq.Again:
                break
            envelope, body = self._split(frames)
            if body is None:
                bad.append(envelope)
            else:
                envelopes.append(envelope)
                bodies.append(body)
                if self.client_keys is not None:
                    identities.append(self.client_keys.client_for(public_key))
        metrics = self.metrics
        outcomes: list[tuple[str, str]] = []
        if metrics is not None and bodies:
            metrics.started(len(bodies))
        for envelope in bad:
            self._send(sock, envelope, _extra_frames_reply())
        if bodies:
            replies = self.dispatcher.handle(
                bodies, identities if self.client_keys is not None else None, outcomes
            )
            for envelope, reply in zip(envelopes, replies, strict=True):
                self._send(sock, envelope, reply)
        self.served += len(bodies) + len(bad)
        if metrics is not None and (bodies or bad):
            outcomes.extend([(INVALID, InvalidRequest.code)] * len(bad))
            metrics.finished(outcomes, time.perf_counter() - started)

    def _receive(self, sock: zmq.Socket[bytes]) -> tuple[list[bytes], str | None]:
        """The frames, and with CURVE the public key (Z85) that sent them."""
        if self.client_keys is None:
            return sock.recv_multipart(zmq.NOBLOCK), None
        if self.forwarded_identity:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            return [frames[0], *frames[2:]], frames[1].decode("ascii", "replace")
        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        return [p.bytes for p in parts], str(parts[-1].get("User-Id"))

    def _split(self, frames: list[bytes]) -> tuple[list[bytes], bytes | None]:
        """(reply envelope, body); body is None when the frames are malformed."""
        k = self.routing_frames
        rest = frames[k:]
        if rest and rest[0] == b"":
            envelope, rest = frames[: k + 1], rest[1:]
        else:
            envelope = frames[:k]
        if len(rest) == 1:
            return envelope, rest[0]
        return envelope, None

    @staticmethod
    def _send(sock: zmq.Socket[bytes], envelope: list[bytes], reply: bytes) -> None:
        try:
            sock.send_multipart([*envelope, reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # The peer is gone or not reading: its reply is dropped, others go on.
            log.debug("reply dropped: %s", exc)
