"""HAProxy in TCP mode in front of several front workers, as a child process.

ZeroMQ speaks ZMTP over plain TCP, so HAProxy balances *connections*, not
requests: each REQ socket (one TCP connection) sticks to one front until the
connection breaks. Used by tests/test_loadbalancer.py and
benchmarks/scaleout.py.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from workers.launchers.process import LaunchError, free_port, stop_process


def find_haproxy() -> str | None:
    """The haproxy binary, or None so that callers can skip loudly."""
    found = shutil.which("haproxy")
    if found:
        return found
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    for candidate in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class HAProxyNotFound(LaunchError):
    pass


class HAProxy:
    """`haproxy -f CFG -db` on 127.0.0.1:<free port>, balancing over `backends`
    (host:port strings), with a stats socket to read each server's state."""

    def __init__(
        self,
        backends: Sequence[str],
        *,
        balance: str = "roundrobin",
        port: int | None = None,
        nbthread: int | None = None,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = list(backends)
        self.balance = balance
        self.port = port or free_port()
        self.nbthread = nbthread
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="stui-haproxy-"))
        self.config_path = self.dir / "haproxy.cfg"
        self.stats_socket = self.dir / "stats.sock"
        # Outside self.dir, which stop() removes: the log outlives a failed test.
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"stui-haproxy-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def server_name(index: int) -> str:
        return f"front{index}"

    def config(self) -> str:
        threads = f"    nbthread {self.nbthread}\n" if self.nbthread else ""
        servers = "\n".join(
            f"    server {self.server_name(i)} {addr}" for i, addr in enumerate(self.backends)
        )
        # Why each setting:
        # - mode tcp: ZMTP is not HTTP; HAProxy only relays bytes.
        # - timeout connect 300ms: backends are local, a connect that takes
        #   longer means the front is gone. It also bounds the turn-around
        #   pause HAProxy takes before retrying a refused connect.
        # - timeout client/server 1h: ZeroMQ connections are long-lived and
        #   may sit idle between requests; a short timeout would cut them and
        #   turn idleness into lost requests.
        # - retries 3 + option redispatch 1: a connect refused by a front
        #   that died before the health check noticed is retried on another
        #   server instead of failing the client's connection.
        # - check inter 200ms fall 2 rise 1: a dead front is out of rotation
        #   within about 0.4 s, a restarted one is back after one good check.
        # - on-marked-down shutdown-sessions: clients still connected through
        #   a front that is marked down are cut at once, so their ZeroMQ
        #   sockets reconnect (to a live front) instead of waiting on a
        #   connection that leads nowhere.
        return f"""\
global
    maxconn 4096
    stats socket {self.stats_socket} mode 600 level admin
{threads}
defaults
    mode tcp
    timeout connect 300ms
    timeout client 1h
    timeout server 1h
    timeout check 300ms
    retries 3
    option redispatch 1

frontend stui
    bind 127.0.0.1:{self.port}
    default_backend fronts

backend fronts
    balance {self.balance}
    default-server check inter 200ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""

    def start(self, wait: float = 15.0) -> HAProxy:
        binary = find_haproxy()
        if binary is None:
            raise HAProxyNotFound("haproxy is not installed (apt-get install haproxy)")
        self.config_path.write_text(self.config())
        with open(self.log, "wb") as log:
            # -db: stay in the foreground, so this Popen is HAProxy itself and
            # stopping it stops the proxy.
            self.proc = subprocess.Popen(
                [binary, "-f", str(self.config_path), "-db"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_accepting(wait)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_accepting(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"haproxy exited with {self.proc.returncode}: {self.log.read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if self.stats_socket.exists():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy not accepting on {self.port}: {self.log.read_text()}")
            time.sleep(0.05)

    def command(self, line: str) -> str:
        """One command on the stats socket (e.g. "show stat"), its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks: list[bytes] = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_stats(self) -> dict[str, dict[str, str]]:
        """`show stat` of the backend's servers, by server name: status
        ("UP", "DOWN", ...), scur (current connections), stot (total)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == "fronts" and row.get("svname") not in ("FRONTEND", "BACKEND")
        }

    def wait_status(self, server: str, status: str, timeout: float = 10.0) -> None:
        """Until the health checks report `server` in `status` (e.g. "UP")."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.server_stats()[server]["status"]
            if current.startswith(status):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server} still {current}, not {status}, after {timeout} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "haproxy not started"
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # SIGTERM: HAProxy's hard stop
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
