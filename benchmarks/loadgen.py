"""The load generator: one thread, REQ or DEALER clients, N requests in flight.

REQ: N REQ sockets polled by one thread, each with one request outstanding.
DEALER: one socket that sends [b"", body] and keeps N requests outstanding,
matching replies to requests by their id (a reply starts with {"id":"...").

Every drive is bounded by a request count (the bodies it is given) and by
time: it stops sending at `seconds`, then waits at most `drain` seconds for
outstanding replies. Bodies are built before the clock starts, so the load
generator's own cost per request is a send, a receive and a clock read.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import zmq

Kind = Literal["REQ", "DEALER"]
Body = tuple[bytes, bytes]  # (request id, request bytes)

_ID_AT = len(b'{"id":"')
_SUCCESS = b'"status":"success"'


@dataclass
class Sample:
    ok: int = 0
    errors: int = 0
    lost: int = 0  # sent, never answered within the drain time
    elapsed: float = 0.0  # first send to last reply, seconds
    latencies_ns: list[int] = field(default_factory=list)
    error_sample: str = ""
    replies: list[bytes] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.ok + self.errors

    @property
    def throughput(self) -> float:
        return self.answered / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def _is_success(reply: bytes) -> bool:
    end = reply.find(b'"', _ID_AT)
    return end > 0 and reply.startswith(_SUCCESS, end + 2)


def _reply_id(reply: bytes) -> bytes:
    return reply[_ID_AT : reply.find(b'"', _ID_AT)]


class LoadGen:
    """Sockets stay open across drives (warm-up, then the measured drive)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, kind: Kind,
                 inflight: int) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.kind = kind
        self.inflight = inflight
        self.socks: list[zmq.Socket[bytes]] = []
        self._open()

    def _open(self) -> None:
        count = self.inflight if self.kind == "REQ" else 1
        stype = zmq.REQ if self.kind == "REQ" else zmq.DEALER
        for _ in range(count):
            sock = self.ctx.socket(stype)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(self.endpoint)
            self.socks.append(sock)

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.socks = []

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drive(self, bodies: Sequence[Body], seconds: float, drain: float = 10.0,
              keep_replies: bool = False) -> Sample:
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if self.kind == "REQ":
                sample = self._drive_req(bodies, seconds, drain, keep_replies)
            else:
                sample = self._drive_dealer(bodies, seconds, drain, keep_replies)
        finally:
            if gc_was_enabled:
                gc.enable()
        if sample.lost:
            # A REQ socket with an unanswered request cannot send again, and a
            # late reply would confuse the next drive: start over.
            self.close()
            self._open()
        return sample

    def _record(self, sample: Sample, reply: bytes, latency: int, keep: bool) -> None:
        sample.latencies_ns.append(latency)
        if _is_success(reply):
            sample.ok += 1
        else:
            sample.errors += 1
            if not sample.error_sample:
                sample.error_sample = reply[:300].decode("utf-8", "replace")
        if keep:
            sample.replies.append(reply)

    def _drive_req(self, bodies: Sequence[Body], seconds: float, drain: float,
                   keep: bool) -> Sample:
        sample = Sample()
        poller = zmq.Poller()
        index = {sock: i for i, sock in enumerate(self.socks)}
        sent_at = [0] * len(self.socks)
        clock = time.perf_counter_ns
        start = clock()
        stop_sending = start + int(seconds * 1e9)
        give_up = stop_sending + int(drain * 1e9)
        nxt = outstanding = 0
        for i, sock in enumerate(self.socks):
            if nxt < len(bodies):
                poller.register(sock, zmq.POLLIN)
                sent_at[i] = clock()
                sock.send(bodies[nxt][1])
                nxt += 1
                outstanding += 1
        last = start
        while outstanding and clock() < give_up:
            for sock, _ in poller.poll(100):
                reply = sock.recv()
                last = clock()
                i = index[sock]
                outstanding -= 1
                self._record(sample, reply, last - sent_at[i], keep)
                if nxt < len(bodies) and last < stop_sending:
                    sent_at[i] = clock()
                    sock.send(bodies[nxt][1])
                    nxt += 1
                    outstanding += 1
        sample.lost = outstanding
        sample.elapsed = (last - start) / 1e9
        return sample

    def _drive_dealer(self, bodies: Sequence[Body], seconds: float, drain: float,
                      keep: bool) -> Sample:
        sample = Sample()
        sock = self.socks[0]
        sent: dict[bytes, int] = {}
        clock = time.perf_counter_ns
        start = clock()
        stop_sending = start + int(seconds * 1e9)
        give_up = stop_sending + int(drain * 1e9)
        nxt = 0
        while nxt < len(bodies) and len(sent) < self.inflight:
            rid, body = bodies[nxt]
            sent[rid] = clock()
            sock.send_multipart([b"", body])
            nxt += 1
        last = start
        while sent and clock() < give_up:
            if not sock.poll(100, zmq.POLLIN):
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                last = clock()
                reply = frames[-1]
                t0 = sent.pop(_reply_id(reply), None)
                if t0 is None:
                    continue  # a late reply from an earlier drive
                self._record(sample, reply, last - t0, keep)
                if nxt < len(bodies) and last < stop_sending:
                    rid, body = bodies[nxt]
                    sent[rid] = clock()
                    sock.send_multipart([b"", body])
                    nxt += 1
        sample.lost = len(sent)
        sample.elapsed = (last - start) / 1e9
        return sample
