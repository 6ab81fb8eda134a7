"""Redis Cluster versus one standalone Redis: throughput and CPU per request.

    .venv/bin/python -m benchmarks.cluster           # full run, ~6 min; writes
                                                     # benchmarks/results/cluster.json and
                                                     # docs/benchmarks-cluster.md
    .venv/bin/python -m benchmarks.cluster --quick   # smoke run, about a minute; writes
                                                     # benchmarks/results/quick/

Two set-ups in one process: a standalone redis-server (no persistence) with a
front on it, and a LocalCluster (workers/launchers/cluster.py: 3 masters + 3 replicas,
no persistence) with a front in `--redis-mode cluster`. Both fronts are
`python -m workers.cli front --workers 1` with default settings otherwise, as
in benchmarks/servers.py, so the standalone figures compare with
docs/benchmarks.md.

Each set-up gets the same number of pre-created sessions with 1 KB of state,
then the load generator of benchmarks/loadgen.py (REQ sockets) drives
update_session_state, get_session_info and get_session_statistics at each
in-flight level. Both set-ups stay up for the whole run and their drives are
interleaved, standalone and cluster back to back for every cell, the order
reversed every other round, so that each cluster/standalone ratio compares two
drives a few seconds apart rather than two phases minutes apart on a noisy
shared machine. Figures are medians over the rounds.

CPU per request is read from the kernel around each drive (precise_cpu: the
scheduler's nanosecond count, psutil where that is missing): the front
process, and the redis-server processes (the one standalone server, or all six cluster
nodes, split into masters and replicas), divided by the answered requests.
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
from string import Template
from typing import Literal

import psutil
import redis
import zmq
from redis.crc import key_slot

from benchmarks import machine, workload
from benchmarks.common import RESULTS, Progress, outputs, plain, template, template_parts
from benchmarks.loadgen import Body, Kind, LoadGen
from benchmarks.measure import RunResult
from benchmarks.servers import REPO, Snapshot, _clean_env, process_cpu, wait_answering
from service import codec, keys, scripts
from service.settings import Settings
from service.store import Call, _slot, redis_for
from workers.launchers.cluster import LocalCluster
from workers.launchers.process import free_port
from workers.launchers.redis import EmbeddedRedis

SetupName = Literal["standalone", "cluster"]
SETUPS: tuple[SetupName, ...] = ("standalone", "cluster")
OPS = ("update_session_state", "get_session_info", "get_session_statistics")
KIND: Kind = "REQ"  # one request outstanding per socket: "in flight" = sockets
# Processes whose load would distort the run; they are looked for at the start
# and at the end, and the report says what was found.
NOISY = ("benchmarks.scaleout", "benchmarks.soak", "pytest")


@dataclass(frozen=True)
class Config:
    quick: bool
    rounds: int
    run_seconds: float  # time bound of each measured drive
    warmup_seconds: float
    max_requests: int  # count bound of each measured drive
    warmup_requests: int
    sessions: int  # pre-created sessions with 1 KB of state, per set-up
    idle_seconds: float  # how long the idle CPU of each set-up is sampled
    routing_repeats: int  # statistics call lists routed in the routing micro-measure
    inflights: tuple[int, ...] = (1, 64)


FULL = Config(quick=False, rounds=5, run_seconds=2.5, warmup_seconds=0.4, max_requests=60_000,
              warmup_requests=3_000, sessions=2_000, idle_seconds=10.0,
              routing_repeats=2_000)
QUICK = Config(quick=True, rounds=1, run_seconds=0.3, warmup_seconds=0.1, max_requests=4_000,
               warmup_requests=300, sessions=250, idle_seconds=1.0, routing_repeats=200)


# -- the processes ------------------------------------------------------------


def precise_cpu(pid: int) -> float:
    """CPU seconds of a process so far, to the nanosecond where Linux allows.

    psutil's cpu_times() counts clock ticks (10 ms), which over a drive of a
    few thousand requests is an error of several us per request and process,
    and six redis-servers add up six such errors. The scheduler's own count
    (/proc/<pid>/task/<tid>/schedstat: ns on a CPU, user and system alike),
    summed over the live threads, has no such step. Threads that have already
    exited are missing from it; redis-server's and the front's threads live
    as long as the process. Elsewhere: psutil."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return process_cpu(pid)
    total = read = 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
            read += 1
        except (OSError, ValueError, IndexError):
            continue  # a thread that exited meanwhile
    # No thread readable at all: a kernel without schedstat, not a fast process.
    return total / 1e9 if read else process_cpu(pid)


