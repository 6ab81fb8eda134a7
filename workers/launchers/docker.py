"""Docker for the image and compose tests, on a machine without Docker Hub.

- `DockerDaemon`: the daemon that ``DOCKER_HOST`` (or the default socket)
  reaches; else, as root, a ``dockerd`` started here with its data under
  `STATE_DIR` (kept between runs, so the base image and the build cache
  are), stopped by PID when done.
- `ensure_base_image`: ``local/python:3.11-slim``, a stand-in for the
  ``python:3.11-slim`` base that cannot be pulled: Debian made by
  ``debootstrap`` from the mirror in the machine's apt sources, with
  python3, venv and pip, a ``python`` command, and the machine's local CA
  certificates (pip reaches PyPI through a TLS-intercepting proxy on such
  machines). Made once, then found in the daemon's image store.
- `build_image`: the project's own Dockerfile on that base (legacy builder:
  there is no buildx plugin here).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from workers.launchers.process import LaunchError, stop_process

# A stable place: the daemon's image store (and so the base image and the
# layer cache) survives between test runs on the same machine.
STATE_DIR = Path(os.environ.get("STUI_DOCKER_STATE", "/var/tmp/stui-sessions/docker"))
BASE_IMAGE = "local/python:3.11-slim"
SUITE_FALLBACK = "bookworm"
# What the python:3.11-slim image has and our Dockerfile relies on.
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[str], None]


class DockerUnavailable(LaunchError):
    """No daemon can be reached or started here (the tests skip on it)."""


def _quiet(_: str) -> None:
    pass


class Docker:
    """The docker CLI, pointed at one daemon."""

    def __init__(self, cli: str, host: str | None) -> None:
        self.cli = cli
        self.env = dict(os.environ)
        if host is not None:
            self.env["DOCKER_HOST"] = host
        # The legacy builder: BuildKit needs the buildx plugin on newer CLIs.
        self.env["DOCKER_BUILDKIT"] = "0"

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120.0,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.cli, *args],
            env={**self.env, **(env or {})},
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            # A build's own error is at the end of its output, not in stderr.
            raise LaunchError(
                f"docker {' '.join(args[:3])} failed ({done.returncode}): "
                f"{(done.stdout[-2500:] + done.stderr[-1500:]).strip()}"
            )
        return done

    def reachable(self) -> bool:
        try:
            return self.run("info", check=False, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def has_image(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0


def find_docker_cli() -> str | None:
    return shutil.which("docker")


def find_dockerd() -> str | None:
    return shutil.which("dockerd") or (
        "/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None
    )


class DockerDaemon:
    """A context manager giving a `Docker` bound to a working daemon."""

    def __init__(self, state_dir: Path = STATE_DIR, progress: Progress = _quiet) -> None:
        self.state_dir = state_dir
        self.progress = progress
        self.proc: subprocess.Popen[bytes] | None = None
        self.docker: Docker | None = None

    @property
    def socket(self) -> Path:
        return self.state_dir / "docker.sock"

    def start(self) -> Docker:
        cli = find_docker_cli()
        if cli is None:
            raise DockerUnavailable("no docker CLI on PATH (Debian: apt-get install docker.io)")
        existing = Docker(cli, None)
        if existing.reachable():
            self.docker = existing
            return existing
        own = Docker(cli, f"unix://{self.socket}")
        dockerd = find_dockerd()
        if dockerd is None:
            raise DockerUnavailable("no reachable Docker daemon and no dockerd to start")
        if os.geteuid() != 0:
            raise DockerUnavailable("no reachable Docker daemon, and dockerd needs root")
        self._stop_leftover()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "dockerd.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.progress(f"starting dockerd (data in {self.state_dir / 'data'})")
        self.proc = subprocess.Popen(
            [
                dockerd,
                "--data-root", str(self.state_dir / "data"),
                "--exec-root", str(self.state_dir / "exec"),
                "--pidfile", str(self.state_dir / "dockerd.pid"),
                "--host", f"unix://{self.socket}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 60
        while not own.reachable():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DockerUnavailable(
                    f"dockerd did not start; see {self.state_dir / 'dockerd.log'}"
                )
            time.sleep(0.5)
        self.docker = own
        return own

    def _stop_leftover(self) -> None:
        """A dockerd an earlier run started here and did not stop holds the
        data root's lock: stop it (by the PID it wrote) before starting."""
        pidfile = self.state_dir / "dockerd.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            if "dockerd" not in Path(f"/proc/{pid}/cmdline").read_text():
                return
            os.kill(pid, signal.SIGTERM)
        except (OSError, ProcessLookupError):
            return
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, timeout=60)  # dockerd stops its containers, then exits
        self.proc = None

    def __enter__(self) -> Docker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def apt_mirror(sources: Sequence[Path] | None = None) -> str:
    """The Debian mirror the machine's apt sources name (deb822 or one-line)."""
    paths = list(sources) if sources is not None else [
        Path("/etc/apt/sources.list"),
        *sorted(Path("/etc/apt/sources.list.d").glob("*")),
    ]  # fmt: skip
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            deb822 = re.match(r"URIs:\s*(\S+)", line)
            one_line = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            found = deb822 or one_line
            if found and "security" not in found.group(1):
                return found.group(1)
    raise LaunchError("no Debian mirror in the apt sources")


