"""Commands about the service itself: no Redis, but for the caller's rate limit."""

from __future__ import annotations

import time

from service import keys, limits, models
from service.handlers.base import Ctx, Plan, immediate, rate_limited
from service.models import CLIENT_ID_PATTERN
from service.protocol import MAX_ID_LENGTH, PROTOCOL_VERSION, SUPPORTED_VERSIONS

SERVER_VERSION = "0.1.0"


def ping(p: models.Ping, ctx: Ctx) -> Plan:
    return rate_limited(
        ctx,
        p.client_id,
        immediate(
            {
                "message": p.message if p.message is not None else "pong",
                "status": "ready",
                "uptime": int(time.monotonic() - ctx.started_at),
                "server_version": SERVER_VERSION,
            }
        ),
    )


def describe(p: models.NoParams, ctx: Ctx) -> Plan:
    """With a client id (named or authenticated), ctx.settings holds that
    client's own limits (its plan's over the service's), and `plan` names it."""
    s = ctx.settings
    return rate_limited(
        ctx,
        p.client_id,
        immediate(
            {
                "commands": list(ctx.command_names),
                "server_version": SERVER_VERSION,
                "protocol": {
                    "version": PROTOCOL_VERSION,
                    "versions": SUPPORTED_VERSIONS,
                    "encodings": ["command", "envelope"],
                },
                "limits": {
                    "max_sessions_per_client": s.max_sessions_per_client,
                    "default_timeout": s.timeout_given,
                    "min_timeout": models.MIN_TIMEOUT,
                    "max_timeout": s.max_timeout,
                    "history_limit": s.history_limit,
                    "max_state_bytes": s.max_state_bytes,
                    "max_registry_size": s.max_registry_size,
                    "max_checkpoints": s.max_checkpoints,
                    "max_checkpoint_bytes": s.max_checkpoint_bytes,
                    "max_request_bytes": s.max_request_bytes,
                    "transport_max_bytes": s.transport_max_bytes,
                    "replay_window": s.replay_window,
                    "max_id_length": MAX_ID_LENGTH,
                    "client_id_pattern": CLIENT_ID_PATTERN,
                    "storage_timeout": s.storage_timeout,
                    "cleanup_interval": s.cleanup_interval,
                    "rate_limit": s.rate_limit,
                    "rate_burst": s.rate_burst,
                    "create_rate_limit": s.create_rate_limit,
                    "create_burst": s.create_burst,
                    "session_id_length": len(keys.new_session_id("0" * keys.CLIENT_HASH_LEN)),
                    # What one request or one peer can cost (docs/security.md).
                    "max_client_info_bytes": s.client_info_cap,
                    "max_state_keys": s.max_state_keys,
                    "entry_overhead_bytes": limits.ENTRY_OVERHEAD,
                    "max_reply_bytes": s.max_reply_bytes,
                    "peer_recv_queue": s.peer_recv_queue,
                    "peer_inbound_bytes": s.peer_inbound_bytes,
                    "peer_send_queue": s.peer_send_queue,
                    "peer_outbox_bytes": s.peer_outbox_budget,
                    "peer_outbound_bytes": s.peer_outbound_bytes,
                    "batch_max": s.batch_max,
                    "batch_max_bytes": s.batch_max_bytes,
                    "batch_ahead_bytes": s.batch_ahead_bytes,
                    "batch_reply_bytes": s.batch_reply_bytes,
                    "stats_max_age": s.stats_max_age,
                },
                **({"plan": ctx.plan} if p.client_id is not None else {}),
            }
        ),
    )
