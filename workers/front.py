"""The ZeroMQ front worker: a ROUTER socket in front of the dispatcher.

One thread, one loop: wait for a message, take what is already queued (a
batch), answer it from as few Redis round trips as its bounds allow, repeat.
Requests that arrive while a batch is at Redis form the next batch, so many
requests in flight cost few round trips; that next batch is taken and
decoded while Redis still runs this one, and answered after it.

What one peer can make this process hold is bounded by settings, not by
what it sends (docs/security.md):
- inbound: libzmq queues at most peer_recv_queue messages per peer, each at
  most transport_max_bytes (a larger one makes libzmq drop the peer);
- a batch takes at most batch_max messages and about batch_max_bytes, and
  at most two batches are held: one at Redis, and the next, planned
  meanwhile, of about batch_ahead_bytes at most;
  libzmq reads its peers in turn, one message each, so one peer's queue
  never holds another's first request back by more than a batch (and the
  small batch taken ahead);
- outbound: at most peer_send_queue replies wait for one peer in libzmq,
  each at most max_reply_bytes, then peer_outbox_bytes in this process
  (workers/outbox.py); a reply beyond that is dropped and counted, as Redis'
  client-output-buffer-limit does.

Frames: a ROUTER prepends the peer's routing id. REQ clients and well-behaved
DEALER clients send an empty delimiter frame, then the body; a DEALER that
sends the body alone is answered the same way. Anything but exactly one body
frame after the envelope is an InvalidRequest.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import cast

import zmq

from service.auth import ClientKeyCache
from service.dispatch import AT_REDIS, Dispatcher
from service.errors import InvalidRequest
from service.metrics import INVALID, Heartbeat, heartbeat_path
from service.protocol import ReplyTo, encode_error
from service.settings import Settings
from workers.curve import CurveServer
from workers.outbox import Outbox

log = logging.getLogger(__name__)

# ms between two tries of the replies that wait in the outbox.
OUTBOX_RETRY_MS = 5
# Addresses remembered per routing id that libzmq made (it never reuses one).
ADDRESS_CACHE = 65536


# glibc's mallopt parameter, and the size from which a buffer gets its own
# mapping (a reply of up to max_reply_bytes is well above it).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 256 * 1024


def return_large_buffers_to_the_os() -> None:
    """Pin glibc's mmap threshold. By default it grows to the largest buffer
    freed so far, after which replies of up to a MiB come from the heap, and
    a burst of them (a round trip of restores) leaves the process that much
    larger for good. Pinned, each such buffer is unmapped when freed, so the
    front's memory follows what it holds (tests/test_bounds.py). A no-op
    where there is no glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _extra_frames_reply() -> bytes:
    error = InvalidRequest("a request is exactly one frame after the envelope", field=None)
    return encode_error(ReplyTo(), error)


def _done() -> Generator[Sequence[tuple[int, bytes]], None, None]:
    yield from ()


