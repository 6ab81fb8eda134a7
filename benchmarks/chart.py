"""docs/benchmarks.png: throughput ratio to echo, and CPU per request."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): no display needed

from benchmarks.measure import RunResult
from benchmarks.targets import CPU_RATIO, THROUGHPUT_RATIO, pair, ratio
from benchmarks.workload import OPS

SHORT = {
    "create_session": "create",
    "update_session_state": "update",
    "restore_session": "restore",
    "get_session_info": "info",
    "list_client_sessions": "list",
}


def draw(results: list[RunResult], kinds: tuple[str, ...], inflights: tuple[int, ...],
         path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    series = [(k, n) for k in kinds for n in inflights]
    width = 0.8 / len(series)
    for s, (kind, n) in enumerate(series):
        values = []
        for op in OPS:
            p = pair(results, op, kind, n)
            values.append(ratio(p[0].throughput, p[1].throughput) if p else 0.0)
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(OPS))]
        left.bar(xs, values, width, label=f"{kind} x{n}")
    left.axhline(THROUGHPUT_RATIO, color="black", linestyle="--", linewidth=1,
                 label=f"target {THROUGHPUT_RATIO}x")
    left.set_xticks(range(len(OPS)), [SHORT[op] for op in OPS])
    left.set_ylabel("front+Redis throughput / echo throughput")
    left.set_title("Throughput relative to the echo server (higher is better)")
    left.legend(fontsize=8, ncol=2)

    kind, n = kinds[-1], inflights[-1]
    front_cpu, redis_cpu, echo_cpu = [], [], []
    for op in OPS:
        p = pair(results, op, kind, n)
        front_cpu.append(p[0].server_cpu_us if p else 0.0)
        redis_cpu.append(p[0].redis_cpu_us if p else 0.0)
        echo_cpu.append(p[1].server_cpu_us if p else 0.0)
    xs = list(range(len(OPS)))
    right.bar([x - 0.2 for x in xs], front_cpu, 0.4, label="front worker")
    right.bar([x - 0.2 for x in xs], redis_cpu, 0.4, bottom=front_cpu, label="Redis")
    right.bar([x + 0.2 for x in xs], echo_cpu, 0.4, label="echo server")
    right.scatter([x + 0.2 for x in xs], [CPU_RATIO * e for e in echo_cpu], marker="_", s=400,
                  color="black", label=f"{CPU_RATIO}x echo (target for update)")
    right.set_xticks(xs, [SHORT[op] for op in OPS])
    right.set_ylabel("CPU microseconds per request")
    right.set_title(f"CPU per request, {kind} x{n} (lower is better)")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
