"""The phases of a run: statistics at 1k, the command matrix, memory at 100k."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks import workload
from benchmarks.loadgen import Kind, LoadGen
from benchmarks.measure import Config, RunResult, measured, planned_count
from benchmarks.servers import Stack
from service import codec, keys

Progress = Callable[[str], None]
STATS_WARMUP = 20


@dataclass
class StatsResult:
    sessions: int  # total_sessions as the service reported it
    calls: int
    p50_ms: float
    p99_ms: float
    commands_per_call: float
    redis_ms: float  # Redis time inside the scripts per call (commandstats usec)
    errors: int

    def line(self) -> str:
        return (f"get_session_statistics at {self.sessions:,} sessions: p50 {self.p50_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms ({self.redis_ms:.2f} ms in Redis), "
                f"{self.commands_per_call:.1f} Redis commands/call")


@dataclass
class MemoryResult:
    sessions: int
    state_bytes: int  # encoded state per session
    used_before: int
    used_loaded: int  # after the creates and updates, their replay records included
    create: RunResult
    update: RunResult
    breakdown: dict[str, float]  # bytes per session, by kind of key (MEMORY USAGE)
    session_encoding: str  # OBJECT ENCODING of a session hash

    @property
    def per_session(self) -> float:
        """Everything included: the session, its index entry and bucket
        members, and the replay records of its create and its update."""
        return (self.used_loaded - self.used_before) / max(1, self.sessions)


def populate(stack: Stack, count: int, client_prefix: str, seconds: float,
             tag: str) -> tuple[list[str], RunResult, RunResult]:
    """count sessions (5 per client) through the front worker with DEALER 64
    in flight, then one 1 KB state update each."""
    with LoadGen(stack.ctx, stack.front_endpoint, "DEALER", 64) as lg:
        create, sample = measured(stack, "front", f"create_session ({tag})", "DEALER", 64, lg,
                                  workload.create_bodies(count, client_prefix), seconds,
                                  keep_replies=True)
        sids = workload.session_ids_of(sample.replies)
        if not sids:
            raise RuntimeError(f"no session was created: {create.error_sample}")
        update, _ = measured(stack, "front", f"update_session_state ({tag})", "DEALER", 64, lg,
                             workload.update_bodies(len(sids), sids), seconds)
    return sids, create, update


def statistics_latency(stack: Stack, cfg: Config) -> StatsResult:
    with LoadGen(stack.ctx, stack.front_endpoint, "REQ", 1) as lg:
        lg.drive(workload.statistics_bodies(STATS_WARMUP), 30.0)
        result, sample = measured(stack, "front", "get_session_statistics", "REQ", 1, lg,
                                  workload.statistics_bodies(cfg.stats_calls), 120.0,
                                  keep_replies=True)
    sessions = -1
    if sample.ok:
        last = codec.loads(sample.replies[-1])
        sessions = int(last.get("result", {}).get("total_sessions", -1))
    return StatsResult(sessions, result.answered, result.p50_ms, result.p99_ms,
                       result.commands_per_request, result.script_ms,
                       result.errors + result.lost)


def statistics_at_small(stack: Stack, cfg: Config, progress: Progress) -> StatsResult:
    stack.redis.flushall()
    populate(stack, cfg.small_sessions, "stats-small", cfg.bulk_seconds, "stats")
    stats = statistics_latency(stack, cfg)
    progress(stats.line())
    return stats


def prepare_targets(stack: Stack, cfg: Config, progress: Progress) -> workload.Targets:
    stack.redis.flushall()
    sids, create, update = populate(stack, cfg.target_sessions, "bench", cfg.bulk_seconds,
                                    "targets")
    clients = sorted({f"bench-{n // workload.SESSIONS_PER_CLIENT}" for n in range(len(sids))})
    progress(f"prepared {len(sids):,} sessions with 1 KB state for {len(clients):,} clients "
             f"({create.throughput:,.0f} creates/s, {update.throughput:,.0f} updates/s)")
    return workload.Targets(sids, clients)


def measure_one(stack: Stack, cfg: Config, targets: workload.Targets, op: str, kind: Kind,
                inflight: int, server: str, warm_up: bool = True) -> RunResult:
    """One drive after a warm-up; without one (a command that can run only
    once per target session), of as many requests as there are targets."""
    with LoadGen(stack.ctx, stack.endpoint(server), kind, inflight) as lg:
        count = len(targets.session_ids)
        if warm_up:
            warm = lg.drive(workload.bodies_for(op, cfg.warmup_requests, targets),
                            cfg.warmup_seconds)
            count = planned_count(cfg, warm)
        bodies = workload.bodies_for(op, count, targets)
        result, _ = measured(stack, server, op, kind, inflight, lg, bodies, cfg.run_seconds)
    return result


def matrix(stack: Stack, cfg: Config, targets: workload.Targets,
           progress: Progress) -> list[RunResult]:
    """Every command x socket type x in-flight, front then echo back to back."""
    results: list[RunResult] = []
    total = len(workload.OPS) * len(cfg.kinds) * len(cfg.inflights) * 2
    for op in workload.OPS:
        for kind in cfg.kinds:
            for inflight in cfg.inflights:
                for server in ("front", "echo"):
                    results.append(measure_one(stack, cfg, targets, op, kind, inflight, server))
                    progress(f"[{len(results):3d}/{total}] {results[-1].line()}")
    return results


def repeats(stack: Stack, cfg: Config, targets: workload.Targets,
            progress: Progress) -> list[RunResult]:
    """More front/echo pairs of the headline case (update, 64 in flight), so
    its ratios come as a median with a spread rather than one noisy pair."""
    results: list[RunResult] = []
    op, inflight = "update_session_state", max(cfg.inflights)
    for rep in range(cfg.repeats):
        for kind in cfg.kinds:
            for server in ("front", "echo"):
                results.append(measure_one(stack, cfg, targets, op, kind, inflight, server))
                progress(f"[repeat {rep + 1}/{cfg.repeats}] {results[-1].line()}")
    return results


def every_command(stack: Stack, cfg: Config, targets: workload.Targets,
                  progress: Progress) -> list[RunResult]:
    """Every command the matrix leaves out, through the front worker only,
    DEALER with the most requests in flight: its Redis time and inner calls
    per request (INFO commandstats) and the front's CPU. close_session comes
    last: it ends the target sessions."""
    results: list[RunResult] = []
    inflight = max(cfg.inflights)
    for n, op in enumerate(workload.OTHER_OPS, 1):
        # Each target session can be closed once: no warm-up for close.
        result = measure_one(stack, cfg, targets, op, "DEALER", inflight, "front",
                             warm_up=op != "close_session")
        results.append(result)
        progress(f"[{n:2d}/{len(workload.OTHER_OPS)}] {result.line()}")
    return results


def _sampled_usage(stack: Stack, pattern: str, limit: int) -> tuple[float, str]:
    """Mean MEMORY USAGE of up to `limit` keys matching pattern, and one's encoding."""
    sizes: list[int] = []
    encoding = ""
    for key in stack.redis.scan_iter(match=pattern, count=1000):
        sizes.append(int(stack.redis.memory_usage(key, samples=0) or 0))
        if not encoding:
            raw = stack.redis.object("encoding", key)
            encoding = raw.decode() if isinstance(raw, bytes) else str(raw)
        if len(sizes) >= limit:
            break
    return (sum(sizes) / len(sizes) if sizes else 0.0), encoding