@dataclass(slots=True)
class _Batch:
    """Requests taken off the socket together, planned, not yet answered."""

    started: float  # perf_counter when taken: the batch's latency metric
    envelopes: list[list[bytes]]  # per request, the frames its reply goes back with
    bad: list[list[bytes]]  # envelopes of malformed messages (InvalidRequest)
    first: Sequence[tuple[int, bytes]] = ()  # replies that needed no Redis
    answers: Generator[Sequence[tuple[int, bytes]], None, None] = field(default_factory=_done)
    outcomes: list[tuple[str, str]] = field(default_factory=list)  # metrics labels


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
        forwarded_identity: behind the multi-process proxy, which puts in the
        frame after its own routing id what it knows of the peer: its CURVE
        public key (client_keys given: CURVE on, the proxy did the handshake)
        or its network address. Otherwise this worker's socket is the CURVE
        server, or reads the address itself."""
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
        # Routing id -> the peer's network address (the replay scope).
        self._addresses: dict[bytes, str] = {}
        self.outbox: Outbox | None = None  # made with the socket
        # A batch taken and planned while the previous one was at Redis.
        self._next: _Batch | None = None
        self._held = 0  # requests taken and not answered yet (the in-flight gauge)

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def open_socket(self) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.ROUTER)
        bound_peer_queues(sock, self.settings)
        sock.setsockopt(zmq.LINGER, int(self.settings.shutdown_grace * 1000))
        if self.client_keys is not None and not self.forwarded_identity:
            self.curve = CurveServer(self.context, self.settings, self.client_keys).start()
            self.curve.secure(sock)
        if self.connect:
            sock.connect(self.endpoint)
        else:
            sock.bind(self.endpoint)
        return sock

    def _dropped(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reply_dropped(reason)

    def run(self, sock: zmq.Socket[bytes] | None = None) -> None:
        return_large_buffers_to_the_os()
        sock = sock or self.open_socket()
        # Behind the multi-process proxy the only peer is the proxy, which
        # reads every reply at once and holds the per-peer bounds itself.
        budget = None if self.connect else self.settings.peer_outbox_budget
        self.outbox = Outbox(sock, budget, self._dropped)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        log.info("front worker serving on %s", self.endpoint)
        try:
            while not self.stopping:
                if self._next is not None or poller.poll(OUTBOX_RETRY_MS if self.outbox else 100):
                    self.serve_available(sock)
                if self.outbox:
                    self.outbox.flush()
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
            held = self.outbox.held if self.outbox is not None else 0
            log.info(
                "front worker stopped after %d requests (%d replies waited in the outbox)",
                self.served,
                held,
            )

    def drain(self, sock: zmq.Socket[bytes]) -> None:
        """After a stop request: answer what has already arrived, within the grace period."""
        self._drain_deadline = time.monotonic() + self.settings.shutdown_grace
        if self._next is not None:  # taken off the socket already: answered whatever the grace
            self.serve_available(sock)
        quiet_since = time.monotonic()
        while time.monotonic() < self._drain_deadline:
            if self.outbox:
                self.outbox.flush()
            if self._next is not None or sock.poll(20, zmq.POLLIN):
                self.serve_available(sock)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.2:
                break

    def serve_available(self, sock: zmq.Socket[bytes]) -> None:
        """Answer one batch: the one planned while the previous batch was at
        Redis, else what is queued now. While this batch's calls are at
        Redis, what has been queued meanwhile is taken and planned as the
        next batch (answered by the next call), so that decoding overlaps
        with Redis instead of waiting for it."""
        batch, self._next = self._next, None
        if batch is None:
            batch = self._take(sock)
        if batch is not None:
            self._answer(sock, batch)

    def _take(self, sock: zmq.Socket[bytes], max_bytes: int | None = None) -> _Batch | None:
        """What is queued, up to the batch bounds (max_bytes instead of
        batch_max_bytes when given), decoded and planned (the dispatcher's
        first step); None when nothing is."""
        started = time.perf_counter()
        envelopes: list[list[bytes]] = []
        bodies: list[bytes] = []
        peers: list[str | None] = []  # CURVE public key, or network address
        bad: list[list[bytes]] = []
        settings = self.settings
        limit = settings.batch_max_bytes if max_bytes is None else max_bytes
        taken = 0
        for _ in range(settings.batch_max):
            try:
                frames, peer = self._receive(sock)
            except zmq.Again:
                break
            envelope, body = self._split(frames)
            if body is None:
                bad.append(envelope)
            else:
                envelopes.append(envelope)
                bodies.append(body)
                peers.append(peer)
            taken += len(frames[-1])  # the body; routing frames are a few bytes
            if taken >= limit:
                break
        if not bodies and not bad:
            return None
        self._held += len(bodies)
        if self.metrics is not None:
            self.metrics.started(self._held)
        batch = _Batch(started, envelopes, bad)
        if bodies:
            if self.client_keys is not None:
                identities = [self.client_keys.client_for(k) for k in peers]
                answers = self.dispatcher.handle_iter(bodies, identities, batch.outcomes)
            else:
                addresses = [a or "" for a in peers]
                answers = self.dispatcher.handle_iter(bodies, None, batch.outcomes, addresses)
            batch.first = next(answers)  # decoded and planned; nothing sent yet
            batch.answers = answers
        return batch

    def _answer(self, sock: zmq.Socket[bytes], batch: _Batch) -> None:
        if self.outbox is None:  # serve_available called without run (tests)
            self.outbox = Outbox(sock, self.settings.peer_outbox_budget, self._dropped)
        send = self.outbox.send
        for envelope in batch.bad:
            send([*envelope, _extra_frames_reply()])
        envelopes = batch.envelopes
        for n, reply in batch.first:
            send([*envelopes[n], reply])
        ahead = self.settings.batch_ahead_bytes
        try:
            for ready in batch.answers:
                if ready is AT_REDIS:
                    # Only while requests wait, and never while stopping
                    # (drain() answers what has arrived, it takes no more early).
                    if (
                        ahead
                        and self._next is None
                        and not self.stopping
                        and cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN
                    ):
                        self._take_ahead(sock, ahead)
                    continue
                for n, reply in ready:
                    send([*envelopes[n], reply])
        finally:
            # Left early only by an exception: its Redis connection, if one
            # is still unread, is disconnected now rather than at collection.
            batch.answers.close()
            self._held -= len(envelopes)
        self.served += len(envelopes) + len(batch.bad)
        metrics = self.metrics
        if metrics is not None:
            metrics.started(self._held)  # what is still held: the batch taken ahead
            outcomes = batch.outcomes
            outcomes.extend([(INVALID, InvalidRequest.code)] * len(batch.bad))
            metrics.finished(outcomes, time.perf_counter() - batch.started)

    def _take_ahead(self, sock: zmq.Socket[bytes], max_bytes: int) -> None:
        """The next batch, taken while this one is at Redis. A failure here
        (memory, say) must not cost the batch at Redis its replies: its
        writes are done. What this take had received is lost, as it would
        have been with the process."""
        try:
            self._next = self._take(sock, max_bytes)
        except Exception:
            log.exception("taking the next batch failed; the batch at Redis is still answered")

    def _receive(self, sock: zmq.Socket[bytes]) -> tuple[list[bytes], str | None]:
        """The frames, and what identifies the sender: with CURVE the public
        key (Z85) that sent them, else the peer's network address."""
        if self.forwarded_identity:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            return [frames[0], *frames[2:]], frames[1].decode("ascii", "replace")
        if self.client_keys is not None:  # the key: read on every message (it may be removed)
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            return [p.bytes for p in parts], _property(parts[-1], "User-Id")
        # A connection's address does not change: read it from the first
        # frame once per routing id, and take the rest of the message as bytes.
        first = sock.recv(zmq.NOBLOCK, copy=False)
        frames = [first.bytes]
        while sock.getsockopt(zmq.RCVMORE):
            frames.append(sock.recv())
        rid = frames[0]
        address = self._addresses.get(rid)
        if address is None:
            address = _property(first, "Peer-Address") or ""
            # Only ids libzmq made (a zero byte first) are never reused; a
            # peer may choose its own, and another peer may take it later.
            if rid[:1] == b"\x00":
                if len(self._addresses) >= ADDRESS_CACHE:
                    self._addresses.clear()  # routing ids of gone peers: start again
                self._addresses[rid] = address
        return frames, address

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


def bound_peer_queues(sock: zmq.Socket[bytes], settings: Settings, peers_per_pipe: int = 1) -> None:
    """The per-peer bounds of a public ROUTER (see the module docstring).
    peers_per_pipe: how many workers' replies share one peer's queue."""
    # libzmq drops a peer whose message exceeds this; below it and above
    # max_request_bytes the request is answered with PayloadTooLarge.
    sock.setsockopt(zmq.MAXMSGSIZE, settings.transport_max_bytes)
    sock.setsockopt(zmq.RCVHWM, settings.peer_recv_queue)
    sock.setsockopt(zmq.SNDHWM, settings.peer_send_queue * peers_per_pipe)
    # A full queue refuses the send (EAGAIN) instead of dropping in silence:
    # the reply then waits in the outbox.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


def _property(frame: zmq.Frame, name: str) -> str | None:
    try:
        return str(frame.get(name))
    except zmq.ZMQError:  # not set on this transport (e.g. no address on inproc)
        return None
