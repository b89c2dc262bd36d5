"""The cancels a worker holds: which requests it must stop or skip, bounded and expiring.

A cancel may arrive before its request (still in the processors, or queued behind a bulk backlog),
while it generates, or after its answer (nothing left to do). So each cancel is held until it
expires (`schemas.limits.CANCEL_TTL_S` after it was published) and looked up when a request is
prepared and between decode steps. Cancels are keyed by (tenant, request id): the tenant is the
topic a cancel came from, and the tenant of an enriched request is trusted (the processors set it
from the topic it came in on), so no tenant can cancel another's request, whatever ids it guesses.

At most `limit` cancels are held; beyond that the oldest are forgotten (and counted), so a flood of
cancels costs bounded memory. Lookups come from the engines' threads while the event loop adds
cancels: one lock guards the table.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from schemas import limits

Key = tuple[str, str]


@dataclass
class CancelStats:
    added: int = 0
    expired: int = 0
    #: Forgotten before they expired because the table was full.
    evicted: int = 0
    #: Requests stopped or skipped because of a cancel.
    honoured: int = 0


class CancelRegistry:
    def __init__(
        self,
        *,
        limit: int = limits.CANCELS_PENDING_MAX,
        ttl_s: float = limits.CANCEL_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if limit < 1:
            raise ValueError("a cancel registry holds at least one cancel")
        self.limit = limit
        self.ttl_s = ttl_s
        self.clock = clock
        self.stats = CancelStats()
        #: (tenant, request id) → (expiry, reason), oldest expiry first (see `add`).
        self._held: OrderedDict[Key, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def add(self, tenant: str, request_id: str, reason: str, *, published_s: float | None = None) -> bool:
        """Hold a cancel published at `published_s` (wall clock; None or a time in the future: now).
        False when it expired already (a worker reading back old cancels skips those)."""
        now = self.clock()
        start = now if published_s is None else min(published_s, now)
        expiry = start + self.ttl_s
        if expiry <= now:
            return False
        key = (tenant, request_id)
        with self._lock:
            self._expire(now)
            previous = self._held.pop(key, None)
            if previous is not None:
                expiry = max(expiry, previous[0])
            self._held[key] = (expiry, reason)
            # Kept in expiry order: cancels arrive nearly in publish order; a late one (an older
            # record read after a newer one) is moved to where it belongs.
            self._reorder(key, expiry)
            while len(self._held) > self.limit:
                self._held.popitem(last=False)
                self.stats.evicted += 1
            self.stats.added += 1
        return True

    def reason(self, tenant: str, request_id: str) -> str | None:
        """Why request `request_id` of `tenant` was cancelled, or None when it was not (or the
        cancel expired). Safe from any thread."""
        now = self.clock()
        with self._lock:
            held = self._held.get((tenant, request_id))
            if held is None:
                return None
            if held[0] <= now:
                self._expire(now)
                return None
            return held[1]

    def cancelled(self, tenant: str, request_id: str) -> bool:
        return self.reason(tenant, request_id) is not None

    def check(self, tenant: str, request_id: str) -> Callable[[], bool]:
        """A no-argument check an engine calls between decode steps (from its own thread)."""
        return lambda: self.reason(tenant, request_id) is not None

    def honoured(self) -> None:
        with self._lock:
            self.stats.honoured += 1

    def _expire(self, now: float) -> None:
        while self._held:
            key, (expiry, _) = next(iter(self._held.items()))
            if expiry > now:
                return
            del self._held[key]
            self.stats.expired += 1

    def _reorder(self, key: Key, expiry: float) -> None:
        """Move `key` (just appended) back past every entry that expires later."""
        later = []
        for other in reversed(self._held):
            if other == key:
                continue
            if self._held[other][0] <= expiry:
                break
            later.append(other)
            if len(later) > 64:  # far out of order: one full pass keeps the order exact
                items = sorted(self._held.items(), key=lambda kv: kv[1][0])
                self._held = OrderedDict(items)
                return
        for other in reversed(later):
            self._held.move_to_end(other)
