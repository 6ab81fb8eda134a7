"""Instructions Redis executes per command, this tree against earlier
commits, and where the update script's go.

    .venv/bin/python -m benchmarks.rediscount --against 67c3ff1 --against 4bafe8a

writes docs/benchmarks-rediscount.md and benchmarks/results/rediscount.json.

Redis' time per request (benchmarks.rediscost, benchmarks.run) moves with
whatever else the machine runs: on this shared machine the same tree has
measured 43 us and 100 us per update on different days. The instructions
Redis executes do not: redis-server runs under valgrind's callgrind, with
instrumentation on only while one command's requests run, and the count
is the same for the same binary and requests, whatever the load.

Each tree runs benchmarks/rediscost_probe.py (its typical requests: 1 KB of
state in two keys, a request id on each, rate limiting on) in a process of
its own, each earlier commit from a temporary git worktree. Then this tree's
update calls, recorded as its dispatcher sent them, are replayed against
copies of the update script cut short at successive points (`do return 1
end` before a line), each call with a fresh request id: the differences
between cuts are what each stretch of the script costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.common import Progress
from benchmarks.rediscost import probe

REPO = Path(__file__).resolve().parent.parent
RESULTS_JSON = REPO / "benchmarks" / "results" / "rediscount.json"

# Where the update script is cut: each stretch ends before its line (a
# unique line of scripts.UPDATE's source), in order.
CUTS = (
    ("the script's call, its prelude (closures, TIME)", "local replace = ARGV[8] == '1'"),
    ("index_read (the client index's HMGET)", "local limited = rate_take(idx['!r'], ARGV[6])"),
    ("rate_take (the token buckets)", "local m, early = load_meta('kh')"),
    ("load_meta (the session's HMGET, unpack_meta)", "local r = replay_lookup(m.q)"),
    ("replay_lookup, the version check",
     "local ck, book, took, names = nil, nil, 0, nil"),
    ("the writes' fields and sizes (klen per key)", "local old, exact = {}, replace"),
    ("the size checks", "m.v, m.lm = m.v + 1, now"),
    ("refresh, replay_add", "if replace then\n  -- The old keys go first"),
    ("session_write (pack_meta, the session's HSET)",
     "\nindex_write(m, moved, idx)\nidx_flush(idx)\nreturn untouched"),
    ("index_write (the expiry and clients ZADDs, the entry)",
     "\nidx_flush(idx)\nreturn untouched"),
    ("idx_flush (the client index's HSET)", "\nreturn untouched(reply, m.sn)"),
)


def have_callgrind() -> str | None:
    """None when valgrind and callgrind_control are there, else what is missing."""
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    return ", ".join(missing) or None


def cut_at(source: str, line: str) -> str:
    if source.count(line) != 1:
        raise ValueError(f"the cut {line!r} is not one line of the script")
    lead = "\n" if line.startswith("\n") else ""
    return source.replace(line, f"{lead}do return 1 end\n{line.lstrip(chr(10))}")


def update_breakdown(workdir: Path, sessions: int) -> list[tuple[str, float]]:
    """Instructions per update up to each cut, then for the whole script."""
    from benchmarks import rediscost_probe as rp
    from service import scripts, store

    rp.CALLGRIND = str(workdir)  # where callgrind writes its dumps (read at each use)

    recorded: list[tuple[list[Any], list[Any]]] = []
    pack = store._pack

    def spy(call: store.Call) -> bytes:
        if call.script.name == scripts.UPDATE.name:
            recorded.append((list(call.keys), list(call.args)))
        return pack(call)

    server = rp.CallgrindRedis().start(wait=120)
    store._pack = spy
    try:
        assert server.process is not None
        p = rp.Probe(server.url)
        client = p.r
        counter = rp.Counter(server.process.pid, client)
        sids = [p.ask("create_session", client_id=f"c{n % 50}")["session_id"]
                for n in range(sessions)]
        for sid in sids:
            p.ask("update_session_state", session_id=sid, state_data=rp.STATE)
        recorded.clear()
        for n, sid in enumerate(sids):
            p.ask("update_session_state", session_id=sid,
                  state_data={**rp.STATE, "cursor": {"line": n, "column": 1}})
        found: list[tuple[str, float]] = []
        for label, line in (*CUTS, ("the whole script", None)):
            source = cut_at(scripts.UPDATE.source, line) if line else scripts.UPDATE.source
            sha = client.script_load(source)

            def replay(calls: list[tuple[list[Any], list[Any]]], sha: str = sha) -> None:
                for call_keys, call_args in calls:
                    args = list(call_args)
                    if args[1]:  # a fresh request id: a replay would answer from its record
                        digest = args[1] if isinstance(args[1], bytes) else args[1].encode()
                        args[1] = os.urandom(8) + digest[8:]
                    client.execute_command(  # type: ignore[no-untyped-call]
                        "EVALSHA", sha, len(call_keys), *call_keys, *args)

            replay(recorded[:1])  # the new script's first call, not counted
            counter.start()
            replay(recorded)
            found.append((label, counter.stop() / len(recorded)))
        return found
    finally:
        store._pack = pack
        server.stop()


def report(earlier: dict[str, dict[str, Any]], new: dict[str, Any],
           cuts: list[tuple[str, float]], seconds: float, repeats: int,
           info: dict[str, str]) -> str:
    """earlier: each earlier commit's probe result, by commit."""
    commits = list(earlier)
    head = " | ".join(f"instructions, {c}" for c in commits)
    ratios = " | ".join(f"ratio to {c}" for c in commits)
    rows = []
    for command, figures in new["found"].items():
        now = figures["instructions"]
        was = [earlier[c]["found"][command]["instructions"] for c in commits]
        rows.append(f"| {command} | " + " | ".join(f"{w:,.0f}" for w in was)
                    + f" | {now:,.0f} | " + " | ".join(f"{now / w:.2f}x" for w in was) + " |")
    stretches, before = [], 0.0
    whole = cuts[-1][1]
    for label, upto in cuts[:-1]:
        stretches.append(f"| {label} | {upto - before:,.0f} | {(upto - before) / whole:.0%} |")
        before = upto
    stretches.append(f"| untouched (the reply's other keys), the reply | {whole - before:,.0f} "
                     f"| {(whole - before) / whole:.0%} |")
    described = "\n".join(f"- {k}: {v}" for k, v in info.items())
    against = " ".join(f"--against {c}" for c in commits)
    return f"""# Redis instructions per command: this tree against {", ".join(commits)}

Generated by `.venv/bin/python -m benchmarks.rediscount {against}` in
{seconds:.0f} s. Do not edit by hand: rerun the command.

What redis-server executed per request (valgrind's callgrind, instrumentation
on only while that command's {repeats} requests ran, each command's after a
full collection of Redis' Lua heap, `--hz 1`): reading the request, the
script, the reply. A count, not a time: the same, to half a percent, for the
same binary and requests whatever else the machine runs, so a ratio is the
change's own. It is not a time either way: a cache miss costs no
instruction, so a layout that touches fewer keys gains more time than count
(benchmarks-rediscost.md measures time). Each tree's dispatcher sends the typical
requests of `benchmarks.rediscost` (1 KB of state in two keys, a request id
on each, rate limiting on). `get_session_statistics` is one snapshot read
(64 script calls).

| command | {head} | instructions, this tree | {ratios} |
|---|{"---:|" * (2 * len(commits) + 1)}
{chr(10).join(rows)}

## Where an update's instructions go

This tree's update calls (as its dispatcher sent them) replayed against the
update script cut short before successive lines, each call with a fresh
request id (and one uncounted call first); each row is the difference
between two cuts, the first the call itself: Redis reading the request,
building KEYS and ARGV, the prelude's closures and its `TIME`. Replayed one
call per round trip, so the whole differs a little from the table above's.

| stretch | instructions per update | share |
|---|---:|---:|
{chr(10).join(stretches)}
| **the whole script** | **{whole:,.0f}** | |

## Machine

{described}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, action="append",
                        help="an earlier commit (repeat for more)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--output", type=Path,
                        default=REPO / "docs" / "benchmarks-rediscount.md")
    args = parser.parse_args()
    missing = have_callgrind()
    if missing:
        sys.exit(f"benchmarks.rediscount needs valgrind's callgrind; missing: {missing}")
    progress = Progress()
    started = time.monotonic()
    earlier: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="stui-rediscount-") as tmp:
        env = {"STUI_PROBE_CALLGRIND": tmp}
        for commit in args.against:
            tree = Path(tmp) / f"tree-{commit}"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit],
                           cwd=REPO, check=True)
            try:
                progress(f"{commit}: {args.repeats} requests per command under callgrind")
                earlier[commit] = probe(tree, args.repeats, env)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                               check=False)
        progress(f"this tree: {args.repeats} requests per command under callgrind")
        new = probe(REPO, args.repeats, env)
        progress("this tree: the update script, cut short at each stretch")
        cuts = update_breakdown(Path(tmp), args.repeats)
    info = machine.describe(new["redis"])
    args.output.write_text(report(earlier, new, cuts, time.monotonic() - started,
                                  args.repeats, info))
    progress(f"wrote {args.output}")
    # The figures, for benchmarks.report (docs/benchmarks.md shows the ratios).
    RESULTS_JSON.write_text(json.dumps({
        "against": args.against, "date": info["date"], "repeats": args.repeats,
        "commands": {c: {"new": new["found"][c]["instructions"],
                         **{commit: earlier[commit]["found"][c]["instructions"]
                            for commit in args.against}} for c in new["found"]},
        "update_cuts": cuts}, indent=1) + "\n")
    progress(f"wrote {RESULTS_JSON}")


if __name__ == "__main__":
    main()
