"""The benchmark tools still work against the service as it is: those that
build Lua of their own from the service's scripts still load it (a change to
the prelude must not break them unseen: benchmarks.rediscost's Function
library failed at FUNCTION LOAD once), and benchmarks.statscompare's parts
still drive a real front."""

from __future__ import annotations

import pytest
import redis
import zmq

from benchmarks import rediscost, statscompare
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
