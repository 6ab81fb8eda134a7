"""docs/capacity.md: how many TUI users a deployment carries, from measured figures.

    .venv/bin/python -m benchmarks.capacity

Reads the last full runs' results (benchmarks/results/latest-full.json from
benchmarks.run, scaleout.json from benchmarks.scaleout, cluster.json from
benchmarks.cluster) and applies a stated workload mix. Nothing here is
measured: rerun those benchmarks, then this, to bring it up to date.

The model: every request costs Redis and the front the CPU that
benchmarks.run measured for its command (DEALER, 64 in flight, INFO cpu for
Redis and the process's own CPU for the front). A Redis shard is one thread,
and so is a front process; each is planned at UTILISATION of one CPU.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from benchmarks.common import RESULTS
from benchmarks.servers import REPO

# Requests per active user per hour: a developer working in the IDE.
MIX: dict[str, float] = {
    "update_session_state": 360,  # the workspace autosaved every 10 s while typing
    "save_context": 60,  # the context saved once a minute
    "record_evaluation": 120,  # two do-its a minute
    "register_object": 30,  # an inspector opened every two minutes
    "release_object": 30,
    "get_context_summary": 30,
    "get_session_info": 30,
    "ping": 120,  # a keep-alive every 30 s
    "load_context": 2,
    "restore_session": 2,  # a reconnect every half hour
    "list_client_sessions": 2,
    "clear_context": 2,
    "create_session": 1,
    "close_session": 1,
}
UTILISATION = 0.7  # of one CPU, for a shard and for a front process
SESSIONS_PER_USER = 2  # live sessions per active user: the open one, and one within its timeout
HOST_MEMORY_GIB = 16  # an example Redis host
MEMORY_SHARE = 0.5  # of the host's memory for data: fragmentation, fork copy-on-write, replicas
SHARDS = (1, 3, 6, 12)
CHECK_HEADER = ("| set-up | updates/s measured | bound from CPU per request | measured / bound "
                "| Redis CPU us | fronts' CPU us |")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def per_command(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Redis and front CPU us per request of each command, DEALER x64."""
    inflight = max(run["config"]["inflights"])
    seen: dict[str, tuple[list[float], list[float]]] = {}
    for r in run["runs"] + run.get("repeated_runs", []) + run.get("other_commands", []):
        if (r["server"], r["kind"], r["inflight"]) != ("front", "DEALER", inflight) or not r["ok"]:
            continue
        redis_us, front_us = seen.setdefault(r["op"], ([], []))
        redis_us.append(float(r["redis_cpu_us"]))
        front_us.append(float(r["server_cpu_us"]))
    return {op: {"redis": statistics.median(a), "front": statistics.median(b)}
            for op, (a, b) in seen.items()}


