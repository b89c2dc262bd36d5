"""Quotas of the gateway: requests/min, tokens/min and a monthly token budget per tenant (and per API
key where its entry in the keys file sets them), the same for any number of gateway processes.

Design: FIXED-WINDOW counters in Postgres, shared by every gateway. `quota_counters` has one row per
(tenant, key scope, period) that holds the current window of its period (minute, calendar month;
producers/gateway/quota_windows.py); a request of a later window restarts the row's counts in place,
so the table stays one row per scope and period. Admitting a request is ONE statement: a multi-row
`INSERT ... ON CONFLICT DO UPDATE ... WHERE <still within the limit> RETURNING` over the request's
rows (tenant minute and month, and the key's when it has limits) that adds 1 request and the
request's estimated tokens (prompt estimate + max_tokens) to each. Postgres serialises the updates
of a row, so two gateways can never both take the last tokens of a window. A row over its limit is
not updated and not returned; then the rows that were taken are given back (a second statement,
only on that path) and the answer is 429 with Retry-After = seconds to the window's end. When the
answer arrives the reservation is settled to the real usage (one UPDATE): a successful generation
counts its prompt + completion tokens; an error or an answer-cache hit gives the reservation back
and is counted apart. A request the client abandons (a disconnect, stream or not) keeps its
reservation: the tokens were likely generated, and nothing says how many.

Fixed windows let a client use up to twice a per-minute limit across a window's edge; a sliding
window would need a second row read per request. A tenant's limits are read from `quota_limits`
(`ragbus tenants limits`) at most every `gateway_quota_refresh_s`; unset ones are the gateway's
defaults (settings), 0 is unlimited. Postgres unreachable: requests are refused with 503 (a quota
that cannot be checked is not enforced by letting everything through).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import asyncpg

from infra.settings import Settings
from producers.gateway.auth import Principal
from producers.gateway.quota_windows import (
    PERIODS,
    Exceeded,
    Limits,
    Period,
    check_fits,
    estimate_tokens,
    exceeded,
    window_start,
)
from schemas import ChatRequest, ChatResponse

log = logging.getLogger(__name__)

#: key_id of the rows that count the whole tenant.
TENANT_SCOPE = ""

Outcome = Literal["ok", "cached", "error"]

_RESERVE = """
INSERT INTO quota_counters AS q
    (tenant, key_id, period, window_start, requests, tokens, cap_requests, cap_tokens)
SELECT $1, r.key_id, r.period, r.window_start, 1, $2, r.cap_requests, r.cap_tokens
FROM unnest($3::text[], $4::text[], $5::timestamptz[], $6::bigint[], $7::bigint[])
     AS r(key_id, period, window_start, cap_requests, cap_tokens)
ON CONFLICT (tenant, key_id, period) DO UPDATE SET
    requests = CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.requests ELSE 0 END + 1,
    tokens = CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.tokens ELSE 0 END + EXCLUDED.tokens,
    ok_requests = CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.ok_requests ELSE 0 END,
    prompt_tokens = CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.prompt_tokens ELSE 0 END,
    completion_tokens =
        CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.completion_tokens ELSE 0 END,
    error_requests = CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.error_requests ELSE 0 END,
    cache_hits = CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.cache_hits ELSE 0 END,
    window_start = greatest(q.window_start, EXCLUDED.window_start),
    cap_requests = EXCLUDED.cap_requests,
    cap_tokens = EXCLUDED.cap_tokens,
    updated_at = now()
WHERE (EXCLUDED.cap_requests = 0 OR
       CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.requests ELSE 0 END + 1
         <= EXCLUDED.cap_requests)
  AND (EXCLUDED.cap_tokens = 0 OR
       CASE WHEN q.window_start >= EXCLUDED.window_start THEN q.tokens ELSE 0 END + EXCLUDED.tokens
         <= EXCLUDED.cap_tokens)
RETURNING key_id, period, window_start
"""

_ADJUST = """
UPDATE quota_counters AS q SET
    requests = greatest(q.requests + $2, 0),
    tokens = greatest(q.tokens + $3, 0),
    ok_requests = q.ok_requests + $4,
    prompt_tokens = q.prompt_tokens + $5,
    completion_tokens = q.completion_tokens + $6,
    error_requests = q.error_requests + $7,
    cache_hits = q.cache_hits + $8,
    updated_at = now()
