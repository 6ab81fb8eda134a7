"""The benchmark tools that build Lua of their own from the service's
scripts still load it: a change to the prelude must not break them unseen
(benchmarks.rediscost's Function library failed at FUNCTION LOAD once)."""

from __future__ import annotations

import pytest
import redis

from benchmarks import rediscost
from service import scripts

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
