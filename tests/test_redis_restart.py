"""Redis restarts under write load: no acknowledged write is lost.

Run it alone, with its report on stdout:

    .venv/bin/python -m pytest tests/test_redis_restart.py -s

Each test starts its OWN redis-server (append-only file in tmp_path,
`appendfsync always`) and one front worker on it. Four client threads use the
project's Client: each creates a session, then sends update_session_state
requests, each with a key of its own. While they write, redis-server is
stopped (SIGKILL: no chance to flush anything; SIGTERM: a graceful shutdown)
and started again on the same port and directory. Then:

- every acknowledged key is in its session, and the version is exactly
  1 + the acknowledged updates, so nothing acknowledged was lost and nothing
  ran twice (a retry that reaches Redis after the restart must be answered
  from the persisted replay record, not executed again);
- the front is the same process (same pid), never restarted, and answers
  requests that need Redis;
- the restarted Redis started with an empty script cache (it counted NOSCRIPT
  errors), the front loaded the scripts again (SCRIPT LOAD calls, and every
  script of service.scripts.ALL_SCRIPTS exists at the end).

No timing is asserted; durations and counts are printed.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import zmq

from service.scripts import ALL_SCRIPTS
from tests.conftest import FrontProcess
from workers.client import Client, ClientStats, NoReply, RemoteError
from workers.launchers.redis import EmbeddedRedis, RedisNotFound, find_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Ctx = zmq.Context[zmq.Socket[bytes]]

WRITERS = 4
# Bounds on the run: writes per thread, and the phases (seconds). A phase is
# a wall-clock wait of the test itself, never something asserted.
MAX_WRITES = 20_000
BEFORE_KILL = 1.5  # writers are busy before Redis goes
DOWN_FOR = 1.0  # Redis stays down this long (plus its own start-up)
AFTER_RESTART = 2.0  # writers go on after Redis is back
ACK_WAIT = 20.0  # at most this long for the first acknowledgement after the restart

# Client budget: StorageUnavailable is retried after backoff * attempt, so
# 40 retries at 0.05 s wait about 41 s in all, far beyond a restart of a few
# seconds; a 5 s timeout covers a slow reply on a noisy 2-core machine.
CLIENT_TIMEOUT = 5.0
CLIENT_RETRIES = 40
CLIENT_BACKOFF = 0.05


@pytest.fixture
def zmq_ctx() -> Iterator[Ctx]:
    ctx: Ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone: AOF, fsync before every reply."""
    try:
        find_redis_server()
    except RedisNotFound as exc:
        pytest.skip(f"SKIPPED LOUDLY: {exc}")
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="always").start()
    yield server
    server.stop()


@dataclass
class Writer:
    """One client thread: its session, and what the server acknowledged."""

    index: int
    client_id: str
    session_id: str = ""
    acked: dict[str, int] = field(default_factory=dict)  # key -> value written
    ack_times: list[float] = field(default_factory=list)  # monotonic
    unanswered: list[str] = field(default_factory=list)  # NoReply: may or may not have run
    errors: list[str] = field(default_factory=list)
    stats: ClientStats = field(default_factory=ClientStats)


def write_loop(writer: Writer, client: Client, stop: threading.Event) -> None:
    """update_session_state with a fresh key per request until told to stop."""
    try:
        for n in range(MAX_WRITES):
            if stop.is_set():
                break
            key = f"k{writer.index}-{n}"
            try:
                client.call(
                    "update_session_state",
                    session_id=writer.session_id,
                    client_id=writer.client_id,
                    state_data={key: n},
                )
            except NoReply:
                writer.unanswered.append(key)
                continue
            except RemoteError as exc:
                writer.errors.append(f"{key}: {exc.code}: {exc.message}")
                continue
            writer.acked[key] = n
            writer.ack_times.append(time.monotonic())
    # A crash must fail the test (through w.errors), not vanish with the thread.
    except Exception as exc:  # noqa: BLE001
        writer.errors.append(f"thread crashed: {exc!r}")
    finally:
        writer.stats = client.stats


def script_exists(rc: redis.Redis) -> list[bool]:
    found: list[Any] = rc.script_exists(*(s.sha for s in ALL_SCRIPTS))
    return [bool(x) for x in found]


def noscript_errors(rc: redis.Redis) -> int:
    """NOSCRIPT replies this redis-server instance has sent (INFO errorstats)."""
    stats = rc.info("errorstats")
    if not stats:
        pytest.skip("SKIPPED LOUDLY: this redis-server has no INFO errorstats (Redis < 6.2)")
    entry = stats.get("errorstat_NOSCRIPT", {})
    return int(entry.get("count", 0)) if isinstance(entry, dict) else 0


