"""This tree's front against an earlier commit's, interleaved in one run.

    .venv/bin/python -m benchmarks.compare --against 78b5432           # docs/benchmarks-compare.md
    .venv/bin/python -m benchmarks.compare --against 78b5432 --quick   # benchmarks/results/quick/
    .venv/bin/python -m benchmarks.compare --against 78b5432 --name x  # docs/benchmarks-x.md

The earlier commit is checked out into a temporary git worktree (removed
afterwards) and run with this venv. Both fronts serve one private
redis-server; the same load (update_session_state with 1 KB of state, REQ
x64 and DEALER x64) drives them in turn, round after round, the order
flipped every round, so that the shared machine's noise falls on both. Per
request: the front's CPU (psutil), Redis' time inside the script
(commandstats usec of EVALSHA) and the calls the script made, and
throughput. The report gives medians over the rounds and this tree's figures
as ratios of the earlier commit's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis
import zmq

from benchmarks import machine
from benchmarks.common import Progress, outputs, plain
from benchmarks.servers import REPO, wait_answering
from workers.launchers.process import free_port
from workers.launchers.redis import EmbeddedRedis

INFLIGHT = 64
SESSIONS = 8
IGNORED = ("cmdstat_evalsha", "cmdstat_info")


@dataclass
class Figures:
    front_us: list[float] = field(default_factory=list)
    redis_us: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)

    def median(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else float("nan")


def start_front(
    tree: Path, url: str, port: int, log: Path, extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUI_")}
    # The limiter stays on (its code runs) with room for the load.
    env.update(STUI_LOG_LEVEL="WARNING", STUI_RATE_BURST="1000000000", PYTHONPATH=str(tree))
    env.update(extra)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "front", "--redis-url", url,
             "--bind", f"tcp://127.0.0.1:{port}"],
            cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


@dataclass
class SideBySide:
    """Two fronts on one private redis-server: "earlier" (the commit
    compared against, in a temporary worktree) and "this" (this tree)."""

    ctx: zmq.Context[zmq.Socket[bytes]]
    server: EmbeddedRedis
    procs: dict[str, tuple[subprocess.Popen[bytes], str]]  # name -> (process, endpoint)


@contextmanager
def side_by_side(
    against: str, prefix: str, env: dict[str, dict[str, str]]
) -> Iterator[SideBySide]:
    """Both fronts started and answering, each with env[name] added to its
    settings; stopped, and the worktree removed, afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    tree = work / "earlier"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), against],
                   cwd=REPO, check=True)
    server = EmbeddedRedis().start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name, root in (("earlier", tree), ("this", REPO)):
            port = free_port()
            proc = start_front(root, server.url, port, work / f"{name}.log", env.get(name, {}))
            procs[name] = (proc, f"tcp://127.0.0.1:{port}")
            wait_answering(ctx, procs[name][1], proc)
        yield SideBySide(ctx, server, procs)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(15)
        ctx.destroy(0)
        server.stop()
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
        shutil.rmtree(work, ignore_errors=True)


def sessions(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, name: str) -> list[str]:
    sock = ctx.socket(zmq.REQ)
    sock.connect(endpoint)
    found = []
    for n in range(SESSIONS):
        body = {"id": None, "command": "create_session", "parameters": {"client_id": f"{name}{n}"}}
        sock.send(json.dumps(body).encode())
        found.append(json.loads(sock.recv())["result"]["session_id"])
    sock.close(0)
    return found


def drive(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, sids: list[str], kind: str,
          seconds: float) -> tuple[int, float]:
    """(requests answered, seconds): INFLIGHT updates kept in flight."""
    dealer = kind == "DEALER"
    socks = [ctx.socket(zmq.DEALER)] if dealer else [ctx.socket(zmq.REQ) for _ in range(INFLIGHT)]
    for sock in socks:
        sock.connect(endpoint)
    tag = os.urandom(4).hex()  # request ids never repeat across drives: no replays
    state = {"k": "x" * 1000}
    count = 0

    def body() -> bytes:
        nonlocal count
        count += 1
        return json.dumps({"id": f"{tag}-{count}", "command": "update_session_state",
                           "parameters": {"session_id": sids[count % len(sids)],
                                          "state_data": state}}).encode()

    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    if dealer:
        for _ in range(INFLIGHT):
            socks[0].send_multipart([b"", body()])
    else:
        for sock in socks:
            sock.send(body())
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for sock, _ in poller.poll(1000):
            if dealer:
                while True:
                    try:
                        sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    done += 1
                    sock.send_multipart([b"", body()])
            else:
                sock.recv()
                done += 1
                sock.send(body())
    elapsed = time.perf_counter() - started
    pending, deadline = INFLIGHT, time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        for sock, _ in poller.poll(200):
            try:
                (sock.recv_multipart if dealer else sock.recv)(zmq.NOBLOCK)
                pending -= 1
            except zmq.Again:
                pass
    for sock in socks:
        sock.close(0)
    return done, elapsed


