"""Redis time and memory of the checkpoint commands, and the existing
commands' Redis time against the lean request path's floors, in one run.

    .venv/bin/python -m benchmarks.checkpoints [--quick] [--rounds N] [--against REV]

writes benchmarks/results/checkpoints.json and docs/benchmarks-checkpoints.md
(--quick: both under benchmarks/results/quick/). Everything runs against
private redis-servers (workers.launchers.redis.EmbeddedRedis, with its
TUNING), no front worker:

- The checkpoint commands: this process's Dispatcher (memscale's path) sends
  batches of 64 requests (what the front hands it with 64 in flight) for
  fresh sessions with 1 KB of state (workload.state_data) and a small context
  (workload.CONTEXT), one request per session per case, the cases in the
  order CASES lists them (each leaves the checkpoints the next one expects).
  Per case: Redis' own time per script call (`INFO commandstats` usec of
  EVALSHA), the commands run inside per script call, and the used_memory the
  case left behind per request.
- The existing commands: benchmarks.rediscost's probe on this tree and on
  REV (default: the commit that wrote benchmarks/results/latest-full.json,
  whose run judged the floors), the two alternating each round. This tree's
  figure over REV's, times the figure that run recorded, is the figure the
  floor is judged on: the run that judged the floors was on another machine.
- Memory: sessions x checkpoints (used_memory before and after, divided),
  and a session whose snapshot passes hash-max-listpack-value, which turns
  its hash from a listpack into a hashtable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks import machine, rediscost, snapshot_cost, targets, workload
from benchmarks.common import RESULTS, Progress, outputs, save_json, template
from benchmarks.loadgen import Body
from benchmarks.rediscost_probe import NOT_INNER
from benchmarks.servers import REPO
from service import codec, keys
from service.dispatch import Dispatcher
from service.handlers.checkpoints import checkpoint_count
from service.layout import CHECKPOINT_HEADS, REPLAY_FIELD
from service.settings import Settings
from service.store import Store, connect
from workers.launchers.redis import TUNING, EmbeddedRedis

BATCH = 64  # requests per Dispatcher.handle: the front's batch with 64 in flight
LABEL = "before the refactoring"  # a manual checkpoint's label, as a client would give it
LARGE_STATE_BYTES = 2000  # every state value under 2048 B, the snapshot over it
LISTPACK_VALUE = int(TUNING[1])  # hash-max-listpack-value of the embedded Redis
SAMPLE = 200  # session hashes whose MEMORY USAGE is averaged

Params = Callable[[int], dict[str, Any]]


def _nothing(n: int) -> dict[str, Any]:
    return {}


def _merge(n: int) -> dict[str, Any]:
    return {"state_data": workload.state_data(n)}


def _replace(n: int) -> dict[str, Any]:
    return {"state_data": workload.state_data(n), "replace": True}


def _labelled(n: int) -> dict[str, Any]:
    return {"label": LABEL}


def _checkpoint(checkpoint_id: int) -> Params:
    return lambda n: {"checkpoint_id": checkpoint_id}


@dataclass(frozen=True)
class Case:
    """One request per session; before/after: the checkpoints each session holds."""

    name: str
    command: str
    before: int
    after: int
    params: Params
    measured: bool = True  # False: a step that only sets up the next cases


# Checkpoint ids as the cases give them: 1 the manual one, 2 before the
# replace, 3 before the restore (deleted), 4 before clear_context, 5-11 the
# fill, 12 the replace at the cap (2 gives way), 13 the manual one at the
# cap (4 gives way), 14 the restore at the cap (5 gives way).
CASES: tuple[Case, ...] = (
    Case("get_session_info", "get_session_info", 0, 0, _nothing),
    Case("restore_session", "restore_session", 0, 0, _nothing),
    Case("update_session_state, merge", "update_session_state", 0, 0, _merge),
    Case("create_checkpoint, labelled", "create_checkpoint", 0, 1, _labelled),
    Case("list_checkpoints", "list_checkpoints", 1, 1, _nothing),
    Case("get_session_info", "get_session_info", 1, 1, _nothing),
    Case("restore_session", "restore_session", 1, 1, _nothing),
    Case("update_session_state, merge", "update_session_state", 1, 1, _merge),
    Case("update_session_state, replace (automatic checkpoint)", "update_session_state", 1, 2,
         _replace),
    Case("restore_checkpoint (automatic checkpoint)", "restore_checkpoint", 2, 3,
         _checkpoint(1)),
    Case("delete_checkpoint", "delete_checkpoint", 3, 2, _checkpoint(3)),
    Case("clear_context inspector_state (automatic checkpoint)", "clear_context", 2, 3,
         lambda n: {"parts": ["inspector_state"]}),
    Case("save_context (the context back)", "save_context", 3, 3,
         lambda n: {"context": workload.CONTEXT}, measured=False),
    *(Case(f"update_session_state, replace (fill {k + 1}/7)", "update_session_state", 3 + k,
           4 + k, _replace, measured=False) for k in range(7)),
    Case("update_session_state, replace at the cap (the oldest automatic one goes)",
         "update_session_state", 10, 10, _replace),
    Case("create_checkpoint, labelled, at the cap (the oldest automatic one goes)",
         "create_checkpoint", 10, 10, _labelled),
    Case("list_checkpoints", "list_checkpoints", 10, 10, _nothing),
    Case("get_session_info", "get_session_info", 10, 10, _nothing),
    Case("restore_session", "restore_session", 10, 10, _nothing),
    Case("update_session_state, merge", "update_session_state", 10, 10, _merge),
    Case("restore_checkpoint at the cap (the oldest automatic one goes)", "restore_checkpoint",
         10, 10, _checkpoint(1)),
    Case("delete_checkpoint", "delete_checkpoint", 10, 9, _checkpoint(1)),
)
REFERENCE = 2  # CASES[2], update merge without checkpoints: the ratios' denominator


def case_key(case: Case) -> str:
    return f"{case.name} [{case.before}->{case.after}]"


@dataclass(frozen=True)
class Cost:
    usec: float  # Redis time per script call (commandstats usec of EVALSHA)
    inner: float  # commands the scripts ran (TIME included), per script call
    scripts: float  # script calls per request
    bytes: float  # used_memory the requests left behind, per request
    inner_by: dict[str, float]  # inner, by command


class Bench:
    """A Dispatcher in this process on a private Redis, INFO commandstats
    and used_memory around each measured set of requests."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)
        store = Store(connect(url, 60))
        store.load_scripts()  # no NOSCRIPT round in a measured case
        settings = Settings(redis_url=url, rate_burst=10**9, create_burst=10**9,
                            stats_max_age=0)
        self.d = Dispatcher(settings, store)

    def send(self, bodies: list[Body]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s in range(0, len(bodies), BATCH):
            for reply in self.d.handle([b for _, b in bodies[s:s + BATCH]]):
                decoded = codec.loads(reply)
                if decoded.get("status") != "success":
                    raise RuntimeError(f"benchmarks.checkpoints: {decoded}")
                out.append(decoded["result"])
        return out

    def stats(self) -> dict[str, tuple[int, int]]:
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for k, v in self.r.info("commandstats").items()}

    def used(self) -> int:
        return int(self.r.info("memory")["used_memory"])

    def measure(self, bodies: list[Body]) -> tuple[Cost, list[dict[str, Any]]]:
        used, before = self.used(), self.stats()
        results = self.send(bodies)
        after, grown = self.stats(), self.used() - used
        calls = {k: after[k][0] - before.get(k, (0, 0))[0] for k in after}
        scripts = max(calls.get("evalsha", 0), 1)
        usec = after["evalsha"][1] - before.get("evalsha", (0, 0))[1]
        inner = {k: v / scripts for k, v in sorted(calls.items()) if k not in NOT_INNER and v}
        return Cost(usec / scripts, sum(inner.values()), scripts / len(bodies),
                    grown / len(bodies), inner), results