@dataclass(frozen=True)
class Counters:
    """What a drive is measured by, read just before and just after it."""

    front_cpu: float  # seconds on a CPU, user + system (precise_cpu)
    master_cpu: float  # seconds, every master's redis-server (the standalone one)
    replica_cpu: float  # seconds, every replica's redis-server (none standalone)
    commands: dict[str, int]  # INFO commandstats calls, summed over the masters
    script_usec: int  # commandstats usec of evalsha, summed over the masters
    reads: int  # INFO stats total_reads_processed, summed over the masters
    loadgen_cpu: float  # seconds, this process with its ZeroMQ I/O thread
    # front + every redis-server, from psutil's clock ticks: a cross-check of
    # the precise figures (a thread that exited mid-drive would show here only)
    coarse_cpu: float

    def minus(self, before: Counters) -> Counters:
        names = set(self.commands) | set(before.commands)
        return Counters(
            self.front_cpu - before.front_cpu,
            self.master_cpu - before.master_cpu,
            self.replica_cpu - before.replica_cpu,
            {n: self.commands.get(n, 0) - before.commands.get(n, 0) for n in sorted(names)},
            self.script_usec - before.script_usec,
            self.reads - before.reads,
            self.loadgen_cpu - before.loadgen_cpu,
            self.coarse_cpu - before.coarse_cpu,
        )


