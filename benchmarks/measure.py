"""One measured drive: load, the counters around it, and what they come to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.loadgen import Body, Kind, LoadGen, Sample
from benchmarks.servers import Snapshot, Stack

# Commands the front worker sends to Redis on the request path. Commands run
# inside a script are counted in commandstats too: they make up the rest of
# the delta, apart from our own INFO and connection housekeeping.
CLIENT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
NOT_REQUEST_PATH = ("info", "hello", "ping", "select", "client|setinfo", "client|setname")


@dataclass(frozen=True)
class Config:
    quick: bool
    run_seconds: float  # time bound of each measured drive
    warmup_seconds: float
    max_requests: int  # count bound of each measured drive
    warmup_requests: int
    target_sessions: int  # pre-created sessions that reads and updates aim at
    small_sessions: int  # statistics latency "at 1k"
    memory_sessions: int  # statistics latency and memory "at 100k"
    stats_calls: int
    bulk_seconds: float  # time bound of each bulk drive of the memory phase
    repeats: int  # extra front/echo pairs of update x64, for the headline targets
    inflights: tuple[int, ...] = (1, 16, 64)
    kinds: tuple[Kind, ...] = ("REQ", "DEALER")


FULL = Config(quick=False, run_seconds=2.5, warmup_seconds=0.4, max_requests=60_000,
              warmup_requests=3_000, target_sessions=2_000, small_sessions=1_000,
              memory_sessions=100_000, stats_calls=1_000, bulk_seconds=150.0, repeats=4)
QUICK = Config(quick=True, run_seconds=0.25, warmup_seconds=0.1, max_requests=4_000,
               warmup_requests=300, target_sessions=250, small_sessions=1_000,
               memory_sessions=5_000, stats_calls=50, bulk_seconds=30.0, repeats=1)


@dataclass
class RunResult:
    server: str  # "front" (front worker + Redis) or "echo"
    op: str
    kind: str
    inflight: int
    ok: int
    errors: int
    lost: int
    elapsed_s: float
    throughput: float  # answered requests per second
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # per answered request
    redis_cpu_us: float  # per answered request (front runs only)
    loadgen_cpu_us: float  # per answered request: the load generator's own cost
    client_commands: int  # EVALSHA/EVAL calls Redis received
    script_calls: int  # commands run inside those scripts
    script_ms: float  # Redis time inside EVALSHA per answered request (commandstats usec)
    error_sample: str

    @property
    def answered(self) -> int:
        return self.ok + self.errors

    @property
    def total_cpu_us(self) -> float:
        return self.server_cpu_us + self.redis_cpu_us

    @property
    def commands_per_request(self) -> float:
        return self.client_commands / self.answered if self.answered else math.nan

    @staticmethod
    def of(server: str, op: str, kind: str, inflight: int, sample: Sample,
           delta: Snapshot) -> RunResult:
        n = max(1, sample.answered)
        client = sum(delta.commands.get(c, 0) for c in CLIENT_COMMANDS)
        client += sum(v for k, v in delta.commands.items() if k.startswith("script"))
        inner = sum(v for k, v in delta.commands.items() if k not in NOT_REQUEST_PATH) - client
        redis_cpu = delta.redis_cpu if server == "front" else 0.0
        return RunResult(
            server=server, op=op, kind=kind, inflight=inflight, ok=sample.ok,
            errors=sample.errors, lost=sample.lost, elapsed_s=sample.elapsed,
            throughput=sample.throughput, p50_ms=sample.percentile_ms(0.50),
            p99_ms=sample.percentile_ms(0.99), server_cpu_us=delta.server_cpu / n * 1e6,
            redis_cpu_us=redis_cpu / n * 1e6, loadgen_cpu_us=delta.loadgen_cpu / n * 1e6,
            client_commands=client, script_calls=inner,
            script_ms=delta.script_usec / n / 1000,
            error_sample=sample.error_sample,
        )

    def line(self) -> str:
        flag = f" ERRORS {self.errors} lost {self.lost}: {self.error_sample[:120]}" \
            if self.errors or self.lost else ""
        cpu = f"cpu {self.server_cpu_us:.0f}+{self.redis_cpu_us:.0f} us/req"
        return (f"{self.op} {self.kind} x{self.inflight} {self.server}: "
                f"{self.throughput:,.0f} req/s, p50 {self.p50_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms, {cpu}{flag}")


def measured(stack: Stack, server: str, op: str, kind: Kind, inflight: int,
             lg: LoadGen, bodies: Sequence[Body], seconds: float,
             keep_replies: bool = False) -> tuple[RunResult, Sample]:
    """Drive `bodies` through an already warm load generator, reading the
    counters just before and just after."""
    before = stack.snapshot(server)
    sample = lg.drive(bodies, seconds, keep_replies=keep_replies)
    after = stack.snapshot(server)
    return RunResult.of(server, op, kind, inflight, sample, after.minus(before)), sample


def planned_count(cfg: Config, warm: Sample) -> int:
    """Enough bodies for the time bound at the warm-up's rate, within the count bound."""
    guess = int(warm.throughput * cfg.run_seconds * 1.6) + 500
    return max(500, min(cfg.max_requests, guess))
