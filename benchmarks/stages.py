"""The front's CPU per request, split into the stages of its request path.

    .venv/bin/python -m benchmarks.stages [--quick]

Runs the dispatcher's own functions in this process, stage by stage, on
batches of 64 requests (the headline case: 64 in flight) against a private
redis-server, and times each stage with the process's CPU clock:

    decode    service.protocol.decode: JSON, the request's own form
    validate  the command's parameters model (pydantic)
    plan      the handler: values encoded, replay id, keys, the script call
    pack      the batch's EVALSHA commands packed (hiredis)
    redis     the round trip, client side: send, wait, read and parse
              (Redis' own CPU is INFO cpu's, reported beside it)
    finish    the plan's finish: the script reply into the result
    encode    the reply's JSON

Then the same batches through Dispatcher.handle as a whole, so that the sum
of the stages can be checked against the real path (the difference is the
dispatcher's own bookkeeping: metrics labels, the batch's grouping). ZeroMQ's
part (receive, send, the loop) is what the front worker's CPU per request in
benchmarks.run adds to Dispatcher.handle.

Writes benchmarks/results/stages.json (quick: benchmarks/results/quick/);
benchmarks.report puts its table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import redis

from benchmarks import machine
from benchmarks.common import Progress, save_json
from service import store as store_module
from service.dispatch import Dispatcher
from service.handlers import lookup
from service.handlers.base import Ctx
from service.protocol import decode, encode_success, validate
from service.settings import Settings
from service.store import Store, connect
from workers.launchers.redis import EmbeddedRedis

STAGES = ("decode", "validate", "plan", "pack", "redis", "finish", "encode")
BATCH = 64
STATE = {"cursor": {"line": 12, "column": 4}, "workspace": "Transcript showln: 3 + 4. " * 38}


def _request(n: int, command: str, params: dict[str, Any]) -> bytes:
    return json.dumps({"id": f"r{n}", "command": command, "parameters": params}).encode()


class Bench:
    def __init__(self, url: str, sessions: int) -> None:
        self.redis = redis.Redis.from_url(url)
        # Rate limiting stays on (as deployed); its burst never refuses here.
        self.settings = Settings(redis_url=url, rate_burst=10**9, create_burst=10**9,
                                 max_sessions_per_client=10**6)
        self.dispatcher = Dispatcher(self.settings, Store(connect(url, 30)))
        self.n = 0
        bodies = [self.body("create_session", client_id=f"client-{k % 400:05d}")
                  for k in range(sessions)]
        self.sids = []
        for s in range(0, len(bodies), 256):
            for reply in self.dispatcher.handle(bodies[s:s + 256]):
                self.sids.append(json.loads(reply)["result"]["session_id"])
        self.dispatcher.handle([self.body("update_session_state", session_id=sid,
                                          state_data=STATE) for sid in self.sids])

    def body(self, command: str, **params: Any) -> bytes:
        self.n += 1
        return _request(self.n, command, params)

    def batches(self, make: Callable[[int, str], tuple[str, dict[str, Any]]],
                count: int) -> list[list[bytes]]:
        out = []
        for b in range(count):
            batch = []
            for k in range(BATCH):
                i = b * BATCH + k
                command, params = make(i, self.sids[i % len(self.sids)])
                batch.append(self.body(command, **params))
            out.append(batch)
        return out

    def staged(self, batches: list[list[bytes]]) -> dict[str, float]:
        """CPU us per request in each stage, the dispatcher's functions run one by one."""
        spent = dict.fromkeys(STAGES, 0)
        clock = time.process_time_ns
        d = self.dispatcher
        for batch in batches:
            t = clock()
            requests = [decode(body, self.settings.max_request_bytes) for body in batch]
            spent["decode"] += clock() - t
            t = clock()
            commands = [lookup(r.command) for r in requests]
            validated = [validate(c.params, r.params) for c, r in zip(commands, requests,
                                                                      strict=True) if c]
            spent["validate"] += clock() - t
            t = clock()
            plans = []
            for c, r, v in zip(commands, requests, validated, strict=True):
                assert c is not None
                ctx = Ctx(settings=self.settings, command=c.name, request_id=r.reply_to.id,
                          params=dict(r.params), started_at=d.started_at,
                          command_names=d.command_names,
                          rate_spec=d.plans.defaults.rate_spec,
                          create_rate_spec=d.plans.defaults.create_rate_spec,
                          requester="addr:127.0.0.1",
                          stats=d.stats)
                plans.append(c.handler(v, ctx))
            spent["plan"] += clock() - t
            calls = [call for p in plans for call in p.calls]
            t = clock()
            b"".join(store_module._pack(call) for call in calls)
            packed = clock() - t
            spent["pack"] += packed
            t = clock()
            results = d.store.run(calls)
            # run() packs again: that part is the pack stage's, not Redis'.
            spent["redis"] += clock() - t - packed
            t = clock()
            done, i = [], 0
            for p in plans:
                done.append(p.finish(results[i:i + len(p.calls)]))
                i += len(p.calls)
            spent["finish"] += clock() - t
            t = clock()
            for c, r, result in zip(commands, requests, done, strict=True):
                assert c is not None
                encode_success(r.reply_to, c.pascal, result)
            spent["encode"] += clock() - t
        n = sum(len(b) for b in batches)
        return {stage: ns / n / 1000 for stage, ns in spent.items()}

    def whole(self, batches: list[list[bytes]]) -> tuple[float, float, float]:
        """(front CPU us, Redis CPU us, Redis EVALSHA us) per request through
        Dispatcher.handle."""
        before = self.redis.info("cpu")
        self.redis.config_resetstat()
        t = time.process_time_ns()
        for batch in batches:
            self.dispatcher.handle(batch)
        front = time.process_time_ns() - t
        after = self.redis.info("cpu")
        evalsha = self.redis.info("commandstats").get("cmdstat_evalsha", {})
        n = sum(len(b) for b in batches)

        def cpu(i: dict[str, Any]) -> float:
            return float(i["used_cpu_user"]) + float(i["used_cpu_sys"])

        return (front / n / 1000, (cpu(after) - cpu(before)) / n * 1e6,
                float(evalsha.get("usec", 0)) / n)