class Setup:
    """One Redis set-up (standalone or cluster) and a front worker on it.

    benchmarks/servers.py's Stack is hard-wired to one standalone Redis and
    reads Redis' CPU from INFO; this is the same idea for either set-up, with
    the CPU time of however many redis-server processes there are."""

    def __init__(self, name: SetupName, ctx: zmq.Context[zmq.Socket[bytes]],
                 log_dir: Path) -> None:
        self.name = name
        self.ctx = ctx
        self.log_dir = log_dir
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.standalone: EmbeddedRedis | None = None
        self.cluster: LocalCluster | None = None
        self.masters: list[EmbeddedRedis] = []
        self.replicas: list[EmbeddedRedis] = []
        self.clients: list[redis.Redis] = []  # one per master: INFO and SCAN
        self.front: subprocess.Popen[bytes] | None = None
        # CPU the redis-servers use with no load (us per second), once measured:
        # each drive's share of it is reported as background.
        self.idle_redis_us_per_s = 0.0

    def start(self) -> Setup:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.name == "cluster":
                self.cluster = LocalCluster().start()
                self.masters = self.cluster.masters()
                master_ports = {m.port for m in self.masters}
                self.replicas = [n for n in self.cluster.nodes if n.port not in master_ports]
                url = self.cluster.url
            else:
                self.standalone = EmbeddedRedis().start()  # no data_dir: no persistence
                self.masters = [self.standalone]
                url = self.standalone.url
            self.clients = [redis.Redis(port=m.port, socket_timeout=10) for m in self.masters]
            cmd = [sys.executable, "-m", "workers.cli", "front", "--redis-url", url,
                   "--bind", self.endpoint, "--workers", "1"]
            env = _clean_env()  # defaults only, as benchmarks/servers.py
            if self.name == "cluster":
                cmd += ["--redis-mode", "cluster"]
                env["STUI_REDIS_MODE"] = "cluster"
            with open(self.log_dir / f"front-{self.name}.log", "wb") as log:
                self.front = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                              stderr=subprocess.STDOUT)
            wait_answering(self.ctx, self.endpoint, self.front)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.front is not None and self.front.poll() is None:
            self.front.terminate()
            try:
                self.front.wait(15)
            except subprocess.TimeoutExpired:
                self.front.kill()
                self.front.wait()
        self.front = None
        for c in self.clients:
            c.close()
        self.clients = []
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.standalone is not None:
            self.standalone.stop()
            self.standalone = None

    def __enter__(self) -> Setup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nodes(self) -> int:
        return len(self.masters) + len(self.replicas)

    def _front_pid(self) -> int:
        assert self.front is not None, "set-up not started"
        if self.front.poll() is not None:
            raise RuntimeError(f"the {self.name} front exited with {self.front.returncode}")
        return self.front.pid

    def _coarse_cpu(self) -> float:
        nodes = [n.process.pid for n in self.masters + self.replicas if n.process is not None]
        return sum(process_cpu(pid) for pid in [self._front_pid(), *nodes])

    def _cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far: front, masters, replicas."""

        def of(nodes: list[EmbeddedRedis]) -> float:
            pids = [n.process.pid for n in nodes if n.process is not None]
            return sum(precise_cpu(pid) for pid in pids)

        return precise_cpu(self._front_pid()), of(self.masters), of(self.replicas)

    def _info(self) -> tuple[dict[str, int], int, int]:
        commands: dict[str, int] = {}
        usec = reads = 0
        for c in self.clients:
            # One INFO per node per snapshot: "all" holds commandstats and stats.
            info = c.info("all")
            for name, value in info.items():
                if name.startswith("cmdstat_") and isinstance(value, dict):
                    key = name.removeprefix("cmdstat_")
                    commands[key] = commands.get(key, 0) + int(value["calls"])
            usec += int(info.get("cmdstat_evalsha", {}).get("usec", 0))
            reads += int(info["total_reads_processed"])
        return commands, usec, reads

    def snapshot(self, before: bool) -> Counters:
        """Before a drive INFO is read first and CPU last, after it CPU first
        and INFO last: the CPU our own INFO calls cost stays outside the window."""
        if before:
            commands, usec, reads = self._info()
            coarse = self._coarse_cpu()
            front, masters, replicas = self._cpu()
            loadgen = time.process_time()
        else:
            front, masters, replicas = self._cpu()
            loadgen = time.process_time()
            coarse = self._coarse_cpu()
            commands, usec, reads = self._info()
        return Counters(front, masters, replicas, commands, usec, reads, loadgen, coarse)

    def server_version(self) -> str:
        return str(self.clients[0].info("server")["redis_version"])

    def layout(self) -> list[tuple[int, int, int]]:
        """(port, session hashes, buckets served) per master: how the 64
        buckets, the only hash tags the service uses, fell on the masters'
        slot ranges."""
        ranges: dict[int, list[tuple[int, int]]] = {}
        if self.name == "cluster":
            slots_reply = self.clients[0].execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER", "SLOTS")
            for entry in slots_reply:
                ranges.setdefault(int(entry[2][1]), []).append((int(entry[0]), int(entry[1])))
        out = []
        for m, c in zip(self.masters, self.clients, strict=True):
            sessions = sum(1 for _ in c.scan_iter(match=keys.session_scan_pattern(), count=1000))
            buckets = keys.NUM_BUCKETS
            if self.name == "cluster":
                slots = [key_slot(keys.bucket_expiry_key(b).encode())
                         for b in range(keys.NUM_BUCKETS)]
                buckets = sum(1 for slot in slots
                              if any(lo <= slot <= hi for lo, hi in ranges.get(m.port, [])))
            out.append((m.port, sessions, buckets))
        return out


# -- the load -----------------------------------------------------------------


def bodies_for(op: str, count: int, targets: workload.Targets) -> list[Body]:
    if op == "get_session_statistics":
        return workload.statistics_bodies(count)
    return workload.bodies_for(op, count, targets)


def prepare(setup: Setup, count: int) -> workload.Targets:
    """count sessions (5 per client) created through the front, each given one
    1 KB state, as benchmarks/phases.py prepares its targets."""
    with LoadGen(setup.ctx, setup.endpoint, "DEALER", 64) as lg:
        created = lg.drive(workload.create_bodies(count, "bench"), 120.0, keep_replies=True)
        sids = workload.session_ids_of(created.replies)
        if len(sids) != count:
            raise RuntimeError(f"{setup.name}: created {len(sids)} of {count} sessions: "
                               f"{created.error_sample}")
        updated = lg.drive(workload.update_bodies(len(sids), sids), 120.0)
        if updated.ok != len(sids):
            raise RuntimeError(f"{setup.name}: state updates failed: {updated.error_sample}")
    clients = sorted({f"bench-{n // workload.SESSIONS_PER_CLIENT}" for n in range(count)})
    return workload.Targets(sids, clients)


def reported_sessions(setup: Setup) -> int:
    """total_sessions as get_session_statistics answers it: a check that the
    cluster front sees every bucket on every master."""
    with LoadGen(setup.ctx, setup.endpoint, "REQ", 1) as lg:
        sample = lg.drive(workload.statistics_bodies(1), 30.0, keep_replies=True)
    if not sample.ok:
        raise RuntimeError(f"{setup.name}: get_session_statistics failed: {sample.error_sample}")
    return int(codec.loads(sample.replies[0])["result"]["total_sessions"])


@dataclass
class Idle:
    """CPU microseconds per second of wall time with no load at all."""

    setup: str
    seconds: float
    front_us_per_s: float
    master_us_per_s: float
    replica_us_per_s: float


def idle_cpu(setup: Setup, seconds: float) -> Idle:
    """Cluster nodes are never quite idle (cluster bus pings, replication
    acknowledgements, serverCron on six processes): this is what that
    background costs, next to the standalone server's."""
    f0, m0, r0 = setup._cpu()
    t0 = time.monotonic()
    time.sleep(seconds)
    f1, m1, r1 = setup._cpu()
    wall = time.monotonic() - t0
    idle = Idle(setup.name, wall, (f1 - f0) / wall * 1e6, (m1 - m0) / wall * 1e6,
                (r1 - r0) / wall * 1e6)
    setup.idle_redis_us_per_s = idle.master_us_per_s + idle.replica_us_per_s
    return idle


