"""One tree's Redis cost per command: run by benchmarks/rediscost.py with that
tree's code first on sys.path (so it imports only what every release has:
service.dispatch, service.settings, service.store, and the embedded Redis,
workers.launchers.redis or, before that package, workers.embedded_redis).

Prints JSON: {command: {"usec": per script call, "calls": inner Redis calls
per request (TIME included), "scripts": script calls per request}}.

With STUI_PROBE_CALLGRIND set to a folder, redis-server runs under valgrind's
callgrind and each command also gets "instructions": what Redis executed per
request (reading it, the script, the reply), counted with instrumentation on
only while that command's requests run. A count, not a time: the same for
the same binary and requests whatever else the machine does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from service.dispatch import Dispatcher  # type: ignore[import-not-found, unused-ignore]
from service.settings import Settings  # type: ignore[import-not-found, unused-ignore]
from service.store import Store, connect  # type: ignore[import-not-found, unused-ignore]

# The old module first: the editable install of this checkout serves its own
# workers.launchers to a tree without one (an older release, e.g. 67c3ff1),
# which would then measure with this tree's EmbeddedRedis, not its own.
try:
    from workers.embedded_redis import (  # type: ignore[import-not-found, unused-ignore]
        EmbeddedRedis,
    )
except ImportError:
    from workers.launchers.redis import EmbeddedRedis

CALLGRIND = os.environ.get("STUI_PROBE_CALLGRIND", "")


class CallgrindRedis(EmbeddedRedis):  # type: ignore[misc, unused-ignore]
    """The embedded Redis under callgrind, instrumentation off until asked."""

    def command(self) -> list[str]:
        # --hz 1: serverCron's timed work, counted with the requests', runs
        # once a second rather than ten times (Redis is slow under valgrind).
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={CALLGRIND}/callgrind.%p", *super().command(),
                "--hz", "1"]


class Counter:
    """Redis' executed instructions over a stretch of requests (callgrind_control).
    Each stretch starts after a full collection of Redis' Lua heap: the
    collector's steps follow the allocations, so without it a stretch would
    also pay for garbage that earlier ones left (several percent of a small
    command, and different for two trees)."""

    def __init__(self, pid: int, client: redis.Redis) -> None:
        self.pid, self.dumps, self.client = str(pid), 0, client

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, self.pid], check=True, capture_output=True,
                       timeout=120)

    def start(self) -> None:
        self.client.eval("collectgarbage('collect') return 1", 0)
        self._control("-i", "on")
        self._control("-z")

    def stop(self) -> int:
        self._control("-d")
        self._control("-i", "off")
        self.dumps += 1
        dump = Path(CALLGRIND) / f"callgrind.{self.pid}.{self.dumps}"
        found = re.search(r"^summary: (\d+)", dump.read_text(), re.MULTILINE)
        if not found:
            raise RuntimeError(f"no summary in {dump}")
        return int(found.group(1))


NOT_INNER = {"evalsha", "eval", "info", "script", "flushall", "config"}
STATE = {"cursor": {"line": 12, "column": 4}, "workspace": "Transcript showln: 3 + 4. " * 38}


class Probe:
    def __init__(self, url: str) -> None:
        self.counter: Counter | None = None  # set to count instructions too
        self.r = redis.Redis.from_url(url)
        settings = Settings(redis_url=url, rate_burst=10**9, create_burst=10**9,
                            max_sessions_per_client=10**6, stats_max_age=0)
        self.d = Dispatcher(settings, Store(connect(url, 30)))
        self.n = 0

    def ask(self, command: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        body = json.dumps({"id": f"p{self.n}", "command": command, "parameters": params})
        reply: dict[str, Any] = json.loads(self.d.handle([body.encode()])[0])
        if reply.get("status") != "success":
            raise RuntimeError(f"{command}: {reply}")
        return reply["result"]  # type: ignore[no-any-return]

    def stats(self) -> dict[str, tuple[int, int]]:
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for k, v in self.r.info("commandstats").items()}

    def measure(self, requests: list[tuple[str, dict[str, Any]]]) -> dict[str, float]:
        before = self.stats()
        if self.counter:
            self.counter.start()
        for command, params in requests:
            self.ask(command, **params)
        executed = self.counter.stop() if self.counter else 0
        after = self.stats()

        def delta(name: str, i: int) -> int:
            return after.get(name, (0, 0))[i] - before.get(name, (0, 0))[i]

        scripts = delta("evalsha", 0)
        inner = sum(delta(k, 0) for k in after if k not in NOT_INNER)
        n = len(requests)
        found = {"usec": delta("evalsha", 1) / max(scripts, 1), "calls": inner / n,
                 "scripts": scripts / n}
        if self.counter:
            found["instructions"] = executed / n
        return found


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    # valgrind starts redis-server slowly: give it longer than the default wait.
    server = CallgrindRedis().start(wait=120) if CALLGRIND else EmbeddedRedis().start()
    try:
        p = Probe(server.url)
        if CALLGRIND:
            p.counter = Counter(server.process.pid, p.r)
        sids = [p.ask("create_session", client_id=f"c{n % 50}")["session_id"]
                for n in range(repeats)]
        for sid in sids:
            p.ask("update_session_state", session_id=sid, state_data=STATE)
        found: dict[str, dict[str, float]] = {}

        def each(command: str, make: Any) -> None:
            found[command] = p.measure([(command, make(n, sid)) for n, sid in enumerate(sids)])

        each("create_session", lambda n, sid: {"client_id": f"n{n % 50}", "timeout": 3600})
        each("update_session_state", lambda n, sid: {
            "session_id": sid, "state_data": {**STATE, "cursor": {"line": n, "column": 1}}})
        each("get_session_info", lambda n, sid: {"session_id": sid})
        each("restore_session", lambda n, sid: {"session_id": sid})
        each("list_client_sessions", lambda n, sid: {"client_id": f"c{n % 50}"})
        each("save_context", lambda n, sid: {"session_id": sid, "context": {
            "workspace_context": {"vars": {"a": n}}, "object_registry": {"o1": {"c": "Point"}}}})
        each("load_context", lambda n, sid: {"session_id": sid})
        each("get_context_summary", lambda n, sid: {"session_id": sid})
        each("record_evaluation", lambda n, sid: {"session_id": sid, "code": "3 + 4",
                                                  "result": 7})
        each("register_object", lambda n, sid: {"session_id": sid, "object_id": f"x{n}",
                                                "description": "a Point"})
        each("release_object", lambda n, sid: {"session_id": sid, "object_id": f"x{n}"})
        each("clear_context", lambda n, sid: {"session_id": sid, "parts": ["object_registry"]})
        each("ping", lambda n, sid: {"client_id": f"c{n % 50}"})
        each("close_session", lambda n, sid: {"session_id": sid})
        stats = p.measure([("get_session_statistics", {}) for _ in range(20)])
        found["get_session_statistics"] = stats
        memory = p.r.info("memory")["used_memory"]
        print(json.dumps({"found": found, "used_memory": memory,
                          "redis": p.r.info("server")["redis_version"]}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
