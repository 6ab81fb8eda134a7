"""The HTTP role's gunicorn worker class, which slow clients cannot starve.

Slow clients. Kubernetes probes this port, so a client that sends half a
request and goes quiet must not keep /healthz and /readyz from answering.
gunicorn's own workers do not hold: a sync worker gives its one thread to
the half request until `timeout`; gthread hands each new connection to a
pool thread that waits 5 s for a first byte and then blocks reading the rest
of the head for as long as the client likes, and it closes every
non-keep-alive connection on its main loop, lingering up to 2 s for the
client's FIN (docs/security.md has the figures). ProbeSafeWorker, a gthread
worker, changes four things:

- A request head is read on the worker's main loop, without blocking, and a
  pool thread gets the connection only once the whole head is in (or the
  bytes already make the request invalid). A client gets HEAD_TIMEOUT
  seconds for its head, from the connection (or the end of the previous
  response) on, and HEAD_MAX_BYTES of room; then it is closed.
- In a pool thread, every blocking call of one turn on the socket (sending
  the response, mostly) shares one deadline of IO_TIMEOUT seconds, and the
  body of a request that has one is never read or drained: the answer
  closes the connection (this app takes no body).
- The closing linger (the FIN, then draining what the client still sends)
  happens on the main loop without blocking, LINGER_TIMEOUT at most.
- A client that sends its next request while more than UNSENT_MAX bytes of
  earlier answers wait unread in the send queue is closed instead of served
  (pipelining without reading would otherwise end in a blocked send).

A slow client then costs the worker one connection slot and HEAD_MAX_BYTES
at most, never a thread. When every slot (worker_connections) is taken, a
new connection closes the one that has been idle longest (waiting for its
head or kept alive), so that a probe still gets in.
"""


from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import resource
import selectors
import socket
import struct
import termios
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

# Pool threads of one worker: what answers requests whose head is complete.
HTTP_THREADS = 4
# Open connections one worker holds (waiting for a head, in a thread, or
# kept alive); at the limit, the longest idle one is closed for a new one.
WORKER_CONNECTIONS = 256
# s an idle connection is kept between two requests (HTTP keep-alive).
KEEPALIVE = 5
# s a client has to send a whole request head, and the most bytes it may be.
HEAD_TIMEOUT = 5.0
HEAD_MAX_BYTES = 16 * 1024
# s all the blocking socket calls of one turn in a pool thread may take.
IO_TIMEOUT = 5.0
# Bytes of earlier answers a client may leave unread (in our send queue)
# when it sends its next request; beyond, the connection closes.
UNSENT_MAX = 64 * 1024
# s and bytes of the closing linger (gunicorn's util.close_graceful figures).
LINGER_TIMEOUT = 2.0
LINGER_MAX_BYTES = 64 * 1024
# s without a heartbeat from a worker's main loop before the master
# replaces it; the loop beats at least once a second and never blocks.
WORKER_TIMEOUT = 10

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Connection: close\r\nContent-Length: 0\r\n\r\n"
)


class ClientTooSlow(BrokenPipeError):
    """The client did not keep up within IO_TIMEOUT; gunicorn drops the
    connection as it does a broken pipe (quietly: a client must not be able to
    fill the log)."""

    def __init__(self) -> None:
        super().__init__(errno.EPIPE, "client too slow")


class DeadlineSocket(socket.socket):
    """A client socket whose blocking calls in one pool-thread turn share a
    deadline: the turn starts when gunicorn makes the socket blocking, the
    clock at its first blocking call (the app's own time does not count)."""

    _deadline: float | None = None

    def setblocking(self, flag: bool) -> None:
        self._deadline = None
        if flag:
            self.settimeout(IO_TIMEOUT)
        else:
            super().setblocking(False)

    def _arm(self) -> None:
        current = self.gettimeout()
        if current == 0.0:
            return  # non-blocking: the main loop's own reads
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + IO_TIMEOUT
        left = self._deadline - now
        if left <= 0:
            raise ClientTooSlow
        if current is None or left < current:
            self.settimeout(left)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:
            raise ClientTooSlow from None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        try:
            return super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            raise ClientTooSlow from None

    def send(self, data: Any, flags: int = 0) -> int:
        self._arm()
        try:
            return super().send(data, flags)
        except TimeoutError:
            raise ClientTooSlow from None

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()  # sendall's timeout bounds the whole call
        try:
            super().sendall(data, flags)
        except TimeoutError:
            raise ClientTooSlow from None


