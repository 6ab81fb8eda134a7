"""What an automatic checkpoint costs Redis, piece by piece.

`clear_context` is over its lean-path floor by the automatic checkpoint that
the checkpoints' issue asks it to take. This measures that checkpoint's work
one step at a time, as scripts of their own on copies of one real session
hash (made through the dispatcher, shaped as `benchmarks.rediscost`'s probe
leaves it before its `clear_context`: 1 KB of state, a workspace context, an
object in the registry, replay records): each row adds one step to the one
above, so the difference between rows is that step's price. The steps are
those of `checkpoint_kit()` in service/scripts.py (HGETALL, the content
filter, cmsgpack.pack, the HSET of the snapshot and its head), written out
flat so that nothing else is measured.

Used by `benchmarks.checkpoints` (its "Why clear_context is over its floor");
runnable alone: `python -m benchmarks.snapshot_cost`.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import redis

from benchmarks.rediscost_probe import STATE, Probe
from workers.launchers.redis import EmbeddedRedis

# Each step's Lua, appended in order: a row runs every step up to its own.
_READ = "local all = redis.call('HGETALL', KEYS[1])\n"
_FILTER = """local names, values = {}, {}
for i = 1, #all, 2 do
  local f = all[i]
  local p = string.sub(f, 1, 2)
  if p == 's:' or p == 'o:' or p == 'e:' or f == 'w' or f == 'wv' or f == 'i'
    or f == 'ih' or f == 'so' then
    names[#names + 1] = f; values[#values + 1] = all[i + 1]
  end
end
"""
_PACK = "local blob = cmsgpack.pack({1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, names, values)\n"
_WRITE = "redis.call('HSET', KEYS[1], 'k:1', blob, 'kh', '1;1,2,3,' .. #blob .. ',1')\n"
STEPS: list[tuple[str, str]] = [
    ("a script that does nothing (`return 1`)", ""),
    ("+ HGETALL of the session hash", _READ),
    ("+ keep the state and context fields (the Lua loop)", _FILTER),
    ("+ cmsgpack.pack of the snapshot", _PACK),
    ("+ HSET of the snapshot and its head into the hash", _WRITE),
]

# Other ways to take the same checkpoint, each a whole script (measured as
# the steps are): what was tried to bring clear_context under its floor.
_LABELLED = ("redis.call('HSET', KEYS[1], 'k:1', blob, 'kl:1', 'before clear_context', 'kh', "
             "'1;1,2,3,' .. #blob .. ',1')\n")
_CONCAT = """local lens = {}
for i = 1, #names do lens[i] = #values[i] end
local blob = table.concat({'1,2,3,4,5,6,7,8,9,10;', table.concat(names, '\\0'), ';',
  table.concat(lens, ','), ';', table.concat(values)})
"""
_PACK_ALL = "local blob = cmsgpack.pack(all)\n"
_WRITE_ELSEWHERE = _WRITE.replace("KEYS[1]", "'x' .. KEYS[1]")
ALTERNATIVES: list[tuple[str, str]] = [
    ("as built: the steps above, and the label in a field of its own (`kl:<id>`)",
     _READ + _FILTER + _PACK + _LABELLED),
    ("no label field (the head would say which command took it)", _READ + _FILTER + _PACK + _WRITE),
    ("no label field, the snapshot built by table.concat (names, lengths, values)",
     _READ + _FILTER + _CONCAT + _WRITE),
    ("no label field, the snapshot written to a key of its own (no listpack growth)",
     _READ + _FILTER + _PACK + _WRITE_ELSEWHERE),
    ("no label field, no filter: the whole HGETALL packed (metadata and replay records too)",
     _READ + _PACK_ALL + _WRITE),
]


def _session(url: str) -> dict[bytes, bytes]:
    """One session hash as the rediscost probe's clear_context finds it."""
    p = Probe(url)
    sid = p.ask("create_session", client_id="c0")["session_id"]
    p.ask("update_session_state", session_id=sid, state_data=STATE)
    p.ask("save_context", session_id=sid, context={
        "workspace_context": {"vars": {"a": 0}}, "object_registry": {"o1": {"c": "Point"}}})
    (key,) = p.r.keys(f"*{sid}*")
    return p.r.hgetall(key)  # type: ignore[return-value]


def _timed(scripts: list[str], rounds: int, calls: int) -> list[float]:
    """Each script's Redis us per call (median over rounds), on fresh copies
    of the probe's session hash, the scripts taking turns in every round."""
    server = EmbeddedRedis().start()
    try:
        fields = _session(server.url)
        r = redis.Redis.from_url(server.url)
        shas = [r.script_load(body + "return 1") for body in scripts]
        found: list[list[float]] = [[] for _ in scripts]
        for _ in range(rounds):
            for n, sha in enumerate(shas):
                r.flushall()
                pipe = r.pipeline(transaction=False)
                for i in range(calls):
                    pipe.hset(f"s{i}", mapping=fields)  # type: ignore[arg-type]
                pipe.execute()
                r.config_resetstat()
                pipe = r.pipeline(transaction=False)
                for i in range(calls):
                    pipe.evalsha(sha, 1, f"s{i}")
                pipe.execute()
                stat = r.info("commandstats")["cmdstat_evalsha"]
                found[n].append(stat["usec"] / stat["calls"])
    finally:
        server.stop()
    return [statistics.median(v) for v in found]


def measure(rounds: int = 5, calls: int = 2000) -> list[dict[str, Any]]:
    """Rows of {step, usec (median over rounds of usec per call), added}."""
    bodies, body = [], ""
    for _, step in STEPS:
        body += step
        bodies.append(body)
    rows: list[dict[str, Any]] = []
    previous = None
    for (name, _), usec in zip(STEPS, _timed(bodies, rounds, calls), strict=True):
        rows.append({"step": name, "usec": usec,
                     "added": None if previous is None else usec - previous})
        previous = usec
    return rows


def alternatives(rounds: int = 5, calls: int = 2000) -> list[dict[str, Any]]:
    """Rows of {design, usec, over_nothing}: each way of ALTERNATIVES, less
    a script that does nothing, measured in the same rounds."""
    found = _timed(["", *(body for _, body in ALTERNATIVES)], rounds, calls)
    return [{"design": name, "usec": usec, "over_nothing": usec - found[0]}
            for (name, _), usec in zip(ALTERNATIVES, found[1:], strict=True)]


def alternatives_md(rows: list[dict[str, Any]]) -> str:
    built = rows[0]["over_nothing"]
    return "\n".join(f"| {r['design']} | {r['usec']:.1f} | {r['over_nothing']:.1f} | "
                     f"{r['over_nothing'] / built:.2f}x |" for r in rows)


def rows_md(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        added = "" if r["added"] is None else f"{r['added']:+.1f}"
        out.append(f"| {r['step']} | {r['usec']:.1f} | {added} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(json.dumps({"steps": measure(), "alternatives": alternatives()}, indent=1))
