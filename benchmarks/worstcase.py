"""What one request can make Redis do, at the default limits.

    .venv/bin/python -m benchmarks.worstcase           # writes docs/benchmarks-worstcase.md
    .venv/bin/python -m benchmarks.worstcase --quick   # fewer repeats, benchmarks/results/quick/

For each request shape (the largest the default limits allow, next to a
typical one), the real dispatcher sends it to a private redis-server over
TCP and the figures come from Redis itself (INFO commandstats): the Redis
time of each script call, and the Redis commands the script ran inside. The
front's own Python time is not counted: a shard's time is what caps the
service (docs/security.md, "Bounds"). Each shape runs `repeats` times; the
report gives the median and the highest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis

from benchmarks import machine
from benchmarks.common import Progress, outputs, plain
from service.dispatch import Dispatcher
from service.settings import Settings
from service.store import Store, connect
from workers.launchers.redis import EmbeddedRedis

DEFAULTS = Settings(redis_url="redis://unused")
IGNORED = {"evalsha", "info", "script", "flushall", "time"}  # not the script's own work


@dataclass
class Shape:
    name: str
    usec_median: float
    usec_max: float
    inner_calls: float  # Redis commands run inside one script call, on average
    script_calls: float  # EVALSHA per request
    reply_bytes: int


class Bench:
    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.d = Dispatcher(
            Settings(redis_url=url, rate_burst=10**9, create_burst=10**9), Store(connect(url, 30))
        )
        self.n = 0

    def ask(self, command: str, **params: Any) -> dict[str, Any]:
        self.n += 1
        body = json.dumps({"id": f"w{self.n}", "command": command, "parameters": params})
        reply: dict[str, Any] = json.loads(self.d.handle([body.encode()])[0])
        if reply.get("status") != "success" and reply.get("error_type") != "PayloadTooLarge":
            raise RuntimeError(f"{command}: {reply}")
        return reply

    def stats(self) -> dict[str, tuple[int, int]]:
        out = {}
        for key, value in self.r.info("commandstats").items():
            out[key.removeprefix("cmdstat_")] = (int(value["calls"]), int(value["usec"]))
        return out

    def measure(self, name: str, run: Callable[[int], dict[str, Any]], repeats: int) -> Shape:
        per_call: list[float] = []
        inner = scripts = 0
        size = 0
        for n in range(repeats):
            before = self.stats()
            reply = run(n)
            after = self.stats()
            size = max(size, len(json.dumps(reply)))
            calls, usec = (
                after.get("evalsha", (0, 0))[i] - before.get("evalsha", (0, 0))[i] for i in (0, 1)
            )
            scripts += calls
            inner += sum(
                after[k][0] - before.get(k, (0, 0))[0] for k in after if k not in IGNORED
            )
            if calls:
                per_call.append(usec / calls)
        return Shape(
            name,
            statistics.median(per_call) if per_call else 0.0,
            max(per_call, default=0.0),
            inner / scripts if scripts else 0.0,
            scripts / repeats,
            size,
        )


def shapes(b: Bench, repeats: int, progress: Progress) -> list[Shape]:
    s = DEFAULTS
    value = "v" * (s.max_state_bytes // s.max_state_keys - 64 - 16)
    full = {f"key{n:04d}": value for n in range(s.max_state_keys)}
    other = {f"key{n:04d}": value[:-1] for n in range(s.max_state_keys)}
    one_big = {"big": "b" * (s.max_state_bytes - 1024)}
    registry = {f"obj{n:04d}": {"d": "r" * 800} for n in range(s.max_registry_size)}
    entry = "e" * (s.max_state_bytes // s.history_limit - 1024)

    typical = b.ask("create_session", client_id="typical")["result"]["session_id"]
    keys = b.ask("create_session", client_id="keys")["result"]["session_id"]
    b.ask("update_session_state", session_id=keys, state_data=full)
    big = b.ask("create_session", client_id="big")["result"]["session_id"]
    b.ask("update_session_state", session_id=big, state_data=one_big)
    reg = b.ask("create_session", client_id="registry")["result"]["session_id"]
    hist = b.ask("create_session", client_id="history")["result"]["session_id"]
    for _ in range(s.history_limit):
        b.ask("record_evaluation", session_id=hist, code=entry)
    info = {"i": "c" * (s.client_info_cap - 16)}
    infos = b.ask("create_session", client_id="info", client_info=info)["result"]["session_id"]
    for _ in range(s.max_sessions_per_client - 1):
        b.ask("create_session", client_id="typical")

    cases: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
        ("typical: create_session", lambda n: b.ask("create_session", client_id=f"new{n}")),
        ("typical: update, 1 KB of state", lambda n: b.ask(
            "update_session_state", session_id=typical, state_data={"k": "x" * (1000 + n % 2)})),
        ("typical: get_session_info", lambda n: b.ask("get_session_info", session_id=typical)),
        ("update, replace 1000 keys (1 MiB) with 1000", lambda n: b.ask(
            "update_session_state", session_id=keys, state_data=other if n % 2 else full,
            replace=True)),
        ("update, one key of a 1000-key session", lambda n: b.ask(
            "update_session_state", session_id=keys,
            state_data={"key0000": value[: len(value) - n % 7]})),
        ("update, one 1 MiB value replaced", lambda n: b.ask(
            "update_session_state", session_id=big, state_data={"big": one_big["big"][n % 5:]})),
        ("update, 1001 keys (refused before Redis)", lambda n: b.ask(
            "update_session_state", session_id=typical,
            state_data={f"t{i}": 1 for i in range(s.max_state_keys + 1)})),
        ("restore_session of a 1000-key session", lambda n: b.ask(
            "restore_session", session_id=keys)),
        ("save_context, full registry replaced", lambda n: b.ask(
            "save_context", session_id=reg, context={"object_registry": {
                k: {"d": v["d"][: 800 - n % 3]} for k, v in registry.items()}})),
        ("load_context of a full registry", lambda n: b.ask("load_context", session_id=reg)),
        ("record_evaluation, full history (~20 KB entries)", lambda n: b.ask(
            "record_evaluation", session_id=hist, code=entry)),
        ("get_session_info, 64 KiB client_info", lambda n: b.ask(
            "get_session_info", session_id=infos)),
        ("list_client_sessions, 5 sessions", lambda n: b.ask(
            "list_client_sessions", client_id="typical")),
        ("clear_context, full registry", lambda n: (
            b.ask("clear_context", session_id=reg) if n % 2 else b.ask(
                "save_context", session_id=reg, context={"object_registry": registry}))),
    ]
    found = []
    for name, run in cases:
        progress(f"{name}: {repeats} requests")
        found.append(b.measure(name, run, repeats))
    # Statistics: one read of the buckets (64 calls), forced by a stale snapshot.
    progress(f"get_session_statistics, a snapshot read: {repeats} requests")

    def stats(n: int) -> dict[str, Any]:
        time.sleep(DEFAULTS.stats_max_age + 0.01)
        return b.ask("get_session_statistics")

    snapshot = b.measure("get_session_statistics, one snapshot read", stats, max(3, repeats // 4))
    found.append(snapshot)
    return found


def report(found: list[Shape], info: dict[str, str], repeats: int, seconds: float) -> str:
    worst = max((f for f in found if not f.name.startswith("typical")), key=lambda f: f.usec_max)
    rows = "\n".join(
        f"| {f.name} | {f.usec_median / 1000:.2f} | {f.usec_max / 1000:.2f} | "
        f"{f.script_calls:.0f} | {f.inner_calls:.0f} | {f.reply_bytes:,} |"
        for f in found
    )
    described = "\n".join(f"- {k}: {v}" for k, v in info.items())
    return f"""# What one request can make Redis do

