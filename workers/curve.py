"""CurveZMQ on the front socket, with ZAP through pyzmq's zmq.auth.

A connecting client is let in only if its public key is registered in Redis
(service/auth.py); the key's client id then travels with each of its
messages (ZeroMQ's User-Id property, here the key in Z85) and the worker
maps it back to a client id on every request, so a removed key stops
working within one cache refresh even on an open connection.
"""

from __future__ import annotations

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


def generate_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """name.key (public) and name.key_secret (both), as zmq.auth writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


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