def each(command: str, sids: list[str], params: Params) -> list[Body]:
    tag = workload.fresh_tag(command[:3])
    return [workload.body(f"{tag}-{n}", command, {"session_id": sid, **params(n)})
            for n, sid in enumerate(sids)]


def large_state(n: int) -> dict[str, Any]:
    """workload.state_data's shape at LARGE_STATE_BYTES of JSON."""
    state = workload.state_data(n)
    grow = LARGE_STATE_BYTES - workload.STATE_BYTES
    state["workspace"] = (state["workspace"] * 3)[:len(state["workspace"]) + grow]
    return state


def prepare(bench: Bench, count: int, state: Callable[[int], dict[str, Any]]) -> list[str]:
    """count sessions (5 per client), each with state(n) and workload.CONTEXT."""
    created = bench.send(workload.create_bodies(count, f"ck-{workload.fresh_tag('k')}"))
    sids = [str(r["session_id"]) for r in created]
    bench.send(each("update_session_state", sids, lambda n: {"state_data": state(n)}))
    bench.send(each("save_context", sids, lambda n: {"context": workload.CONTEXT}))
    return sids


def held(bench: Bench, sids: list[str]) -> set[int]:
    """How many checkpoints the sessions hold (the first and last few)."""
    found = set()
    for sid in sids[:3] + sids[-3:]:
        heads = bench.r.hget(keys.session_key(sid), CHECKPOINT_HEADS)
        found.add(checkpoint_count(heads.encode() if isinstance(heads, str) else heads))
    return found


