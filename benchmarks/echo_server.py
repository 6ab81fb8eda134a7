"""The baseline: a ROUTER that does only what every request costs anyway.

It takes a batch off the socket exactly as workers/front.py does (wait, then
every message already queued up to the same batch limit), parses each body
with service.codec.loads and answers with service.codec.dumps of a small
success reply that holds the parsed request. Same socket options, same JSON
library, same framing; no validation, no Redis. The ratio of the front
worker's figures to this server's is what the benchmark reports.

    python -m benchmarks.echo_server --bind tcp://127.0.0.1:5556
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from types import FrameType
from typing import Any

import zmq

from service import codec

BATCH_MAX = 256  # service.settings.Settings.batch_max default
HWM = 10_000  # as workers/front.py
MAX_MSG = 40 * 1024 * 1024  # Settings.transport_max_bytes default


def _now_iso() -> str:
    ms = time.time_ns() // 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def reply_for(body: bytes) -> bytes:
    try:
        request: Any = codec.loads(body)
    except codec.JSONError:
        return codec.dumps({"id": None, "status": "error", "error": "not JSON",
                            "error_type": "InvalidRequest", "details": {},
                            "timestamp": _now_iso()})
    rid = request.get("id") if isinstance(request, dict) else None
    return codec.dumps(
        {"id": rid, "status": "success", "result": {"echo": request}, "timestamp": _now_iso()}
    )


def split(frames: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """(reply envelope, body) as FrontWorker._split with one routing frame."""
    rest = frames[1:]
    if rest and rest[0] == b"":
        envelope, rest = frames[:2], rest[1:]
    else:
        envelope = frames[:1]
    return envelope, rest[0] if len(rest) == 1 else None


class EchoServer:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.stopping = False

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.bind(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self.stopping:
                if poller.poll(100):
                    self.serve_available(sock)
        finally:
            sock.close(linger=0)
            ctx.term()

    @staticmethod
    def serve_available(sock: zmq.Socket[bytes]) -> None:
        envelopes: list[list[bytes]] = []
        bodies: list[bytes] = []
        for _ in range(BATCH_MAX):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            envelope, body = split(frames)
            if body is not None:
                envelopes.append(envelope)
                bodies.append(body)
        replies = [reply_for(body) for body in bodies]
        for envelope, reply in zip(envelopes, replies, strict=True):
            # A peer that is gone loses its reply, as with the front worker.
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart([*envelope, reply], zmq.NOBLOCK)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", required=True)
    server = EchoServer(parser.parse_args().bind)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    server.run()


if __name__ == "__main__":
    main()
