"""A daemon thread that keeps caches of Redis-held configuration fresh (the
client policy, the CURVE client keys) without ever blocking a request."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


class Refresher:
    def __init__(self, refreshers: Sequence[Callable[[], None]], interval: float) -> None:
        self.refreshers = list(refreshers)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stui-refresher", daemon=True)

    def start(self) -> Refresher:
        self.refresh_now()  # in force before the first request
        self._thread.start()
        return self

    def refresh_now(self) -> None:
        for refresh in self.refreshers:
            refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh_now()
            except Exception:  # never let the thread die: stale beats none
                log.exception("refresh failed")

    def stop(self) -> None:
        self._stop.set()
