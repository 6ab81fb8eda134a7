"""`stui-sessions clients show` and `clients purge` against a real Redis
(standalone and Cluster) and real fronts: one client whole, and an erasure
after which nothing of the client is left in Redis or in the backups, while
another client's sessions come back intact from the rewritten backups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import zmq

from service import auth, clients, keys, layout, plans, policy
from service.backup import verify_backup, write_records
from service.backup_read import iter_backup
from service.settings import Settings
from service.store import RedisClient, redis_for
from tests.conftest import FrontProcess
from tests.helpers import wait_for
from tests.test_backup import TEST_KEY, cli, cli_env
from tests.test_checkpoints import CONTEXT, STATE
from workers.client import Client, RemoteError
from workers.launchers.cluster import LocalCluster
from workers.launchers.redis import EmbeddedRedis

pytestmark = pytest.mark.integration

GONE = "gone-client-7f3a"  # the client erased
KEPT = "kept-client-91c2"  # a client beside it, never a substring of the other


class Topology:
    """Where the fronts and the CLI point, and every master to scan."""

    def __init__(self, url: str, env: dict[str, str], flags: list[str],
                 masters: list[redis.Redis]) -> None:
        self.url, self.env, self.flags, self.masters = url, env, flags, masters

    def client(self) -> RedisClient:
        mode = "cluster" if "--redis-mode" in self.flags else "standalone"
        return redis_for(Settings(redis_url=self.url, redis_mode=mode))  # type: ignore[arg-type]


@pytest.fixture(params=["standalone", "cluster"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    if request.param == "standalone":
        server: EmbeddedRedis = request.getfixturevalue("redis_server")
        node = redis.Redis.from_url(server.url)
        node.flushall()
        yield Topology(server.url, {}, ["--redis-url", server.url], [node])
        node.close()
        return
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    cluster.flushall()
    masters = [redis.Redis(port=n.port) for n in cluster.masters()]
    yield Topology(cluster.url, {"STUI_REDIS_MODE": "cluster"},
                   ["--redis-url", cluster.url, "--redis-mode", "cluster"], masters)
    for m in masters:
        m.close()


@pytest.fixture
def topo_front(topology: Topology) -> Iterator[FrontProcess]:
    front = FrontProcess(topology.url, env=topology.env).start()
    yield front
    front.stop()


def seed(c: Client, client_id: str, sessions: int = 3) -> list[str]:
    """Sessions with state, context, checkpoints and replay records."""
    sids = []
    for n in range(sessions):
        sid: str = c.call("create_session", client_id=client_id)["session_id"]
        c.call("update_session_state", session_id=sid, state_data={**STATE, "n": n})
        c.call("save_context", session_id=sid, context=CONTEXT)
        c.call("create_checkpoint", session_id=sid, label=f"cp {n}")
        c.call("clear_context", session_id=sid, parts=["object_registry"])  # automatic one
        sids.append(sid)
    return sids


def contents(masters: list[redis.Redis]) -> Iterator[tuple[bytes, bytes]]:
    """Every key of every master, with each of its elements (fields, values,
    members): what a scan of Redis finds."""
    for node in masters:
        for key in node.scan_iter(count=1000):
            kind = node.type(key)
            elements: list[Any]
            if kind == b"hash":
                elements = [x for pair in node.hgetall(key).items() for x in pair]
            elif kind == b"zset":
                elements = list(node.zrange(key, 0, -1))
            elif kind == b"set":
                elements = list(node.smembers(key))
            elif kind == b"string":
                elements = [node.get(key) or b""]
            else:
                elements = [b""]
            for element in elements:
                yield bytes(key), bytes(element)


def traces(masters: list[redis.Redis], client_id: str,
           sessions: Sequence[str] = ()) -> list[tuple[bytes, bytes]]:
    """Keys and elements that name the client, its hash or one of its
    sessions' random parts (which the client index keeps alone)."""
    marks = (client_id.encode(), keys.client_hash(client_id).encode(),
             *(layout.index_field(sid) for sid in sessions))
    return [(k, e) for k, e in contents(masters)
            if any(m in k or m in e for m in marks)]