def measure(
    rc: redis.Redis, proc: psutil.Process, run: Callable[[], tuple[int, float]]
) -> tuple[float, float, float, float]:
    cpu0 = sum(proc.cpu_times()[:2])
    before = rc.info("commandstats")
    done, elapsed = run()
    cpu1 = sum(proc.cpu_times()[:2])
    after = rc.info("commandstats")
    calls = after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"]
    usec = after["cmdstat_evalsha"]["usec"] - before["cmdstat_evalsha"]["usec"]
    inner = sum(v["calls"] - before.get(k, {"calls": 0})["calls"]
                for k, v in after.items() if k not in IGNORED)
    return (cpu1 - cpu0) / calls * 1e6, usec / calls, inner / calls, done / elapsed


def report(against: str, found: dict[tuple[str, str], Figures], rounds: int, seconds: float,
           info: dict[str, str], took: float, extra: dict[str, str],
           report_name: str = "compare") -> str:
    rows = []
    for kind in ("REQ", "DEALER"):
        old, new = found[(kind, "earlier")], found[(kind, "this")]
        for label, name, unit in (("front CPU", "front_us", "us"), ("Redis time in the script",
                                  "redis_us", "us"), ("calls inside the script", "inner", ""),
                                  ("throughput", "rate", "req/s")):
            a, b = old.median(name), new.median(name)
            rows.append(f"| {kind} x{INFLIGHT} | {label} | {a:,.1f} {unit} | {b:,.1f} {unit} | "
                        f"{b / a:.2f}x |")
        a = old.median("front_us") + old.median("redis_us")
        b = new.median("front_us") + new.median("redis_us")
        rows.append(f"| {kind} x{INFLIGHT} | **front + Redis** | {a:,.1f} us | {b:,.1f} us | "
                    f"**{b / a:.2f}x** |")
    described = "\n".join(f"- {k}: {v}" for k, v in info.items())
    settings = (
        "This tree's front ran with " + ", ".join(f"`{k}={v}`" for k, v in extra.items()) + "."
        if extra else "Both fronts ran with their default settings."
    )
    table = "\n".join(rows)
    named = f" --name {report_name}" if report_name != "compare" else ""
    return f"""# This tree against {against}

Generated by `.venv/bin/python -m benchmarks.compare --against {against}{named}` in
{took:.0f} s. Do not edit by hand: rerun the command.

Both fronts (one worker process each) served one private redis-server;
update_session_state with 1 KB of state, {INFLIGHT} requests in flight, drove
them in turn for {seconds:.0f} s each, {rounds} rounds, the order flipped every
round. Medians over the rounds; "ratio" is this tree over {against} (below 1
is better, but for throughput). CPU is per request answered: the front's own
(psutil) and Redis' time inside the script (`INFO commandstats`). The
machine is shared: the ratios, taken in one run, are the figures to quote.
{settings}

| load | figure | {against} | this tree | ratio |
|---|---|---:|---:|---:|
{table}

## Machine

{described}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--against", required=True, help="a commit, tag or branch")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--name", default="compare",
        help="the report's name: docs/benchmarks-NAME.md (keeps an earlier comparison)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="STUI_NAME=VALUE",
        help="a setting for this tree's front only (repeatable), e.g. to price one bound",
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    rounds, seconds = (2, 2.0) if args.quick else (8, 4.0)
    progress = Progress()
    started = time.monotonic()
    found: dict[tuple[str, str], Figures] = {}
    with side_by_side(args.against, "stui-compare-", {"this": extra}) as fronts:
        ctx, server, procs = fronts.ctx, fronts.server, fronts.procs
        sids = {name: sessions(ctx, endpoint, name) for name, (_, endpoint) in procs.items()}
        rc = redis.Redis.from_url(server.url)
        info = machine.describe(str(rc.info("server")["redis_version"]))
        for rnd in range(rounds):
            order = list(procs) if rnd % 2 == 0 else list(procs)[::-1]
            for kind in ("REQ", "DEALER"):
                for name in order:
                    proc, endpoint = procs[name]

                    def run(e: str = endpoint, n: str = name, k: str = kind) -> tuple[int, float]:
                        return drive(ctx, e, sids[n], k, seconds)

                    front, rtime, inner, rate = measure(rc, psutil.Process(proc.pid), run)
                    f = found.setdefault((kind, name), Figures())
                    f.front_us.append(front)
                    f.redis_us.append(rtime)
                    f.inner.append(inner)
                    f.rate.append(rate)
                    progress(f"round {rnd + 1}/{rounds} {kind} x{INFLIGHT} {name}: front "
                             f"{front:.0f} us, Redis {rtime:.0f} us, {rate:,.0f} req/s")
    took = time.monotonic() - started
    json_path, md_path = outputs(args.name, args.quick or bool(extra))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(plain({
        "against": args.against, "env": extra, "rounds": rounds, "seconds": seconds,
        "machine": info,
        "figures": {f"{k[0]} {k[1]}": vars(v) for k, v in found.items()}}), indent=1))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(
        report(args.against, found, rounds, seconds, info, took, extra, args.name)
    )
    progress(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
