"""Chaos through a load balancer: three fronts behind HAProxy, one is killed
mid-run and started again on the same port; no request may fail, run twice,
or lose an acknowledged write.

Run it on its own (needs haproxy and redis-server; it skips loudly without
haproxy):

    .venv/bin/python -m pytest tests/test_loadbalancer.py -s

Why the checks prove what they claim:

- Each client owns one session and sends `update_session_state` with a new
  key per request (`{"k<i>": i}`). The version goes up by exactly one per
  *executed* update, so the i-th acknowledged reply must carry version i + 2
  and the final version must be 1 + the acknowledged count: a request run
  twice (a retry that was not recognised as a replay) would skip a version.
- Reading the state back and finding every acknowledged key, with its value,
  proves that no acknowledged write was lost; the state having exactly as
  many keys as executed updates cross-checks the version count.

The counts (requests, retries, timeouts, StorageUnavailable replies, time)
are printed and written as JSON to $STUI_CHAOS_REPORT, or to
$TMPDIR/stui-chaos-report.json.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import FrontProcess
from workers.client import Client, ClientStats, NoReply, RemoteError
from workers.launchers.haproxy import HAProxy, find_haproxy

pytestmark = pytest.mark.integration

FRONTS = 3
CLIENTS = 6
UPDATES = 150  # per client: the count bound of the run
DEADLINE_S = 50.0  # the time bound of the load (the test fails past it)
KILL_AFTER = 1 / 3  # fraction of all updates acknowledged before the fault
STOP_BEFORE_KILL_S = 0.5
# Lazy Pirate budget: 9 attempts of 1 s cover a dead front (its clients wait
# out one timeout) and a busy 2-core machine (a slow reply is retried, and
# the replay window answers the repeat).
CLIENT_TIMEOUT_S = 1.0
CLIENT_RETRIES = 8
CLIENT_BACKOFF_S = 0.1
# Think time between a client's requests. Unpaced, 900 updates take about
# 2 s here and end before the restarted front is back; paced, the load goes
# on through the whole fault (freeze, kill, detection, restart), and the
# restart gets some of the 2 CPUs. Nothing is asserted about timing.
THINK_S = 0.02


@dataclass
class ClientRun:
    index: int
    client_id: str
    session_id: str = ""
    acked: list[tuple[int, int]] = field(default_factory=list)  # (i, reply version)
    error: str | None = None
    stats: ClientStats = field(default_factory=ClientStats)


@dataclass
class Fault:
    server: str = ""
    port: int = 0
    connections_at_kill: int = 0  # HAProxy's scur for the victim
    acked_at_kill: int = 0
    exit_code: int = 0
    restarted: bool = False
    acked_when_back: int = 0  # updates acknowledged when HAProxy had it UP again
    restarted_connections: int = 0  # new connections the restarted front took


def _report_path() -> Path:
    given = os.environ.get("STUI_CHAOS_REPORT")
    if given:
        return Path(given)
    return Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "stui-chaos-report.json"


def _drive(run: ClientRun, endpoint: str, deadline: float) -> None:
    """One client's whole run; errors are recorded, not raised, so that the
    report still shows what every client did."""
    with Client(
        endpoint, timeout=CLIENT_TIMEOUT_S, retries=CLIENT_RETRIES, backoff=CLIENT_BACKOFF_S
    ) as client:
        run.stats = client.stats
        try:
            created = client.call("create_session", client_id=run.client_id, timeout=600)
            run.session_id = str(created["session_id"])
            for i in range(UPDATES):
                if time.monotonic() > deadline:
                    run.error = f"deadline of {DEADLINE_S} s passed after {i} updates"
                    return
                reply = client.call(
                    "update_session_state",
                    session_id=run.session_id,
                    client_id=run.client_id,
                    state_data={f"k{i}": i},
                )
                run.acked.append((i, int(reply["version"])))
                time.sleep(THINK_S)
        except (RemoteError, NoReply) as exc:
            run.error = f"{type(exc).__name__}: {exc}"


def _acked(runs: list[ClientRun]) -> int:
    return sum(len(r.acked) for r in runs)


def _wait_for(condition: Callable[[], bool], deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"deadline of {DEADLINE_S} s passed waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def haproxy_over(
    start_front: Callable[..., FrontProcess],
) -> Iterator[tuple[HAProxy, list[FrontProcess]]]:
    if find_haproxy() is None:
        pytest.skip(
            "SKIPPED LOUDLY: haproxy not installed (apt-get install haproxy); "
            "the load-balancer chaos test did not run"
        )
    fronts = [start_front() for _ in range(FRONTS)]
    with HAProxy([f"127.0.0.1:{f.port}" for f in fronts]) as proxy:
        for i in range(FRONTS):
            proxy.wait_status(HAProxy.server_name(i), "UP")
        yield proxy, fronts


def _kill_busiest(proxy: HAProxy, fronts: list[FrontProcess], fault: Fault) -> FrontProcess:
    """SIGSTOP then SIGKILL the front that holds the most client connections."""
    stats = proxy.server_stats()
    index = max(range(len(fronts)), key=lambda i: int(stats[HAProxy.server_name(i)]["scur"]))
    victim = fronts[index]
    fault.server = HAProxy.server_name(index)
    fault.port = victim.port
    fault.connections_at_kill = int(stats[fault.server]["scur"])
    assert victim.proc is not None
    # Frozen first, so that every client connected through it has sent its
    # next request and is waiting when it dies: the fault then certainly
    # costs in-flight requests, which makes "retries happened" a fact rather
    # than a likelihood. A request it had already passed to Redis may have
    # run; its retry must come back as a replay.
    victim.proc.send_signal(signal.SIGSTOP)
    time.sleep(STOP_BEFORE_KILL_S)
    fault.exit_code = victim.stop(sig=signal.SIGKILL)
    return victim


def test_kill_and_restart_a_front_behind_haproxy(
    haproxy_over: tuple[HAProxy, list[FrontProcess]],
    redis_client: redis.Redis,  # for its flush: the fixture Redis starts empty
) -> None:
    proxy, fronts = haproxy_over
    tag = uuid.uuid4().hex[:8]
    runs = [ClientRun(i, f"chaos-{tag}-{i}") for i in range(CLIENTS)]
    fault = Fault()
    restarted: FrontProcess | None = None
    started = time.monotonic()
    deadline = started + DEADLINE_S
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(_drive, run, proxy.endpoint, deadline) for run in runs]
            total = CLIENTS * UPDATES
            _wait_for(lambda: _acked(runs) >= total * KILL_AFTER or all(f.done() for f in futures),
                      deadline, f"{KILL_AFTER:.0%} of the updates")
            fault.acked_at_kill = _acked(runs)
            victim = _kill_busiest(proxy, fronts, fault)
            proxy.wait_status(fault.server, "DOWN")
            # The same port, as a supervisor restarting the process would do,
            # so HAProxy's unchanged configuration brings it back.
            restarted = FrontProcess(victim.redis_url, port=victim.port).start()
            proxy.wait_status(fault.server, "UP")
            fault.restarted = True
            fault.acked_when_back = _acked(runs)
            for future in futures:
                future.result(timeout=max(0.0, deadline - time.monotonic()) + 15)

        # Read back through the proxy on fresh connections. Round robin over
        # three servers that are all UP hands these six new connections two
        # to each, so the restarted front must take some.
        before = int(proxy.server_stats()[fault.server]["stot"])
        states: dict[int, dict[str, Any]] = {}
        for run in runs:
            if not run.session_id:
                continue
            with Client(proxy.endpoint, timeout=CLIENT_TIMEOUT_S, retries=CLIENT_RETRIES) as c:
                states[run.index] = c.call(
                    "restore_session", session_id=run.session_id, client_id=run.client_id
                )
        fault.restarted_connections = int(proxy.server_stats()[fault.server]["stot"]) - before
    finally:
        if restarted is not None:
            restarted.stop()
    duration = time.monotonic() - started

    timeouts = sum(r.stats.timeouts for r in runs)
    errors = [r.error for r in runs if r.error]
    summary: dict[str, Any] = {
        "clients": CLIENTS,
        "updates_per_client": UPDATES,
        "requests": sum(r.stats.requests for r in runs),
        "acknowledged_updates": _acked(runs),
        "retries": sum(r.stats.retries for r in runs),
        "timeouts": timeouts,
        "storage_unavailable": sum(r.stats.unavailable for r in runs),
        "errors": errors,
        "duration_s": round(duration, 2),
        "fault": asdict(fault),
        "per_client": [
            {"client": r.client_id, "acked": len(r.acked), "retries": r.stats.retries,
             "timeouts": r.stats.timeouts, "unavailable": r.stats.unavailable}
            for r in runs
        ],
    }
    path = _report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nchaos report ({path}):\n{json.dumps(summary, indent=1)}")

    # Every request ended in success: no NoReply, no error reply, no deadline.
    assert errors == []
    assert all(len(r.acked) == UPDATES for r in runs)
    for run in runs:
        state = states[run.index]
        # Zero executed twice: each acknowledged update got the next version...
        assert [v for _, v in run.acked] == list(range(2, UPDATES + 2)), run.client_id
        # ...and nothing ran that was not acknowledged once.
        assert state["version"] == 1 + len(run.acked), run.client_id
        # Zero acknowledged writes lost, and one key per executed update.
        session_state = state["session_state"]
        missing = [i for i, _ in run.acked if session_state.get(f"k{i}") != i]
        assert missing == [], f"{run.client_id} lost acknowledged keys {missing}"
        assert len(session_state) == state["version"] - 1, run.client_id
    # The fault really happened and really hit clients: the victim held
    # connections when it died, it died by SIGKILL, and requests that were
    # in flight through it had to be retried.
    assert fault.connections_at_kill >= 1
    assert fault.exit_code == -signal.SIGKILL
    assert timeouts >= 1
    # HAProxy brought the restarted front back into rotation.
    assert fault.restarted
    assert fault.restarted_connections >= 1