def debian_suite() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return SUITE_FALLBACK
    found = re.search(r"^VERSION_CODENAME=(\w+)", text, re.MULTILINE)
    return found.group(1) if found else SUITE_FALLBACK


def ensure_base_image(docker: Docker, tag: str = BASE_IMAGE, progress: Progress = _quiet) -> None:
    """Makes the local base image unless the daemon already has it."""
    if docker.has_image(tag):
        return
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise DockerUnavailable("no base image and no debootstrap to make one")
    mirror, suite = apt_mirror(), debian_suite()
    progress(f"making {tag}: debootstrap {suite} from {mirror} (about a minute)")
    with tempfile.TemporaryDirectory(prefix="stui-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", suite,
             str(rootfs), mirror],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        python = rootfs / "usr/bin/python"
        if not python.exists():
            python.symlink_to("python3")
        _install_local_cas(rootfs)
        progress(f"importing {tag}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        done = subprocess.run(
            [docker.cli, "import", "--change", f"ENV {PATH_ENV}",
             "--change", 'CMD ["python3"]', "-", tag],
            stdin=tar.stdout, env=docker.env, capture_output=True, timeout=600,
        )  # fmt: skip
        tar.stdout.close()
        tar.wait()
        if done.returncode != 0 or tar.returncode != 0:
            raise LaunchError(f"docker import failed: {done.stderr.decode()[-2000:]}")


def _install_local_cas(rootfs: Path) -> None:
    """The machine's own CA certificates, trusted inside the image too, and
    pip told to use the system bundle (its own does not hold them)."""
    local = sorted(LOCAL_CA_DIR.glob("*.crt")) if LOCAL_CA_DIR.is_dir() else []
    if not local:
        return
    target = rootfs / LOCAL_CA_DIR.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    for cert in local:
        shutil.copy2(cert, target / cert.name)
    subprocess.run(
        ["chroot", str(rootfs), "update-ca-certificates"], check=True, capture_output=True
    )
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


def build_image(
    docker: Docker,
    context: Path,
    tag: str,
    base: str = BASE_IMAGE,
    dockerfile: Path | None = None,
    progress: Progress = _quiet,
) -> None:
    """``docker build`` of the project's Dockerfile (or ``dockerfile``) on ``base``."""
    progress(f"building {tag} on {base}")
    args = ["build", "--build-arg", f"BASE_IMAGE={base}", "-t", tag]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    docker.run(*args, str(context), timeout=1200)
