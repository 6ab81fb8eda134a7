"""Soak: one front worker under a steady, mixed workload for minutes. Does it leak?

    .venv/bin/python -m benchmarks.soak                # 10 min; writes docs/soak.md and
                                                       # benchmarks/results/soak.json
    .venv/bin/python -m benchmarks.soak --minutes 30
    .venv/bin/python -m benchmarks.soak --quick        # ~30 s; benchmarks/results/quick/soak.json
    .venv/bin/python -m benchmarks.soak --seconds 5 --out /tmp/soak.json   # smoke test

Starts a private redis-server (no persistence, free port) and one real front
worker process (`python -m workers.cli front --workers 1`), then drives it
with client threads, each using the project's Client at a bounded request
rate. The workload mixes every kind of request a terminal IDE sends (sessions
created, updated, saved and loaded, evaluations recorded, objects registered
and released, sessions listed and closed, some left to expire) with
deliberately bad requests, whose error replies are expected and counted apart.

Every ~10 s it samples the front worker's RSS and open file descriptors
(psutil) and Redis' used_memory, and prints a line. Only quick and smoke runs
write under benchmarks/results/quick/ (or --out); only a full run writes
docs/soak.md.

Exit status: 0 when there was no unexpected error (a reply other than the one
the request was built to get, a request left without a reply, an ERROR line in
the front's log) and the front's descriptor count did not grow by more than
--fd-margin; 1 otherwise; 2 when redis-server is missing (psutil, from the
test or bench extra, is needed to import this module at all).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import zmq

from benchmarks import machine
from benchmarks.common import template, template_parts
from benchmarks.servers import REPO, wait_answering
from workers.client import Client, NoReply
from workers.launchers.process import free_port
from workers.launchers.redis import EmbeddedRedis, RedisNotFound, find_redis_server

RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "soak.md"

# The server's own default: a client's live sessions, inactive ones included.
MAX_SESSIONS_PER_CLIENT = 5
SESSION_TIMEOUT = 1800  # s: tracked sessions never expire during a run
ABANDONED_TIMEOUT = (2, 6)  # s: sessions left to expire, to exercise expiry
TRACKED_PER_CLIENT = 3  # leaves room for one abandoned session under the cap
OBJECT_IDS = [f"obj-{i}" for i in range(16)]
REOPEN_EVERY = 400  # requests: a client disconnects and connects again
UNEXPECTED_SAMPLES = 20  # first unexpected replies kept for the report


@dataclass(frozen=True)
class Config:
    seconds: float
    threads: int
    rate: float  # requests per second, all threads together
    clients_per_thread: int
    sample_every: float
    fd_margin: int
    seed: int


@dataclass
class Tally:
    """One thread's counts; merged at the end (no lock on the request path)."""

    requests: int = 0
    ok: int = 0
    by_op: Counter[str] = field(default_factory=Counter)
    expected_errors: Counter[str] = field(default_factory=Counter)  # code -> count
    unexpected: Counter[str] = field(default_factory=Counter)  # "op: outcome" -> count
    unexpected_samples: list[str] = field(default_factory=list)
    no_reply: int = 0
    client_retries: int = 0
    client_timeouts: int = 0
    client_unavailable: int = 0
    reconnects: int = 0

    def merge(self, other: Tally) -> None:
        for name in ("requests", "ok", "no_reply", "client_retries", "client_timeouts",
                     "client_unavailable", "reconnects"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.by_op.update(other.by_op)
        self.expected_errors.update(other.expected_errors)
        self.unexpected.update(other.unexpected)
        room = UNEXPECTED_SAMPLES - len(self.unexpected_samples)
        self.unexpected_samples += other.unexpected_samples[:max(room, 0)]


@dataclass
class Session:
    session_id: str
    client_id: str
    parked: bool = False  # closed with save_state: inactive until restored
    objects: set[str] = field(default_factory=set)


@dataclass
class ClientState:
    client_id: str
    sessions: list[Session] = field(default_factory=list)
    abandoned_until: deque[float] = field(default_factory=deque)  # monotonic, with margin

    def live(self, now: float) -> int:
        while self.abandoned_until and self.abandoned_until[0] < now:
            self.abandoned_until.popleft()
        return len(self.sessions) + len(self.abandoned_until)


class Actor:
    """One thread: a few client ids, their sessions, a paced request loop."""

    def __init__(self, index: int, endpoint: str, ctx: zmq.Context[zmq.Socket[bytes]],
                 cfg: Config, stop: threading.Event) -> None:
        self.index = index
        self.endpoint = endpoint
        self.ctx = ctx
        self.cfg = cfg
        self.stop = stop
        self.rnd = random.Random(cfg.seed * 1000 + index)
        self.clients = [ClientState(f"soak-{index}-{k}") for k in range(cfg.clients_per_thread)]
        self.closed_ids: deque[str] = deque(maxlen=32)  # deleted sessions, for bad requests
        self.tally = Tally()
        self.client = self._new_client()
        self.crash: str | None = None

    def _new_client(self) -> Client:
        # Timeout and retries as an interactive client would choose them; a
        # retried timeout is counted (client_timeouts), only NoReply is an error.
        return Client(self.endpoint, timeout=5.0, retries=2, backoff=0.2, context=self.ctx)

    def _reconnect(self) -> None:
        """Close the socket and open a new one: the front sees a peer leave and
        another arrive, which is where descriptors would leak."""
        self._fold_stats()
        self.client.close()
        self.client = self._new_client()
        self.tally.reconnects += 1

    def _fold_stats(self) -> None:
        s = self.client.stats
        self.tally.client_retries += s.retries
        self.tally.client_timeouts += s.timeouts
        self.tally.client_unavailable += s.unavailable
        s.retries = s.timeouts = s.unavailable = 0

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - reported as a failure of the run, not lost
            self.crash = repr(exc)
        finally:
            self._fold_stats()
            self.client.close()

    def _loop(self) -> None:
        interval = self.cfg.threads / self.cfg.rate
        next_at = time.monotonic()
        ops = list(WEIGHTS)
        weights = [WEIGHTS[op] for op in ops]
        since_reconnect = 0
        while not self.stop.is_set():
            now = time.monotonic()
            if next_at > now:
                self.stop.wait(next_at - now)
                continue
            # Falling behind (a slow reply) does not turn into a burst later.
            next_at = max(next_at + interval, now - 1.0)
            before = self.tally.requests
            getattr(self, "op_" + self.rnd.choices(ops, weights)[0])()
            since_reconnect += self.tally.requests - before
            if since_reconnect >= REOPEN_EVERY:
                self._reconnect()
                since_reconnect = 0

    def do(self, op: str, command: str, params: dict[str, Any],
           expect: str = "ok", raw: bytes | None = None) -> dict[str, Any] | None:
        """One request; its result when it succeeded as intended, else None.
        `expect`: "ok", or the error code a deliberately bad request must get."""
        self.tally.requests += 1
        self.tally.by_op[op] += 1
        try:
            reply = self.client.send_raw(raw) if raw is not None else self.client.request(
                command, params)
        except NoReply:
            self.tally.no_reply += 1
            self._unexpected(op, "NoReply", "")
            return None
        code = Client.error_code(reply) or "ok"
        if code != expect:
            self._unexpected(op, code, json.dumps(reply)[:300])
            return None
        if code != "ok":
            self.tally.expected_errors[code] += 1
            return None
        self.tally.ok += 1
        return Client.result(reply)

    def _unexpected(self, op: str, outcome: str, detail: str) -> None:
        self.tally.unexpected[f"{op}: {outcome}"] += 1
        if len(self.tally.unexpected_samples) < UNEXPECTED_SAMPLES:
            self.tally.unexpected_samples.append(f"{op}: {outcome} {detail}")

    # -- choosing what to act on ------------------------------------------------

    def _any_session(self, parked: bool = False) -> Session | None:
        found = [s for c in self.clients for s in c.sessions if s.parked == parked]
        return self.rnd.choice(found) if found else None

    def _session(self) -> Session | None:
        """A live (not parked) session, creating one when there is none."""
        s = self._any_session()
        if s is None:
            self.op_create()
            s = self._any_session()
        return s

    def _ref(self, s: Session) -> dict[str, Any]:
        return {"session_id": s.session_id, "client_id": s.client_id}

    def _text(self, low: int, high: int) -> str:
        return "".join(self.rnd.choices(string.ascii_letters + " ", k=self.rnd.randint(low, high)))

    # -- the operations (names are the keys of WEIGHTS) --------------------------

    def op_create(self) -> None:
        now = time.monotonic()
        room = [c for c in self.clients
                if len(c.sessions) < TRACKED_PER_CLIENT and c.live(now) < MAX_SESSIONS_PER_CLIENT]
        if not room:
            return
        c = self.rnd.choice(room)
        info = {"editor": "stui", "pid": self.rnd.randint(1, 99999), "tty": self._text(3, 12)}
        r = self.do("create_session", "create_session",
                    {"client_id": c.client_id, "timeout": SESSION_TIMEOUT, "client_info": info})
        if r is not None:
            c.sessions.append(Session(r["session_id"], c.client_id))

    def op_abandon(self) -> None:
        """A session nobody closes: it must expire on its own (Redis TTL)."""
        now = time.monotonic()
        room = [c for c in self.clients if not c.abandoned_until
                and c.live(now) < MAX_SESSIONS_PER_CLIENT]
        if not room:
            return
        c = self.rnd.choice(room)
        timeout = self.rnd.randint(*ABANDONED_TIMEOUT)
        r = self.do("create_session (abandoned)", "create_session",
                    {"client_id": c.client_id, "timeout": timeout})
        if r is not None:
            # Counted against the cap until surely expired (clock skew margin).
            c.abandoned_until.append(time.monotonic() + timeout + 2.0)

    def op_update(self) -> None:
        s = self._session()
        if s is None:
            return
        data: dict[str, Any] = {
            f"var{self.rnd.randrange(40)}": {"n": self.rnd.random(), "text": self._text(0, 120),
                                           "items": list(range(self.rnd.randrange(8)))}
        }
        if self.rnd.random() < 0.1:
            data[f"var{self.rnd.randrange(40)}"] = None  # removes the key
        self.do("update_session_state", "update_session_state",
                {**self._ref(s), "state_data": data, "replace": self.rnd.random() < 0.02})

    def op_save_context(self) -> None:
        s = self._session()
        if s is None:
            return
        registry = {oid: {"object_id": oid, "description": self._text(5, 30)}
                    for oid in self.rnd.sample(OBJECT_IDS, self.rnd.randrange(4))}
        context: dict[str, Any] = {
            "workspace_context": {"variables": {f"v{i}": i for i in range(self.rnd.randrange(10))},
                                  "source": self._text(20, 400)},
            "inspector_state": {"history": [self._text(3, 10) for _ in range(3)],
                                "selected_object": "obj-1"},
            "object_registry": registry,
            "evaluation_history": [{"code": "3 + 4", "result": 7}],
        }
        if self.do("save_context", "save_context", {**self._ref(s), "context": context}):
            s.objects = set(registry)

    def op_load_context(self) -> None:
        s = self._session()
        if s is not None:
            self.do("load_context", "load_context", self._ref(s))

    def op_summary(self) -> None:
        s = self._session()
        if s is not None:
            self.do("get_context_summary", "get_context_summary", self._ref(s))

    def op_record(self) -> None:
        s = self._session()
        if s is None:
            return
        failed = self.rnd.random() < 0.1
        self.do("record_evaluation", "record_evaluation", {
            **self._ref(s), "code": f"Transcript show: '{self._text(1, 40)}'",
            "result": None if failed else self._text(0, 60),
            "result_type": "Error" if failed else "String", "has_error": failed,
            "execution_time": round(self.rnd.random() * 50, 3), "tool_id": "workspace"})

    def op_register(self) -> None:
        s = self._session()
        if s is None:
            return
        oid = self.rnd.choice(OBJECT_IDS)
        if self.do("register_object", "register_object", {
                **self._ref(s), "object_id": oid, "description": self._text(5, 40),
                "metadata": {"class": "OrderedCollection", "size": self.rnd.randrange(100)}}):
            s.objects.add(oid)

    def op_release(self) -> None:
        s = self._session()
        if s is None:
            return
        oid = self.rnd.choice(sorted(s.objects)) if s.objects else self.rnd.choice(OBJECT_IDS)
        if self.do("release_object", "release_object", {**self._ref(s), "object_id": oid}):
            s.objects.discard(oid)

    def op_info(self) -> None:
        s = self._session()
        if s is None:
            return
        r = self.do("get_session_info", "get_session_info", self._ref(s))
        if r is not None and r.get("client_id") != s.client_id:
            self._unexpected("get_session_info", "wrong owner", str(r)[:200])

    def op_list(self) -> None:
        c = self.rnd.choice(self.clients)
        r = self.do("list_client_sessions", "list_client_sessions", {"client_id": c.client_id})
        if r is not None:
            listed = {e["session_id"] for e in r["sessions"]}
            missing = [s.session_id for s in c.sessions if s.session_id not in listed]
            if missing:
                self._unexpected("list_client_sessions", "tracked session missing", missing[0])

    def op_park(self) -> None:
        """close_session with save_state: inactive, kept, restorable."""
        s = self._any_session()
        if s is not None and self.do("close_session (save_state)", "close_session",
                                     {**self._ref(s), "save_state": True}):
            s.parked = True

    def op_restore(self) -> None:
        s = self._any_session(parked=True) or self._any_session()
        if s is not None and self.do("restore_session", "restore_session", self._ref(s)):
            s.parked = False

    def op_close(self) -> None:
        s = self._any_session() or self._any_session(parked=True)
        if s is None:
            return
        if self.do("close_session", "close_session", {**self._ref(s), "save_state": False}):
            for c in self.clients:
                if s in c.sessions:
                    c.sessions.remove(s)
            self.closed_ids.append(s.session_id)

    def op_ping(self) -> None:
        self.do("ping", "ping", {"client_id": self.rnd.choice(self.clients).client_id})

    def op_statistics(self) -> None:
        self.do("get_session_statistics", "get_session_statistics", {})

    def op_bad(self) -> None:
        """A request built to fail; its error code is the expected outcome."""
        kind = self.rnd.randrange(8)
        c = self.rnd.choice(self.clients)
        if kind == 0 and self.closed_ids:
            sid = self.rnd.choice(self.closed_ids)
            self.do("bad: closed session", "get_session_info",
                    {"session_id": sid, "client_id": c.client_id}, expect="SessionNotFound")
        elif kind == 1:
            self.do("bad: malformed session id", "update_session_state",
                    {"session_id": "no-such-session", "state_data": {"a": 1}},
                    expect="SessionNotFound")
        elif kind == 2 and len(self.clients) > 1:
            s = self._session()
            if s is not None:
                other = next(x for x in self.clients if x.client_id != s.client_id)
                self.do("bad: another client's session", "load_context",
                        {"session_id": s.session_id, "client_id": other.client_id},
                        expect="SessionNotFound")
        elif kind == 3:
            self.do("bad: unknown command", "no_such_command", {}, expect="UnknownCommand")
        elif kind == 4:
            s = self._session()
            if s is not None:
                self.do("bad: version 0", "update_session_state",
                        {**self._ref(s), "state_data": {"x": 1}, "expected_version": 0},
                        expect="VersionConflict")
        elif kind == 5:
            self.do("bad: not JSON", "", {}, expect="InvalidRequest", raw=b"{not json")
        elif kind == 6:
            self.do("bad: timeout 0", "create_session",
                    {"client_id": c.client_id, "timeout": 0}, expect="InvalidRequest")
        else:
            s = self._session()
            if s is not None:
                self.do("bad: state_data not an object", "update_session_state",
                        {**self._ref(s), "state_data": [1, 2, 3]}, expect="InvalidRequest")


# Relative frequencies of the operations (Actor.op_<name>): mostly edits and
# reads of open sessions, as an IDE does, with session turnover kept well under
# the per-client cap and the default create rate.
WEIGHTS: dict[str, float] = {
    "create": 2, "abandon": 0.5, "update": 22, "save_context": 6, "load_context": 8,
    "summary": 3, "record": 14, "register": 6, "release": 4, "info": 8, "list": 5,
    "park": 1, "restore": 1.5, "close": 1.5, "ping": 2, "statistics": 0.5, "bad": 4,
}


# -- the processes and the samples ------------------------------------------------


def _front_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUI_")}
    env["STUI_LOG_LEVEL"] = "WARNING"  # a 10-minute log stays small; warnings are read
    # The limiter runs on every request (its script code is part of what is
    # soaked) with room for this workload's bursts; RateLimited is not a leak.
    env["STUI_RATE_BURST"] = "1000000"
    env["STUI_CREATE_BURST"] = "100000"
    return env


@dataclass(frozen=True)
class Sample:
    t: float  # s since the workload started
    rss: int  # bytes, front worker
    fds: int  # open file descriptors, front worker
    threads: int
    redis_used_memory: int
    redis_keys: int
    requests: int  # so far, all threads (read without a lock: approximate)


def take_sample(proc: psutil.Process, rc: redis.Redis, t: float, actors: list[Actor]) -> Sample:
    mem = rc.info("memory")
    return Sample(round(t, 1), int(proc.memory_info().rss), int(proc.num_fds()),
                  int(proc.num_threads()), int(mem["used_memory"]), int(rc.dbsize()),
                  sum(a.tally.requests for a in actors))


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def soak(cfg: Config, log_dir: Path) -> dict[str, Any]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    server = EmbeddedRedis().start()  # no data_dir: no persistence, free port
    rc = redis.Redis.from_url(server.url)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log_path = log_dir / "soak-front.log"
    with open(log_path, "wb") as log:
        front = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "front", "--redis-url", server.url,
             "--bind", endpoint, "--workers", "1"],
            cwd=REPO, env=_front_env(), stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    actors: list[Actor] = []
    threads: list[threading.Thread] = []
    try:
        wait_answering(ctx, endpoint, front)
        proc = psutil.Process(front.pid)
        info = machine.describe(str(rc.info("server")["redis_version"]))
        idle = take_sample(proc, rc, 0.0, actors)
        print(f"front pid {front.pid} at {endpoint}, redis {server.url}; idle: rss "
              f"{_mib(idle.rss)}, fds {idle.fds}; {cfg.seconds:.0f} s at <= {cfg.rate:g} req/s, "
              f"{cfg.threads} threads", flush=True)
        actors = [Actor(i, endpoint, ctx, cfg, stop) for i in range(cfg.threads)]
        threads = [threading.Thread(target=a.run, name=f"soak-{a.index}") for a in actors]
        started = time.monotonic()
        for t in threads:
            t.start()
        samples: list[Sample] = []
        # The first sample once every thread is connected and busy: the
        # baseline the end is compared with.
        next_sample = started + min(2.0, cfg.sample_every)
        end = started + cfg.seconds
        while True:
            now = time.monotonic()
            if front.poll() is not None:
                raise RuntimeError(f"the front worker exited with {front.returncode}")
            if now >= next_sample or now >= end:
                s = take_sample(proc, rc, now - started, actors)
                samples.append(s)
                rate = (s.requests - samples[-2].requests) / (s.t - samples[-2].t) \
                    if len(samples) > 1 and s.t > samples[-2].t else 0.0
                print(f"[{s.t:7.1f}s] rss {_mib(s.rss)}  fds {s.fds}  threads {s.threads}  "
                      f"redis {_mib(s.redis_used_memory)} / {s.redis_keys} keys  "
                      f"requests {s.requests}  ({rate:.0f}/s)", flush=True)
                next_sample = now + cfg.sample_every
                if now >= end:
                    break
            time.sleep(min(0.2, max(0.0, min(next_sample, end) - time.monotonic())))
        stop.set()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - started
        front_alive = front.poll() is None
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        if front.poll() is None:
            front.terminate()
            try:
                front.wait(20)
            except subprocess.TimeoutExpired:
                front.kill()
                front.wait()
        rc.close()
        server.stop()
        ctx.destroy(linger=0)
    return summarize(cfg, info, idle, samples, actors, elapsed, front_alive, front.returncode,
                     log_path)