class ProbeConn(TConn):  # type: ignore[misc]
    """A connection with the bytes of its next request head, read so far."""

    def __init__(self, worker: ProbeSafeWorker, *args: Any) -> None:
        super().__init__(*args)
        self.worker = worker
        self.head = bytearray()
        self.head_deadline = 0.0

    def close(self, graceful: bool = False) -> None:
        if graceful:
            self.worker.linger(self)
        else:
            _close(self.sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the client
    (Linux SIOCOUTQ, which is TIOCOUTQ); 0 where that cannot be known."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, AttributeError):
        return 0
    return int(struct.unpack("i", raw)[0])


def head_complete(data: bytes | bytearray) -> bool:
    """The parser can finish with these bytes: the head ends, or it holds a
    bare LF, which gunicorn refuses at once without reading on."""
    return b"\r\n\r\n" in data or data.count(b"\n") != data.count(b"\r\n")


def has_body(req: Any) -> bool:
    for name, value in getattr(req, "headers", ()):
        if name == "TRANSFER-ENCODING" or (name == "CONTENT-LENGTH" and value.strip() != "0"):
            return True
    return False


class ProbeSafeWorker(ThreadWorker):  # type: ignore[misc]
    """gthread with request heads read on the main loop (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Insertion order is deadline order: every entry gets the same delay.
        self.heads: dict[ProbeConn, None] = {}
        self.lingering: dict[socket.socket, float] = {}
        # What was closed for being slow, told in one line a minute at most.
        self.closed = {"head timeout": 0, "evicted": 0, "unread answers": 0}
        self.told = time.monotonic()

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.is_ssl:
            raise RuntimeError("ProbeSafeWorker reads plain HTTP only (no TLS)")
        super().check_config(cfg, log)

    # -- accepting, and the head stage (main loop) ---------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            raw, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Out of descriptors: free the oldest idle one and go on.
                self.log.warning("out of file descriptors: %s", exc)
                if not self.evict_oldest():
                    time.sleep(0.1)  # nothing idle to close: let threads finish
                return
            raise
        sock = DeadlineSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        with contextlib.suppress(OSError):
            # A response fits in the kernel's buffer (up to net.core.wmem_max),
            # so a client that does not read seldom holds a thread at all.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.nr_conns += 1
        conn = ProbeConn(self, self.cfg, sock, addr, listener.getsockname())
        while self.nr_conns >= self.worker_connections and self.evict_oldest():
            pass
        self.enqueue_req(conn)

    def enqueue_req(self, conn: ProbeConn) -> None:
        """Every way to a pool thread goes through here (a new connection, a
        kept-alive one that became readable, one with pipelined bytes): with
        a whole head it goes on, otherwise it waits for one on the poller."""
        if conn.parser is not None:
            if unsent_bytes(conn.sock) > UNSENT_MAX:
                # More requests, earlier answers unread: it would soon hold a
                # thread blocked in a send. (HTTP lets a server close here.)
                self.closed["unread answers"] += 1
                self.nr_conns -= 1
                conn.close(graceful=True)
                return
            conn.head = bytearray(conn.parser.unreader.take_buffered())
        if head_complete(conn.head):
            self.dispatch(conn)
            return
        conn.sock.setblocking(False)
        conn.head_deadline = time.monotonic() + HEAD_TIMEOUT
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.read_head, conn))
        self.heads[conn] = None

    def dispatch(self, conn: ProbeConn) -> None:
        conn.data_ready = True  # no 5 s wait for a first byte in the thread
        super().enqueue_req(conn)

    def read_head(self, conn: ProbeConn, _sock: Any) -> None:
        try:
            data = conn.sock.recv(HEAD_MAX_BYTES + 1 - len(conn.head))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop_head(conn)
            return
        conn.head += data
        if head_complete(conn.head):
            self.heads.pop(conn, None)
            self.unregister(conn.sock)
            self.dispatch(conn)
        elif len(conn.head) > HEAD_MAX_BYTES:
            with contextlib.suppress(OSError):
                conn.sock.send(_TOO_LARGE)
            self.drop_head(conn)

    def drop_head(self, conn: ProbeConn) -> None:
        self.heads.pop(conn, None)
        self.unregister(conn.sock)
        self.nr_conns -= 1
        _close(conn.sock)

    def evict_oldest(self) -> bool:
        """Closes the connection idle longest (waiting for its head, or kept
        alive); False when every connection is busy in a thread."""
        head = next(iter(self.heads), None)
        kept = self.keepalived_conns[0] if self.keepalived_conns else None
        if head is None and kept is None:
            return False
        self.closed["evicted"] += 1
        head_since = head.head_deadline - HEAD_TIMEOUT if head is not None else math.inf
        kept_since = kept.timeout - self.cfg.keepalive if kept is not None else math.inf
        if head is not None and head_since <= kept_since:
            self.drop_head(head)
        elif kept is not None:
            self.keepalived_conns.popleft()
            self.unregister(kept.sock)
            self.nr_conns -= 1
            _close(kept.sock)
        return True

    def unregister(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)

    def murder_pending(self) -> None:
        """Called by the main loop once a second at least: the timeouts."""
        super().murder_pending()
        now = time.monotonic()
        while self.heads:
            conn = next(iter(self.heads))
            if conn.head_deadline > now:
                break
            self.closed["head timeout"] += 1
            self.drop_head(conn)
        while self.lingering:
            sock, deadline = next(iter(self.lingering.items()))
            if deadline > now:
                break
            self.end_linger(sock)
        if now - self.told >= 60 and any(self.closed.values()):
            told = ", ".join(f"{n} {why}" for why, n in self.closed.items() if n)
            level = logging.WARNING if self.closed["evicted"] else logging.INFO
            self.log.log(level, "slow clients closed in the last minute: %s", told)
            self.closed = dict.fromkeys(self.closed, 0)
            self.told = now

    # -- the closing linger (main loop) --------------------------------------

    def linger(self, conn: ProbeConn) -> None:
        """gunicorn's close_graceful without blocking: FIN, then read what the
        client still sends until it closes, LINGER_TIMEOUT at most."""
        sock = conn.sock
        while len(self.lingering) >= self.worker_connections:
            self.end_linger(next(iter(self.lingering)))
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
            self.poller.register(sock, selectors.EVENT_READ, partial(self.drain, [0]))
        except (OSError, KeyError, ValueError):
            # never raises: gunicorn has already counted the connection out
            self.end_linger(sock)
            return
        self.lingering[sock] = time.monotonic() + LINGER_TIMEOUT

    def drain(self, drained: list[int], sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            drained[0] += len(data)
            if not data or drained[0] >= LINGER_MAX_BYTES:
                self.end_linger(sock)
                return

    def end_linger(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        self.unregister(sock)
        _close(sock)

    # -- in a pool thread ----------------------------------------------------

    def handle(self, conn: ProbeConn) -> Any:
        if conn.head:
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(conn.head))
            conn.head = bytearray()
        return super().handle(conn)

    def handle_request(self, req: Any, conn: ProbeConn) -> Any:
        # A body is never read here, nor drained: the answer says
        # "Connection: close" and the connection closes after it.
        if has_body(req):
            req.force_close()
        return super().handle_request(req, conn)


def worker_connections() -> int:
    """WORKER_CONNECTIONS, or less when the descriptor limit is lower (each
    connection may linger one more descriptor after it is closed)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return WORKER_CONNECTIONS
    return max(HTTP_THREADS + 8, min(WORKER_CONNECTIONS, (soft - 64) // 2))
