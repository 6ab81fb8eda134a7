"""The front worker decodes the next batch while a batch is at Redis.

In-process FrontWorker on a real ROUTER over TCP, a real redis-server, and a
Store wrapped to record when each batch is written and when it is read: the
order of those events against the dispatcher's planning is the overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import pytest
import redis
import zmq
from prometheus_client import CollectorRegistry

from service import codec
from service import store as store_module
from service.dispatch import Dispatcher
from service.metrics import FrontMetrics
from service.settings import Settings
from service.store import Call, Flight, Store
from workers.front import FrontWorker
from workers.launchers.process import free_port
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

BATCH = 4


class RecordingFlight:
    def __init__(self, flight: Flight, events: list[str]) -> None:
        self.flight, self.events = flight, events

    def results(self) -> list[Any]:
        self.events.append("read")
        return self.flight.results()


class RecordingStore(Store):
    """A Store that notes each write and each read of a batch."""

    def __init__(self, client: redis.Redis, events: list[str]) -> None:
        super().__init__(client)
        self.events = events

    def send(self, calls: Sequence[Call]) -> Flight:
        self.events.append("send")
        return RecordingFlight(super().send(calls), self.events)  # type: ignore[return-value]


Rig = tuple[FrontWorker, zmq.Socket[bytes], zmq.Socket[bytes], list[str]]


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Settings of the worker under test, beside batch_max (a test may override)."""
    return {}


@pytest.fixture
def worker_and_peer(
    redis_server: EmbeddedRedis, redis_client: redis.Redis, overrides: dict[str, Any]
) -> Iterator[Rig]:
    events: list[str] = []
    settings = Settings(redis_url=redis_server.url, batch_max=BATCH, **overrides)
    store = RecordingStore(redis.Redis.from_url(redis_server.url), events)
    store.load_scripts()
    dispatcher = Dispatcher(settings, store)
    plan = dispatcher._plan

    def recorded_plan(*args: Any) -> Any:
        events.append("plan")
        return plan(*args)

    dispatcher._plan = recorded_plan  # type: ignore[method-assign,assignment]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    worker = FrontWorker(settings, dispatcher, endpoint, context=ctx)
    sock = worker.open_socket()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(endpoint)
    try:
        yield worker, sock, peer, events
    finally:
        peer.close(0)
        sock.close(0)
        ctx.term()


def _create(worker: FrontWorker, sock: zmq.Socket[bytes], peer: zmq.Socket[bytes]) -> str:
    peer.send_multipart([b"", _body("c", "create_session", client_id="overlap")])
    assert sock.poll(5000)
    worker.serve_available(sock)
    return str(_replies(peer, 1)[0]["result"]["session_id"])


def _body(rid: str, command: str, **params: Any) -> bytes:
    return codec.dumps({"id": rid, "command": command, "parameters": params})


def _queue(sock: zmq.Socket[bytes], peer: zmq.Socket[bytes], bodies: list[bytes]) -> None:
    """Send every body, then wait until the worker's socket holds them all."""
    for b in bodies:
        peer.send_multipart([b"", b])
    deadline = time.monotonic() + 5
    # ZMQ_EVENTS says only "at least one"; wait a little for the rest of a
    # burst that a loopback TCP connection delivers within microseconds.
    while not sock.poll(50) and time.monotonic() < deadline:
        pass
    time.sleep(0.2)