@dataclass
class Routing:
    """What the front does per call on a cluster before anything is sent
    (Store._send_by_node): the call's hash slot, then the master serving it,
    timed in this process with the same client the front builds."""

    calls: int
    slot_us: float  # per call: service.store._slot (CRC16 of the hash tag)
    lookup_us: float  # per call: redis-py's nodes_manager.get_node_from_slot

    @property
    def per_call_us(self) -> float:
        return self.slot_us + self.lookup_us


def routing_cost(url: str, repeats: int) -> Routing:
    client = redis_for(Settings(redis_url=url, redis_mode="cluster"))
    try:
        assert isinstance(client, redis.RedisCluster)
        nodes = client.nodes_manager
        # The 64 calls of one get_session_statistics, as the handler makes them.
        calls = [Call(scripts.STATS, [keys.bucket_expiry_key(b), keys.bucket_clients_key(b)], [])
                 for b in range(keys.NUM_BUCKETS)]
        slots = [_slot(c) for c in calls]
        t0 = time.perf_counter()
        for _ in range(repeats):
            for call in calls:
                _slot(call)
        t1 = time.perf_counter()
        for _ in range(repeats):
            for slot in slots:
                nodes.get_node_from_slot(slot)
        t2 = time.perf_counter()
    finally:
        client.close()
    n = repeats * len(calls)
    return Routing(n, (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6)


@dataclass
class Drive:
    """One measured drive of one command against one set-up."""

    setup: str
    round: int
    result: RunResult  # the shared record: throughput, latency, CPU, commands
    master_cpu_us: float  # per answered request
    replica_cpu_us: float  # per answered request
    # Read events in the masters per answered request (INFO stats
    # total_reads_processed, our own INFO taken out): at least one per
    # pipeline the front sends, so it follows the round trips to Redis.
    reads_per_request: float
    # The set-up's idle redis-server CPU over the drive's window, per answered
    # request: what the nodes would have used with no load at all.
    background_us: float
    coarse_total_cpu_us: float  # front + Redis per request by psutil's ticks

    @property
    def op(self) -> str:
        return self.result.op

    @property
    def inflight(self) -> int:
        return self.result.inflight

    def line(self) -> str:
        r = self.result
        flag = f" ERRORS {r.errors} lost {r.lost}: {r.error_sample[:120]}" \
            if r.errors or r.lost else ""
        return (f"{self.setup:10s} {r.op} x{r.inflight}: {r.throughput:,.0f} req/s, "
                f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, CPU us/req front "
                f"{r.server_cpu_us:.0f} + redis {r.redis_cpu_us:.0f} (masters "
                f"{self.master_cpu_us:.0f}, replicas {self.replica_cpu_us:.0f}), "
                f"{r.commands_per_request:.1f} EVALSHA/req, "
                f"{self.reads_per_request:.3f} Redis reads/req{flag}")


def measure(setup: Setup, cfg: Config, targets: workload.Targets, op: str, inflight: int,
            round_no: int) -> Drive:
    with LoadGen(setup.ctx, setup.endpoint, KIND, inflight) as lg:
        warm = lg.drive(bodies_for(op, cfg.warmup_requests, targets), cfg.warmup_seconds)
        # Enough bodies for the time bound at the warm-up's rate, within the
        # count bound (as benchmarks/measure.py plans them).
        planned = max(200, min(cfg.max_requests,
                               int(warm.throughput * cfg.run_seconds * 1.6) + 200))
        bodies = bodies_for(op, planned, targets)
        before = setup.snapshot(before=True)
        t0 = time.monotonic()
        sample = lg.drive(bodies, cfg.run_seconds)
        window = time.monotonic() - t0
        after = setup.snapshot(before=False)
    d = after.minus(before)
    # The shared RunResult ("front": a front + Redis drive, as opposed to the
    # echo server's), with "redis" = every redis-server process of the set-up.
    result = RunResult.of("front", op, KIND, inflight, sample,
                          Snapshot(d.front_cpu, d.master_cpu + d.replica_cpu, d.commands,
                                   d.script_usec, d.loadgen_cpu))
    n = max(1, sample.answered)
    # The after-INFO of each master counts one read of its own.
    reads = d.reads - len(setup.clients)
    return Drive(setup.name, round_no, result, d.master_cpu / n * 1e6,
                 d.replica_cpu / n * 1e6, reads / n, setup.idle_redis_us_per_s * window / n,
                 d.coarse_cpu / n * 1e6)


# -- summaries ----------------------------------------------------------------

METRICS: dict[str, Callable[[Drive], float]] = {
    "throughput": lambda d: d.result.throughput,
    "front_cpu_us": lambda d: d.result.server_cpu_us,
    "redis_cpu_us": lambda d: d.result.redis_cpu_us,  # all nodes
    "master_cpu_us": lambda d: d.master_cpu_us,
    "replica_cpu_us": lambda d: d.replica_cpu_us,
    "redis_net_cpu_us": lambda d: d.result.redis_cpu_us - d.background_us,
    "total_cpu_us": lambda d: d.result.total_cpu_us,  # front + all nodes
    "p50_ms": lambda d: d.result.p50_ms,
    "p99_ms": lambda d: d.result.p99_ms,
    "evalsha_per_request": lambda d: d.result.commands_per_request,
    "reads_per_request": lambda d: d.reads_per_request,
    "loadgen_cpu_us": lambda d: d.result.loadgen_cpu_us,
}


@dataclass
class Stat:
    median: float
    low: float
    high: float

    @staticmethod
    def of(values: Sequence[float]) -> Stat:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return Stat(math.nan, math.nan, math.nan)
        return Stat(statistics.median(finite), min(finite), max(finite))


@dataclass
class Summary:
    """Medians (and min-max) over the rounds of one set-up, command and level."""

    setup: str
    op: str
    inflight: int
    drives: int
    errors: int  # errors and lost requests, summed over the rounds
    stats: dict[str, Stat]


@dataclass
class Ratio:
    """cluster / standalone for one command and level: median / median, and
    the min-max of each round's ratio (two drives back to back)."""

    op: str
    inflight: int
    ratios: dict[str, Stat]


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def summarise(drives: list[Drive], cfg: Config) -> tuple[list[Summary], list[Ratio]]:
    summaries: list[Summary] = []
    ratios: list[Ratio] = []
    for op in OPS:
        for n in cfg.inflights:
            cell = [d for d in drives if d.op == op and d.inflight == n]
            by_setup: dict[str, Summary] = {}
            for name in SETUPS:
                ds = [d for d in cell if d.setup == name]
                if not ds:
                    continue
                s = Summary(name, op, n, len(ds),
                            sum(d.result.errors + d.result.lost for d in ds),
                            {k: Stat.of([f(d) for d in ds]) for k, f in METRICS.items()})
                by_setup[name] = s
                summaries.append(s)
            if len(by_setup) < 2:
                continue
            out: dict[str, Stat] = {}
            for key, f in METRICS.items():
                per_round = []
                for r in sorted({d.round for d in cell}):
                    pair = {d.setup: d for d in cell if d.round == r}
                    if len(pair) == 2:
                        per_round.append(_ratio(f(pair["cluster"]), f(pair["standalone"])))
                spread = Stat.of(per_round)
                out[key] = Stat(_ratio(by_setup["cluster"].stats[key].median,
                                       by_setup["standalone"].stats[key].median),
                                spread.low, spread.high)
            ratios.append(Ratio(op, n, out))
    return summaries, ratios


# -- the run ------------------------------------------------------------------


@dataclass
class Run:
    command: str
    config: Config
    machine: dict[str, str]
    noisy_at_start: list[str]
    noisy_at_end: list[str] = field(default_factory=list)
    sessions: dict[str, int] = field(default_factory=dict)  # reported by the service
    layout: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    idle: list[Idle] = field(default_factory=list)
    routing: Routing | None = None
    drives: list[Drive] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    duration_s: float = 0.0


def noisy_processes() -> list[str]:
    """Other benchmarks or test runs on the machine (our own process excluded)."""
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != me and any(word in cmdline for word in NOISY):
            found.append(f"{p.info['pid']} {cmdline[:100]}")
    return found


def measure_all(cfg: Config, command: str, progress: Progress) -> Run:
    started = time.monotonic()
    noisy = noisy_processes()
    if noisy:
        progress(f"WARNING: other benchmark/test processes are running: {noisy}")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    log_dir = RESULTS / ("quick" if cfg.quick else "") / "cluster-logs"
    try:
        progress("phase 1/5: standalone redis-server (no persistence) and a front on it")
        with Setup("standalone", ctx, log_dir) as alone:
            run = Run(command, cfg, machine.describe(alone.server_version()), noisy)
            progress(f"standalone redis {run.machine['redis-server']} on port "
                     f"{alone.masters[0].port}, front at {alone.endpoint}")
            progress("phase 2/5: LocalCluster (3 masters + 3 replicas) and a front in "
                     "--redis-mode cluster")
            with Setup("cluster", ctx, log_dir) as clu:
                progress(f"cluster masters on ports {[m.port for m in clu.masters]}, replicas "
                         f"on {[r.port for r in clu.replicas]}, front at {clu.endpoint}")
                assert clu.cluster is not None
                run.routing = routing_cost(clu.cluster.url, cfg.routing_repeats)
                progress(f"routing one call on the cluster, in this process: "
                         f"{run.routing.slot_us:.2f} us slot + {run.routing.lookup_us:.2f} us "
                         f"master lookup")
                setups = {"standalone": alone, "cluster": clu}
                progress(f"phase 3/5: {cfg.sessions:,} sessions with 1 KB state on each")
                targets = {}
                for name, s in setups.items():
                    targets[name] = prepare(s, cfg.sessions)
                    run.sessions[name] = reported_sessions(s)
                    run.layout[name] = s.layout()
                    progress(f"{name}: get_session_statistics reports "
                             f"{run.sessions[name]:,} sessions; per master (port, sessions, "
                             f"buckets): {run.layout[name]}")
                progress(f"phase 4/5: idle CPU, {cfg.idle_seconds:.0f} s each")
                for s in setups.values():
                    run.idle.append(idle_cpu(s, cfg.idle_seconds))
                    i = run.idle[-1]
                    progress(f"{s.name} idle: front {i.front_us_per_s:,.0f} us/s, masters "
                             f"{i.master_us_per_s:,.0f} us/s, replicas "
                             f"{i.replica_us_per_s:,.0f} us/s")
                cells = len(OPS) * len(cfg.inflights) * len(SETUPS)
                progress(f"phase 5/5: {cfg.rounds} round(s) of {cells} drives, standalone and "
                         "cluster back to back")
                for r in range(cfg.rounds):
                    order = SETUPS if r % 2 == 0 else SETUPS[::-1]
                    for op in OPS:
                        for n in cfg.inflights:
                            for name in order:
                                d = measure(setups[name], cfg, targets[name], op, n, r + 1)
                                run.drives.append(d)
                                progress(f"[round {r + 1}/{cfg.rounds}] {d.line()}")
    finally:
        ctx.destroy(linger=0)
    run.noisy_at_end = noisy_processes()
    run.summaries, run.ratios = summarise(run.drives, cfg)
    run.duration_s = time.monotonic() - started
    return run


# -- output -------------------------------------------------------------------


def write_json(run: Run, path: Path) -> None:
    data = asdict(run)
    for d, drive in zip(data["drives"], run.drives, strict=True):
        d["op"], d["inflight"] = drive.op, drive.inflight
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(data), indent=1, allow_nan=False) + "\n")