def script_loads(rc: redis.Redis) -> int:
    """SCRIPT LOAD calls on this instance: `script|load` since Redis 7, else all
    SCRIPT subcommands (the front sends no other)."""
    stats = rc.info("commandstats")
    entry = stats.get("cmdstat_script|load", stats.get("cmdstat_script", {}))
    return int(entry.get("calls", 0)) if isinstance(entry, dict) else 0


def kill_redis(server: EmbeddedRedis, sig: signal.Signals) -> None:
    proc = server.process
    assert proc is not None and proc.poll() is None, "redis-server is not running"
    proc.send_signal(sig)
    proc.wait(30)
    server.process = None  # start() runs it again on the same port and directory


def restart_under_load(
    durable_redis: EmbeddedRedis,
    start_front: Callable[..., FrontProcess],
    zmq_ctx: Ctx,
    sig: signal.Signals,
) -> None:
    # INFO logging whatever the caller's environment says: the checks read it.
    # Each write adds a key (the final state lists the acknowledged writes):
    # the session may hold that many.
    env = {"STUI_LOG_LEVEL": "INFO", "STUI_MAX_STATE_KEYS": str(MAX_WRITES * WRITERS)}
    front = start_front(redis_url=durable_redis.url, env=env)
    assert front.proc is not None
    pid = front.proc.pid
    rc = redis.Redis.from_url(durable_redis.url)

    writers = [Writer(i, f"restart-client-{i}") for i in range(WRITERS)]
    clients = [
        Client(
            front.endpoint,
            timeout=CLIENT_TIMEOUT,
            retries=CLIENT_RETRIES,
            backoff=CLIENT_BACKOFF,
            context=zmq_ctx,
        )
        for _ in writers
    ]
    for writer, client in zip(writers, clients, strict=True):
        writer.session_id = client.call("create_session", client_id=writer.client_id)["session_id"]
    # The first request on this Redis loaded every script.
    assert all(script_exists(rc)), "scripts should be loaded before the restart"
    rc.close()

    stop = threading.Event()
    threads = [
        threading.Thread(target=write_loop, args=(w, c, stop), name=f"writer-{w.index}")
        for w, c in zip(writers, clients, strict=True)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(BEFORE_KILL)
        acked_before = sum(len(w.acked) for w in writers)
        killed_at = time.monotonic()
        kill_redis(durable_redis, sig)
        time.sleep(DOWN_FOR)
        durable_redis.start(wait=30)
        back_at = time.monotonic()
        # Go on until some write after the restart has been acknowledged, then
        # AFTER_RESTART more (bounded by ACK_WAIT if none ever is: the asserts
        # below then say why).
        deadline = back_at + ACK_WAIT
        while time.monotonic() < deadline and not any(
            t > back_at for w in writers for t in w.ack_times[-1:]
        ):
            time.sleep(0.05)
        time.sleep(AFTER_RESTART)
    finally:
        stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT * (CLIENT_RETRIES + 2))
        for client in clients:
            client.close()
    assert not any(t.is_alive() for t in threads), "a writer thread never finished"

    rc = redis.Redis.from_url(durable_redis.url)
    try:
        _check_and_report(writers, front, pid, rc, sig, killed_at, back_at, acked_before, zmq_ctx)
    finally:
        rc.close()