FROM unnest($9::text[], $10::text[], $11::timestamptz[]) AS r(key_id, period, window_start)
WHERE q.tenant = $1 AND q.key_id = r.key_id AND q.period = r.period AND q.window_start = r.window_start
"""

_COUNTS = """
SELECT key_id, period, window_start, requests, tokens FROM quota_counters
WHERE tenant = $1 AND key_id = ANY($2::text[])
"""


class QuotaUnavailable(Exception):
    """The counters could not be reached; the gateway answers 503."""


@dataclass(frozen=True)
class Row:
    key_id: str
    period: Period
    window_start: datetime


@dataclass
class Reservation:
    """What one admitted request holds until it is settled."""

    tenant: str
    estimate: int
    rows: list[Row]
    settled: bool = field(default=False)


class QuotaStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        defaults: Limits,
        *,
        refresh_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pool = pool
        self.defaults = defaults
        self.refresh_s = refresh_s
        self.clock = clock
        self._limits: dict[str, tuple[float, Limits]] = {}

    @classmethod
    async def open(cls, settings: Settings) -> QuotaStore:
        """A store on the gateway's own Postgres role; refuses a database whose schema lacks the
        quota tables (`ragbus up` migrates it)."""
        from infra.postgres.pool import create_checked_pool

        pool = await create_checked_pool(
            settings, dsn=settings.postgres_dsn_for("gateway"), needed_by="a gateway with quotas"
        )
        defaults = Limits(
            settings.gateway_quota_rpm, settings.gateway_quota_tpm, settings.gateway_quota_monthly_tokens
        )
        return cls(pool, defaults, refresh_s=settings.gateway_quota_refresh_s)

    async def close(self) -> None:
        await self.pool.close()

    async def tenant_limits(self, tenant: str) -> Limits:
        """The tenant's limits: its `quota_limits` row over the defaults, kept `refresh_s`."""
        cached = self._limits.get(tenant)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        row = await self.pool.fetchrow(
            "SELECT rpm, tpm, monthly_tokens FROM quota_limits WHERE tenant = $1", tenant
        )
        limits = Limits.merged(dict(row) if row is not None else {}, self.defaults)
        self._limits[tenant] = (time.monotonic() + self.refresh_s, limits)
        return limits

    async def reserve(self, who: Principal, request: ChatRequest) -> Reservation | Exceeded:
        """Admit `request` against every limit of its tenant and key, or say which it is over."""
        try:
            return await self._reserve(who, request)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.error("quota counters unreachable: %s: %s", type(e).__name__, e)
            raise QuotaUnavailable(str(e)) from e

    async def _reserve(self, who: Principal, request: ChatRequest) -> Reservation | Exceeded:
        estimate = estimate_tokens(request)
        scopes: dict[str, tuple[Limits, str]] = {
            TENANT_SCOPE: (await self.tenant_limits(who.tenant_id), f"tenant {who.tenant_id}")
        }
        if who.limits is not None and not who.limits.unlimited:
            scopes[who.key_id] = (who.limits, "this API key")
        for limits, name in scopes.values():
            too_large = check_fits(limits, estimate, name)
            if too_large is not None:
                return too_large
        now = self.clock()
        rows = [
            (key_id, p, window_start(p, now), *limits.caps(p))
            for key_id, (limits, _) in scopes.items()
            for p in PERIODS
        ]
        taken = await self.pool.fetch(
            _RESERVE,
            who.tenant_id,
            estimate,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
        )
        held = [Row(t["key_id"], t["period"], t["window_start"]) for t in taken]
        if len(held) == len(rows):
            return Reservation(who.tenant_id, estimate, held)
        # Over a limit: give back what was taken, then say which limit from the counts before it.
        await self._adjust(who.tenant_id, held, requests=-1, tokens=-estimate)
        counts = {
            (c["key_id"], c["period"]): c for c in await self.pool.fetch(_COUNTS, who.tenant_id, list(scopes))
        }
        taken_keys = {(r.key_id, r.period) for r in held}
        for key_id, (limits, name) in scopes.items():
            for p in PERIODS:
                if (key_id, p) in taken_keys:
                    continue
                c = counts.get((key_id, p))
                current = c is not None and c["window_start"] >= window_start(p, now)
                used_requests, used_tokens = (c["requests"], c["tokens"]) if current else (0, 0)
                over = exceeded(limits, p, used_requests, used_tokens, estimate, now, name)
                if over is not None:
                    return over
        # The counts moved on between the two statements (a new window began): the next try fits.
        limits, name = scopes[TENANT_SCOPE]
        return Exceeded("requests", limits.rpm, limits.rpm, 1, 1, name)

    async def settle(self, reservation: Reservation, outcome: Outcome, response: ChatResponse | None) -> None:
        """Turn the reservation into what the request used: a successful generation's real tokens;
        nothing (counted as an error or a cache hit) otherwise. Failures are logged, never raised:
        the client's answer matters more than the count."""
        if reservation.settled:
            return
        reservation.settled = True
        used = response.usage.total_tokens if outcome == "ok" and response is not None else 0
        try:
            await self._adjust(
                reservation.tenant,
                reservation.rows,
                tokens=used - reservation.estimate,
                ok=int(outcome == "ok"),
                prompt=response.usage.prompt_tokens if used and response is not None else 0,
                completion=response.usage.completion_tokens if used and response is not None else 0,
                errors=int(outcome == "error"),
                cached=int(outcome == "cached"),
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            log.error(
                "tenant %s: settling a quota reservation failed (it stays counted at its estimate): %s: %s",
                reservation.tenant,
                type(e).__name__,
                e,
            )

    async def _adjust(
        self,
        tenant: str,
        rows: list[Row],
        *,
        requests: int = 0,
        tokens: int = 0,
        ok: int = 0,
        prompt: int = 0,
        completion: int = 0,
        errors: int = 0,
        cached: int = 0,
    ) -> None:
        if not rows:
            return
        await self.pool.execute(
            _ADJUST,
            tenant,
            requests,
            tokens,
            ok,
            prompt,
            completion,
            errors,
            cached,
            [r.key_id for r in rows],
            [r.period for r in rows],
            [r.window_start for r in rows],
        )


def outcome_of(response: ChatResponse) -> Outcome:
    if response.error is not None:
        return "error"
    return "cached" if response.cached else "ok"