def _x(s: Stat) -> str:
    if not math.isfinite(s.median):
        return "-"
    if s.low == s.high or not math.isfinite(s.low):
        return f"{s.median:.2f}x"
    return f"{s.median:.2f}x ({s.low:.2f}-{s.high:.2f})"


def _summary(run: Run, setup: str, op: str, n: int) -> Summary | None:
    for s in run.summaries:
        if (s.setup, s.op, s.inflight) == (setup, op, n):
            return s
    return None


def _ratio_of(run: Run, op: str, n: int) -> Ratio | None:
    for r in run.ratios:
        if (r.op, r.inflight) == (op, n):
            return r
    return None


def _lines(rows: list[str]) -> str:
    """Table rows for a placeholder that ends the table's separator line in
    the template: each row on a line of its own."""
    return "".join("\n" + row for row in rows)


def _parts() -> dict[str, Template]:
    return template_parts("cluster-parts.md")


def _figure_rows(run: Run) -> list[str]:
    rows = []
    for op in OPS:
        for n in run.config.inflights:
            for name in SETUPS:
                s = _summary(run, name, op, n)
                if s is None:
                    continue
                st = s.stats
                rows.append(
                    f"| {op} | {n} | {name} | {st['throughput'].median:,.0f} | "
                    f"{st['throughput'].low:,.0f}-{st['throughput'].high:,.0f} | "
                    f"{st['front_cpu_us'].median:.0f} | {st['redis_cpu_us'].median:.0f} | "
                    f"{st['master_cpu_us'].median:.0f} | {st['replica_cpu_us'].median:.0f} | "
                    f"{st['redis_net_cpu_us'].median:.0f} | {st['total_cpu_us'].median:.0f} | "
                    f"{st['p50_ms'].median:.2f} | "
                    f"{st['p99_ms'].median:.2f} | {st['evalsha_per_request'].median:.2f} | "
                    f"{st['reads_per_request'].median:.3f} | "
                    f"{st['loadgen_cpu_us'].median:.0f} | {s.errors} |")
    return rows