def _check_and_report(
    writers: list[Writer],
    front: FrontProcess,
    pid: int,
    rc: redis.Redis,
    sig: signal.Signals,
    killed_at: float,
    back_at: float,
    acked_before: int,
    zmq_ctx: Ctx,
) -> None:
    # -- the report first, so that a failing assert still shows the figures --
    acked = sum(len(w.acked) for w in writers)
    times = sorted(t for w in writers for t in w.ack_times)
    gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    after = sum(1 for t in times if t > back_at)
    totals = {
        name: sum(getattr(w.stats, name) for w in writers)
        for name in ("requests", "retries", "timeouts", "unavailable")
    }
    log = front.log.read_text(errors="replace")
    unavailable_logs = log.count("redis unavailable")
    reloads_logged = log.count(f"loaded {len(ALL_SCRIPTS)} scripts")
    noscripts, loads, exists = noscript_errors(rc), script_loads(rc), script_exists(rc)
    print(
        f"\n[redis restart, {sig.name}] writers={len(writers)} acknowledged={acked} "
        f"(before kill {acked_before}, after restart {after}) "
        f"unanswered={sum(len(w.unanswered) for w in writers)} "
        f"errors={sum(len(w.errors) for w in writers)}\n"
        f"  client stats: requests={totals['requests']} retries={totals['retries']} "
        f"StorageUnavailable replies={totals['unavailable']} timeouts={totals['timeouts']}\n"
        f"  redis down (signal to answering PING) {back_at - killed_at:.2f} s; "
        f"longest gap between acknowledgements {gap:.2f} s\n"
        f"  front pid {pid} still running: {front.proc is not None and front.proc.poll() is None}; "
        f"'redis unavailable' log lines {unavailable_logs}; script loads logged {reloads_logged}\n"
        f"  restarted redis: NOSCRIPT errors {noscripts}, SCRIPT LOAD calls {loads}, "
        f"scripts present {sum(exists)}/{len(exists)}"
    )

    # -- no acknowledged write lost, none executed twice ----------------------
    for w in writers:
        assert not w.errors, f"{w.client_id}: {w.errors[:5]}"
        # With this client budget every request gets an answer; an unanswered
        # one would leave its key's fate unknown and weaken the version check.
        assert not w.unanswered, f"{w.client_id}: no reply for {w.unanswered[:5]}"
        with Client(front.endpoint, timeout=CLIENT_TIMEOUT, retries=3, context=zmq_ctx) as c:
            session = c.call("restore_session", session_id=w.session_id, client_id=w.client_id)
        state: dict[str, Any] = session["session_state"]
        lost = [k for k in w.acked if state.get(k) != w.acked[k]]
        assert not lost, f"{w.client_id}: {len(lost)} acknowledged keys lost, e.g. {lost[:5]}"
        phantom = set(state) - set(w.acked)
        assert not phantom, f"{w.client_id}: keys nobody acknowledged: {sorted(phantom)[:5]}"
        assert session["version"] == 1 + len(w.acked), (
            f"{w.client_id}: version {session['version']} != 1 + {len(w.acked)} acknowledged "
            "updates (an update ran twice, or one was lost)"
        )
    assert acked_before > 0, "no write was acknowledged before the kill"
    assert after > 0, "no write was acknowledged after the restart"
    # The restart really was under load: clients saw the outage.
    assert totals["unavailable"] + totals["timeouts"] > 0, "the clients never saw the outage"

    # -- the front rode it out on its own -------------------------------------
    assert front.proc is not None and front.proc.poll() is None, "the front worker died"
    assert front.proc.pid == pid
    assert unavailable_logs > 0, "the front never noticed Redis was gone"
    with Client(front.endpoint, timeout=CLIENT_TIMEOUT, retries=3, context=zmq_ctx) as c:
        # Names a client, so it runs a script on the restarted Redis.
        assert c.call("ping", client_id="restart-probe")["status"] == "ready"
        listed = c.call("list_client_sessions", client_id=writers[0].client_id)
        assert listed["session_count"] == 1

    # -- the scripts were loaded again on the new instance ---------------------
    # The counters are this instance's own (a restart zeroes them): NOSCRIPT
    # replies prove it came up with an empty cache and the front sent EVALSHA
    # to it; SCRIPT LOAD calls and SCRIPT EXISTS prove the front reloaded.
    assert noscripts > 0, "the restarted Redis never answered NOSCRIPT: was it restarted?"
    assert loads >= len(ALL_SCRIPTS), f"only {loads} SCRIPT LOAD calls after the restart"
    assert all(exists), [s.name for s, ok in zip(ALL_SCRIPTS, exists, strict=True) if not ok]
    assert reloads_logged >= 2, "the front should have logged loading scripts twice"


def test_acknowledged_writes_survive_redis_sigkill(
    durable_redis: EmbeddedRedis, start_front: Callable[..., FrontProcess], zmq_ctx: Ctx
) -> None:
    """SIGKILL: only what appendfsync always put on disk survives."""
    restart_under_load(durable_redis, start_front, zmq_ctx, signal.SIGKILL)


def test_acknowledged_writes_survive_redis_sigterm(
    durable_redis: EmbeddedRedis, start_front: Callable[..., FrontProcess], zmq_ctx: Ctx
) -> None:
    """SIGTERM: Redis shuts down gracefully (it refuses new work, then exits)."""
    restart_under_load(durable_redis, start_front, zmq_ctx, signal.SIGTERM)