def checkpoint_round(bench: Bench, sessions: int) -> dict[str, Cost]:
    sids = prepare(bench, sessions, workload.state_data)
    found: dict[str, Cost] = {}
    for case in CASES:
        cost, _ = bench.measure(each(case.command, sids, case.params))
        if held(bench, sids) != {case.after}:
            raise RuntimeError(f"{case_key(case)}: the sessions hold {held(bench, sids)}")
        if case.measured:
            found[case_key(case)] = cost
    return found


def summarize(rounds: list[dict[str, Cost]]) -> dict[str, dict[str, Any]]:
    """The median of each figure over the rounds; ratios to REFERENCE per round."""
    reference = case_key(CASES[REFERENCE])
    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        key = case_key(case)
        if not case.measured:
            continue
        costs = [r[key] for r in rounds]
        ratios = [r[key].usec / r[reference].usec for r in rounds]
        out[key] = {
            "command": case.command, "name": case.name, "before": case.before,
            "after": case.after,
            "usec": statistics.median(c.usec for c in costs),
            "usec_rounds": [c.usec for c in costs],
            "x_reference": statistics.median(ratios),
            "x_reference_range": [min(ratios), max(ratios)],
            "inner": statistics.median(c.inner for c in costs),
            "scripts": statistics.median(c.scripts for c in costs),
            "bytes": statistics.median(c.bytes for c in costs),
            "inner_by": costs[-1].inner_by,
        }
    return out


# -- memory ------------------------------------------------------------------


def _sampled(bench: Bench, sids: list[str]) -> dict[str, Any]:
    """Mean MEMORY USAGE and field lengths over up to SAMPLE session hashes."""
    picked = [keys.session_key(sid) for sid in sids[:SAMPLE]]
    pipe = bench.r.pipeline(transaction=False)
    for key in picked:
        pipe.memory_usage(key, samples=0)
        pipe.hstrlen(key, REPLAY_FIELD.decode())
        pipe.hstrlen(key, CHECKPOINT_HEADS.decode())
        pipe.object("encoding", key)
    got = pipe.execute()
    encodings = sorted({(e.decode() if isinstance(e, bytes) else str(e)) for e in got[3::4]})
    return {"memory_usage": statistics.mean(int(x or 0) for x in got[0::4]),
            "replay_bytes": statistics.mean(int(x) for x in got[1::4]),
            "heads_bytes": statistics.mean(int(x) for x in got[2::4]),
            "encoding": "/".join(encodings)}