def _ratio_rows(run: Run) -> list[str]:
    """The cluster / standalone table, its header included (it is printed at
    the end of a run as well)."""
    rows = _parts()["ratio_header"].template.splitlines()
    for op in OPS:
        for n in run.config.inflights:
            r = _ratio_of(run, op, n)
            if r is None:
                continue
            x = r.ratios
            rows.append(f"| {op} | {n} | {_x(x['throughput'])} | {_x(x['front_cpu_us'])} | "
                        f"{_x(x['redis_cpu_us'])} | {_x(x['redis_net_cpu_us'])} | "
                        f"{_x(x['master_cpu_us'])} | "
                        f"{_x(x['total_cpu_us'])} | {_x(x['p50_ms'])} | {_x(x['p99_ms'])} |")
    return rows


def _findings(run: Run) -> list[str]:
    """Sentences made from this run's medians: nothing here is typed in by hand.
    Their words are in templates/cluster-parts.md."""
    parts = _parts()
    out: list[str] = []
    for op in OPS:
        for n in run.config.inflights:
            a = _summary(run, "standalone", op, n)
            c = _summary(run, "cluster", op, n)
            r = _ratio_of(run, op, n)
            if a is None or c is None or r is None:
                continue
            sa, sc, x = a.stats, c.stats, r.ratios
            out.append(parts["finding_cell"].substitute(
                op=op, inflight=n,
                c_throughput=f"{sc['throughput'].median:,.0f}",
                a_throughput=f"{sa['throughput'].median:,.0f}",
                x_throughput=f"{x['throughput'].median:.2f}",
                c_front=f"{sc['front_cpu_us'].median:.0f}",
                a_front=f"{sa['front_cpu_us'].median:.0f}",
                x_front=f"{x['front_cpu_us'].median:.2f}",
                c_redis=f"{sc['redis_cpu_us'].median:.0f}",
                c_masters=f"{sc['master_cpu_us'].median:.0f}",
                c_replicas=f"{sc['replica_cpu_us'].median:.0f}",
                a_redis=f"{sa['redis_cpu_us'].median:.0f}",
                x_redis=f"{x['redis_cpu_us'].median:.2f}",
                x_redis_net=f"{x['redis_net_cpu_us'].median:.2f}",
                x_masters=f"{x['master_cpu_us'].median:.2f}",
                c_reads=f"{sc['reads_per_request'].median:.3f}",
                a_reads=f"{sa['reads_per_request'].median:.3f}",
                c_p50=f"{sc['p50_ms'].median:.2f}", a_p50=f"{sa['p50_ms'].median:.2f}"))
    lo, hi = min(run.config.inflights), max(run.config.inflights)
    stats_lo = _ratio_of(run, "get_session_statistics", lo)
    stats_hi = _ratio_of(run, "get_session_statistics", hi)
    if stats_lo is not None and stats_hi is not None and lo != hi:
        r_lo = stats_lo.ratios["master_cpu_us"].median
        r_hi = stats_hi.ratios["master_cpu_us"].median
        line = parts["finding_statistics"].substitute(
            ratio_lo=f"{r_lo:.2f}", lo=lo, ratio_hi=f"{r_hi:.2f}", hi=hi)
        if r_hi <= 1.15 and r_lo >= 1.3:
            # Only said when the two rows bear it out.
            line += " " + parts["finding_statistics_inference"].substitute(lo=lo)
        out.append(line)
    if run.routing is not None:
        ro = run.routing
        extra = []
        for n in run.config.inflights:
            a = _summary(run, "standalone", "get_session_statistics", n)
            c = _summary(run, "cluster", "get_session_statistics", n)
            if a is not None and c is not None:
                more = c.stats["front_cpu_us"].median - a.stats["front_cpu_us"].median
                extra.append(parts["routing_extra"].substitute(extra_us=f"{more:,.0f}",
                                                               inflight=n))
        out.append(parts["finding_routing"].substitute(
            per_call_us=f"{ro.per_call_us:.1f}", slot_us=f"{ro.slot_us:.1f}",
            lookup_us=f"{ro.lookup_us:.1f}", calls=f"{ro.calls:,}",
            statistics_us=f"{64 * ro.per_call_us:,.0f}", extra=" and ".join(extra)))
    gaps = [abs(d.coarse_total_cpu_us - d.result.total_cpu_us) for d in run.drives]
    rel = [g / d.result.total_cpu_us for g, d in zip(gaps, run.drives, strict=True)
           if d.result.total_cpu_us > 0]
    if gaps and rel:
        out.append(parts["finding_cross_check"].substitute(
            median_us=f"{statistics.median(gaps):.1f}",
            median_pct=f"{statistics.median(rel) * 100:.1f}",
            max_us=f"{max(gaps):.1f}", max_pct=f"{max(rel) * 100:.1f}", drives=len(gaps)))
    idle = {i.setup: i for i in run.idle}
    if "cluster" in idle and "standalone" in idle:
        ci, si = idle["cluster"], idle["standalone"]
        cluster_us = ci.master_us_per_s + ci.replica_us_per_s
        out.append(parts["finding_idle"].substitute(
            cluster_us=f"{cluster_us:,.0f}", cluster_pct=f"{cluster_us / 1e4:.2f}",
            standalone_us=f"{si.master_us_per_s:,.0f}"))
    return out


