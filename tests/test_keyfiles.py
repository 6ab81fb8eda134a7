"""CURVE key files (workers/curve.py generate_key_pair): the secret file is
0600 from the instant it exists, an existing file or symlink is never
overwritten nor followed, the files load with zmq.auth and make a working
CURVE handshake; and CurveKeys never shows its secret."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from workers.client import CurveKeys
from workers.curve import KeyFileExists, generate_key_pair


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


class FirstSight(threading.Thread):
    """Watches a path from before it exists: the mode it has the first time
    it is seen (what a reader racing the writer would get)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.mode: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                continue
            self.mode = stat.S_IMODE(st.st_mode)
            return


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_the_secret_file_is_0600_from_its_first_instant(
    tmp_path: Path, umask: None, mask: int
) -> None:
    os.umask(mask)  # 000: a create-then-chmod would make it 0666 for a while
    for n in range(10):
        watcher = FirstSight(tmp_path / f"k{n}.key_secret")
        watcher.start()
        public_file, secret_file = generate_key_pair(tmp_path, f"k{n}")
        watcher.stop.set()
        watcher.join(5)
        assert watcher.mode == 0o600, oct(watcher.mode or 0)
        assert mode_of(secret_file) == 0o600
        assert mode_of(public_file) == 0o644
        assert secret_file == tmp_path / f"k{n}.key_secret"
        assert public_file == tmp_path / f"k{n}.key"


def test_a_narrower_umask_is_kept_for_no_file_and_widens_none(tmp_path: Path, umask: None) -> None:
    os.umask(0o077)
    public_file, secret_file = generate_key_pair(tmp_path, "narrow")
    assert (mode_of(public_file), mode_of(secret_file)) == (0o644, 0o600)


@pytest.mark.parametrize("which", ["key_secret", "key"])
def test_an_existing_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path, which: str
) -> None:
    keys, elsewhere = tmp_path / "keys", tmp_path / "elsewhere"
    keys.mkdir()
    elsewhere.mkdir()
    target = elsewhere / "precious"
    target.write_text("precious\n")
    target.chmod(0o644)
    (keys / f"server.{which}").symlink_to(target)
    with pytest.raises(KeyFileExists, match="never overwritten nor followed") as raised:
        generate_key_pair(keys, "server")
    assert raised.value.filename == str(keys / f"server.{which}")
    assert target.read_text() == "precious\n" and mode_of(target) == 0o644
    assert sorted(p.name for p in keys.iterdir()) == [f"server.{which}"]  # nothing else written


def test_a_dangling_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    (tmp_path / "server.key_secret").symlink_to(target)
    with pytest.raises(KeyFileExists):
        generate_key_pair(tmp_path, "server")
    assert not target.exists() and not (tmp_path / "server.key").exists()


def test_an_existing_pair_is_never_overwritten(tmp_path: Path) -> None:
    public_file, secret_file = generate_key_pair(tmp_path, "server")
    before = (public_file.read_bytes(), secret_file.read_bytes())
    with pytest.raises(KeyFileExists):
        generate_key_pair(tmp_path, "server")
    assert (public_file.read_bytes(), secret_file.read_bytes()) == before
    assert mode_of(secret_file) == 0o600


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../up"])
def test_a_name_must_be_a_plain_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        generate_key_pair(tmp_path / "keys", name)


def test_the_cli_refuses_to_overwrite(tmp_path: Path) -> None:
    def generate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers.cli", "keys", "generate",
             "--dir", str(tmp_path), "--name", "server"],
            capture_output=True, text=True, timeout=30, check=False,
        )

    assert generate().returncode == 0
    secret = (tmp_path / "server.key_secret").read_bytes()
    again = generate()
    assert again.returncode == 1  # EXIT_BAD_FILE, one line and no traceback
    assert "never overwritten nor followed" in again.stderr
    assert "Traceback" not in again.stderr and again.stderr.count("\n") == 1
    assert (tmp_path / "server.key_secret").read_bytes() == secret


def test_the_files_load_with_zmq_auth_and_make_a_curve_handshake(tmp_path: Path) -> None:
    server_public_file, server_secret_file = generate_key_pair(tmp_path, "server")
    _, client_secret_file = generate_key_pair(tmp_path, "client")
    server_public, server_secret = zmq.auth.load_certificate(str(server_secret_file))
    assert zmq.auth.load_certificate(str(server_public_file)) == (server_public, None)
    assert server_secret is not None and zmq.curve_public(server_secret) == server_public
    assert zmq.auth.load_certificates(str(tmp_path)).keys() >= {server_public}

    keys = CurveKeys.from_files(str(server_public_file), str(client_secret_file))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    server, client = ctx.socket(zmq.REP), ctx.socket(zmq.REQ)
    try:
        server.curve_server = True
        server.curve_secretkey = server_secret
        server.curve_publickey = server_public
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.curve_serverkey = keys.server_public.encode()
        client.curve_publickey = keys.public.encode()
        client.curve_secretkey = keys.secret.encode()
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"ping")
        assert server.poll(5000) and server.recv() == b"ping"
        server.send(b"pong")
        assert client.poll(5000) and client.recv() == b"pong"
    finally:
        server.close(linger=0)
        client.close(linger=0)
        ctx.term()


def test_curve_keys_never_show_the_secret(tmp_path: Path) -> None:
    server_public_file, _ = generate_key_pair(tmp_path, "server")
    _, client_secret_file = generate_key_pair(tmp_path, "client")
    keys = CurveKeys.from_files(str(server_public_file), str(client_secret_file))
    assert len(keys.secret) == 40
    for shown in (repr(keys), str(keys), f"{keys}", f"{keys!r}", repr([keys]), repr({"k": keys})):
        assert keys.secret not in shown
        assert keys.public in shown  # the public parts stay visible
    assert "secret" not in repr(CurveKeys("s" * 40, "p" * 40, "x" * 40))
