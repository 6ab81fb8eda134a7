"""The service on a real Redis Cluster (3 masters, one replica each).

Every command's integration test runs again here, through front workers in
`--redis-mode cluster` (the tests are imported from their modules, and this
module's fixtures point them at the cluster); then backup, restore,
housekeeping and the scheduler over every master.

    .venv/bin/python -m pytest tests/test_cluster.py
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from service import backup, keys, scripts
from service.dispatch import Dispatcher
from service.errors import StorageUnavailable
from service.housekeeping import Pruned, global_figures, housekeep
from service.leader import current_leader
from service.settings import Settings
from service.store import Call, RedisClient, Store, redis_for
from tests.conftest import FrontProcess, RedisTarget
from tests.helpers import wait_for
from tests.test_backup import (
    TEST_KEY,
    TEST_KEY_TEXT,
    cli,
    in_batches,
    make_sessions,
    run,
    snapshot,
)
from tests.test_commands import (  # noqa: F401  (collected again, against the cluster)
    any_client,
    test_command_form_reply_shape,
    test_describe_reports_configured_limits,
    test_envelope_reply_shape,
    test_statistics_and_system_commands,
    test_top_level_client_id,
    test_whole_lifecycle,
)
from tests.test_scheduler import Recorder
from tests.test_semantics import (  # noqa: F401  (collected again, against the cluster)
    test_awkward_json_round_trips,
    test_closed_with_save_still_counts,
    test_expired_sessions_free_the_client_limit,
    test_expiry_and_sliding_expiry,
    test_history_cap_keeps_newest,
    test_ownership,
    test_replay_window_expires,
    test_same_request_id_different_parameters_is_refused,
    test_same_request_id_executes_once,
    test_state_size_cap_changes_nothing,
    test_twenty_concurrent_creates_exactly_five_succeed,
    test_two_writers_same_expected_version_one_wins,
)
from tests.test_sentinel import LEDGER_ENV, MAX_UPDATES, Writer
from workers.client import Client
from workers.launchers.cluster import LocalCluster
from workers.scheduler import Scheduler

pytestmark = pytest.mark.integration

CLUSTER_ENV = {"STUI_REDIS_MODE": "cluster"}


@pytest.fixture
def redis_target(redis_cluster: LocalCluster) -> RedisTarget:
    return RedisTarget(redis_cluster.url, CLUSTER_ENV)


@pytest.fixture
def redis_client(redis_cluster: LocalCluster) -> Iterator[RedisClient]:
    """A cluster client on an emptied cluster (every master flushed)."""
    redis_cluster.flushall()
    client = redis_for(Settings(redis_url=redis_cluster.url, redis_mode="cluster"))
    yield client
    client.close()


@pytest.fixture
def dispatcher(redis_client: RedisClient) -> Dispatcher:
    settings = Settings(redis_url="unused", rate_limit=0, create_rate_limit=0)
    return Dispatcher(settings, Store(redis_client))


def masters_holding_sessions(cluster: LocalCluster) -> int:
    held = 0
    for node in cluster.masters():
        with redis.Redis(port=node.port) as c:
            held += any(True for _ in c.scan_iter(match=keys.session_scan_pattern(), count=500))
    return held


def test_sessions_spread_over_every_master(
    redis_cluster: LocalCluster, dispatcher: Dispatcher
) -> None:
    make_sessions(dispatcher, 200)
    assert masters_holding_sessions(redis_cluster) == LocalCluster.MASTERS
    stats = run(dispatcher, [("get_session_statistics", {})])[0]
    assert stats["total_sessions"] == 200


def test_backup_restore_and_verify_cover_every_master(
    redis_cluster: LocalCluster, dispatcher: Dispatcher, redis_client: RedisClient, tmp_path: Path
) -> None:
    sids = make_sessions(dispatcher, 300)
    before = snapshot(redis_client, sids)  # type: ignore[arg-type]
    path = tmp_path / "cluster.jsonl.gz"
    mode = ["--redis-mode", "cluster", "--redis-url", redis_cluster.url]

    done = cli("backup", *mode, "--output", str(path))
    assert done.returncode == 0, done
    assert backup.verify_backup(path, key=TEST_KEY).sessions == 300

    redis_cluster.flushall()
    restored = cli("restore", str(path), *mode)
    assert restored.returncode == 0, restored
    after = snapshot(redis_client, sids)  # type: ignore[arg-type]
    assert {s: f for s, (f, _) in after.items()} == {s: f for s, (f, _) in before.items()}
    assert masters_holding_sessions(redis_cluster) == LocalCluster.MASTERS


def test_housekeeping_prunes_on_every_master(
    redis_cluster: LocalCluster, dispatcher: Dispatcher, redis_client: RedisClient
) -> None:
    assert isinstance(redis_client, redis.RedisCluster)
    created = in_batches(
        dispatcher, [("create_session", {"client_id": f"hk{n}", "timeout": 600}) for n in range(60)]
    )
    # Delete every session hash behind the service's back, as an eviction
    # would: the client indexes on every master now hold orphans.
    for r in created:
        redis_client.delete(keys.session_key(r["session_id"]))
    nodes = backup.primaries(redis_client)
    assert len(nodes) == LocalCluster.MASTERS
    pruned = housekeep(redis_client, nodes)
    assert pruned.orphans == 60
    assert global_figures(redis_client).sessions == 0
    assert housekeep(redis_client, nodes) == Pruned()


def test_scheduler_leads_and_backs_up_on_a_cluster(
    redis_cluster: LocalCluster, dispatcher: Dispatcher, redis_client: RedisClient, tmp_path: Path
) -> None:
    make_sessions(dispatcher, 50)
    settings = Settings(
        redis_url=redis_cluster.url,
        redis_mode="cluster",
        leader_ttl=2.0,
        backup_dir=tmp_path / "b",
        backup_interval=0.01,
        cleanup_interval=1,
        backup_key=SecretStr(TEST_KEY_TEXT),
    )
    seen = Recorder()
    scheduler = Scheduler(settings, redis_for(settings), seen)
    thread = threading.Thread(target=scheduler.run)
    thread.start()
    try:
        wait_for(lambda: seen.kinds().count("backup") >= 2, 20)
        wait_for(lambda: ("figures", 50, 50) in seen.events, 10)
        assert current_leader(redis_client) is not None
    finally:
        scheduler.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    files = sorted((tmp_path / "b").glob("*.jsonl.gz"))
    assert files and backup.verify_backup(files[-1], key=TEST_KEY).sessions == 50
    assert current_leader(redis_client) is None  # released through a fenced transaction


def test_a_master_killed_under_load_fails_over_and_nothing_acknowledged_is_lost(
    redis_cluster: LocalCluster, start_front: Callable[..., FrontProcess], redis_client: RedisClient
) -> None:
    """SIGKILL the master holding a writer's sessions; the cluster promotes
    its replica, the front follows the new slot map by itself, and once the
    killed node is back (as a replica) WAIT succeeds again. Runs last in this
    module: the cluster's roles are shuffled afterwards."""
    assert isinstance(redis_client, redis.RedisCluster)
    front = start_front(env={"STUI_REDIS_WAIT_REPLICAS": "1", **LEDGER_ENV})
    assert front.proc is not None
    writers = [Writer(front.endpoint, f"cw-{n}") for n in range(4)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in writers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(w.acked) >= 20 for w in writers), 30)
        key = keys.session_key(writers[0].session_id)
        victim_port = redis_client.get_node_from_key(key).port  # type: ignore[no-untyped-call]
        victim = next(n for n in redis_cluster.nodes if n.port == victim_port)
        before = [list(w.acked) for w in writers]
        assert victim.process is not None
        victim.process.kill()
        victim.process.wait()
        wait_for(lambda: redis_cluster.covered_without(victim_port), 30)
        victim.start()  # rejoins as a replica of its promoted replica
        marks = [len(w.acked) for w in writers]
        wait_for(
            lambda: all(
                len(w.acked) >= min(m + 20, MAX_UPDATES) or w.failures
                for w, m in zip(writers, marks, strict=True)
            ),
            60,
        )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert [w.failures for w in writers] == [[]] * 4
    assert front.proc.poll() is None  # the same process served throughout
    lost = lost_before = executed_twice = 0
    with Client(front.endpoint, timeout=5.0, retries=5) as reader:
        for w, acked_before in zip(writers, before, strict=True):
            session = reader.call("restore_session", session_id=w.session_id)
            lost += sum(1 for k in w.acked if k not in session["session_state"])
            lost_before += sum(1 for k in acked_before if k not in session["session_state"])
            executed_twice += session["version"] - 1 - len(w.acked)
    retries = sum(w.stats["retries"] for w in writers)
    print(
        f"\ncluster failover: {sum(len(w.acked) for w in writers)} acknowledged, "
        f"{lost} lost, {executed_twice} executed twice, {retries} client retries"
    )
    assert (lost, lost_before, executed_twice) == (0, 0, 0)
    assert retries > 0  # the kill was felt


