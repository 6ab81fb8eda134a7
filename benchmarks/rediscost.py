"""Redis time and inner calls per request, for every command, this tree
against an earlier commit, on one machine in one run.

    .venv/bin/python -m benchmarks.rediscost --against 67c3ff1

writes docs/benchmarks-rediscost.md.

Each tree runs benchmarks/rediscost_probe.py in a process of its own (the
earlier commit checked out in a temporary git worktree), against a private
redis-server: typical requests (1 KB of state in two keys, a request id on
each, rate limiting on), 300 of each command, the figures from Redis' own
INFO commandstats. The two trees alternate for `--rounds` rounds; the report
gives each figure's median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.common import Progress

REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "rediscost_probe.py"
RESULTS_JSON = REPO / "benchmarks" / "results" / "rediscost.json"
HEADER = (
    "| command | Redis us, {against} | Redis us, this tree | ratio "
    "| inner calls, {against} | inner calls, this tree | script calls |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def probe(tree: Path, repeats: int, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(PROBE), str(repeats)], cwd=tree, env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def fixed_costs(rounds: int = 3, calls: int = 3000) -> dict[str, float]:
    """Redis time per EVALSHA of scripts that do (almost) nothing: what any
    script costs before its own work, on this machine (median of rounds)."""
    import redis

    from service import scripts
    from workers.launchers.redis import EmbeddedRedis

    prelude = scripts.UPDATE.source.split("local replace = ARGV[8]")[0]
    cases = {
        "EVALSHA of `return 1`": "return 1",
        "one redis.call (`TIME`)": "redis.call('TIME') return 1",
        "three redis.call (`TIME`, `HMGET`, `HSET`)": (
            "redis.call('TIME'); redis.call('HMGET', KEYS[1], 'a', 'b', 'c'); "
            "redis.call('HSET', KEYS[1], 'a', '1'); return 1"),
        "the update script's prelude (its helpers, built on every call, and its `TIME`), "
        "then `return 1`": prelude + "\nreturn 1",
    }
    function = ("the same prelude as a Redis Function library (built once, at FUNCTION "
                "LOAD): FCALL of a function that reads `TIME`, then `return 1`")
    server = EmbeddedRedis().start()
    try:
        r = redis.Redis.from_url(server.url)
        shas = {name: r.script_load(src) for name, src in cases.items()}
        found: dict[str, list[float]] = {name: [] for name in cases}
        has_functions = int(str(r.info("server")["redis_version"]).split(".")[0]) >= 7
        if has_functions:
            r.function_load(_as_library(prelude), replace=True)
            found[function] = []
        args = ("k", "k", "", "", "0", "", "abc", "")
        for _ in range(rounds):
            for name, sha in shas.items():
                r.config_resetstat()
                for _ in range(calls):
                    r.evalsha(sha, 2, *args)
                found[name].append(float(r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]))
            if has_functions:
                r.config_resetstat()
                for _ in range(calls):
                    r.fcall("noop", 2, *args)
                found[function].append(float(r.info("commandstats")["cmdstat_fcall"]["usec_per_call"]))
    finally:
        server.stop()
    return {name: statistics.median(v) for name, v in found.items()}


def _as_library(prelude: str) -> str:
    """The prelude as a Function library: its helpers defined once, the
    per-call values (KEYS, ARGV, the clock) set by the function itself."""
    lib = prelude.replace("local sid, chash = ARGV[4], ARGV[5]",
                          "local KEYS, ARGV, now, sid, chash, idx_sets, idx_until")
    clock = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)"
    if clock not in lib:
        raise ValueError("the prelude's clock reading is not where _as_library looks")
    lib = lib.replace(clock, "")
    lib = lib.replace("local idx_sets, idx_until = {}, 0", "")
    lib = lib.replace("local ient = string.sub(sid, #chash + 2)", "local ient")
    return ("#!lua name=stui_rediscost\n" + lib + """
