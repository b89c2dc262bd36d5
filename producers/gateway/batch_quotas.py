"""Batch API lines charged to their tenant's quotas (producers/gateway/quotas.py), the same counters
the gateway's chat completions use, so a batch cannot take more than the tenant's share.

A line is admitted as a chat request of the batch's tenant would be (its requests/min, tokens/min
and monthly budget; the creating key's own limits are not kept with a batch, so only the tenant's
hold). Over a per-minute limit the line waits for the next window instead of failing: a batch
then runs at its tenant's rate. A line that can never fit (larger than a limit, or the month's
budget spent) is answered in the error file as `quota_exceeded`. Counters out of reach: the line
waits and tries again (it is neither sent unmetered nor failed for a database restart). Each
answer settles its line's reservation to the real usage, so `ragbus usage` counts batch lines
with the tenant's other requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from producers.bulk.admission import LineRefused
from producers.gateway.auth import Principal
from producers.gateway.quotas import QuotaStore, QuotaUnavailable, Reservation, outcome_of
from schemas import ChatRequest, ChatResponse

log = logging.getLogger(__name__)

#: The error code of a line refused by a quota (OpenAI's 429 code).
QUOTA_EXCEEDED = "quota_exceeded"


class QuotaAdmission:
    def __init__(self, quotas: QuotaStore, tenant: str, user: str, *, retry_s: float) -> None:
        self.quotas = quotas
        self.who = Principal(tenant_id=tenant, user_id=user)
        self.retry_s = retry_s

    async def admit(self, request: ChatRequest, stopped: Callable[[], bool]) -> Reservation | None:
        waited_since: float | None = None
        while not stopped():
            try:
                got = await self.quotas.reserve(self.who, request)
            except QuotaUnavailable:
                wait = self.retry_s
            else:
                if isinstance(got, Reservation):
                    if waited_since is not None:
                        log.info(
                            "batch line %s admitted after %.1f s under tenant %s's quota",
                            request.request_id,
                            time.monotonic() - waited_since,
                            self.who.tenant_id,
                        )
                    return got
                if got.retry_after_s is None or got.kind == "monthly_tokens":
                    raise LineRefused(QUOTA_EXCEEDED, got.message)
                wait = float(got.retry_after_s)
            waited_since = waited_since or time.monotonic()
            await _sleep_unless(stopped, wait)
        return None

    async def settle(self, hold: Reservation, response: ChatResponse) -> None:
        await self.quotas.settle(hold, outcome_of(response), response)


async def _sleep_unless(stopped: Callable[[], bool], seconds: float) -> None:
    """Sleep `seconds`, waking early (within half a second) once `stopped()`."""
    deadline = time.monotonic() + seconds
    while not stopped() and (left := deadline - time.monotonic()) > 0:  # noqa: ASYNC110 - a flag, no event
        await asyncio.sleep(min(left, 0.5))