def memory_breakdown(stack: Stack, sessions: int, clients: int) -> tuple[dict[str, float], str]:
    """Bytes per session by kind of key; the rest of used_memory is Redis'
    own keyspace and expiry tables and allocator rounding."""
    session, encoding = _sampled_usage(stack, "stui:*:s:*", 500)
    index, _ = _sampled_usage(stack, "stui:*:c:*", 500)
    zsets = sum(int(stack.redis.memory_usage(k, samples=0) or 0)
                for b in range(keys.NUM_BUCKETS)
                for k in (keys.bucket_expiry_key(b), keys.bucket_clients_key(b)))
    return {
        "session hash (sampled)": session,
        "client index hash (sampled), per session": index * clients / max(1, sessions),
        "bucket zsets (expiry, clients), per session": zsets / max(1, sessions),
    }, encoding


def memory_and_statistics(stack: Stack, cfg: Config,
                          progress: Progress) -> tuple[MemoryResult, StatsResult]:
    stack.redis.flushall()
    before = stack.used_memory()
    sids, create, update = populate(stack, cfg.memory_sessions, "mem", cfg.bulk_seconds, "bulk")
    for r in (create, update):
        progress(r.line())
    loaded = stack.used_memory()
    stats = statistics_latency(stack, cfg)
    progress(stats.line())
    state_bytes = len(codec.dumps(workload.state_data(0)))
    clients = -(-len(sids) // workload.SESSIONS_PER_CLIENT)
    breakdown, encoding = memory_breakdown(stack, len(sids), clients)
    memory = MemoryResult(len(sids), state_bytes, before, loaded, create, update, breakdown,
                          encoding)
    progress(f"memory at {memory.sessions:,} sessions: {memory.per_session:,.0f} B/session, "
             f"everything included ({encoding} session hashes)")
    return memory, stats
