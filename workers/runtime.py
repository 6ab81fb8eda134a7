"""Wiring shared by every process: logging, and the dispatcher over Redis."""

from __future__ import annotations

import logging

from service.auth import ClientKeyCache
from service.dispatch import Dispatcher
from service.plans import PlanCache
from service.policy import PolicyCache
from service.settings import Settings
from service.store import Store, redis_for
from workers.refresher import Refresher


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
    # Audit lines are JSON objects, one per line, with nothing in front.
    audit = logging.getLogger("stui.audit")
    if not audit.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        audit.addHandler(handler)
        audit.propagate = False


def build_dispatcher(settings: Settings) -> tuple[Dispatcher, ClientKeyCache | None]:
    """The dispatcher, and with CURVE on the cache of client keys it trusts.
    Without CURVE the same cache tells which clients have a key (and are
    served by CURVE fronts only). Both caches are refreshed by one
    background thread."""
    assert settings.redis_configured, "the entry point checks that a Redis is configured"
    client = redis_for(settings)
    policy = PolicyCache(client)
    key_cache = ClientKeyCache(client)
    plans = PlanCache(client, settings)
    Refresher([policy.refresh, key_cache.refresh, plans.refresh], settings.policy_refresh).start()
    # WAIT for replicas at most half the storage timeout: the reply must still
    # come within the bound the protocol promises.
    store = Store(client, settings.redis_wait_replicas, int(settings.storage_timeout * 500))
    if settings.curve:
        return Dispatcher(settings, store, policy, authenticated=True, plans=plans), key_cache
    return Dispatcher(settings, store, policy, curve_clients=key_cache, plans=plans), None
