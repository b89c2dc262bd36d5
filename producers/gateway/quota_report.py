"""Quotas as an operator sees and sets them: each tenant's (and key's) use in the current windows
against its limits (`ragbus usage`), and a tenant's limits (`ragbus tenants limits`).

Reads go through the read-only role; setting limits needs the owner (the gateway's role may not
change them). The counters themselves are written only by the gateways (producers/gateway/quotas.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import asyncpg

from producers.gateway.quota_windows import Limits, window_start
from schemas.topics import check_tenant


@dataclass(frozen=True)
class QuotaUse:
    """One scope's use: the whole tenant (key_id '') or one API key with limits of its own."""

    tenant: str
    key_id: str
    month: str
    requests_this_minute: int
    rpm: int
    tokens_this_minute: int
    tpm: int
    tokens_this_month: int
    monthly_tokens: int
    #: This month's outcomes: successful generations (only their tokens count), errors, cache hits.
    ok_requests: int
    prompt_tokens: int
    completion_tokens: int
    error_requests: int
    cache_hits: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def quota_use(
    conn: asyncpg.Connection, defaults: Limits, now: datetime, *, tenant: str | None = None
) -> list[QuotaUse]:
    """Every tenant with counters or limits (or just `tenant`), its keys with limits after it.

    A tenant's limits are its `quota_limits` row over `defaults` (the caller's settings); a key's
    are those its gateway applied at its last request (stored on its counters)."""
    configured = {
        r["tenant"]: Limits.merged(dict(r), defaults)
        for r in await conn.fetch("SELECT tenant, rpm, tpm, monthly_tokens FROM quota_limits")
    }
    counters: dict[tuple[str, str], dict[str, Any]] = {}
    for r in await conn.fetch(
        """SELECT tenant, key_id, period, window_start, requests, tokens, cap_requests, cap_tokens,
                  ok_requests, prompt_tokens, completion_tokens, error_requests, cache_hits
           FROM quota_counters"""
    ):
        counters.setdefault((r["tenant"], r["key_id"]), {})[r["period"]] = dict(r)
    scopes = {(t, "") for t in configured} | set(counters)
    minute, month = window_start("minute", now), window_start("month", now)
    out = []
    for t, key_id in sorted(scopes):
        if tenant is not None and t != tenant:
            continue
        rows = counters.get((t, key_id), {})
        m = rows.get("minute") if rows.get("minute", {}).get("window_start") == minute else None
        mo = rows.get("month") if rows.get("month", {}).get("window_start") == month else None
        if key_id:
            caps_minute, caps_month = rows.get("minute", {}), rows.get("month", {})
            limits = Limits(
                caps_minute.get("cap_requests", 0),
                caps_minute.get("cap_tokens", 0),
                caps_month.get("cap_tokens", 0),
            )
        else:
            limits = configured.get(t, defaults)
        out.append(
            QuotaUse(
                tenant=t,
                key_id=key_id,
                month=f"{month:%Y-%m}",
                requests_this_minute=m["requests"] if m else 0,
                rpm=limits.rpm,
                tokens_this_minute=m["tokens"] if m else 0,
                tpm=limits.tpm,
                tokens_this_month=mo["tokens"] if mo else 0,
                monthly_tokens=limits.monthly_tokens,
                ok_requests=mo["ok_requests"] if mo else 0,
                prompt_tokens=mo["prompt_tokens"] if mo else 0,
                completion_tokens=mo["completion_tokens"] if mo else 0,
                error_requests=mo["error_requests"] if mo else 0,
                cache_hits=mo["cache_hits"] if mo else 0,
            )
        )
    return out


async def set_limits(
    conn: asyncpg.Connection,
    tenant: str,
    *,
    rpm: int | None,
    tpm: int | None,
    monthly_tokens: int | None,
    reset: bool = False,
) -> dict[str, int | None]:
    """Set the tenant's limits (None: leave as it is; `reset`: back to the defaults, all of them);
    the row as it is now. Every gateway applies it within `gateway_quota_refresh_s`."""
    check_tenant(tenant)
    for name, value in (("rpm", rpm), ("tpm", tpm), ("monthly_tokens", monthly_tokens)):
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: unlimited)")
    if reset:
        await conn.execute("DELETE FROM quota_limits WHERE tenant = $1", tenant)
        return {"rpm": None, "tpm": None, "monthly_tokens": None}
    row = await conn.fetchrow(
        """INSERT INTO quota_limits (tenant, rpm, tpm, monthly_tokens) VALUES ($1, $2, $3, $4)
           ON CONFLICT (tenant) DO UPDATE SET
               rpm = coalesce($2, quota_limits.rpm),
               tpm = coalesce($3, quota_limits.tpm),
               monthly_tokens = coalesce($4, quota_limits.monthly_tokens),
               updated_at = now()
           RETURNING rpm, tpm, monthly_tokens""",
        tenant,
        rpm,
        tpm,
        monthly_tokens,
    )
    return dict(row)
