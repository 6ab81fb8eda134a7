"""The benchmark tools still work against the service as it is: those that
build Lua of their own from the service's scripts still load it (a change to
the prelude must not break them unseen: benchmarks.rediscost's Function
library failed at FUNCTION LOAD once; benchmarks.rediscount cuts the update
script before lines it names), and benchmarks.statscompare's parts still
drive a real front."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import zmq

from benchmarks import rediscost, rediscount, statscompare
from service import scripts
from tests.conftest import FrontProcess

pytestmark = pytest.mark.integration


def test_the_prelude_as_a_function_library_loads_and_runs(redis_client: redis.Redis) -> None:
    version = str(redis_client.info("server")["redis_version"])
    if int(version.split(".")[0]) < 7:
        pytest.skip(f"redis-server {version} has no Functions (7.0 or later)")
    prelude = scripts.UPDATE.source.split("local replace = ARGV[8]")[0]
    assert prelude != scripts.UPDATE.source  # the split point is still there
    redis_client.function_load(rediscost._as_library(prelude), replace=True)
    try:
        sid = "0123456789abcdef.abcdefghijklmnopqrstuv"
        args = ("", "", "0", sid, "0123456789abcdef", "")
        assert redis_client.fcall("noop", 2, "k", "k", *args) == 1
    finally:
        redis_client.function_flush()


def test_statscompare_fills_measures_and_reports(
    front: FrontProcess, redis_client: redis.Redis
) -> None:
    """benchmarks.statscompare's parts against a real front: the fill makes
    the sessions, the probe gets successful statistics, the report's ratios
    are the medians' (large / small)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        statscompare.fill(ctx, front.endpoint, 12, "bt", per_client=4)  # the front's limit is 5
        assert len(list(redis_client.scan_iter("stui:*:s:*", count=1000))) == 12
        assert statscompare.p50_ms(ctx, front.endpoint, 5) > 0
    finally:
        ctx.destroy(0)
    found = {"earlier": {"10": [1.0, 3.0], "20": [3.0, 5.0]},
             "this": {"10": [2.0, 2.0], "20": [2.0, 2.0]}}
    text = statscompare.report("abc1234", found, (10, 20), 2, 5, {"cpus": "2"}, 1.0)
    assert "| abc1234 | 2.000 | 4.000 | **2.00x** |" in text
    assert "| this tree | 2.000 | 2.000 | **1.00x** |" in text


def test_rediscount_counts_each_command_and_each_stretch_of_the_update(tmp_path: Path) -> None:
    """benchmarks.rediscount against this tree, a few requests: every
    command gets an instruction count, every cut line is still in the
    update script (cut_at refuses a line it does not find once), and the
    whole script runs more than its first cut."""
    missing = rediscount.have_callgrind()
    if missing:
        pytest.skip(f"benchmarks.rediscount needs valgrind's callgrind; missing: {missing}")
    found = rediscost.probe(rediscount.REPO, 5, {"STUI_PROBE_CALLGRIND": str(tmp_path)})["found"]
    assert set(found) >= {"update_session_state", "clear_context", "get_session_statistics"}
    assert all(figures["instructions"] > 10_000 for figures in found.values())
    cuts = rediscount.update_breakdown(tmp_path, 5)
    assert [label for label, _ in cuts[:-1]] == [label for label, _ in rediscount.CUTS]
    # Over 5 calls a Lua GC step can land in any one cut: only the ends compare.
    counts = [n for _, n in cuts]
    assert min(counts) > 10_000 and counts[-1] > counts[0]
    report = rediscount.report({"HEAD": {"found": found}}, {"found": found}, cuts, 1.0, 5, {})
    assert "| update_session_state |" in report and "1.00x" in report
