"""Which topics exist on the broker: one admin client per component, asked again when stale.

The processors read it to find every tenant's input topics (and the ones added while they run).

The inference worker answers on the responses topic of the tenant an enriched request names.
The broker does not create topics on demand (`auto.create.topics.enable=false`), and a send to a
topic that does not exist waits for its metadata until the request times out: inside a
transaction that aborts the batch, again on every retry and after every restart, so one record
naming a tenant without topics (a removed tenant, or bytes nobody vetted) would stop the worker
for every tenant. Asking this directory first turns that into one dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka.admin import AIOKafkaAdminClient

from infra.kafka.clients import make_admin
from infra.settings import Settings

log = logging.getLogger(__name__)


class TopicDirectory:
    """The broker's topic list, refreshed when it is older than `max_age_s`, or when asked about a
    topic it does not hold (at most once per `min_refresh_s`, so a flood of unknown names costs
    one metadata request per interval, while a tenant added a moment ago is found at once)."""

    def __init__(self, settings: Settings, *, min_refresh_s: float = 1.0, max_age_s: float = 30.0) -> None:
        self.settings = settings
        self.min_refresh_s = min_refresh_s
        self.max_age_s = max_age_s
        self._known: set[str] = set()
        self._refreshed = float("-inf")
        self._admin: AIOKafkaAdminClient | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._admin = make_admin(self.settings)
        await self._admin.start()
        await self.refresh()

    async def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None

    async def refresh(self) -> bool:
        """Re-read the topic list; False (and the old list kept) when the broker cannot be asked."""
        async with self._lock:
            if self._admin is None:
                return False
            try:
                self._known = set(await self._admin.list_topics())
            except Exception as e:  # noqa: BLE001 - the old list stays; the next miss asks again
                log.warning("topic list not refreshed: %r", e)
                return False
            finally:
                self._refreshed = time.monotonic()
            return True

    @property
    def known(self) -> frozenset[str]:
        """The topics as of the last refresh."""
        return frozenset(self._known)

    async def exists(self, topic: str) -> bool:
        age = time.monotonic() - self._refreshed
        if age >= self.max_age_s or (topic not in self._known and age >= self.min_refresh_s):
            await self.refresh()
        return topic in self._known
