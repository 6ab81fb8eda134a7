"""Wiring shared by every process: logging, and the dispatcher over Redis."""

from __future__ import annotations

import logging

from service.dispatch import Dispatcher
from service.settings import Settings
from service.store import Store, connect


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


def build_dispatcher(settings: Settings) -> Dispatcher:
    assert settings.redis_url, "the entry point checks that a Redis is configured"
    store = Store(connect(settings.redis_url, settings.storage_timeout))
    return Dispatcher(settings, store)
