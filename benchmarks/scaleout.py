"""Scale-out: 1, 2 and 4 front processes behind one HAProxy endpoint.

    .venv/bin/python -m benchmarks.scaleout           # full run, a few minutes; writes
                                                      # benchmarks/results/scaleout.json and
                                                      # docs/benchmarks-scaleout.md
    .venv/bin/python -m benchmarks.scaleout --quick   # smoke run, under a minute; writes
                                                      # benchmarks/results/quick/

One private redis-server (no persistence), N `stui-sessions front --workers 1`
processes, and HAProxy in TCP mode balancing connections round robin over
them (workers/launchers/haproxy.py). The load generator of benchmarks/loadgen.py
drives the HAProxy endpoint with REQ sockets: HAProxy balances *connections*,
so 64 REQ sockets (64 connections) spread evenly, where one DEALER socket would
pin all its load on one front. A "1 front, direct" configuration (no HAProxy)
shows what the proxy itself costs.

CPU per request = (CPU seconds of all front processes + redis-server +
haproxy, read with psutil around the measured drive) / answered requests.
Every configuration runs in each round, the order reversed every other round,
and each figure is the median over the rounds; ratios are against the
1-front-behind-HAProxy run of the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
import zmq

from benchmarks import machine, workload
from benchmarks.common import RESULTS, Progress, outputs, plain
from benchmarks.loadgen import Body, LoadGen
from benchmarks.servers import REPO, _clean_env, process_cpu, wait_answering
from workers.launchers.haproxy import HAProxy, find_haproxy
from workers.launchers.process import free_port
from workers.launchers.redis import EmbeddedRedis

OPS = ("update_session_state", "ping")
INFLIGHT = 64  # REQ sockets, hence connections through HAProxy


@dataclass(frozen=True)
class Setup:
    name: str
    fronts: int
    proxied: bool


SETUPS = (
    Setup("1 front, direct", 1, False),
    Setup("1 front", 1, True),
    Setup("2 fronts", 2, True),
    Setup("4 fronts", 4, True),
)
BASELINE = "1 front"


@dataclass(frozen=True)
class Config:
    quick: bool
    rounds: int
    run_seconds: float  # time bound of each measured drive
    warmup_seconds: float
    max_requests: int  # count bound of each measured drive
    warmup_requests: int
    sessions: int  # pre-created sessions with 1 KB state that updates aim at


FULL = Config(quick=False, rounds=5, run_seconds=3.0, warmup_seconds=0.5, max_requests=60_000,
              warmup_requests=3_000, sessions=2_000)
QUICK = Config(quick=True, rounds=1, run_seconds=0.4, warmup_seconds=0.1, max_requests=4_000,
               warmup_requests=300, sessions=250)


@dataclass
class Drive:
    """One measured drive of one op against one setup."""

    setup: str
    fronts: int
    op: str
    round: int
    ok: int
    errors: int
    lost: int
    elapsed_s: float
    throughput: float
    p50_ms: float
    p99_ms: float
    front_cpu_us: float  # per answered request, all fronts together
    redis_cpu_us: float
    haproxy_cpu_us: float
    loadgen_cpu_us: float  # this process, with its ZeroMQ I/O thread
    connections: list[int]  # HAProxy's current connections per front during the drive
    # Answered requests per read event in Redis (INFO stats
    # total_reads_processed): how many calls arrive in one pipelined batch.
    requests_per_redis_read: float
    error_sample: str = ""

    @property
    def server_cpu_us(self) -> float:
        return self.front_cpu_us + self.redis_cpu_us + self.haproxy_cpu_us


@dataclass
class Summary:
    """Medians over the rounds of one (setup, op)."""

    setup: str
    fronts: int
    op: str
    throughput: float
    throughput_range: tuple[float, float]
    server_cpu_us: float
    front_cpu_us: float
    redis_cpu_us: float
    haproxy_cpu_us: float
    loadgen_cpu_us: float
    requests_per_redis_read: float
    p50_ms: float
    p99_ms: float
    errors: int  # summed over the rounds, lost requests included
    throughput_x: float = math.nan  # against the baseline's median
    cpu_x: float = math.nan
    # Each round's ratio against the same round's baseline: the spread.
    throughput_x_range: tuple[float, float] = (math.nan, math.nan)
    cpu_x_range: tuple[float, float] = (math.nan, math.nan)


@dataclass
class Run:
    command: str
    config: Config
    machine: dict[str, str]
    haproxy_version: str
    drives: list[Drive] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    duration_s: float = 0.0


# -- the processes ------------------------------------------------------------


class Fleet:
    """N front processes on one Redis, optionally behind HAProxy."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], redis_url: str, setup: Setup,
                 log_dir: Path) -> None:
        self.ctx = ctx
        self.redis_url = redis_url
        self.setup = setup
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(setup.fronts)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proxy: HAProxy | None = None

    def start(self) -> Fleet:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            # All started before any is waited for: their imports overlap.
            for port in self.ports:
                cmd = [sys.executable, "-m", "workers.cli", "front", "--redis-url",
                       self.redis_url, "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1"]
                with open(self.log_dir / f"front-{port}.log", "wb") as log:
                    # Default settings (as benchmarks/servers.py), so the figures
                    # compare with docs/benchmarks.md.
                    self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=_clean_env(),
                                                       stdout=log, stderr=subprocess.STDOUT))
            for port, proc in zip(self.ports, self.procs, strict=True):
                wait_answering(self.ctx, f"tcp://127.0.0.1:{port}", proc)
            if self.setup.proxied:
                self.proxy = HAProxy([f"127.0.0.1:{p}" for p in self.ports]).start()
                for i in range(len(self.ports)):
                    self.proxy.wait_status(HAProxy.server_name(i), "UP")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def endpoint(self) -> str:
        if self.proxy is not None:
            return self.proxy.endpoint
        return f"tcp://127.0.0.1:{self.ports[0]}"

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: all fronts, and HAProxy (0 when direct)."""
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a front exited with {proc.returncode}")
        fronts = sum(process_cpu(p.pid) for p in self.procs)
        return fronts, (process_cpu(self.proxy.pid) if self.proxy is not None else 0.0)

    def connections(self) -> list[int]:
        if self.proxy is None:
            return [INFLIGHT]
        stats = self.proxy.server_stats()
        return [int(stats[HAProxy.server_name(i)]["scur"]) for i in range(len(self.ports))]

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the load -----------------------------------------------------------------


def ping_bodies(count: int) -> list[Body]:
    tag = workload.fresh_tag("p")
    return [workload.body(f"{tag}-{n}", "ping", {}) for n in range(count)]


def bodies_for(op: str, count: int, session_ids: list[str]) -> list[Body]:
    if op == "ping":
        return ping_bodies(count)
    return workload.update_bodies(count, session_ids)


def prepare_sessions(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                     count: int) -> list[str]:
    """count sessions (5 per client) with one 1 KB state update each."""
    with LoadGen(ctx, endpoint, "DEALER", 64) as lg:
        created = lg.drive(workload.create_bodies(count, "scaleout"), 120.0, keep_replies=True)
        sids = workload.session_ids_of(created.replies)
        if len(sids) != count:
            raise RuntimeError(f"created {len(sids)} of {count} sessions: {created.error_sample}")
        updated = lg.drive(workload.update_bodies(len(sids), sids), 120.0)
        if updated.ok != len(sids):
            raise RuntimeError(f"state updates failed: {updated.error_sample}")
    return sids


def _redis_reads(rc: redis.Redis) -> int:
    return int(rc.info("stats")["total_reads_processed"])


def measure(ctx: zmq.Context[zmq.Socket[bytes]], fleet: Fleet, redis_pid: int,
            rc: redis.Redis, cfg: Config, op: str, session_ids: list[str],
            round_no: int) -> Drive:
    with LoadGen(ctx, fleet.endpoint, "REQ", INFLIGHT) as lg:
        warm = lg.drive(bodies_for(op, cfg.warmup_requests, session_ids), cfg.warmup_seconds)
        # Enough bodies for the time bound at the warm-up's rate, within the count bound.
        planned = max(500, min(cfg.max_requests, int(warm.throughput * cfg.run_seconds * 1.6)
                               + 500))
        bodies = bodies_for(op, planned, session_ids)
        connections = fleet.connections()
        fronts0, proxy0 = fleet.cpu()
        reads0 = _redis_reads(rc)
        redis0, lg0 = process_cpu(redis_pid), time.process_time()
        sample = lg.drive(bodies, cfg.run_seconds)
        fronts1, proxy1 = fleet.cpu()
        redis1, lg1 = process_cpu(redis_pid), time.process_time()
        reads = _redis_reads(rc) - reads0
    n = max(1, sample.answered)
    return Drive(
        setup=fleet.setup.name, fronts=fleet.setup.fronts, op=op, round=round_no,
        ok=sample.ok, errors=sample.errors, lost=sample.lost, elapsed_s=sample.elapsed,
        throughput=sample.throughput, p50_ms=sample.percentile_ms(0.50),
        p99_ms=sample.percentile_ms(0.99), front_cpu_us=(fronts1 - fronts0) / n * 1e6,
        redis_cpu_us=(redis1 - redis0) / n * 1e6, haproxy_cpu_us=(proxy1 - proxy0) / n * 1e6,
        loadgen_cpu_us=(lg1 - lg0) / n * 1e6, connections=connections,
        requests_per_redis_read=sample.answered / reads if reads else math.nan,
        error_sample=sample.error_sample,
    )


def line(d: Drive) -> str:
    flag = f" ERRORS {d.errors} lost {d.lost}: {d.error_sample[:120]}" \
        if d.errors or d.lost else ""
    return (f"{d.op} via {d.setup} (connections {d.connections}): {d.throughput:,.0f} req/s, "
            f"p50 {d.p50_ms:.2f} ms, p99 {d.p99_ms:.2f} ms, CPU {d.server_cpu_us:.0f} us/req "
            f"(fronts {d.front_cpu_us:.0f} + redis {d.redis_cpu_us:.0f} + haproxy "
            f"{d.haproxy_cpu_us:.0f}), load generator {d.loadgen_cpu_us:.0f}, "
            f"requests per Redis read {_reads(d.requests_per_redis_read, d.op)}{flag}")


# -- summaries ----------------------------------------------------------------


def _span(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (math.nan, math.nan)


def summarise(drives: list[Drive]) -> list[Summary]:
    out: list[Summary] = []
    for op in OPS:
        for setup in SETUPS:
            ds = [d for d in drives if d.op == op and d.setup == setup.name]
            if not ds:
                continue
            med = statistics.median
            out.append(Summary(
                setup=setup.name, fronts=setup.fronts, op=op,
                throughput=med(d.throughput for d in ds),
                throughput_range=_span([d.throughput for d in ds]),
                server_cpu_us=med(d.server_cpu_us for d in ds),
                front_cpu_us=med(d.front_cpu_us for d in ds),
                redis_cpu_us=med(d.redis_cpu_us for d in ds),
                haproxy_cpu_us=med(d.haproxy_cpu_us for d in ds),
                loadgen_cpu_us=med(d.loadgen_cpu_us for d in ds),
                requests_per_redis_read=med(d.requests_per_redis_read for d in ds),
                p50_ms=med(d.p50_ms for d in ds), p99_ms=med(d.p99_ms for d in ds),
                errors=sum(d.errors + d.lost for d in ds),
            ))
        base = next((s for s in out if s.op == op and s.setup == BASELINE), None)
        if base is None:
            continue
        for s in out:
            if s.op != op:
                continue
            s.throughput_x = s.throughput / base.throughput if base.throughput else math.nan
            s.cpu_x = s.server_cpu_us / base.server_cpu_us if base.server_cpu_us else math.nan
            tx: list[float] = []
            cx: list[float] = []
            for d in drives:
                if d.op != op or d.setup != s.setup:
                    continue
                b = next(x for x in drives
                         if x.op == op and x.setup == BASELINE and x.round == d.round)
                tx.append(d.throughput / b.throughput if b.throughput else math.nan)
                cx.append(d.server_cpu_us / b.server_cpu_us if b.server_cpu_us else math.nan)
            s.throughput_x_range, s.cpu_x_range = _span(tx), _span(cx)
    return out


# -- the whole run ------------------------------------------------------------


def _haproxy_version() -> str:
    binary = find_haproxy()
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


def measure_all(cfg: Config, command: str, progress: Callable[[str], None]) -> Run:
    started = time.monotonic()
    if find_haproxy() is None:
        raise SystemExit("haproxy is not installed (apt-get install haproxy): nothing to measure")
    log_dir = RESULTS / ("quick" if cfg.quick else "") / "scaleout-logs"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with EmbeddedRedis() as server:  # no data_dir: no persistence
            assert server.process is not None
            with redis.Redis.from_url(server.url) as rc:
                version = str(rc.info("server")["redis_version"])
                run = Run(command, cfg, machine.describe(version), _haproxy_version())
                progress(f"redis {version} at {server.url}; {run.haproxy_version}")
                with Fleet(ctx, server.url, SETUPS[0], log_dir) as fleet:
                    sids = prepare_sessions(ctx, fleet.endpoint, cfg.sessions)
                progress(f"prepared {len(sids):,} sessions with 1 KB of state")
                for round_no in range(1, cfg.rounds + 1):
                    # Reversed every other round, so a slow drift of the shared
                    # machine's load does not always favour the same setup.
                    order = SETUPS if round_no % 2 else tuple(reversed(SETUPS))
                    for setup in order:
                        where = " behind haproxy" if setup.proxied else ""
                        progress(f"round {round_no}/{cfg.rounds}: starting {setup.name}{where}")
                        with Fleet(ctx, server.url, setup, log_dir) as fleet:
                            for op in OPS:
                                drive = measure(ctx, fleet, server.process.pid, rc, cfg, op,
                                                sids, round_no)
                                run.drives.append(drive)
                                progress(f"round {round_no}/{cfg.rounds}: {line(drive)}")
    finally:
        ctx.destroy(linger=0)
    # Next to the load at start: this run's own processes keep about two CPUs
    # busy, so a load far above that at the end means other work competed.
    load = os.getloadavg()
    run.machine["load average at end"] = f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    run.summaries = summarise(run.drives)
    run.duration_s = time.monotonic() - started
    return run


def write_json(run: Run, path: Path) -> None:
    data = {
        "command": run.command,
        "duration_s": run.duration_s,
        "config": asdict(run.config),
        "machine": run.machine,
        "haproxy": run.haproxy_version,
        "inflight": INFLIGHT,
        "baseline": BASELINE,
        "summaries": [asdict(s) for s in run.summaries],
        "drives": [{**asdict(d), "server_cpu_us": d.server_cpu_us} for d in run.drives],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(data), indent=1, allow_nan=False) + "\n")


# -- the report ---------------------------------------------------------------


def _x(value: float, span: tuple[float, float]) -> str:
    if not math.isfinite(value):
        return "-"
    if not all(math.isfinite(v) for v in span) or span[0] == span[1]:
        return f"{value:.2f}x"
    return f"{value:.2f}x ({span[0]:.2f}-{span[1]:.2f})"


def _table(run: Run, op: str) -> str:
    rows = [
        "| setup | req/s (median) | req/s range | throughput x 1 front | CPU us/req: all | "
        "fronts | redis | haproxy | CPU x 1 front | load gen us/req | requests per Redis read | "
        "p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in run.summaries:
        if s.op != op:
            continue
        lo, hi = s.throughput_range
        rows.append(
            f"| {s.setup} | {s.throughput:,.0f} | {lo:,.0f}-{hi:,.0f} | "
            f"{_x(s.throughput_x, s.throughput_x_range)} | {s.server_cpu_us:.0f} | "
            f"{s.front_cpu_us:.0f} | {s.redis_cpu_us:.0f} | {s.haproxy_cpu_us:.0f} | "
            f"{_x(s.cpu_x, s.cpu_x_range)} | {s.loadgen_cpu_us:.0f} | "
            f"{_reads(s.requests_per_redis_read, s.op)} | {s.p50_ms:.2f} | "
            f"{s.p99_ms:.2f} | {s.errors} |"
        )
    return "\n".join(rows)


def _reads(value: float, op: str = "") -> str:
    # ping makes no Redis call: its Redis reads are the fronts' policy refreshes.
    return "-" if op == "ping" or not math.isfinite(value) else f"{value:.1f}"


def _drive_rows(run: Run) -> str:
    rows = ["| round | op | setup | connections per front | req/s | CPU us/req | errors+lost |",
            "|---:|---|---|---|---:|---:|---:|"]
    for d in sorted(run.drives, key=lambda d: (d.op != OPS[0], d.op, d.round, d.fronts,
                                               d.setup)):
        rows.append(f"| {d.round} | {d.op} | {d.setup} | {', '.join(map(str, d.connections))} | "
                    f"{d.throughput:,.0f} | {d.server_cpu_us:.0f} | {d.errors + d.lost} |")
    return "\n".join(rows)


def _get(run: Run, op: str, setup: str) -> Summary | None:
    return next((s for s in run.summaries if s.op == op and s.setup == setup), None)


def _findings(run: Run) -> str:
    """Sentences computed from this run's medians, so they cannot go stale."""
    out: list[str] = []
    one = _get(run, "update_session_state", BASELINE)
    direct = _get(run, "update_session_state", "1 front, direct")
    if one is not None and direct is not None and direct.server_cpu_us:
        out.append(
            f"- **What HAProxy costs.** Per update, HAProxy's own CPU is "
            f"{one.haproxy_cpu_us:.0f} us; all servers together spend {one.server_cpu_us:.0f} us "
            f"behind HAProxy against {direct.server_cpu_us:.0f} us direct "
            f"({one.server_cpu_us / direct.server_cpu_us:.2f}x). Throughput behind HAProxy is "
            f"{one.throughput / direct.throughput:.2f}x the direct run's.")
    for setup in ("2 fronts", "4 fronts"):
        s = _get(run, "update_session_state", setup)
        if s is not None:
            out.append(
                f"- **{setup}.** Update throughput {s.throughput:,.0f} req/s, "
                f"{s.throughput_x:.2f}x the 1-front run; CPU per update {s.server_cpu_us:.0f} us, "
                f"{s.cpu_x:.2f}x the 1-front run (fronts {s.front_cpu_us:.0f}, Redis "
                f"{s.redis_cpu_us:.0f}, HAProxy {s.haproxy_cpu_us:.0f} us).")
    four = _get(run, "update_session_state", "4 fronts")
    if one is not None and four is not None:
        out.append(
            f"- **Batch depth.** Redis received {one.requests_per_redis_read:.1f} update calls "
            f"per read with 1 front and {four.requests_per_redis_read:.1f} with 4. The "
            f"{INFLIGHT} requests in flight are the same in every setup, so each of 4 fronts "
            f"sees a quarter of them, and its batches (one poll wake-up and one Redis pipeline "
            f"round trip each) are smaller. Smaller batches spread the per-batch costs over "
            f"fewer requests, which pushes CPU per update up as fronts are added under a fixed "
            f"load (analysis, not a separate measurement); in this run CPU per update with 4 "
            f"fronts was {four.cpu_x:.2f}x the 1-front figure. With more clients per front "
            f"the batches would be deeper again.")
    return "\n".join(out)


