"""Run the whole benchmark with one command.

    .venv/bin/python -m benchmarks.run            # full run, ~5-10 min, writes docs/
    .venv/bin/python -m benchmarks.run --quick    # smoke run, < 1 min, writes
                                                  # benchmarks/results/quick/

Starts a private redis-server (no persistence, free port), the real front
worker and the echo server as child processes, drives both with one load
generator and writes the report, its chart and the raw results (JSON).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import chart, machine, memscale, phases, report, stages, targets
from benchmarks.common import Progress, plain
from benchmarks.measure import FULL, QUICK, Config
from benchmarks.servers import REPO, Stack

RESULTS = REPO / "benchmarks" / "results"


def write_json(run: report.Run, path: Path) -> None:
    data = {
        "command": run.command,
        "duration_s": run.duration_s,
        "config": asdict(run.config),
        "machine": run.machine,
        "targets": [{**asdict(t), "verdict": t.verdict} for t in run.targets],
        "statistics": {"small": asdict(run.small), "large": asdict(run.large)},
        "memory": {**asdict(run.memory), "per_session": run.memory.per_session},
        "runs": [asdict(r) for r in run.results],
        "repeated_runs": [asdict(r) for r in run.repeated],
        "other_commands": [asdict(r) for r in run.others],
        "stages": run.stages,
        "memory_scale": run.memory_scale,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(data), indent=1, allow_nan=False) + "\n")


def measure_all(cfg: Config, command: str, progress: Progress) -> report.Run:
    started = time.monotonic()
    progress("starting redis-server, front worker and echo server")
    with Stack(RESULTS / "logs") as stack:
        info = machine.describe(stack.server_version())
        progress(f"redis {info['redis-server']} at {stack.redis_server.url}, front at "
                 f"{stack.front_endpoint}, echo at {stack.echo_endpoint}")
        progress(f"phase 1/6: get_session_statistics at {cfg.small_sessions:,} sessions")
        small = phases.statistics_at_small(stack, cfg, progress)
        progress(f"phase 2/6: preparing {cfg.target_sessions:,} target sessions")
        goals = phases.prepare_targets(stack, cfg, progress)
        progress("phase 3/6: command matrix, front worker vs echo server")
        results = phases.matrix(stack, cfg, goals, progress)
        progress(f"phase 3b/6: {cfg.repeats} more front/echo pairs of update x64")
        repeated = phases.repeats(stack, cfg, goals, progress)
        progress("phase 3c/6: every other command through the front worker")
        others = phases.every_command(stack, cfg, goals, progress)
        progress(f"phase 4/6: memory and statistics at {cfg.memory_sessions:,} sessions")
        memory, large = phases.memory_and_statistics(stack, cfg, progress)
        sizes = memscale.QUICK_SIZES if cfg.quick else memscale.FULL_SIZES
        progress(f"phase 5/6: memory per session at {', '.join(f'{n:,}' for n in sizes)} "
                 "sessions")
        scale = memscale.measure(stack.redis_server.url, sizes, progress)
    progress("phase 6/6: the front's CPU per request, stage by stage (in this process)")
    split = stages.measure(cfg.quick, progress)
    verdicts = targets.evaluate(results, repeated, cfg.kinds, max(cfg.inflights), memory,
                                small, large, others)
    return report.Run(command, cfg, info, results, repeated, small, large, memory, verdicts,
                      time.monotonic() - started, "benchmarks.png", others, split, scale,
                      report.load_rediscost(), report.load_rediscount())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--docs", type=Path, default=None,
                        help="where benchmarks.md and benchmarks.png go (default: docs/ for a "
                             "full run, benchmarks/results/quick/ for --quick)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    docs: Path = args.docs or (RESULTS / "quick" if args.quick else REPO / "docs")
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.run",
                          *(sys.argv[1:] if argv is None else argv)])
    progress = Progress()
    run = measure_all(cfg, command, progress)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kind = "quick" if cfg.quick else "full"
    for path in (RESULTS / f"{stamp}-{kind}.json", RESULTS / f"latest-{kind}.json"):
        write_json(run, path)
    chart.draw(run.results, cfg.kinds, cfg.inflights, docs / run.chart)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.md").write_text(report.render(run))
    progress(f"wrote {docs / 'benchmarks.md'}, {docs / run.chart} and "
             f"{RESULTS / f'{stamp}-{kind}.json'}")
    for t in run.targets:
        progress(f"{t.verdict:8s} {t.name}: {t.measured} (goal {t.goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
