"""get_session_statistics from a per-worker snapshot at most `stats_max_age` old.

The exact figures cost one script call per bucket (keys.NUM_BUCKETS of them).
Asked on every request they would let a client that names no client id (and
so meets no rate limit) or one that is refused by its rate limit still make
Redis do 64 calls per request. Instead the dispatcher reads all buckets at
most once per `stats_max_age` per worker, for whichever requests of a batch
want the figures, and every request in between is answered from that
snapshot, as Redis' INFO is one. A refused request then costs its one rate
limit call and nothing more; the statistics' own cost per second is bounded
by the number of workers, whatever the request rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from service import keys, scripts
from service.errors import InternalError, StorageUnavailable, StuiError
from service.store import Call


@dataclass(frozen=True, slots=True)
class Figures:
    sessions: int
    clients: int


class StatsCache:
    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.figures: Figures | None = None
        self.error: StuiError | None = None  # why the last refresh failed, if it did
        self._read_at = -float("inf")
        self._pending_since = self._read_at

    def fresh(self) -> bool:
        return self.figures is not None and time.monotonic() - self._read_at <= self.max_age

    def refresh_calls(self) -> list[Call]:
        """One STATS call per bucket. The snapshot's age counts from now: the
        figures will be at least this recent."""
        self._pending_since = time.monotonic()
        return [
            Call(scripts.STATS, [keys.bucket_expiry_key(b), keys.bucket_clients_key(b)], [])
            for b in range(keys.NUM_BUCKETS)
        ]

    def absorb(self, results: list[Any]) -> None:
        """The replies to refresh_calls(), or the batch's failure."""
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            self.error = failed if isinstance(failed, StuiError) else InternalError()
            return
        self.figures = Figures(sum(int(r[0]) for r in results), sum(int(r[1]) for r in results))
        self.error = None
        self._read_at = self._pending_since

    def fail(self, error: StuiError) -> None:
        self.error = error

    def current(self) -> Figures:
        """The snapshot a finished batch left; raises what made its refresh fail."""
        if self.error is not None or self.figures is None:
            raise self.error or StorageUnavailable()
        return self.figures