def render(run: Run) -> str:
    """docs/benchmarks-cluster.md: templates/cluster.md filled with this run's
    figures and tables."""
    cfg = run.config
    parts = _parts()
    quick = "\n\n" + parts["quick"].substitute(sessions=f"{cfg.sessions:,}") if cfg.quick else ""
    if run.noisy_at_start or run.noisy_at_end:
        noisy = parts["noisy_found"].substitute(at_start="; ".join(run.noisy_at_start) or "none",
                                                at_end="; ".join(run.noisy_at_end) or "none")
    else:
        noisy = parts["noisy_none"].substitute(noisy_names=", ".join(f"`{n}`" for n in NOISY))
    layout_rows = [
        f"| {name} | {run.sessions.get(name, 0):,} | "
        + "; ".join(f"{port}: {sessions:,}, {buckets}" for port, sessions, buckets in rows)
        + " |"
        for name, rows in run.layout.items()
    ]
    idle_rows = [f"| {i.setup} | {i.front_us_per_s:,.0f} | {i.master_us_per_s:,.0f} | "
                 f"{i.replica_us_per_s:,.0f} |" for i in run.idle]
    state_bytes = len(codec.dumps(workload.state_data(0)))
    return template("cluster.md").substitute(
        command=run.command, date=run.machine["date"], duration=f"{run.duration_s:.0f}",
        quick=quick, sessions=f"{cfg.sessions:,}",
        clients=f"{cfg.sessions // workload.SESSIONS_PER_CLIENT:,}",
        state_bytes=f"{state_bytes:,}", inflights=" and ".join(str(n) for n in cfg.inflights),
        run_s=cfg.run_seconds, max_req=f"{cfg.max_requests:,}", rounds=cfg.rounds,
        cpus=run.machine["cpus (nproc)"], noisy=noisy,
        ratio_table="\n".join(_ratio_rows(run)), findings="\n".join(_findings(run)),
        figure_rows=_lines(_figure_rows(run)), layout_rows=_lines(layout_rows),
        idle_s=f"{cfg.idle_seconds:.0f}", idle_rows=_lines(idle_rows),
        machine_rows=_lines([f"| {k} | {v} |" for k, v in run.machine.items()]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.cluster",
                          *(sys.argv[1:] if argv is None else argv)])
    progress = Progress()
    run = measure_all(cfg, command, progress)
    data, doc = outputs("cluster", cfg.quick)
    write_json(run, data)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render(run))
    progress(f"wrote {data} and {doc}")
    for row in _ratio_rows(run):
        progress(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