def summarize(cfg: Config, info: dict[str, str], idle: Sample, samples: list[Sample],
              actors: list[Actor], elapsed: float, front_alive: bool, front_exit: int | None,
              log_path: Path) -> dict[str, Any]:
    total = Tally()
    for a in actors:
        total.merge(a.tally)
    crashes = [f"thread {a.index}: {a.crash}" for a in actors if a.crash]
    log_lines = log_path.read_text(errors="replace").splitlines()
    log_errors = [line for line in log_lines if " ERROR " in line or " CRITICAL " in line]
    log_warnings = [line for line in log_lines if " WARNING " in line]
    first, last = samples[0], samples[-1]
    fd_growth = last.fds - first.fds
    reasons: list[str] = []
    unexpected = sum(total.unexpected.values())
    if unexpected:
        reasons.append(f"{unexpected} unexpected replies")
    if crashes:
        reasons.append(f"{len(crashes)} load threads crashed")
    if log_errors:
        reasons.append(f"{len(log_errors)} ERROR lines in the front's log")
    if fd_growth > cfg.fd_margin:
        reasons.append(f"front fds grew by {fd_growth} (> {cfg.fd_margin})")
    if not front_alive:
        reasons.append("the front worker was not running at the end")
    return {
        "config": asdict(cfg),
        "machine": info,
        "elapsed_s": round(elapsed, 1),
        "idle": asdict(idle),
        "samples": [asdict(s) for s in samples],
        "front": {
            "rss_start": first.rss, "rss_end": last.rss, "rss_max": max(s.rss for s in samples),
            "fds_start": first.fds, "fds_end": last.fds, "fds_max": max(s.fds for s in samples),
            "fd_growth": fd_growth, "alive_at_end": front_alive, "exit_code": front_exit,
            "log_warnings": len(log_warnings), "log_errors": len(log_errors),
            "log_error_samples": log_errors[:10], "log_warning_samples": log_warnings[:10],
        },
        "redis": {"used_memory_start": first.redis_used_memory,
                  "used_memory_end": last.redis_used_memory,
                  "used_memory_max": max(s.redis_used_memory for s in samples),
                  "keys_end": last.redis_keys},
        "requests": {
            "total": total.requests, "ok": total.ok,
            "rate_per_s": round(total.requests / elapsed, 1) if elapsed else 0.0,
            "by_op": dict(sorted(total.by_op.items())),
            "expected_errors": dict(sorted(total.expected_errors.items())),
            "unexpected": dict(sorted(total.unexpected.items())),
            "unexpected_samples": total.unexpected_samples,
            "no_reply": total.no_reply,
            "client_timeouts": total.client_timeouts, "client_retries": total.client_retries,
            "client_storage_unavailable": total.client_unavailable,
            "reconnects": total.reconnects,
        },
        "thread_crashes": crashes,
        "passed": not reasons,
        "reasons": reasons,
    }


