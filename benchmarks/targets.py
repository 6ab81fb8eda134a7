"""The issue's targets, measured and judged (never asserted: a run always completes)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from benchmarks.measure import RunResult
from benchmarks.phases import MemoryResult, StatsResult
from benchmarks.workload import OPS

# The lean request path's floors (its issue's table), and the earlier ones.
THROUGHPUT_RATIO = 0.5
CPU_RATIO = 2.5
MEMORY_BYTES = 1800  # everything included: replay records too
REDIS_UPDATE_US = 40.0  # INFO commandstats usec of EVALSHA per update, DEALER x64
UPDATE_INNER_CALLS = 8.0
REDIS_OTHER_US = 45.0  # the same for every other command
STATS_SLOWDOWN = 1.5
STATS_COMMANDS = 64  # service.keys.NUM_BUCKETS: one script call per bucket


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measured: str
    met: bool
    before: str = ""  # the figure when the lean request path's issue was filed

    @property
    def verdict(self) -> str:
        return "MET" if self.met else "NOT MET"


# What the lean request path's issue measured before it (its table's "now").
BEFORE = {
    "throughput": "0.18-0.28x",
    "cpu": "4.5-4.8x",
    "redis_update": "74-79 us",
    "inner_calls": "20",
    "redis_other": "35-71 us",
    "memory": "3,302 B",
}


def find(results: list[RunResult], server: str, op: str, kind: str,
         inflight: int) -> RunResult | None:
    for r in results:
        if (r.server, r.op, r.kind, r.inflight) == (server, op, kind, inflight):
            return r
    return None


def pair(results: list[RunResult], op: str, kind: str,
         inflight: int) -> tuple[RunResult, RunResult] | None:
    front = find(results, "front", op, kind, inflight)
    echo = find(results, "echo", op, kind, inflight)
    return (front, echo) if front and echo else None


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def pairs(results: list[RunResult], op: str, kind: str,
          inflight: int) -> list[tuple[RunResult, RunResult]]:
    """Every (front, echo) pair of a case, in the order they ran."""
    fronts = [r for r in results if (r.server, r.op, r.kind, r.inflight) ==
              ("front", op, kind, inflight)]
    echoes = [r for r in results if (r.server, r.op, r.kind, r.inflight) ==
              ("echo", op, kind, inflight)]
    return list(zip(fronts, echoes, strict=False))


def spread(values: list[float]) -> str:
    """'median' or 'median (min-max of n)'."""
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:.2f}x"
    return f"{mid:.2f}x (median; {min(values):.2f}-{max(values):.2f} over {len(values)} pairs)"


def _update_targets(results: list[RunResult], kinds: tuple[str, ...],
                    inflight: int) -> list[Target]:
    out: list[Target] = []
    op = "update_session_state"
    for kind in kinds:
        ps = pairs(results, op, kind, inflight)
        if ps:
            ratios = [ratio(f.throughput, e.throughput) for f, e in ps]
            out.append(Target(f"update throughput, {kind} x{inflight}",
                              f">= {THROUGHPUT_RATIO}x echo", spread(ratios),
                              statistics.median(ratios) >= THROUGHPUT_RATIO,
                              BEFORE["throughput"]))
    for kind in kinds:
        ps = pairs(results, op, kind, inflight)
        if ps:
            ratios = [ratio(f.total_cpu_us, e.server_cpu_us) for f, e in ps]
            front = statistics.median(f.total_cpu_us for f, _ in ps)
            echo = statistics.median(e.server_cpu_us for _, e in ps)
            out.append(Target(
                f"front+Redis CPU per update, {kind} x{inflight}",
                f"<= {CPU_RATIO}x echo CPU per request",
                f"{spread(ratios)}; {front:.0f} vs {echo:.0f} us",
                statistics.median(ratios) <= CPU_RATIO, BEFORE["cpu"]))
    return out


def redis_us(r: RunResult) -> float:
    """Redis time in the scripts per answered request (commandstats)."""
    return r.script_ms * 1000


def inner_calls(r: RunResult) -> float:
    return r.script_calls / r.answered if r.answered else float("nan")


def _redis_targets(results: list[RunResult], others: list[RunResult],
                   inflight: int) -> list[Target]:
    out: list[Target] = []
    updates = [r for r in results if (r.server, r.op, r.kind, r.inflight) ==
               ("front", "update_session_state", "DEALER", inflight)]
    if updates:
        us = statistics.median(redis_us(r) for r in updates)
        calls = statistics.median(inner_calls(r) for r in updates)
        out.append(Target(f"Redis time per update, DEALER x{inflight} (commandstats)",
                          f"<= {REDIS_UPDATE_US:.0f} us", f"{us:.1f} us (median of "
                          f"{len(updates)} runs)", us <= REDIS_UPDATE_US,
                          BEFORE["redis_update"]))
        out.append(Target("Redis calls inside the update script", f"<= {UPDATE_INNER_CALLS:.0f}",
                          f"{calls:.1f} per update", calls <= UPDATE_INNER_CALLS,
                          BEFORE["inner_calls"]))
    # get_session_statistics is left out: the benchmark's front reads the 64
    # buckets for every such request (STUI_STATS_MAX_AGE=0, for the latency
    # phase); deployed, a worker reads them at most once a second.
    rest = [r for r in results + others if r.server == "front" and r.kind == "DEALER"
            and r.inflight == inflight
            and r.op not in ("update_session_state", "get_session_statistics")]
    if rest:
        worst = max(rest, key=redis_us)
        out.append(Target(f"Redis time per request of every other command, DEALER x{inflight}",
                          f"<= {REDIS_OTHER_US:.0f} us each",
                          f"{redis_us(worst):.1f} us at most ({worst.op}); "
                          f"{len(rest)} commands", redis_us(worst) <= REDIS_OTHER_US,
                          BEFORE["redis_other"]))
    return out


def commands_per_op(results: list[RunResult], op: str) -> tuple[int, int]:
    """(client-issued Redis commands, answered requests) over all front runs of op."""
    runs = [r for r in results if r.server == "front" and r.op == op]
    return sum(r.client_commands for r in runs), sum(r.answered for r in runs)


def evaluate(results: list[RunResult], repeated: list[RunResult], kinds: tuple[str, ...],
             inflight: int, memory: MemoryResult, small: StatsResult,
             large: StatsResult, others: list[RunResult]) -> list[Target]:
    """results: the matrix; repeated: extra pairs of the headline case;
    others: every other command through the front (phases.every_command)."""
    out = _update_targets(results + repeated, kinds, inflight)
    out += _redis_targets(results + repeated, others, inflight)
    for op in OPS:
        commands, requests = commands_per_op(results, op)
        out.append(Target(
            f"Redis commands per {op}", "exactly 1",
            f"{ratio(commands, requests):.3f} ({commands:,} EVALSHA / {requests:,} requests)",
            commands == requests and requests > 0))
    for s in (small, large):
        out.append(Target(
            f"Redis commands per get_session_statistics snapshot read at {s.sessions:,} sessions",
            f"{STATS_COMMANDS}, whatever the session count", f"{s.commands_per_call:.2f}",
            abs(s.commands_per_call - STATS_COMMANDS) < 1e-9))
    out.append(Target(
        f"Redis memory per session with {memory.state_bytes} B of state "
        f"({memory.sessions:,} sessions), after a create and one update, everything "
        f"included", f"<= {MEMORY_BYTES:,} B",
        f"{memory.per_session:,.0f} B ({memory.session_encoding} session hashes)",
        memory.per_session <= MEMORY_BYTES, BEFORE["memory"]))
    slowdown = ratio(large.p50_ms, small.p50_ms)
    out.append(Target(
        f"get_session_statistics p50 at {large.sessions:,} vs {small.sessions:,} sessions",
        f"<= {STATS_SLOWDOWN}x",
        f"{slowdown:.2f}x ({large.p50_ms:.2f} vs {small.p50_ms:.2f} ms; Redis time "
        f"{large.redis_ms:.2f} vs {small.redis_ms:.2f} ms)",
        slowdown <= STATS_SLOWDOWN))
    return out