def render() -> str:
    run = _load("latest-full.json")
    if run is None:
        raise SystemExit("no benchmarks/results/latest-full.json: run benchmarks.run first")
    costs = per_command(run)
    missing = [op for op in MIX if op not in costs]
    if missing:
        raise SystemExit(f"no figures for {missing} in latest-full.json")
    rows = []
    redis_per_s = front_per_s = 0.0
    for op, per_hour in MIX.items():
        c = costs[op]
        redis_per_s += per_hour / 3600 * c["redis"]
        front_per_s += per_hour / 3600 * c["front"]
        rows.append(f"| {op} | {per_hour:g} | {c['redis']:.0f} | {c['front']:.0f} |")
    requests_per_s = sum(MIX.values()) / 3600
    users_shard = UTILISATION * 1e6 / redis_per_s
    users_front = UTILISATION * 1e6 / front_per_s
    scale = run.get("memory_scale") or []
    million = next((s for s in scale if s["sessions"] == 1_000_000), scale[-1] if scale else None)
    per_session = million["per_session"] if million else run["memory"]["per_session"]
    bytes_per_user = per_session * SESSIONS_PER_USER
    gib = 2**30
    users_memory = HOST_MEMORY_GIB * gib * MEMORY_SHARE / bytes_per_user
    first = "Redis CPU" if users_shard < users_memory else "Redis memory"

    cluster = _load("cluster.json")
    cluster_ratio = None
    cluster_date = ""
    if cluster:
        cluster_date = cluster["machine"]["date"]
        for r in cluster["ratios"]:
            if r["op"] == "update_session_state" and r["inflight"] == max(
                    x["inflight"] for x in cluster["ratios"]):
                cluster_ratio = r["ratios"]["master_cpu_us"]["median"]
    shard_rows = []
    for n in SHARDS:
        if n == 1:
            users = users_shard
        elif cluster_ratio:
            users = n * users_shard / cluster_ratio
        else:
            continue
        shard_rows.append(f"| {n} | {users:,.0f} | {users * bytes_per_user / gib:,.1f} GiB | "
                          f"{users / users_front:,.1f} |")

    scaleout = _load("scaleout.json")
    check_rows = []
    if scaleout:
        cpus = int(scaleout["machine"]["cpus (nproc)"])
        for s in scaleout["summaries"]:
            if s["op"] != "update_session_state":
                continue
            predicted = cpus * 1e6 / (s["server_cpu_us"] + s["loadgen_cpu_us"])
            check_rows.append(
                f"| {s['setup']} | {s['throughput']:,.0f} | {predicted:,.0f} | "
                f"{s['throughput'] / predicted:.2f} | {s['redis_cpu_us']:.0f} | "
                f"{s['front_cpu_us']:.0f} |")
    update = costs["update_session_state"]
    cluster_text = (
        f"On a Cluster a master spends {cluster_ratio:.2f}x the Redis CPU per update that a "
        f"standalone Redis does (`benchmarks.cluster`, {cluster_date}: the masters' CPU, "
        "64 in flight; replicas on their own hosts), so each shard carries that much less: "
        if cluster_ratio else "No Cluster figures (run `benchmarks.cluster`): ")
    host_row = f"one Redis host of {HOST_MEMORY_GIB} GiB (memory, {MEMORY_SHARE:.0%} for data)"
    return f"""# Capacity

Generated by `.venv/bin/python -m benchmarks.capacity` from the last full
runs of `benchmarks.run` ({run['machine']['date']}), `benchmarks.cluster` and
`benchmarks.scaleout`. Do not edit by hand. It is arithmetic on measured
figures, not a measurement: the figures are from a shared {run['machine']['cpus (nproc)']}-CPU
machine (docs/benchmarks.md), and a production host will differ; rerun the
benchmarks there and this model follows.

## The workload of one active user

A Smalltalk developer working in the TUI, per hour. Each request costs Redis
and the front what `benchmarks.run` measured for its command (DEALER, 64 in
flight: Redis' `INFO cpu`, the front process's own CPU, per request).

| command | requests per hour | Redis CPU us per request | front CPU us per request |
|---|---:|---:|---:|
{chr(10).join(rows)}

That is {requests_per_s:.2f} requests per second per active user, costing
Redis {redis_per_s:.1f} us and a front {front_per_s:.1f} us of CPU per second.

## What one part carries

Redis runs scripts on one thread, and a front process is one thread: each is
planned at {UTILISATION:.0%} of one CPU (the rest for persistence, replication,
housekeeping, the backup scheduler's reads, and bursts).

| part | active users |
|---|---:|
| one Redis shard (CPU) | {users_shard:,.0f} |
| one front process (`--workers 1`) | {users_front:,.0f} |
| {host_row} | {users_memory:,.0f} |

So a shard needs about {users_shard / users_front:.1f} front processes to keep it busy
(a front pod with `--workers N` runs N), and **{first} runs out first**: at
{users_shard:,.0f} users a shard holds {users_shard * SESSIONS_PER_USER:,.0f} sessions,
{users_shard * bytes_per_user / gib:,.1f} GiB at {per_session:,.0f} B each.

## Memory

{per_session:,.0f} B per session with 1 KB of state, everything included
(`benchmarks.memscale` at {million['sessions'] if million else run['memory']['sessions']:,}
sessions: the session hash, its client index entry, its bucket sorted-set
members, the replay records of its create and its update). A million sessions
take {per_session * 1e6 / gib:,.2f} GiB of `used_memory`; with
{SESSIONS_PER_USER} sessions per active user that is
{1e6 / SESSIONS_PER_USER:,.0f} users. Plan the host for at least twice that:
the allocator's fragmentation, the copy-on-write of a persistence fork
(`BGSAVE`, AOF rewrite) and client buffers. A session's cost grows with its
state: a session at the 1 MiB cap costs about 1 MiB.

## A Cluster

{cluster_text}the hash tags spread the client buckets over the shards, and a
request touches one shard. There are 64 buckets, so at most 64 shards share
the load.

| shards (masters) | active users (CPU) | their sessions' memory | front processes to keep up |
|---:|---:|---:|---:|
{chr(10).join(shard_rows)}

## Checked against the scale-out benchmark

`benchmarks.scaleout` drives 1, 2 and 4 fronts behind HAProxy on this
machine. The model says CPU per request is the cost that decides throughput:
with every process on the same {scaleout['machine']['cpus (nproc)'] if scaleout else '?'} CPUs,
throughput should be at most the CPUs divided by all the CPU a request takes
(fronts, Redis, HAProxy and the load generator). Below, what each set-up
measured against that bound, and its Redis and front CPU per update (the
model uses {update['redis']:.0f} and {update['front']:.0f} us from benchmarks.run).

{CHECK_HEADER}
|---|---:|---:|---:|---:|---:|
{chr(10).join(check_rows) if check_rows else '| (run benchmarks.scaleout) | | | | | |'}

The more fronts share the machine, the closer throughput comes to that
bound: the CPUs, not waiting, decide it, as the model assumes. Redis' CPU
per update stays about the same however many fronts feed it, which is what
lets the per-shard figure above be divided among fronts. The fronts' CPU per
update grows as each front's batches get smaller (the same load over more
fronts); at one request in flight a front spends several times its
64-in-flight figure (docs/benchmarks.md, the DEALER x1 rows). So a fleet of
lightly loaded fronts needs more front CPU per user than the table above
says: size fronts from their measured CPU at the load each will carry.
This machine cannot show a shard saturated by many fronts: its
{scaleout['machine']['cpus (nproc)'] if scaleout else '?'} CPUs run the fronts, Redis and the
load generator together, so more fronts share the same CPUs rather than add any.
"""


def main() -> int:
    out = REPO / "docs" / "capacity.md"
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
