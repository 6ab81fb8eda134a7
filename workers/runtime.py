"""Wiring shared by every process: logging, and the dispatcher over Redis."""

from __future__ import annotations

import logging

from service.dispatch import Dispatcher
from service.policy import PolicyCache
from service.settings import Settings
from service.store import Store, connect
from workers.refresher import Refresher


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


def build_dispatcher(settings: Settings, authenticated: bool = False) -> Dispatcher:
    assert settings.redis_url, "the entry point checks that a Redis is configured"
    client = connect(settings.redis_url, settings.storage_timeout)
    policy = PolicyCache(client)
    Refresher([policy.refresh], settings.policy_refresh).start()
    return Dispatcher(settings, Store(client), policy, authenticated=authenticated)
