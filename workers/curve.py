"""CurveZMQ on the front socket, with ZAP through pyzmq's zmq.auth.

A connecting client is let in only if its public key is registered in Redis
(service/auth.py); the key's client id then travels with each of its
messages (ZeroMQ's User-Id property, here the key in Z85) and the worker
maps it back to a client id on every request, so a removed key stops
working within one cache refresh even on an open connection.
"""

from __future__ import annotations

import datetime
import errno
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from service import audit
from service.auth import ClientKeyCache
from service.settings import Settings


def server_key_pair(settings: Settings) -> tuple[bytes, bytes]:
    if settings.curve_key_file is not None:
        public, secret = zmq.auth.load_certificate(str(settings.curve_key_file))
        if not secret:
            raise SystemExit(f"{settings.curve_key_file} holds no secret key")
        return public, secret
    if settings.curve_public_key and settings.curve_secret_key:
        return (
            settings.curve_public_key.encode("ascii"),
            settings.curve_secret_key.get_secret_value().encode("ascii"),
        )
    raise SystemExit(
        "CURVE is on but the server has no key pair: set STUI_CURVE_KEY_FILE, or "
        "STUI_CURVE_PUBLIC_KEY and STUI_CURVE_SECRET_KEY (stui-sessions keys generate)"
    )


class KeyFileExists(FileExistsError):
    """A key file (or a symlink) is already where a new one would go."""


_SECRET_BANNER = """#   ****  Generated on {now} by stui-sessions  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {now} by stui-sessions  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange.

"""
# O_EXCL: never an existing file, nor (with O_CREAT) a symlink of any kind,
# dangling or not; O_NOFOLLOW says the same once more.
_TAKEN = "a file or symlink is already there (never overwritten nor followed)"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def certificate_text(banner: str, public: bytes, secret: bytes | None = None) -> str:
    """The ZPL certificate that zmq.auth.load_certificate reads (the layout
    of pyzmq's zmq.auth.create_certificates)."""
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    text = banner.format(now=now) + "metadata\n" + "curve\n"
    text += f'    public-key = "{public.decode("ascii")}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode("ascii")}"\n'
    return text


def _write_new(path: Path, text: str, mode: int) -> None:
    """Creates path with `mode` from the first instant (never wider: the
    umask may only narrow it, and fchmod then sets it exactly), writes
    text, and syncs it; an existing file or symlink is refused."""
    try:
        fd = os.open(path, _CREATE, mode)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ELOOP):  # ELOOP: O_NOFOLLOW met a symlink
            raise KeyFileExists(errno.EEXIST, _TAKEN, str(path)) from None
        raise
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(fd, mode)
        f.write(text)
        f.flush()
        os.fsync(fd)


def generate_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """name.key (public, 0644) and name.key_secret (both keys, 0600), in the
    format of zmq.auth. Refuses (KeyFileExists) when either path is taken,
    by a file or a symlink, and then writes nothing."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{name!r} is not a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    public_file = directory / f"{name}.key"
    secret_file = directory / f"{name}.key_secret"
    for path in (secret_file, public_file):
        if os.path.lexists(path):
            raise KeyFileExists(errno.EEXIST, _TAKEN, str(path))
    public, secret = zmq.curve_keypair()
    _write_new(secret_file, certificate_text(_SECRET_BANNER, public, secret), 0o600)
    try:
        _write_new(public_file, certificate_text(_PUBLIC_BANNER, public), 0o644)
    except BaseException:
        secret_file.unlink(missing_ok=True)  # no half pair left behind
        raise
    return public_file, secret_file


class CurveServer:
    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], settings: Settings, cache: ClientKeyCache
    ) -> None:
        self.public, self.secret = server_key_pair(settings)
        self.cache = cache
        self.authenticator = ThreadAuthenticator(context)

    def start(self) -> CurveServer:
        self.authenticator.start()
        self.authenticator.configure_curve_callback(domain="*", credentials_provider=self)
        return self

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: only registered keys may connect."""
        if self.cache.client_for(client_key.decode("ascii")) is not None:
            return True
        # The key itself stays out of the log, as every key and secret does.
        audit.refused("authentication", None, None, detail="unregistered CURVE key")
        return False

    def secure(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self.authenticator.stop()