def memory_of(bench: Bench, sessions: int, state: Callable[[int], dict[str, Any]],
              stages: tuple[int, ...]) -> dict[str, Any]:
    """sessions sessions, then manual checkpoints (unlabelled) up to each stage."""
    bench.r.flushall()
    sids = prepare(bench, sessions, state)
    held_now, snapshot = 0, 0.0
    rows = [{"checkpoints": 0, "used_memory": bench.used(), **_sampled(bench, sids)}]
    for stage in stages:
        for _ in range(stage - held_now):
            replies = bench.send(each("create_checkpoint", sids, _nothing))
            snapshot = statistics.mean(int(r["bytes"]) for r in replies)
        held_now = stage
        rows.append({"checkpoints": stage, "used_memory": bench.used(), **_sampled(bench, sids)})
    bench.r.flushall()
    state_bytes = len(codec.dumps(state(0)))
    return {"sessions": sessions, "state_bytes": state_bytes, "snapshot_bytes": snapshot,
            "rows": rows}


def memory(url: str, sessions: int, large_sessions: int, progress: Progress) -> dict[str, Any]:
    bench = Bench(url)
    standard = memory_of(bench, sessions, workload.state_data, (1, 10))
    rows = standard["rows"]
    first = (rows[1]["used_memory"] - rows[0]["used_memory"]) / sessions
    more = (rows[2]["used_memory"] - rows[1]["used_memory"]) / (sessions * 9)
    progress(f"memory: {first:,.0f} B for a session's first checkpoint, {more:,.0f} B for each "
             f"further one ({rows[0]['encoding']} -> {rows[1]['encoding']} -> "
             f"{rows[2]['encoding']})")
    large = memory_of(bench, large_sessions, large_state, (1,))
    lrows = large["rows"]
    progress(f"memory, {large['state_bytes']:,} B state: "
             f"{(lrows[1]['used_memory'] - lrows[0]['used_memory']) / large_sessions:,.0f} B "
             f"for the first checkpoint ({lrows[0]['encoding']} -> {lrows[1]['encoding']})")
    return {"standard": standard, "large": large, "first_checkpoint": first,
            "further_checkpoint": more,
            "large_first_checkpoint": (lrows[1]["used_memory"] - lrows[0]["used_memory"])
            / large_sessions}


# -- the existing commands against the floors ---------------------------------


def baseline_rev() -> str:
    """The commit that last wrote benchmarks/results/latest-full.json."""
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--",
                          "benchmarks/results/latest-full.json"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def extract(rev: str, into: Path) -> Path:
    """rev's files (git archive): no worktree added to the repository."""
    tree = into / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def recorded() -> tuple[dict[str, float], str]:
    """Redis us per request of each command in the run that judged the
    floors (latest-full.json: front, DEALER x64, median over its runs)."""
    path = RESULTS / "latest-full.json"
    if not path.exists():
        return {}, ""
    run = json.loads(path.read_text())
    found: dict[str, list[float]] = {}
    for r in run["runs"] + run["repeated_runs"] + run["other_commands"]:
        if (r["server"], r["kind"], r["inflight"]) == ("front", "DEALER", 64):
            found.setdefault(r["op"], []).append(float(r["script_ms"]) * 1000)
    return {op: statistics.median(v) for op, v in found.items()}, str(run["machine"]["date"])


def floor_of(command: str) -> float | None:
    """The lean path's floor (benchmarks/targets.py); None: not judged
    (get_session_statistics, whose read the benchmark forces per request)."""
    if command == "update_session_state":
        return targets.REDIS_UPDATE_US
    if command == "get_session_statistics":
        return None
    return targets.REDIS_OTHER_US