def _replies(peer: zmq.Socket[bytes], count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < count and peer.poll(5000):
        frames = peer.recv_multipart()
        out.append(codec.loads(frames[-1]))
    return out


def _evaluations(sid: str, count: int) -> list[bytes]:
    return [
        _body(f"e{i}", "record_evaluation", session_id=sid, code=f"{i} printString")
        for i in range(count)
    ]


def _burst(rig: Rig, count: int = 2 * BATCH) -> str:
    """A new session, then `count` evaluations of it queued at the worker's
    socket, with the events recorded so far cleared; the session's id."""
    worker, sock, peer, events = rig
    sid = _create(worker, sock, peer)
    events.clear()
    _queue(sock, peer, _evaluations(sid, count))
    return sid


def test_next_batch_is_planned_while_this_one_is_at_redis(
    worker_and_peer: Rig,
) -> None:
    worker, sock, peer, events = worker_and_peer
    sid = _burst(worker_and_peer)
    worker.serve_available(sock)
    # The second batch was taken and planned between the first one's write
    # and its read, and nothing of it was sent yet.
    assert events == ["plan"] * BATCH + ["send"] + ["plan"] * BATCH + ["read"]
    first = _replies(peer, BATCH)
    assert [r["id"] for r in first] == [f"e{i}" for i in range(BATCH)]
    worker.serve_available(sock)  # the planned batch: no decoding left to do
    assert events[-2:] == ["send", "read"] and events.count("plan") == 2 * BATCH
    second = _replies(peer, BATCH)
    # In request order, each written once, in the order the peer sent them.
    assert [r["id"] for r in second] == [f"e{i}" for i in range(BATCH, 2 * BATCH)]
    assert all(r["status"] == "success" for r in first + second)
    peer.send_multipart([b"", _body("i", "get_session_info", session_id=sid)])
    assert sock.poll(5000)
    worker.serve_available(sock)
    assert _replies(peer, 1)[0]["result"]["version"] == 1 + 2 * BATCH


def test_nothing_queued_means_no_wait_for_more(
    worker_and_peer: Rig,
) -> None:
    worker, sock, peer, events = worker_and_peer
    _burst(worker_and_peer, 2)
    worker.serve_available(sock)
    assert events == ["plan", "plan", "send", "read"]
    assert len(_replies(peer, 2)) == 2
    assert worker._next is None


def test_a_stop_answers_the_batch_planned_ahead(
    worker_and_peer: Rig,
) -> None:
    worker, sock, peer, _ = worker_and_peer
    _burst(worker_and_peer)
    worker.serve_available(sock)
    assert worker._next is not None  # taken off the socket, not answered yet
    worker.request_stop()
    worker.drain(sock)
    replies = _replies(peer, 2 * BATCH)
    assert [r["id"] for r in replies] == [f"e{i}" for i in range(2 * BATCH)]
    assert all(r["status"] == "success" for r in replies)
    assert not peer.poll(200)  # each answered once


@pytest.mark.parametrize("overrides", [{"shutdown_grace": 0}])
def test_no_grace_still_answers_what_was_taken_ahead(worker_and_peer: Rig) -> None:
    worker, sock, peer, _ = worker_and_peer
    _burst(worker_and_peer)
    worker.serve_available(sock)
    assert worker._next is not None
    worker.request_stop()
    worker.drain(sock)
    assert worker._next is None
    assert [r["id"] for r in _replies(peer, 2 * BATCH)] == [f"e{i}" for i in range(2 * BATCH)]


def test_a_stop_before_the_write_takes_nothing_ahead(worker_and_peer: Rig) -> None:
    worker, sock, peer, events = worker_and_peer
    _burst(worker_and_peer)
    worker.request_stop()
    worker.serve_available(sock)
    assert events == ["plan"] * BATCH + ["send", "read"] and worker._next is None
    assert len(_replies(peer, BATCH)) == BATCH


@pytest.mark.parametrize("overrides", [{"batch_ahead_bytes": 0}])
def test_batch_ahead_bytes_zero_turns_the_overlap_off(worker_and_peer: Rig) -> None:
    worker, sock, _peer, events = worker_and_peer
    _burst(worker_and_peer)
    worker.serve_available(sock)
    assert events == ["plan"] * BATCH + ["send", "read"] and worker._next is None


@pytest.mark.parametrize("overrides", [{"batch_ahead_bytes": 1}])
def test_the_batch_taken_ahead_is_bounded_by_batch_ahead_bytes(worker_and_peer: Rig) -> None:
    """1 byte: the batch taken ahead holds one message (always at least one),
    against BATCH for a batch taken after the wait."""
    worker, sock, _peer, _ = worker_and_peer
    _burst(worker_and_peer)
    worker.serve_available(sock)
    assert worker._next is not None and len(worker._next.envelopes) == 1


def test_a_failure_taking_ahead_leaves_the_batch_at_redis_answered(
    worker_and_peer: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, sock, peer, _ = worker_and_peer
    _burst(worker_and_peer)

    take = worker._take

    def fail_ahead(sock: zmq.Socket[bytes], max_bytes: int | None = None) -> Any:
        if max_bytes is not None:  # the take-ahead
            raise MemoryError("planning the next batch")
        return take(sock)

    monkeypatch.setattr(worker, "_take", fail_ahead)
    worker.serve_available(sock)
    assert worker._next is None
    replies = _replies(peer, BATCH)
    assert [r["id"] for r in replies] == [f"e{i}" for i in range(BATCH)]
    assert all(r["status"] == "success" for r in replies)


def test_the_in_flight_gauge_counts_the_batch_taken_ahead(worker_and_peer: Rig) -> None:
    worker, sock, _peer, _ = worker_and_peer
    registry = CollectorRegistry()
    worker.metrics = FrontMetrics(registry)
    _burst(worker_and_peer)
    worker.serve_available(sock)
    assert registry.get_sample_value("stui_sessions_requests_in_flight") == BATCH
    worker.serve_available(sock)
    assert registry.get_sample_value("stui_sessions_requests_in_flight") == 0


def test_redis_failing_mid_flight_answers_both_batches(
    worker_and_peer: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection fails while the first batch is at Redis (its replies
    unread): it answers StorageUnavailable, so does the batch planned
    meanwhile (the hold after a failure), and the worker serves again
    afterwards."""
    worker, sock, peer, _ = worker_and_peer
    sid = _burst(worker_and_peer)
    store = worker.dispatcher.store
    real_read = store_module._read
    cut: list[bool] = []

    def read_once_cut(conn: Any, calls: Sequence[Call], wait: Any) -> list[Any]:
        if not cut:
            cut.append(True)
            raise redis.ConnectionError("cut while the batch was at Redis")
        return real_read(conn, calls, wait)

    monkeypatch.setattr(store_module, "_read", read_once_cut)
    worker.serve_available(sock)
    assert worker._next is not None  # planned while the first batch was at Redis
    worker.serve_available(sock)
    replies = _replies(peer, 2 * BATCH)
    assert [r["id"] for r in replies] == [f"e{i}" for i in range(2 * BATCH)]
    assert {r.get("error_type") for r in replies} == {"StorageUnavailable"}
    assert not peer.poll(200)
    time.sleep(store.HOLD_AFTER_FAILURE + 0.1)
    peer.send_multipart([b"", _body("again", "get_session_info", session_id=sid)])
    assert sock.poll(5000)
    worker.serve_available(sock)
    assert _replies(peer, 1)[0]["status"] == "success"


def test_a_flight_reads_once_and_an_abandoned_one_disconnects(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
) -> None:
    from service.errors import StorageUnavailable
    from service.scripts import INFO

    def failing() -> Generator[None, None, list[Any]]:
        yield
        raise StorageUnavailable()

    flight = Flight(failing())
    with pytest.raises(StorageUnavailable):
        flight.results()
    with pytest.raises(RuntimeError):  # not None, as if it had no calls
        flight.results()

    client = redis.Redis.from_url(redis_server.url)
    store = Store(client)
    store.load_scripts()
    pool = client.connection_pool
    flight = store.send([Call(INFO, ["stui:nothing"], [])])
    (conn,) = pool._in_use_connections  # type: ignore[attr-defined,unused-ignore]
    flight.abandon()
    # Its reply unread, the connection must never serve another batch.
    assert not pool._in_use_connections  # type: ignore[attr-defined,unused-ignore]
    assert conn._sock is None
    assert len(store.run([Call(INFO, ["stui:nothing"], [])])) == 1
    client.close()


def test_describe_reports_batch_ahead_bytes(fake_dispatcher: Callable[..., Dispatcher]) -> None:
    """A bound on what a front holds, reported with the others."""
    d = fake_dispatcher(batch_ahead_bytes=4096)
    reply = codec.loads(d.handle([_body("d", "describe")])[0])
    assert reply["result"]["limits"]["batch_ahead_bytes"] == 4096
