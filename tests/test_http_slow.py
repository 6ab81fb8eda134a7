"""The HTTP role under slow and idle clients: a real gunicorn (`stui-sessions
http`, one worker, the hardest case) keeps answering /healthz and /readyz
within a probe's 1 s deadline while clients that send half a request and go
quiet, idle and kept-alive connections, stalled bodies and clients that never
close hold connections; and the server closes each of them after a bounded
time (workers/http.py, ProbeSafeWorker)."""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from tests.test_http_metrics import HttpProcess
from workers.http import gunicorn_options
from workers.http_worker import (
    HEAD_TIMEOUT,
    HTTP_THREADS,
    KEEPALIVE,
    LINGER_TIMEOUT,
    WORKER_CONNECTIONS,
    ProbeSafeWorker,
    has_body,
    head_complete,
)
from workers.launchers.redis import EmbeddedRedis

# A Kubernetes probe's deadline: the liveness bound under test, used as the
# client's socket timeout (never measured against a clock).
PROBE_TIMEOUT = 1.0
# How long a held connection may take to be closed by the server: its own
# timeout, the main loop's once-a-second sweep, and room for a loaded machine.
CLOSE_BOUND = max(HEAD_TIMEOUT, KEEPALIVE) + LINGER_TIMEOUT + 5.0


def probe(port: int, path: str) -> tuple[int, bytes]:
    """One kubelet-style probe: a new connection, 1 s for the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def probes_answer(port: int, rounds: int = 6, pause: float = 0.5) -> None:
    """/healthz and /readyz answer 200 within PROBE_TIMEOUT, several times
    over a few seconds (a timeout fails the test with socket.timeout)."""
    for _ in range(rounds):
        assert probe(port, "/healthz") == (200, b"ok\n")
        assert probe(port, "/readyz") == (200, b"ready\n")
        time.sleep(pause)


@pytest.fixture
def opened() -> Iterator[Callable[..., socket.socket]]:
    """Client connections, all closed at the end whatever happens."""
    held: list[socket.socket] = []

    def open_one(port: int, first: bytes = b"") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT)
        held.append(sock)
        if first:
            sock.sendall(first)
        return sock

    yield open_one
    for sock in held:
        sock.close()


def closed_by_server(sock: socket.socket, timeout: float = CLOSE_BOUND) -> bytes:
    """Waits (at most `timeout`) for the server to close; all it sent first."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return received


@pytest.fixture
def http_server(tmp_path: Path, redis_server: EmbeddedRedis) -> Iterator[HttpProcess]:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics), "STUI_HEARTBEAT_MAX_AGE": "0"}
    server = HttpProcess(redis_server.url, env, workers=1)
    yield server
    assert server.stop() == 0, server.log.read_text()
    log = server.log.read_text()
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log, log


HALF_REQUESTS: dict[str, Callable[[], bytes]] = {
    "half request line": lambda: b"GET /heal",
    "half the headers": lambda: b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: ",
    "nothing at all": lambda: b"",
    "stalled body": lambda: (
        b"POST /healthz HTTP/1.1\r\nHost: slow\r\nContent-Length: 99999\r\n\r\nx"
    ),
    "half a pipelined request": lambda: (
        b"GET /healthz HTTP/1.1\r\nHost: slow\r\n\r\nGET /readyz HTTP/1.1\r\nHo"
    ),
}


@pytest.mark.integration
def test_probes_answer_while_slow_and_idle_clients_hold_the_port(
    http_server: HttpProcess, opened: Callable[..., socket.socket]
) -> None:
    port = http_server.port
    # Four times the worker's threads of every kind: with gunicorn's sync or
    # gthread worker, as many half requests as threads (1, or HTTP_THREADS)
    # were enough to keep every probe out.
    slow = {
        kind: [opened(port, make()) for _ in range(4 * HTTP_THREADS)]
        for kind, make in HALF_REQUESTS.items()
    }
    # Clients that get their answer and never close: the server's closing
    # linger (FIN, then waiting for theirs) must not stall anything.
    never_close = [
        opened(port, b"GET /healthz HTTP/1.1\r\nHost: rude\r\nConnection: close\r\n\r\n")
        for _ in range(4 * HTTP_THREADS)
    ]
    # Idle keep-alive connections, each after one answered request.
    kept_alive = []
    for _ in range(64):
        sock = opened(port, b"GET /healthz HTTP/1.1\r\nHost: idle\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok\n"):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        kept_alive.append(sock)

    probes_answer(port)

    # Every one of them is let go after a bounded time.
    for kind, socks in slow.items():
        for sock in socks:
            received = closed_by_server(sock)
            if kind == "stalled body":  # answered, and closed: the body is never read
                assert received.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), received
                assert b"\r\nConnection: close\r\n" in received, received
            elif kind == "half a pipelined request":  # the whole first one is answered
                assert received.count(b"HTTP/1.1 200 OK\r\n") == 1, received
            else:
                assert received == b"", (kind, received)
    for sock in never_close:
        assert closed_by_server(sock).startswith(b"HTTP/1.1 200 OK\r\n")
    for sock in kept_alive:
        assert closed_by_server(sock) == b""
    probes_answer(port, rounds=1)


@pytest.mark.integration
def test_more_half_requests_than_connection_slots_still_let_probes_in(
    http_server: HttpProcess, opened: Callable[..., socket.socket]
) -> None:
    """At worker_connections, a new connection closes the one idle longest
    instead of waiting in the listen backlog behind the slow ones."""
    wanted = WORKER_CONNECTIONS + 64
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * wanted + 64:
        pytest.skip(f"SKIPPED LOUDLY: descriptor limit {soft} too low for {wanted} clients")
    port = http_server.port
    slow = [opened(port, b"GET /healthz HTTP/1.1\r\nHost: slow\r\n") for _ in range(wanted)]
    probes_answer(port, rounds=4)
    for sock in slow:
        assert closed_by_server(sock) == b""
    probes_answer(port, rounds=1)


def test_a_head_goes_to_a_thread_only_once_the_parser_can_finish_it() -> None:
    assert not head_complete(b"")
    assert not head_complete(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert head_complete(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head_complete(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /rea")
    # a bare LF: gunicorn answers 400 at once, without reading on
    assert head_complete(b"GET /healthz HTTP/1.1\nHost")


def test_only_requests_with_a_body_close_the_connection() -> None:
    class Req:
        def __init__(self, *headers: tuple[str, str]) -> None:
            self.headers = list(headers)

    assert not has_body(Req(("HOST", "x")))
    assert not has_body(Req(("CONTENT-LENGTH", "0")))
    assert has_body(Req(("CONTENT-LENGTH", "12")))
    assert has_body(Req(("TRANSFER-ENCODING", "chunked")))


def test_the_worker_settings_reach_gunicorn(tmp_path: Path) -> None:
    options = gunicorn_options(Settings(), tmp_path)
    assert options["worker_class"] is ProbeSafeWorker
    assert options["threads"] == HTTP_THREADS
    assert options["keepalive"] == KEEPALIVE
    assert HTTP_THREADS + 8 <= options["worker_connections"] <= WORKER_CONNECTIONS
