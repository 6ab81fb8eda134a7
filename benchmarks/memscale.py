"""Redis memory per session at growing session counts (10k, 100k, 1M).

    .venv/bin/python -m benchmarks.memscale [--quick]

Sessions are written as the benchmark's memory phase writes them (5 per
client, then one 1 KB state update each, every request with an id, so the
replay records are included), but through the dispatcher in this process,
in batches of 256: the memory a session takes does not depend on which
front wrote it, and a million sessions through ZeroMQ would take the
machine's two CPUs for several minutes more. After each size, `INFO memory`
`used_memory` less what an empty Redis used, divided by the sessions.

benchmarks.run calls measure() in a full run (against its own Redis, after
the other phases); this command runs it on its own and writes
benchmarks/results/memscale.json.
"""

from __future__ import annotations

import argparse
from typing import Any

import redis

from benchmarks import workload
from benchmarks.common import Progress, save_json
from service import codec
from service.dispatch import Dispatcher
from service.settings import Settings
from service.store import Store, connect
from workers.launchers.redis import EmbeddedRedis

FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 5_000, 10_000)
BATCH = 256


def _write(d: Dispatcher, bodies: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for s in range(0, len(bodies), BATCH):
        for reply in d.handle(bodies[s:s + BATCH]):
            decoded = codec.loads(reply)
            if decoded.get("status") != "success":
                raise RuntimeError(f"memscale: {decoded}")
            out.append(decoded["result"])
    return out


def measure(url: str, sizes: tuple[int, ...], progress: Progress) -> list[dict[str, Any]]:
    """Flushes the Redis at url, then grows it to each size in turn."""
    r = redis.Redis.from_url(url)
    r.flushall()
    settings = Settings(redis_url=url, rate_burst=10**9, create_burst=10**9)
    d = Dispatcher(settings, Store(connect(url, 60)))
    base = int(r.info("memory")["used_memory"])
    done, rows = 0, []
    state_bytes = len(codec.dumps(workload.state_data(0)))
    for size in sizes:
        creates = [codec.dumps({"id": f"mc{n}", "command": "create_session", "parameters": {
            "client_id": f"mem-{n // workload.SESSIONS_PER_CLIENT}", "timeout": 3600}})
            for n in range(done, size)]
        sids = [res["session_id"] for res in _write(d, creates)]
        updates = [codec.dumps({"id": f"mu{n}", "command": "update_session_state", "parameters": {
            "session_id": sid, "state_data": workload.state_data(n)}})
            for n, sid in enumerate(sids, done)]
        _write(d, updates)
        done = size
        used = int(r.info("memory")["used_memory"])
        encoding = r.object("encoding", r.randomkey() or "") if size else None
        rows.append({"sessions": size, "used_memory": used, "base": base,
                     "per_session": (used - base) / size, "state_bytes": state_bytes,
                     "dbsize": int(r.dbsize())})
        progress(f"memory at {size:,} sessions: {(used - base) / size:,.0f} B per session "
                 f"({used / 2**20:,.0f} MiB in all; a random key's encoding: {encoding!r})")
    r.flushall()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k, 5k and 10k sessions")
    args = parser.parse_args(argv)
    progress = Progress()
    server = EmbeddedRedis().start()
    try:
        rows = measure(server.url, QUICK_SIZES if args.quick else FULL_SIZES, progress)
    finally:
        server.stop()
    progress(f"wrote {save_json('memscale', args.quick, {'sizes': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