TEMPLATE = """\
# Benchmarks: scale-out behind HAProxy

Generated by `{command}` on {date}, in {duration:.0f} s. Do not edit by hand:
rerun the command, which rewrites this file and
`benchmarks/results/scaleout.json` (the raw figures of every drive).{quick}
The single-front benchmark is [benchmarks.md](benchmarks.md).

## What was measured

- One redis-server (no persistence), N front processes
  (`python -m workers.cli front --workers 1`, default settings) and
  HAProxy ({haproxy}) in TCP mode, `balance roundrobin`, with the
  configuration of `workers/launchers/haproxy.py` (health checks every 200 ms).
- The load generator of `benchmarks/loadgen.py`, one Python thread with
  {inflight} REQ sockets, one request outstanding on each. HAProxy balances
  connections, not requests: the {inflight} connections are spread evenly
  (the "connections per front" column below, read from HAProxy's stats
  socket during each drive).
- `update_session_state` with a {state_bytes} B state on {sessions:,}
  pre-created sessions, and `ping` (no Redis call), which isolates the
  ZeroMQ, JSON and proxy cost.
- Each drive: a warm-up, then at most {run_s} s / {max_req:,} requests.
  {rounds} round(s), every setup in each round, the order reversed every
  other round; figures are medians over the rounds, ranges are min-max.
- **CPU per request** = (user+system CPU seconds of all front processes +
  redis-server + haproxy, read with psutil just before and after the drive)
  / answered requests. The load generator's own CPU is listed apart and not
  included.
- Ratios ("x 1 front") are against the 1-front-behind-HAProxy setup of the
  same run; the range in brackets is each round's ratio against the same
  round's 1-front drive.

## Machine

| | |
|---|---|
{machine}

## How to read this (honest notes)

- **This machine has {cpus} CPUs**, shared with other work, and the load
  generator, Redis, HAProxy and every front run on them. Throughput cannot
  scale past about {cpus} fronts here: with 4 fronts, 4 Python processes,
  Redis, HAProxy and the load generator compete for {cpus} CPUs, so more
  fronts mostly add context switches. The throughput columns show what this
  box does; they are not a prediction for a bigger one.
- The load generator is itself one Python thread; at these rates it is a
  large share of the CPU in use (see its column), so it caps throughput too.
- **CPU per request is the figure that travels.** It does not depend on how
  many CPUs there are. On a machine with a core per front, throughput can
  grow with fronts until Redis (single-threaded) is the limit, at about
  1 s / (Redis CPU per update) updates per second; the Redis column gives
  that bound. CPU per request does depend on batch depth (requests in flight
  per front), which this run holds at {inflight} in total, not per front.
- HAProxy in TCP mode sticks each connection to one front; a client with one
  socket always talks to one front until its connection breaks (see
  `tests/test_loadbalancer.py` for what happens when a front dies).

## Findings of this run

{findings}

## update_session_state

{update_table}

## ping

{ping_table}

## Every drive

{drives}
"""


