"""All configuration in one place: read from the environment with the STUI_ prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Service settings. Built once at the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="STUI_", extra="ignore")

    # Where state lives. None means "no Redis configured": `serve` then starts
    # an embedded one under data_dir.
    redis_url: str | None = None
    bind: str = "tcp://0.0.0.0:5555"
    workers: int = Field(default=1, ge=1, le=64)
    data_dir: Path = Path("stui-data")

    # Protocol limits (all reported by `describe`).
    max_sessions_per_client: int = Field(default=5, ge=1)
    # Within the protocol's 1 .. 2592000 s (models.MIN_TIMEOUT, models.MAX_TIMEOUT).
    default_timeout: int = Field(default=3600, ge=1, le=2_592_000)
    history_limit: int = Field(default=50, ge=1)
    max_state_bytes: int = Field(default=MIB, ge=1024)
    max_registry_size: int = Field(default=1000, ge=1)
    max_request_bytes: int = Field(default=10 * MIB, ge=1024)
    replay_window: int = Field(default=120, ge=1)

    # Runtime behaviour.
    storage_timeout: float = Field(default=2.0, gt=0)
    shutdown_grace: float = Field(default=10.0, ge=0)
    batch_max: int = Field(default=256, ge=1)
    cleanup_interval: int = Field(default=300, ge=1)

    # Access control. Rates are per client, shared by every worker through
    # Redis (token buckets); 0 turns a limit off.
    rate_limit: float = Field(default=100.0, ge=0)
    rate_burst: int = Field(default=200, ge=1)
    create_rate_limit: float = Field(default=1.0, ge=0)
    create_burst: int = Field(default=20, ge=1)
    policy_refresh: float = Field(default=0.5, gt=0, le=1.0)

    # CURVE authentication of the front socket (off by default). The server's
    # key pair comes from the two Z85 keys, or from a secret certificate file
    # written by `stui-sessions keys generate`.
    curve: bool = False
    curve_public_key: str | None = None
    curve_secret_key: SecretStr | None = None
    curve_key_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    def rate_spec(self, create: bool = False) -> str:
        """ARGV of the scripts' rate limiter (see service/scripts.py)."""
        if self.rate_limit == 0 and (not create or self.create_rate_limit == 0):
            return ""
        return (
            f"{self.rate_limit},{self.rate_burst},{self.create_rate_limit},"
            f"{self.create_burst},{1 if create else 0}"
        )

    @property
    def transport_max_bytes(self) -> int:
        """Messages above this are dropped by libzmq itself (it disconnects the
        peer) so that one client cannot make a worker allocate without bound.
        Between max_request_bytes and this, the request gets PayloadTooLarge."""
        return self.max_request_bytes * 4
