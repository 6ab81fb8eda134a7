"""All configuration in one place: read from the environment with the STUI_ prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
# Room above max_request_bytes in which a message still arrives and is
# answered PayloadTooLarge; beyond it libzmq drops the peer.
TRANSPORT_SLACK = 64 * 1024
# The fixed fields of a reply around a whole session (ids, timestamps,
# counts, the envelope), well above what they take.
REPLY_SLACK = 64 * 1024


class Settings(BaseSettings):
    """Service settings. Built once at the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="STUI_", extra="ignore", populate_by_name=True)

    # Where state lives. None means "no Redis configured": `serve` then starts
    # an embedded one under data_dir. Cluster: the URL of any node (the rest
    # are discovered). Sentinel: the URL is optional and only its database
    # number, user and password are used; the master comes from the sentinels.
    redis_url: str | None = None
    redis_mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    redis_password: SecretStr | None = None
    redis_sentinels: str | None = None  # "host:port,host:port,..."
    redis_master_name: str = "mymaster"
    # Acknowledge a batch only once this many replicas have it (Redis WAIT),
    # so a failover cannot lose an acknowledged write; 0: asynchronous
    # replication, the Redis default. See docs/reliability.md.
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    bind: str = "tcp://0.0.0.0:5555"
    workers: int = Field(default=1, ge=1, le=64)
    data_dir: Path = Path("stui-data")

    # Protocol limits (all reported by `describe`).
    max_sessions_per_client: int = Field(default=5, ge=1)
    # Within the protocol's 1 .. 2592000 s (models.MIN_TIMEOUT, models.MAX_TIMEOUT).
    default_timeout: int = Field(default=3600, ge=1, le=2_592_000)
    history_limit: int = Field(default=50, ge=1)
    # The largest timeout a client may ask for (a plan may lower it; the
    # protocol's bound, 30 days, is the most).
    max_timeout: int = Field(default=2_592_000, ge=1, le=2_592_000)
    max_state_bytes: int = Field(default=MIB, ge=1024)
    max_registry_size: int = Field(default=1000, ge=1)
    # Checkpoints per session, and their bytes in all (each checkpoint's
    # stored snapshot: state and context as the session hash holds them).
    max_checkpoints: int = Field(default=10, ge=1, le=1000)
    max_checkpoint_bytes: int = Field(default=4 * MIB, ge=1024)
    max_request_bytes: int = Field(default=10 * MIB, ge=1024)
    replay_window: int = Field(default=120, ge=1)
    # Bounds on what one request may make Redis do (docs/security.md lists
    # each with the attack it answers). client_info counts toward
    # max_state_bytes too; every stored entry (state key, registry entry,
    # history entry) is counted with service.limits.ENTRY_OVERHEAD bytes.
    max_client_info_bytes: int = Field(default=64 * 1024, ge=2)
    # Top-level state keys a session may hold; also the most keys one
    # update may name (sets and removals together).
    max_state_keys: int = Field(default=1000, ge=1)

    # Front memory: every figure below is per front worker process.
    # Messages one peer may have queued in libzmq (ZMQ_RCVHWM): at most
    # this many of transport_max_bytes each. Beyond it libzmq stops reading
    # that peer's connection (TCP pushes back; nothing is lost).
    peer_recv_queue: int = Field(default=16, ge=1, le=10_000)
    # Replies waiting for one peer: at most peer_send_queue in libzmq
    # (ZMQ_SNDHWM, each at most max_reply_bytes), then up to
    # peer_outbox_bytes held by the worker (workers/outbox.py). A peer that
    # does not read loses the replies beyond, as with Redis'
    # client-output-buffer-limit.
    peer_send_queue: int = Field(default=128, ge=1, le=10_000)
    peer_outbox_bytes: int = Field(default=16 * MIB, ge=0)
    # One batch takes at most batch_max messages and about this many request
    # bytes (always at least one message).
    batch_max_bytes: int = Field(default=16 * MIB, ge=MIB)
    # While a batch is at Redis the front takes and plans what queued behind
    # it, up to about this many request bytes (0: never), answered after it.
    # Small, because that batch's replies wait for this planning: 1 MiB of
    # requests (hundreds of typical ones) is a few ms of it.
    batch_ahead_bytes: int = Field(default=MIB, ge=0)
    # One Redis round trip carries calls whose replies may total at most
    # this (by each command's largest possible reply: about 1 MiB for a
    # whole session, so 64 such requests fit); a batch above it goes to
    # Redis in several round trips.
    batch_reply_bytes: int = Field(default=80 * MIB, ge=MIB)
    # get_session_statistics is answered from figures at most this old
    # (s), read once per worker: like Redis' INFO, a snapshot.
    stats_max_age: float = Field(default=1.0, ge=0, le=1.0)

    # Runtime behaviour.
    storage_timeout: float = Field(default=2.0, gt=0)
    # s to answer what has arrived after SIGTERM. A multi-process front takes
    # at worst 1.5 x this + 2 s to exit (docs/architecture.md, "Shutdown"):
    # with 5 s, 9.5 s, inside `docker stop`'s default 10 s.
    shutdown_grace: float = Field(default=5.0, ge=0)
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

    # Scheduler: leader lock and file backups (stui-sessions scheduler).
    leader_ttl: float = Field(default=10.0, gt=0)  # s; the leader renews at a third of it
    backup_dir: Path = Path("stui-backups")
    backup_interval: float = Field(default=60.0, gt=0)  # minutes
    backup_keep: int = Field(default=24, ge=1)  # files kept, newest first
    backup_max_age_days: float = Field(default=7.0, gt=0)  # older files are removed
    # The HMAC-SHA256 key that signs backup files (never written into them):
    # the key itself, or a file holding it. See docs/operations.md.
    backup_key: SecretStr | None = None
    backup_key_file: Path | None = None

    # Metrics and health (stui-sessions http). The metrics directory is
    # prometheus-client's own variable, without the STUI_ prefix; every process
    # of a pod shares it. None: metrics off.
    metrics_dir: Path | None = Field(default=None, validation_alias="PROMETHEUS_MULTIPROC_DIR")
    heartbeat_file: Path | None = None  # default: front.heartbeat in metrics_dir
    heartbeat_max_age: float = Field(default=5.0, ge=0)  # s; 0: /readyz ignores the heartbeat
    http_bind: str = "0.0.0.0:9102"
    # Where each role leaves how to probe it, for `stui-sessions healthcheck`
    # (the image's HEALTHCHECK; workers/health.py). None: no records.
    health_dir: Path | None = None
    http_workers: int = Field(default=1, ge=1, le=16)
    ready_timeout: float = Field(default=0.5, gt=0)  # s, the PING of /readyz

    @model_validator(mode="after")
    def _check_redis_mode(self) -> Settings:
        if self.redis_mode == "sentinel" and not self.sentinel_addresses:
            raise ValueError("redis_mode sentinel needs redis_sentinels (host:port,...)")
        if self.backup_key is not None and self.backup_key_file is not None:
            raise ValueError("set backup_key or backup_key_file, not both")
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """STUI_REDIS_SENTINELS as (host, port) pairs; a bad entry is an error."""
        found: list[tuple[str, int]] = []
        for item in (self.redis_sentinels or "").split(","):
            item = item.strip()
            if not item:
                continue
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"redis_sentinels: {item!r} is not host:port")
            found.append((host.strip("[]"), int(port)))
        return found

    @property
    def redis_configured(self) -> bool:
        """True when a Redis is named (a URL, or sentinels in sentinel mode)."""
        return bool(self.redis_url) or (
            self.redis_mode == "sentinel" and bool(self.redis_sentinels)
        )

    def for_child_process(self) -> dict[str, Any]:
        """Plain values, secrets included, to rebuild these settings in a
        worker process (model_dump would mask SecretStr values)."""
        data = self.model_dump(mode="json")
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                data[name] = value.get_secret_value()
        return data

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
        return self.max_request_bytes + TRANSPORT_SLACK

    @property
    def timeout_given(self) -> int:
        """The timeout of a create_session that names none: default_timeout,
        held to max_timeout (which a plan may set lower)."""
        return min(self.default_timeout, self.max_timeout)

    @property
    def client_info_cap(self) -> int:
        """client_info counts toward max_state_bytes, so it can never exceed it."""
        return min(self.max_client_info_bytes, self.max_state_bytes)

    @property
    def max_reply_bytes(self) -> int:
        """The largest reply any command can produce: a whole session
        (state, context and client_info within max_state_bytes) plus the
        fixed fields around it."""
        return self.max_state_bytes + REPLY_SLACK

    @property
    def peer_outbox_budget(self) -> int:
        """What the outbox holds for one peer: always room for one reply."""
        return max(self.peer_outbox_bytes, self.max_reply_bytes)

    @property
    def peer_inbound_bytes(self) -> int:
        """The most request bytes one peer can have queued in a front."""
        return self.peer_recv_queue * self.transport_max_bytes

    @property
    def peer_outbound_bytes(self) -> int:
        """The most reply bytes one peer can have waiting in a front."""
        return self.peer_send_queue * self.max_reply_bytes + self.peer_outbox_budget