def existing(base: list[dict[str, Any]], new: list[dict[str, Any]],
             then: dict[str, float]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for command in new[0]["found"]:
        this_us = statistics.median(r["found"][command]["usec"] for r in new)
        base_us = statistics.median(r["found"][command]["usec"] for r in base)
        per_round = [n["found"][command]["usec"] / b["found"][command]["usec"]
                     for n, b in zip(new, base, strict=True)]
        # Contention on a shared machine only adds time, so the lowest figure
        # of each tree is the least disturbed one (benchmarks.stages takes
        # the lowest of its rounds too); the floor is judged on their ratio.
        this_low = min(r["found"][command]["usec"] for r in new)
        base_low = min(r["found"][command]["usec"] for r in base)
        ratio = this_low / base_low
        floor = floor_of(command)
        projected = then[command] * ratio if command in then and floor is not None else None
        out[command] = {
            "this_usec": this_us, "base_usec": base_us, "this_low": this_low,
            "base_low": base_low, "ratio": ratio, "paired_ratio": statistics.median(per_round),
            "ratio_range": [min(per_round), max(per_round)], "ratio_rounds": per_round,
            "this_usec_rounds": [r["found"][command]["usec"] for r in new],
            "base_usec_rounds": [r["found"][command]["usec"] for r in base],
            "this_calls": statistics.median(r["found"][command]["calls"] for r in new),
            "base_calls": statistics.median(r["found"][command]["calls"] for r in base),
            "scripts": statistics.median(r["found"][command]["scripts"] for r in new),
            "recorded_usec": then.get(command), "projected_usec": projected, "floor_us": floor,
            "holds": None if floor is None or projected is None else projected <= floor,
        }
    return out


# -- the report ---------------------------------------------------------------


def _of_which(inner_by: dict[str, float]) -> str:
    return ", ".join(f"{k.upper()} {v:.0f}" if v == round(v) else f"{k.upper()} {v:.1f}"
                     for k, v in sorted(inner_by.items(), key=lambda kv: -kv[1]))


def _checkpoint_rows(found: dict[str, dict[str, Any]]) -> str:
    rows = []
    for c in found.values():
        lo, hi = c["x_reference_range"]
        rows.append(f"| {c['name']} | {c['before']} -> {c['after']} | {c['usec']:.1f} | "
                    f"{c['x_reference']:.2f}x ({lo:.2f}-{hi:.2f}) | {c['inner']:.1f} | "
                    f"{_of_which(c['inner_by'])} | {c['bytes']:,.0f} |")
    return "\n".join(rows)


def _existing_rows(found: dict[str, dict[str, Any]]) -> str:
    rows = []
    for command, c in found.items():
        lo, hi = c["ratio_range"]
        rec = "" if c["recorded_usec"] is None else f"{c['recorded_usec']:.1f}"
        proj = "" if c["projected_usec"] is None else f"{c['projected_usec']:.1f}"
        if c["floor_us"] is None:
            floor, verdict = "not judged", ""
        else:
            floor = f"<= {c['floor_us']:.0f}"
            verdict = {True: "holds", False: "**does not hold**", None: ""}[c["holds"]]
        rows.append(f"| {command} | {c['base_low']:.1f} ({c['base_usec']:.1f}) | "
                    f"{c['this_low']:.1f} ({c['this_usec']:.1f}) | {c['ratio']:.2f}x | "
                    f"{c['paired_ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | {c['base_calls']:.1f} | "
                    f"{c['this_calls']:.1f} | {rec} | {proj} | {floor} | {verdict} |")
    return "\n".join(rows)


def _memory_rows(part: dict[str, Any]) -> str:
    rows, base = [], part["rows"][0]
    for row in part["rows"]:
        n = row["checkpoints"]
        total = (row["used_memory"] - base["used_memory"]) / part["sessions"]
        each_ = f"{total / n:,.0f}" if n else ""
        rows.append(f"| {n} | {total:,.0f} | {each_} | {row['memory_usage']:,.0f} | "
                    f"{row['replay_bytes']:,.0f} | {row['heads_bytes']:,.0f} | "
                    f"{row['encoding']} |")
    return "\n".join(rows)


def _fixed_rows(fixed: dict[str, float], then: dict[str, float]) -> str:
    rows = []
    for name, usec in fixed.items():
        before = then.get(name)
        ratio = f"{usec / before:.2f}x" if before else ""
        rows.append(f"| {name} | {'' if before is None else f'{before:.1f}'} | {usec:.1f} | "
                    f"{ratio} |")
    return "\n".join(rows)


def _room(clear: dict[str, Any], saving: float) -> str:
    """Would clear_context hold its floor with `saving` us less per call: its
    figure here less the saving, projected as the floors table projects."""
    base, this, recorded = (clear.get("base_low"), clear.get("this_low"),
                            clear.get("recorded_usec"))
    if not base or not this or not recorded:
        return ""
    projected = (this - saving) / base * recorded
    return (f"With that saving, clear_context would be {this - saving:.1f} us here instead of"
            f" {this:.1f} (the judged tree's {base:.1f}; the lowest of the rounds),"
            f" projected {projected:.1f} us against the floor's {targets.REDIS_OTHER_US:.0f}: "
            + ("still over it." if projected > targets.REDIS_OTHER_US else "under it."))


def _pieces(result: dict[str, Any]) -> dict[str, str]:
    pieces = result["snapshot_pieces"]
    rows = pieces["rows"]
    clear = result["existing"]["commands"].get("clear_context", {})
    recorded = clear.get("recorded_usec")
    added = rows[-1]["usec"] - rows[0]["usec"]
    verdict = f"The checkpoint's steps add {added:.1f} us to a script call on this machine."
    if recorded is not None:
        margin = targets.REDIS_OTHER_US - recorded
        verdict += (
            f" The floor ({targets.REDIS_OTHER_US:.0f} us) leaves `clear_context` {margin:.1f} us"
            f" over the {recorded:.1f} us its judging run recorded before it took checkpoints: "
            + ("less than these steps alone, before any of the command's own work."
               if added > margin else "room for these steps."))
    redis_own = rows[1]["added"] + rows[4]["added"]  # HGETALL and HSET
    lua = rows[2]["added"] + rows[3]["added"]  # the filter loop and cmsgpack
    verdict += (
        f" Of these, {redis_own:.1f} us are Redis' own commands (the HGETALL that reads the"
        f" session, the HSET that writes a snapshot as large as the session into its listpack)"
        f" and {lua:.1f} us the Lua between them (the filter loop, and cmsgpack's packing in C).")
    designs = pieces.get("alternatives", [])
    best = min(designs[1:], key=lambda d: d["over_nothing"]) if len(designs) > 1 else None
    designs_verdict = "" if best is None else (
        f"The cheapest of them, \"{best['design']}\", takes {best['over_nothing']:.1f} us against"
        f" {designs[0]['over_nothing']:.1f} us as built: "
        f"{1 - best['over_nothing'] / designs[0]['over_nothing']:.0%} less. "
        + _room(clear, designs[0]["over_nothing"] - best["over_nothing"]))
    return {"pieces_rows": snapshot_cost.rows_md(rows), "pieces_rounds": str(pieces["rounds"]),
            "pieces_calls": f"{pieces['calls']:,}", "pieces_verdict": verdict,
            "designs_rows": snapshot_cost.alternatives_md(designs),
            "designs_verdict": designs_verdict}


def _summary(result: dict[str, Any]) -> str:
    found = result["existing"]["commands"]
    judged = {k: c for k, c in found.items() if c["holds"] is not None}
    failed = [k for k, c in judged.items() if not c["holds"]]
    update = found.get("update_session_state", {})
    ck = result["checkpoints"]
    lines = []
    if judged:
        others = [c["projected_usec"] for k, c in judged.items() if k != "update_session_state"]
        lines.append(
            f"- **Floors of the existing commands** (this tree against "
            f"{result['existing']['against']}, same run, projected onto the run that judged "
            f"them): update {update.get('projected_usec', float('nan')):.1f} us "
            f"(<= {targets.REDIS_UPDATE_US:.0f}), every other command at most "
            f"{max(others):.1f} us (<= {targets.REDIS_OTHER_US:.0f}): "
            + ("all hold." if not failed else
               "**not held by " + ", ".join(failed) + "**, the others hold.")
            + f" Inner calls per update: {update.get('this_calls', float('nan')):.1f} (one at a"
            f" time) and {ck[case_key(CASES[REFERENCE])]['inner']:.1f} (in batches), <= "
            f"{targets.UPDATE_INNER_CALLS:.0f}.")
    ref = ck[case_key(CASES[REFERENCE])]
    for key in (case_key(CASES[3]), case_key(CASES[8]), case_key(CASES[9])):
        c = ck[key]
        lines.append(f"- {c['name']}: {c['x_reference']:.2f}x the Redis time of an update "
                     f"(merge, no checkpoint; {c['usec']:.1f} against {ref['usec']:.1f} us "
                     f"here), {c['inner']:.0f} inner calls.")
    mem = result["memory"]
    lines.append(f"- Memory: {mem['first_checkpoint']:,.0f} B for a session's first checkpoint "
                 f"of {mem['standard']['snapshot_bytes']:,.0f} B, "
                 f"{mem['further_checkpoint']:,.0f} B for each further one; the session "
                 f"hash stays a {mem['standard']['rows'][-1]['encoding']} up to 10.")
    return "\n".join(lines)


def render(result: dict[str, Any], command: str) -> str:
    cfg, mem = result["config"], result["memory"]
    std, large = mem["standard"], mem["large"]
    quick = ("\n\n**This is a `--quick` smoke run**: one round and few sessions; its figures "
             "are rough." if cfg["quick"] else "")
    return template("checkpoints.md").substitute(
        command=command, date=result["machine"]["date"], duration=f"{result['duration_s']:.0f}",
        quick=quick, summary=_summary(result), rounds=cfg["rounds"],
        sessions=f"{cfg['sessions']:,}", state_bytes=f"{std['state_bytes']:,}",
        context_bytes=f"{len(codec.dumps(workload.CONTEXT)):,}", label=LABEL,
        checkpoint_rows=_checkpoint_rows(result["checkpoints"]),
        reference=CASES[REFERENCE].name,
        against=result["existing"]["against"], recorded_date=result["existing"]["recorded_date"],
        repeats=cfg["repeats"], existing_rows=_existing_rows(result["existing"]["commands"]),
        update_floor=f"{targets.REDIS_UPDATE_US:.0f}", other_floor=f"{targets.REDIS_OTHER_US:.0f}",
        fixed_rows=_fixed_rows(result["fixed"], result["fixed_recorded"]),
        **_pieces(result),
        mem_sessions=f"{std['sessions']:,}", snapshot_bytes=f"{std['snapshot_bytes']:,.0f}",
        memory_rows=_memory_rows(std), listpack_value=f"{LISTPACK_VALUE:,}",
        large_sessions=f"{large['sessions']:,}", large_state=f"{large['state_bytes']:,}",
        large_snapshot=f"{large['snapshot_bytes']:,.0f}", large_rows=_memory_rows(large),
        large_first=f"{mem['large_first_checkpoint']:,.0f}",
        first=f"{mem['first_checkpoint']:,.0f}", further=f"{mem['further_checkpoint']:,.0f}",
        machine="\n".join(f"| {k} | {v} |" for k, v in result["machine"].items()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, few sessions")
    parser.add_argument("--rounds", type=int, help="rounds (default 7, quick 1)")
    parser.add_argument("--against", help="the commit the existing commands are compared "
                        "with (default: the one that last wrote results/latest-full.json)")
    args = parser.parse_args(argv)
    progress = Progress()
    started = time.monotonic()
    rounds = args.rounds or (1 if args.quick else 7)
    sessions, repeats = (100, 100) if args.quick else (500, 600)
    mem_sessions, large_sessions = (300, 100) if args.quick else (4000, 1000)
    against = args.against or baseline_rev()
    then, recorded_date = recorded()
    found: list[dict[str, Cost]] = []
    base: list[dict[str, Any]] = []
    new: list[dict[str, Any]] = []
    server = EmbeddedRedis().start()
    try:
        info = machine.describe(str(redis.Redis.from_url(server.url).info("server")
                                    ["redis_version"]))
        bench = Bench(server.url)
        with tempfile.TemporaryDirectory(prefix="stui-checkpoints-") as tmp:
            tree = extract(against, Path(tmp))
            progress(f"warm-up probes of {against} and this tree")
            rediscost.probe(tree, repeats // 3)
            rediscost.probe(REPO, repeats // 3)
            for n in range(rounds):
                order = [(against, tree, base), ("this tree", REPO, new)]
                for name, path, into in order if n % 2 == 0 else order[::-1]:
                    progress(f"round {n + 1}/{rounds}: the existing commands, {name}")
                    into.append(rediscost.probe(path, repeats))
                progress(f"round {n + 1}/{rounds}: the checkpoint commands, "
                         f"{sessions} sessions")
                found.append(checkpoint_round(bench, sessions))
                bench.r.flushall()
        progress("memory")
        mem = memory(server.url, mem_sessions, large_sessions, progress)
    finally:
        server.stop()
    progress("an automatic checkpoint's steps (benchmarks.snapshot_cost)")
    pieces_rounds, pieces_calls = (1, 300) if args.quick else (5, 2000)
    pieces = snapshot_cost.measure(pieces_rounds, pieces_calls)
    progress("other ways to take that checkpoint (benchmarks.snapshot_cost)")
    designs = snapshot_cost.alternatives(pieces_rounds, pieces_calls)
    progress("fixed costs of a script call")
    fixed = rediscost.fixed_costs(rounds=1 if args.quick else 3,
                                  calls=500 if args.quick else 2000)
    previous = rediscost.RESULTS_JSON
    fixed_then = json.loads(previous.read_text()).get("fixed", {}) if previous.exists() else {}
    result: dict[str, Any] = {
        "machine": info, "duration_s": time.monotonic() - started,
        "config": {"quick": args.quick, "rounds": rounds, "sessions": sessions,
                   "repeats": repeats, "batch": BATCH, "memory_sessions": mem_sessions,
                   "large_sessions": large_sessions},
        "checkpoints": summarize(found),
        "existing": {"against": against, "recorded_date": recorded_date,
                     "commands": existing(base, new, then)},
        "fixed": fixed, "fixed_recorded": fixed_then, "memory": mem,
        "snapshot_pieces": {"rounds": pieces_rounds, "calls": pieces_calls, "rows": pieces,
                            "alternatives": designs},
    }
    for command, c in result["existing"]["commands"].items():
        progress(f"{command}: {c['base_usec']:.1f} -> {c['this_usec']:.1f} us "
                 f"({c['ratio']:.2f}x), projected {c['projected_usec'] or float('nan'):.1f} us, "
                 f"floor {c['floor_us']}: {c['holds']}")
    for key, c in result["checkpoints"].items():
        progress(f"{key}: {c['usec']:.1f} us ({c['x_reference']:.2f}x), {c['inner']:.1f} "
                 f"inner calls, {c['bytes']:,.0f} B")
    progress(f"wrote {save_json('checkpoints', args.quick, result)}")
    doc = outputs("checkpoints", args.quick)[1]
    doc.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.checkpoints" + (" --quick" if args.quick else "")
    doc.write_text(render(result, command))
    progress(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
