"""N front worker processes behind one endpoint.

The parent binds the public ROUTER and forwards to a DEALER on a private IPC
endpoint, which spreads requests over the workers; each worker is the same
FrontWorker, connected instead of bound. On SIGTERM the parent stops taking
new requests, tells the workers to drain, keeps relaying their replies, and
exits once they have all gone (or the grace period is over).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from service.auth import ClientKeyCache
from service.metrics import front_metrics
from service.settings import Settings
from service.store import redis_for
from workers.curve import CurveServer
from workers.front import OUTBOX_RETRY_MS, bound_peer_queues
from workers.outbox import Outbox
from workers.refresher import Refresher

log = logging.getLogger(__name__)


def _worker_main(settings_data: dict[str, Any], backend: str) -> None:
    from workers.front import FrontWorker
    from workers.runtime import build_dispatcher, configure_logging

    settings = Settings(**settings_data)
    configure_logging(settings)
    dispatcher, client_keys = build_dispatcher(settings)
    worker = FrontWorker(
        settings,
        dispatcher,
        backend,
        connect=True,
        routing_frames=2,
        client_keys=client_keys,
        forwarded_identity=True,
    )
    worker.install_signal_handlers()
    # Ctrl-C reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker.run()


class WorkerPool:
    def __init__(self, settings: Settings, endpoint: str, count: int) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.count = count
        self.stopping = False
        self._dir = tempfile.mkdtemp(prefix="stui-front-")
        self.backend = f"ipc://{Path(self._dir) / 'backend.sock'}"
        self._mp = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.curve: CurveServer | None = None
        self._held: list[bytes] | None = None  # a request no worker could take yet
        self.outbox: Outbox | None = None  # replies the public socket could not take yet
        self._restart_at: dict[int, float] = {}
        self._started: dict[int, float] = {}
        self._failures = 0

    def _spawn(self) -> BaseProcess:
        proc = self._mp.Process(
            target=_worker_main,
            args=(self.settings.for_child_process(), self.backend),
            daemon=False,
        )
        proc.start()
        return proc

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> None:
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        # Every worker may answer one peer: its queue has room for all of them.
        bound_peer_queues(front, self.settings, peers_per_pipe=self.count)
        self.curve = self._curve(ctx)
        if self.curve is not None:
            self.curve.secure(front)
        front.bind(self.endpoint)
        back = ctx.socket(zmq.DEALER)
        # Requests wait for a worker in its own socket's queue (peer_recv_queue
        # each side of the pipe); when every worker's is full this process
        # stops reading the public socket, so the peers' queues fill and TCP
        # pushes back: nothing is dropped and nothing piles up here.
        back.setsockopt(zmq.SNDHWM, self.settings.peer_recv_queue)
        back.setsockopt(zmq.RCVHWM, self.settings.peer_send_queue * self.count)
        back.bind(self.backend)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.procs = [self._spawn() for _ in range(self.count)]
        self._started = dict.fromkeys(range(self.count), time.monotonic())
        log.info("%d front workers serving on %s", self.count, self.endpoint)
        self.outbox = Outbox(front, self.settings.peer_outbox_budget, self._dropped)
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        try:
            while not self.stopping:
                for sock, _ in poller.poll(OUTBOX_RETRY_MS if self.outbox else 100):
                    self._relay(sock, back if sock is front else front, sock is front)
                self.outbox.flush()
                self._gate(front, back, poller)
                self._replace_dead()
            # Requests already queued here are in flight for their clients:
            # pass them on until the front has been quiet for a moment.
            self._drain_front(front, back, poller)
            # Stop taking requests; keep relaying replies while workers drain.
            poller.register(front, 0)
            for proc in self.procs:
                if proc.pid is not None and proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.settings.shutdown_grace + 1
            while time.monotonic() < deadline and any(p.is_alive() for p in self.procs):
                if poller.poll(OUTBOX_RETRY_MS if self.outbox else 50):
                    self._relay(back, front, False)
                self.outbox.flush()
            while back.poll(0):
                self._relay(back, front, False)
            self.outbox.flush()
        finally:
            for proc in self.procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(1)
            front.close(linger=1000)
            back.close(linger=0)
            if self.curve is not None:
                self.curve.stop()
            ctx.term()
            shutil.rmtree(self._dir, ignore_errors=True)

    def _drain_front(
        self, front: zmq.Socket[bytes], back: zmq.Socket[bytes], poller: zmq.Poller
    ) -> None:
        deadline = time.monotonic() + self.settings.shutdown_grace / 2
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.2:
            for sock, _ in poller.poll(20):
                if sock is front:
                    quiet_since = time.monotonic()
                self._relay(sock, back if sock is front else front, sock is front)
            self._gate(front, back, poller)
            if self._held is not None:
                quiet_since = time.monotonic()

    def _gate(self, front: zmq.Socket[bytes], back: zmq.Socket[bytes], poller: zmq.Poller) -> None:
        """Read the public socket only while a worker can take more."""
        if self._held is not None and back.poll(0, zmq.POLLOUT):
            self._forward(back)
        poller.register(front, 0 if self._held is not None else zmq.POLLIN)

    def _curve(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> CurveServer | None:
        """With CURVE on, this process does the handshakes (its own key cache
        answers ZAP) and forwards each client's public key to the workers."""
        if not self.settings.curve:
            return None
        assert self.settings.redis_configured
        cache = ClientKeyCache(redis_for(self.settings))
        Refresher([cache.refresh], self.settings.policy_refresh).start()
        return CurveServer(ctx, self.settings, cache).start()

    def _relay(self, src: zmq.Socket[bytes], dst: zmq.Socket[bytes], inbound: bool) -> None:
        """Inbound, each request goes on with what identifies its peer in the
        frame after the routing id: with CURVE its public key, else its
        network address. A request no worker can take is held (and the
        public socket no longer read) until one can. Outbound, a reply to a
        peer that does not read is dropped, as a single worker does."""
        for _ in range(1000):
            if inbound and self._held is not None:
                return
            try:
                if inbound:
                    parts = src.recv_multipart(zmq.NOBLOCK, copy=False)
                    name = "User-Id" if self.curve is not None else "Peer-Address"
                    peer = _peer(parts[-1], name).encode("ascii", "replace")
                    frames = [peer, *(p.bytes for p in parts)]
                else:
                    frames = src.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if inbound:
                self._held = frames
                self._forward(dst)
                continue
            assert self.outbox is not None
            self.outbox.send(frames)

    def _dropped(self, reason: str) -> None:
        metrics = front_metrics(self.settings)  # this process's own: only drops are counted
        if metrics is not None:
            metrics.reply_dropped(reason)

    def _forward(self, back: zmq.Socket[bytes]) -> None:
        assert self._held is not None
        try:
            back.send_multipart(self._held, zmq.NOBLOCK)
        except zmq.Again:
            return  # every worker's queue is full: keep it
        self._held = None

    def _replace_dead(self) -> None:
        """Restart a dead worker, backing off while workers die young (one that
        cannot start must not turn into a fork loop)."""
        now = time.monotonic()
        for n, proc in enumerate(self.procs):
            if proc.is_alive():
                continue
            if n not in self._restart_at:
                lived = now - self._started.get(n, now)
                self._failures = 0 if lived > 10 else self._failures + 1
                delay = min(30.0, 0.5 * 2 ** min(self._failures, 6)) if self._failures else 0.0
                self._restart_at[n] = now + delay
                log.error(
                    "front worker %s exited with %s; restarting in %.1f s",
                    proc.pid,
                    proc.exitcode,
                    delay,
                )
            if now >= self._restart_at[n]:
                del self._restart_at[n]
                proc.join(0)
                self.procs[n] = self._spawn()
                self._started[n] = now


def _peer(frame: zmq.Frame, name: str) -> str:
    try:
        return str(frame.get(name))
    except zmq.ZMQError:
        return ""