def whole(c: Client, sid: str) -> dict[str, Any]:
    return {"state": c.call("restore_session", session_id=sid)["session_state"],
            "context": c.call("load_context", session_id=sid)["context"],
            "checkpoints": c.call("list_checkpoints", session_id=sid)["checkpoints"]}


def test_show_one_client_whole(topology: Topology, topo_front: FrontProcess) -> None:
    public, _ = zmq.curve_keypair()
    with Client(topo_front.endpoint, timeout=5, retries=0) as c:
        sids = seed(c, GONE, 2)
        seed(c, KEPT, 1)
        c.call("close_session", session_id=sids[0], save_state=True)
    with topology.client() as r:
        auth.add_client_key(r, GONE, public.decode())
    done = cli("clients", "show", GONE, "--json", *topology.flags, env=topology.env)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    settings = Settings()
    assert view["client_id"] == GONE and view["plan"] is None
    assert view["limits"] == plans.Limits.of(settings, None, {}).report()
    assert view["limits"]["max_sessions_per_client"] == 5
    assert sorted(s["session_id"] for s in view["sessions"]) == sorted(sids)
    by_id = {s["session_id"]: s for s in view["sessions"]}
    assert by_id[sids[0]]["active"] is False and by_id[sids[1]]["active"] is True
    for s in view["sessions"]:
        assert s["checkpoints"] == 2  # the manual one and the clear's automatic one
        assert s["bytes"] > len(json.dumps(STATE))
        assert s["version"] >= 3
        assert s["created_ms"] <= s["last_modified_ms"] < s["expires_ms"]
    assert view["curve_keys"] == 1
    assert 0 <= view["rate_tokens"] <= settings.rate_burst
    text = cli("clients", "show", GONE, *topology.flags, env=topology.env)
    assert text.returncode == 0 and sids[1] in text.stdout and "2 checkpoints" in text.stdout
    nobody = cli("clients", "show", "nobody-at-all", "--json", *topology.flags, env=topology.env)
    assert json.loads(nobody.stdout)["sessions"] == []
    bad = cli("clients", "show", "no spaces", *topology.flags, env=topology.env)
    assert bad.returncode == 2 and "client id pattern" in bad.stderr