def test_a_whole_cluster_down_is_storage_unavailable_not_a_crash() -> None:
    """With every node gone the slot map cannot be read again: redis-py raises
    RedisClusterException, which is not a RedisError. The store must still
    answer StorageUnavailable, batch after batch, and recover when the
    cluster is back (its own cluster: the shared one must stay up)."""
    with LocalCluster() as cluster:
        store = Store(redis_for(Settings(redis_url=cluster.url, redis_mode="cluster")))
        index = keys.client_index_key(keys.client_hash("down"))
        rate = ["", "", "0", "", keys.client_hash("down"), "10,10,1,1,0"]
        call = Call(scripts.RATE, [index, index], rate)
        assert not isinstance(store.run([call])[0], Exception)
        for node in cluster.nodes:
            node.stop()
        for _ in range(3):
            store._down_until = 0.0  # skip the hold: exercise the slot-map refresh each time
            with pytest.raises(StorageUnavailable):
                store.run([call])
        for node in cluster.nodes:
            node.start()  # same port and nodes.conf: the same cluster comes back

        def answers() -> bool:
            store._down_until = 0.0
            try:
                return not isinstance(store.run([call])[0], Exception)
            except StorageUnavailable:
                return False

        wait_for(answers, 30, step=0.2, what="the store to recover")


def test_one_master_down_fails_only_its_calls() -> None:
    """A statistics-like batch of 64 calls, one per bucket, while one master
    is dead and not yet replaced: the other masters' calls still answer, the
    dead master's get StorageUnavailable, and no hold blocks the next batch
    (its own cluster: the shared one must stay up)."""
    with LocalCluster(node_timeout_ms=60_000) as cluster:  # no failover during the test
        store = Store(redis_for(Settings(redis_url=cluster.url, redis_mode="cluster")))
        batch = [
            Call(scripts.STATS, [keys.bucket_expiry_key(b), keys.bucket_clients_key(b)], [])
            for b in range(keys.NUM_BUCKETS)
        ]
        assert not any(isinstance(r, Exception) for r in store.run(batch))
        victim = cluster.masters()[0]
        assert victim.process is not None
        victim.process.kill()
        victim.process.wait()
        for _ in range(2):  # the second batch comes at once: no hold
            results = store.run(batch)
            down = [r for r in results if isinstance(r, StorageUnavailable)]
            assert 0 < len(down) < keys.NUM_BUCKETS
            assert all(isinstance(r, StorageUnavailable) or r == [0, 0] for r in results)