def render(run: Run) -> str:
    cfg = run.config
    return TEMPLATE.format(
        command=run.command,
        date=run.machine["date"],
        duration=run.duration_s,
        quick=("\n\n**Quick smoke run: too short to be a measurement.**" if cfg.quick else ""),
        haproxy=run.haproxy_version,
        inflight=INFLIGHT,
        state_bytes=workload.STATE_BYTES,
        sessions=cfg.sessions,
        run_s=cfg.run_seconds,
        max_req=cfg.max_requests,
        rounds=cfg.rounds,
        machine="\n".join(f"| {k} | {v} |" for k, v in run.machine.items()),
        cpus=run.machine["cpus (nproc)"],
        findings=_findings(run),
        update_table=_table(run, "update_session_state"),
        ping_table=_table(run, "ping"),
        drives=_drive_rows(run),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaleout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.scaleout",
                          *(sys.argv[1:] if argv is None else argv)])
    progress = Progress()
    run = measure_all(cfg, command, progress)
    data, doc = outputs("scaleout", cfg.quick)
    write_json(run, data)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render(run))
    progress(f"wrote {data} and {doc}")
    for s in run.summaries:
        progress(f"{s.op} via {s.setup}: {s.throughput:,.0f} req/s "
                 f"({_x(s.throughput_x, s.throughput_x_range)}), "
                 f"{s.server_cpu_us:.0f} us CPU/req ({_x(s.cpu_x, s.cpu_x_range)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
