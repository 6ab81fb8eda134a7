"""Replies a peer's send queue could not take yet, held per peer up to a
byte budget: what bounds the memory a peer that does not read can take.

libzmq queues at most ZMQ_SNDHWM messages per peer, and with
ZMQ_ROUTER_MANDATORY refuses the next one (EAGAIN) instead of dropping it in
silence. A reading peer only hits that in a burst (replies made faster than
libzmq's I/O thread writes them out), so a refused reply waits here and is
sent again on the next turn of the loop. A peer that does not read fills
its queue and then this budget; every reply beyond is dropped and counted,
as Redis' client-output-buffer-limit does. A peer that is gone (EHOSTUNREACH)
loses what waits for it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

Dropped = Callable[[str], None]  # reason: "full" or "gone"

# The flags as plain ints: pyzmq's send_multipart combines its enum flags on
# every frame, which costs more than the send itself (Python's enum.__or__).
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)


def send_frames(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """send_multipart(frames, NOBLOCK), without its per-frame overhead. With
    ROUTER_MANDATORY a full queue refuses the first frame (zmq.Again) and
    nothing is sent; once the first is taken, the rest are."""
    for frame in frames[:-1]:
        sock.send(frame, _MORE)
    sock.send(frames[-1], _LAST)


class Outbox:
    def __init__(self, sock: zmq.Socket[bytes], budget: int | None, dropped: Dropped) -> None:
        """budget: bytes held per peer (at least one reply is always held);
        None: no limit (a link whose far end is this service's own relay)."""
        self.sock = sock
        self.budget = budget
        self.dropped = dropped
        self._queues: dict[bytes, deque[list[bytes]]] = {}
        self._bytes: dict[bytes, int] = {}
        self.held = 0  # replies that had to wait here (a send queue was full)

    def __bool__(self) -> bool:
        return bool(self._queues)

    def send(self, frames: list[bytes]) -> None:
        """Send now, or hold behind what already waits for that peer."""
        if self._queues and frames[0] in self._queues:
            self._hold(frames[0], frames)
            return
        try:  # the common case, inline: one call per reply
            send_frames(self.sock, frames)
        except zmq.Again:
            self._hold(frames[0], frames)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer has left
            log.debug("reply dropped: %s", exc)
            self.dropped("gone")

    def flush(self) -> None:
        """Send what waits, each peer's replies in order, until its queue is full."""
        for peer in list(self._queues):
            queue = self._queues[peer]
            while queue:
                if not self._try(queue[0]):
                    break
                if peer not in self._queues:  # gone: _try dropped all it held
                    break
                self._bytes[peer] -= _size(queue.popleft())
            if not queue and peer in self._queues:
                del self._queues[peer], self._bytes[peer]

    def _try(self, frames: list[bytes]) -> bool:
        """True when libzmq took the reply, or the peer is gone: then every
        reply held for it (frames, the first of them, included) is dropped."""
        try:
            send_frames(self.sock, frames)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer has left
            log.debug("replies dropped: %s", exc)
            waiting = self._queues.pop(frames[0], None)
            self._bytes.pop(frames[0], None)
            for _ in range(len(waiting) if waiting else 1):
                self.dropped("gone")
        return True

    def _hold(self, peer: bytes, frames: list[bytes]) -> None:
        size = _size(frames)
        held = self._bytes.get(peer, 0)
        if self.budget is not None and held and held + size > self.budget:
            self.dropped("full")
            return
        self._queues.setdefault(peer, deque()).append(frames)
        self._bytes[peer] = held + size
        self.held += 1


def _size(frames: list[bytes]) -> int:
    return sum(len(f) for f in frames)