def test_purge_leaves_nothing_and_backups_keep_the_others(
    topology: Topology, topo_front: FrontProcess, tmp_path: Path
) -> None:
    public, _ = zmq.curve_keypair()
    with Client(topo_front.endpoint, timeout=5, retries=0) as c:
        gone = seed(c, GONE)
        kept = seed(c, KEPT)
        c.call("ping", client_id=GONE)  # its rate bucket
        before = {sid: whole(c, sid) for sid in kept}
    with topology.client() as r:
        auth.add_client_key(r, GONE, public.decode())
        plans.set_plan(r, "gold", {"max_checkpoints": 20})
        plans.assign(r, GONE, "gold")
        plans.assign(r, "gone-", "gold", prefix=True)  # a prefix is not the client's
    assert traces(topology.masters, GONE)  # the scan can see the client
    fields = [e for _, e in traces(topology.masters, GONE, gone)]
    assert all(layout.index_field(sid) in fields for sid in gone)  # and its index fields
    backups = tmp_path / "backups"
    backups.mkdir()
    for name in ("a", "b"):
        made = cli("backup", *topology.flags, "--output", str(backups / f"{name}.jsonl.gz"),
                   env=topology.env)
        assert made.returncode == 0, made.stderr

    done = cli("clients", "purge", GONE, "--yes", "--backups", str(backups), *topology.flags,
               env=topology.env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["redis"]
    assert report["sessions"] == 3 and report["checkpoints"] == 6
    assert report["replay_records"] >= 4  # the creates' in the index, the sessions' own
    assert report["index_keys"] == 1 and report["rate_buckets"] == 1
    assert report["expiry_members"] == 3 and report["clients_members"] == 1
    assert report["curve_keys"] == 1 and report["denied_during"] is True
    assert report["plan_assignments"] == 1
    assert '"event": "purged"' in done.stderr and f'"client_id": "{GONE}"' in done.stderr

    # Nothing of it in Redis: no key, no field, no member, no value.
    assert traces(topology.masters, GONE, gone) == []
    with topology.client() as r:
        assert GONE not in policy.read_policy(r).deny  # the purge's own rule went too
        assert plans.read_table(r).prefixes == {"gone-": "gold"}
        assert not clients.redis_holds_client(r, GONE)
    # The other client is untouched, and the erased one starts afresh once
    # the fronts have dropped the purge's deny rule (within policy_refresh).
    with Client(topo_front.endpoint, timeout=5, retries=0) as c:
        assert {sid: whole(c, sid) for sid in kept} == before

        def code() -> str:
            try:
                c.call("get_session_info", session_id=gone[0])
            except RemoteError as exc:
                return str(exc.code)
            return "ok"

        wait_for(lambda: code() == "SessionNotFound", 5)

    # The backups: rewritten without it, signed anew, and a restore of them
    # brings the other client back intact.
    for name in ("a", "b"):
        path = backups / f"{name}.jsonl.gz"
        info = verify_backup(path, key=TEST_KEY)
        assert info.authenticated and info.sessions == 3
        ids = {rec.session_id for _, rec in iter_backup(path) if rec is not None}
        assert ids == set(kept)
    for m in topology.masters:
        m.flushall()
    restored = cli("restore", str(backups / "a.jsonl.gz"), *topology.flags, env=topology.env)
    assert restored.returncode == 0, restored.stderr
    with Client(topo_front.endpoint, timeout=5, retries=0) as c:
        assert {sid: whole(c, sid) for sid in kept} == before
    assert traces(topology.masters, GONE, gone) == []

    # Twice is safe: nothing left to remove, backups left as they are.
    again = cli("clients", "purge", GONE, "--yes", "--backups", str(backups), *topology.flags,
                env=topology.env)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["redis"]["sessions"] == 0 and second["redis"]["index_keys"] == 0
    assert all(b["removed"] == 0 for b in second["backups"])


def test_a_writing_client_is_refused_or_removed(
    redis_server: EmbeddedRedis, front: FrontProcess
) -> None:
    """Requests racing with the purge are refused (the deny rule) or removed
    by it: when the removal ends, nothing of the client is left."""
    stop = threading.Event()
    refused: list[str] = []

    def writer() -> None:
        with Client(front.endpoint, timeout=5, retries=0) as c:
            while not stop.is_set():
                try:
                    sid = c.call("create_session", client_id=GONE)["session_id"]
                    c.call("update_session_state", session_id=sid, state_data={"x": 1})
                    c.call("close_session", session_id=sid)  # stay under the session limit
                except RemoteError as exc:
                    refused.append(str(exc.code))

    thread = threading.Thread(target=writer)
    thread.start()
    left: list[bool] = []
    try:
        with redis.Redis.from_url(redis_server.url) as r:
            while not clients.redis_holds_client(r, GONE):
                pass  # the writer is at work
            settle = 2 * Settings().policy_refresh + 0.5
            done = clients.purge(
                r, GONE, settle=settle,
                before_lifting=lambda: left.append(clients.redis_holds_client(r, GONE)),
            )
    finally:
        stop.set()
        thread.join(10)
    assert left == [False]
    assert done.denied_during and done.passes >= 1
    assert "ClientNotAllowed" in refused


def test_purge_asks_first(redis_server: EmbeddedRedis, front: FrontProcess) -> None:
    with Client(front.endpoint, timeout=5, retries=0) as c:
        sid = c.call("create_session", client_id=GONE)["session_id"]
    no = subprocess.run([sys.executable, "-m", "workers.cli", "clients", "purge", GONE,
                         "--redis-url", redis_server.url], input="no\n", capture_output=True,
                        text=True, timeout=60)
    assert no.returncode == 2 and "nothing was changed" in no.stderr
    with Client(front.endpoint, timeout=5, retries=0) as c:
        assert c.call("get_session_info", session_id=sid)["session_id"] == sid
    yes = subprocess.run([sys.executable, "-m", "workers.cli", "clients", "purge", GONE,
                          "--redis-url", redis_server.url], input=f"{GONE}\n",
                         capture_output=True, text=True, timeout=60)
    assert yes.returncode == 0, yes.stderr
    assert json.loads(yes.stdout)["redis"]["sessions"] == 1


def test_purge_waits_for_a_backup_being_written_and_rewrites_it(
    redis_server: EmbeddedRedis, front: FrontProcess, tmp_path: Path
) -> None:
    """A backup the scheduler began before the purge may hold the client's
    sessions and land in the directory after the purge listed it: the purge
    waits while a backup is being written there, then rewrites what
    appeared. A file begun after the purge is left as it is (it can hold
    nothing of the purged client), and a file rotation removed meanwhile is
    no error."""
    with Client(front.endpoint, timeout=5, retries=0) as c:
        seed(c, GONE, sessions=2)
        kept = seed(c, KEPT, sessions=2)
    backups = tmp_path / "backups"
    backups.mkdir()
    flags = ["--redis-url", redis_server.url]
    first = backups / "a.jsonl.gz"
    assert cli("backup", *flags, "--output", str(first)).returncode == 0
    # The late backup: the client's sessions, read before the purge.
    held = tmp_path / "m.jsonl.gz"
    assert cli("backup", *flags, "--output", str(held)).returncode == 0
    # One begun "after the purge": a clock far ahead of Redis'.
    records = [rec for _, rec in iter_backup(first) if rec is not None]
    future = backups / "z.jsonl.gz"
    write_records(iter(records), future, key=TEST_KEY, created_ms=2**42, token=None)
    # A backup being written: its temporary file, fresh.
    writing = backups / ".m.jsonl.gz.tmp-1-abcd"
    writing.write_bytes(b"")

    lines: list[str] = []
    waiting = threading.Event()

    def read_progress(stream: Any) -> None:
        for line in stream:
            lines.append(line)
            if "waiting for a backup being written" in line:
                waiting.set()

    with subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "clients", "purge", GONE, "--yes",
         "--backups", str(backups), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    ) as purge:
        assert purge.stdout is not None and purge.stderr is not None
        reader = threading.Thread(target=read_progress, args=(purge.stderr,), daemon=True)
        reader.start()
        try:
            # The purge has rewritten what it found and waits for the backup
            # in progress; only then does that backup land (whatever the timing).
            assert waiting.wait(60), "".join(lines)
            os.replace(held.with_name(held.name + ".hmac"), backups / (held.name + ".hmac"))
            os.replace(held, backups / held.name)
            writing.unlink()
            out = purge.stdout.read()
            assert purge.wait(120) == 0, "".join(lines)
        finally:
            if purge.poll() is None:
                purge.kill()
        reader.join(10)
    files = {b["file"]: b for b in json.loads(out)["backups"]}
    assert files["a.jsonl.gz"]["removed"] == 2 and files["m.jsonl.gz"]["removed"] == 2
    assert files["z.jsonl.gz"]["removed"] == 0
    assert files["z.jsonl.gz"]["note"] == "begun after the purge"
    for name in ("a.jsonl.gz", "m.jsonl.gz"):
        path = backups / name
        assert verify_backup(path, key=TEST_KEY).authenticated
        assert {r.session_id for _, r in iter_backup(path) if r is not None} == set(kept)

    gone = clients.rewrite_backup(backups / "rotated.jsonl.gz", keys.client_hash(GONE),
                                  key=TEST_KEY)
    assert gone.removed == 0 and gone.note.startswith("gone")