def cases() -> dict[str, Callable[[int, str], tuple[str, dict[str, Any]]]]:
    return {
        "update_session_state": lambda i, sid: ("update_session_state", {
            "session_id": sid, "state_data": {**STATE, "cursor": {"line": i, "column": 1}}}),
        "get_session_info": lambda i, sid: ("get_session_info", {"session_id": sid}),
        "restore_session": lambda i, sid: ("restore_session", {"session_id": sid}),
        "create_session": lambda i, sid: ("create_session", {"client_id": f"new-{i % 997}"}),
    }


def measure(quick: bool, progress: Progress) -> dict[str, Any]:
    count = 20 if quick else 100
    rounds = 2 if quick else 5
    server = EmbeddedRedis().start()
    try:
        bench = Bench(server.url, 2000)
        progress(f"2,000 sessions with 1 KB of state; {rounds} rounds of {count} batches "
                 f"of {BATCH} per command")
        out: dict[str, Any] = {}
        for name, make in cases().items():
            staged: list[dict[str, float]] = []
            whole: list[tuple[float, float, float]] = []
            for _ in range(rounds):
                # Alternate, so that both see the same machine (and sessions).
                staged.append(bench.staged(bench.batches(make, count)))
                whole.append(bench.whole(bench.batches(make, count)))
            best = {s: min(r[s] for r in staged) for s in STAGES}
            front = min(w[0] for w in whole)
            out[name] = {"stages": best, "sum": sum(best.values()), "handle": front,
                         "redis_cpu": min(w[1] for w in whole),
                         "redis_evalsha": min(w[2] for w in whole)}
            progress(f"{name}: stages sum {out[name]['sum']:.1f} us, Dispatcher.handle "
                     f"{front:.1f} us, Redis {out[name]['redis_cpu']:.1f} us per request")
        return {"machine": machine.describe(str(bench.redis.info("server")["redis_version"])),
                "batch": BATCH, "rounds": rounds, "batches": count, "commands": out}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds")
    args = parser.parse_args(argv)
    progress = Progress()
    result = measure(args.quick, progress)
    progress(f"wrote {save_json('stages', args.quick, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