Generated by `.venv/bin/python -m benchmarks.worstcase` in {seconds:.0f} s
({repeats} requests per shape). Do not edit by hand: rerun the command.

Each shape is the largest request the default limits allow (1 MiB per
session, 1000 state keys, 1000 registry entries, 50 history entries, 64 KiB
of client_info), sent by the real dispatcher to a private redis-server over
TCP. The time is Redis' own (`INFO commandstats`, usec of `EVALSHA`) per
script call: the time the request holds the Redis shard, which nothing else
can use meanwhile. Inner calls are the Redis commands the script ran.
The machine is shared and noisy: the median is the figure to quote, the
highest shows the spread.

| request | Redis ms (median) | Redis ms (highest) | script calls | inner calls | reply bytes |
|---|---:|---:|---:|---:|---:|
{rows}

Worst measured: **{worst.name}**, {worst.usec_max / 1000:.2f} ms at most. The
documented bound (docs/security.md) is 10 ms; `tests/test_bounds.py` checks
the main shapes against it.

## Machine

{described}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 6 if args.quick else 40
    progress = Progress()
    started = time.monotonic()
    server = EmbeddedRedis().start()
    try:
        bench = Bench(server.url)
        info = machine.describe(bench.r.info("server")["redis_version"])
        found = shapes(bench, repeats, progress)
    finally:
        server.stop()
    seconds = time.monotonic() - started
    json_path, md_path = outputs("worstcase", args.quick)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(plain({"repeats": repeats, "machine": info,
                                           "shapes": [asdict(f) for f in found]}), indent=1))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report(found, info, repeats, seconds))
    progress(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
