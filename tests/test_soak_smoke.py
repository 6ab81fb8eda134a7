"""The soak command works: `python -m benchmarks.soak --seconds 5` runs its
whole loop (its own redis-server and front worker, the mixed workload, the
samples) and reports numbers. Nothing about speed or memory is asserted here;
docs/soak.md holds what a full run measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workers.launchers.redis import RedisNotFound, find_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent


def test_soak_runs_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("psutil", reason="SKIPPED LOUDLY: the soak samples the front with psutil")
    try:
        find_redis_server()
    except RedisNotFound as exc:
        pytest.skip(f"SKIPPED LOUDLY: {exc}")
    out = tmp_path / "soak.json"  # never the committed results or docs/soak.md
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "5", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASSED" in proc.stdout
    assert "front RSS start" in proc.stdout and "requests " in proc.stdout

    result = json.loads(out.read_text())
    assert result["passed"] is True
    assert len(result["samples"]) >= 2
    req = result["requests"]
    assert req["total"] > 0 and req["ok"] > 0
    assert req["unexpected"] == {} and req["no_reply"] == 0
    # The deliberate bad requests were sent and answered with their errors.
    assert sum(req["expected_errors"].values()) > 0
    front = result["front"]
    assert front["rss_start"] > 0 and front["fds_start"] > 0 and front["alive_at_end"]