# -- the report ---------------------------------------------------------------------


def _lines(items: list[str]) -> str:
    """A list of lines for a placeholder that ends the line before it in the
    template (a table's separator, a code fence): each on a line of its own."""
    return "".join("\n" + item for item in items)


def _rss_after_warmup(samples: list[dict[str, Any]]) -> str:
    """RSS growth after the first minute, when allocator pools and caches have
    filled: a steady climb from there on is what a leak looks like."""
    parts = template_parts("soak-parts.md")
    later = [s for s in samples if s["t"] >= 60]
    if len(later) < 2:
        return parts["rss_too_short"].substitute()
    a, b = later[0], later[-1]
    minutes = (b["t"] - a["t"]) / 60
    return parts["rss_growth"].substitute(
        t_from=f"{a['t']:.0f}", t_to=f"{b['t']:.0f}", rss_from=_mib(a["rss"]),
        rss_to=_mib(b["rss"]), growth_kib=f"{(b['rss'] - a['rss']) / 1024:+.0f}",
        growth_kib_per_min=f"{(b['rss'] - a['rss']) / 1024 / minutes:+.0f}")


def markdown(result: dict[str, Any], command: str) -> str:
    """docs/soak.md: templates/soak.md filled with a run's result."""
    f, r, req = result["front"], result["redis"], result["requests"]
    first, last = result["samples"][0], result["samples"][-1]
    cfg = result["config"]
    parts = template_parts("soak-parts.md")
    verdict = "PASSED" if result["passed"] else "FAILED: " + "; ".join(result["reasons"])
    unexpected = log_errors = ""
    if req["unexpected"]:
        unexpected = parts["unexpected"].substitute(
            rows=_lines([f"| {k} | {v} |" for k, v in req["unexpected"].items()]),
            samples=_lines(req["unexpected_samples"])) + "\n\n"
    if f["log_error_samples"]:
        log_errors = parts["log_errors"].substitute(
            lines=_lines(f["log_error_samples"])) + "\n\n"
    return template("soak.md").substitute(
        command=command, elapsed=f"{result['elapsed_s']:.0f}", threads=cfg["threads"],
        clients_per_thread=cfg["clients_per_thread"], rate=f"{cfg['rate']:g}",
        reopen_every=REOPEN_EVERY, verdict=verdict, fd_margin=cfg["fd_margin"],
        machine_rows=_lines([f"| {k} | {v} |" for k, v in result["machine"].items()]),
        idle_rss=_mib(result["idle"]["rss"]), idle_fds=result["idle"]["fds"],
        rss_start=_mib(f["rss_start"]), rss_end=_mib(f["rss_end"]),
        rss_max=_mib(f["rss_max"]),
        fds_start=f["fds_start"], fds_end=f["fds_end"], fds_max=f["fds_max"],
        threads_start=first["threads"], threads_end=last["threads"],
        threads_max=max(s["threads"] for s in result["samples"]),
        redis_start=_mib(r["used_memory_start"]), redis_end=_mib(r["used_memory_end"]),
        redis_max=_mib(r["used_memory_max"]),
        rss_after_warmup=_rss_after_warmup(result["samples"]),
        requests=req["total"], rate_per_s=f"{req['rate_per_s']:g}", ok=req["ok"],
        expected_errors=sum(req["expected_errors"].values()),
        unexpected_outcomes=sum(req["unexpected"].values()), no_reply=req["no_reply"],
        client_timeouts=req["client_timeouts"], client_retries=req["client_retries"],
        storage_unavailable=req["client_storage_unavailable"], reconnects=req["reconnects"],
        log_warnings=f["log_warnings"], log_errors=f["log_errors"],
        expected_error_rows=_lines([f"| {k} | {v} |"
                                    for k, v in req["expected_errors"].items()]),
        unexpected_section=unexpected, log_error_section=log_errors,
        by_op_rows=_lines([f"| {k} | {v} |" for k, v in req["by_op"].items()]),
        sample_every=f"{cfg['sample_every']:g}",
        sample_rows=_lines([f"| {s['t']:.0f} | {_mib(s['rss'])} | {s['fds']} | {s['threads']} "
                            f"| {_mib(s['redis_used_memory'])} | {s['redis_keys']} "
                            f"| {s['requests']} |" for s in result["samples"]]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10.0, help="full run length (10)")
    length.add_argument("--quick", action="store_true", help="~30 s smoke run")
    length.add_argument("--seconds", type=float, help="any short length; like --quick")
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s, in all (300)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--clients-per-thread", type=int, default=3)
    parser.add_argument("--sample-every", type=float, help="s between samples (10)")
    parser.add_argument("--fd-margin", type=int, default=5,
                        help="front descriptors may grow this much, start to end (5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON path (default under benchmarks/results/)")
    args = parser.parse_args(argv)

    try:
        find_redis_server()
    except RedisNotFound as exc:
        print(f"cannot soak: {exc}", file=sys.stderr)
        return 2

    full = not args.quick and args.seconds is None
    seconds = args.minutes * 60 if full else (args.seconds if args.seconds is not None else 30.0)
    sample_every = args.sample_every or min(10.0, max(1.0, seconds / 5))
    cfg = Config(seconds, args.threads, args.rate, args.clients_per_thread, sample_every,
                 args.fd_margin, args.seed)
    out: Path = args.out or (RESULTS / "soak.json" if full else RESULTS / "quick" / "soak.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.soak", *(argv if argv is not None
                                                              else sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="stui-soak-") as tmp:
        result = soak(cfg, Path(tmp))
    result["command"] = command
    out.write_text(json.dumps(result, indent=1) + "\n")
    if full:
        DOCS.write_text(markdown(result, command))

    f, req = result["front"], result["requests"]
    print(f"front RSS start {_mib(f['rss_start'])} end {_mib(f['rss_end'])} max "
          f"{_mib(f['rss_max'])}; fds start {f['fds_start']} end {f['fds_end']} max "
          f"{f['fds_max']}")
    print(f"requests {req['total']} ({req['rate_per_s']:g}/s), ok {req['ok']}, expected errors "
          f"{dict(req['expected_errors'])}, unexpected {dict(req['unexpected'])}, no reply "
          f"{req['no_reply']}, client timeouts {req['client_timeouts']}, StorageUnavailable "
          f"{req['client_storage_unavailable']}, front log warnings {f['log_warnings']} errors "
          f"{f['log_errors']}")
    for line in req["unexpected_samples"][:5] + f["log_error_samples"][:5]:
        print(f"  {line}")
    print(f"wrote {out}" + (f" and {DOCS}" if full else ""))
    print("PASSED" if result["passed"] else "FAILED: " + "; ".join(result["reasons"]))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