redis.register_function('noop', function(keys, args)
  KEYS, ARGV, sid, chash = keys, args, args[4], args[5]
  ient = string.sub(sid, #chash + 2)
  local t = redis.call('TIME')
  now = t[1] * 1000 + math.floor(t[2] / 1000)
  idx_sets, idx_until = {}, 0
  return 1
end)
""")


def median_of(runs: list[dict[str, Any]], command: str, figure: str) -> float:
    return float(statistics.median(r["found"][command][figure] for r in runs))


def report(against: str, old: list[dict[str, Any]], new: list[dict[str, Any]],
           seconds: float, info: dict[str, str], fixed: dict[str, float]) -> str:
    fixed_rows = "\n".join(f"| {name} | {usec:.1f} |" for name, usec in fixed.items())
    rows = []
    for command in new[0]["found"]:
        o_us, n_us = median_of(old, command, "usec"), median_of(new, command, "usec")
        o_calls, n_calls = median_of(old, command, "calls"), median_of(new, command, "calls")
        scripts = median_of(new, command, "scripts")
        rows.append(f"| {command} | {o_us:.1f} | {n_us:.1f} | {n_us / o_us:.2f}x | "
                    f"{o_calls:.1f} | {n_calls:.1f} | {scripts:.0f} |")
    described = "\n".join(f"- {k}: {v}" for k, v in info.items())
    return f"""# Redis time per command: this tree against {against}

Generated by `.venv/bin/python -m benchmarks.rediscost --against {against}` in
{seconds:.0f} s ({len(new)} rounds, the trees alternating). Do not edit by
hand: rerun the command.

Each tree's own dispatcher sends typical requests (1 KB of state in two
keys, a request id on each, rate limiting on) to a private redis-server,
300 per command; the figures are Redis' own (`INFO commandstats`): the
`usec` of `EVALSHA` per script call, the time the request holds the shard,
and the commands the script ran inside (`TIME` included), per request. The
median over the rounds is shown. `get_session_statistics` is one snapshot
read (64 script calls of two `ZCOUNT`s each), shown per script call.

{HEADER.format(against=against)}
{chr(10).join(rows)}

## What any script costs here

Redis time per `EVALSHA` (3,000 calls, median of 3 rounds) of scripts that
do nothing of their own: what a script call costs before its own work, each
`redis.call`, and the update script's prelude, whose helpers Lua builds
again on every call (closures and tables). The last row is that prelude as
a Redis Function library, built once: what Functions would save per call.
The service does not use them: the saving is a few microseconds against
the update script's total above, and Functions need Redis 7, a `FUNCTION
LOAD` on every primary (and again after a restart without persistence),
and a fallback to scripts for Redis 6.2.

| script | Redis us per call |
|---|---:|
{fixed_rows}

## Machine

{described}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks-rediscost.md")
    args = parser.parse_args()
    progress = Progress()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stui-rediscost-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.against],
                       cwd=REPO, check=True)
        try:
            old: list[dict[str, Any]] = []
            new: list[dict[str, Any]] = []
            for n in range(args.rounds):
                progress(f"round {n + 1}/{args.rounds}: {args.against}")
                old.append(probe(tree, args.repeats))
                progress(f"round {n + 1}/{args.rounds}: this tree")
                new.append(probe(REPO, args.repeats))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                           check=False)
    progress("fixed costs of a script call")
    fixed = fixed_costs()
    info = machine.describe(new[0]["redis"])
    args.output.write_text(
        report(args.against, old, new, time.monotonic() - started, info, fixed))
    progress(f"wrote {args.output}")
    # The figures, for benchmarks.report (docs/benchmarks.md shows them beside its own).
    medians = {command: {f"{tree}_{figure}": median_of(runs, command, figure)
                         for tree, runs in (("old", old), ("new", new))
                         for figure in ("usec", "calls")}
               for command in new[0]["found"]}
    RESULTS_JSON.write_text(json.dumps({"against": args.against, "date": info["date"],
                                        "commands": medians, "fixed": fixed}, indent=1) + "\n")
    progress(f"wrote {RESULTS_JSON}")


if __name__ == "__main__":
    main()
