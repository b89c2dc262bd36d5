"""The arithmetic of the gateway's quotas, pure: fixed windows, Retry-After, token estimates, limits.

Windows are fixed and aligned to the UTC clock: a minute window is [hh:mm:00, hh:mm+1:00), a month
window the calendar month in UTC. Every gateway process computes the same window from its clock, so
processes on hosts with synchronised clocks (NTP) share one window; a skew of s seconds moves a
window's edge by s for that host only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from schemas import ChatRequest

Period = Literal["minute", "month"]
PERIODS: tuple[Period, ...] = ("minute", "month")

#: The gateway has no tokenizer of the served model: it reserves a prompt of len(text) / this many
#: tokens (English averages about 4 characters a token) and settles to the engine's count after.
CHARS_PER_TOKEN = 4


def window_start(period: Period, now: datetime) -> datetime:
    """The start of the window of `period` that holds `now` (aware; returned in UTC)."""
    now = now.astimezone(UTC)
    if period == "minute":
        return now.replace(second=0, microsecond=0)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def window_end(period: Period, start: datetime) -> datetime:
    """The end (exclusive) of the window of `period` that starts at `start`."""
    if period == "minute":
        return start + timedelta(minutes=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def retry_after_s(period: Period, now: datetime) -> int:
    """Whole seconds until the window of `now` ends (when its counts start again from zero), at
    least 1: what `Retry-After` says. Rounded up, so a client that waits that long is in the next
    window."""
    remaining = (window_end(period, window_start(period, now)) - now.astimezone(UTC)).total_seconds()
    return max(1, math.ceil(remaining))


def estimate_tokens(request: ChatRequest) -> int:
    """Tokens to reserve for `request` before it runs: its text's estimate plus every token it may
    generate (`max_tokens`). The retrieved context is not known yet; settling adds it."""
    chars = len(request.question) + len(request.system_prompt or "")
    chars += sum(len(m.content) for m in request.history)
    return math.ceil(chars / CHARS_PER_TOKEN) + request.sampling.max_tokens


@dataclass(frozen=True)
class Limits:
    """Limits of one scope (a tenant, or one API key); 0 is unlimited."""

    rpm: int = 0
    tpm: int = 0
    monthly_tokens: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.rpm or self.tpm or self.monthly_tokens)

    def caps(self, period: Period) -> tuple[int, int]:
        """(requests, tokens) allowed in one window of `period`."""
        return (self.rpm, self.tpm) if period == "minute" else (0, self.monthly_tokens)

    @classmethod
    def merged(cls, explicit: dict[str, int | None], defaults: Limits) -> Limits:
        """`explicit` values where set (not None), else the defaults."""
        picked = {
            name: explicit[name] if explicit.get(name) is not None else getattr(defaults, name)
            for name in ("rpm", "tpm", "monthly_tokens")
        }
        return cls(**picked)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Exceeded:
    """Which limit a request is over, with what Retry-After says; `retry_after_s` None when waiting
    cannot help (the request alone is larger than the limit)."""

    kind: Literal["requests", "tokens", "monthly_tokens"]
    limit: int
    used: int
    requested: int
    retry_after_s: int | None
    scope: str

    @property
    def message(self) -> str:
        what = {
            "requests": "requests per minute",
            "tokens": "tokens per minute",
            "monthly_tokens": "tokens per month",
        }[self.kind]
        head = f"quota of {self.scope} reached on {what}: limit {self.limit}, used {self.used}, "
        if self.retry_after_s is None:
            return (
                head + f"this request may use up to {self.requested}, more than the whole limit: lower "
                "max_tokens or shorten the messages"
            )
        return head + f"requested {self.requested}; try again in {self.retry_after_s} s"


def check_fits(limits: Limits, estimate: int, scope: str) -> Exceeded | None:
    """The limit a request of `estimate` tokens can never fit in, whatever the window's use."""
    for kind, cap in (("tokens", limits.tpm), ("monthly_tokens", limits.monthly_tokens)):
        if cap and estimate > cap:
            return Exceeded(kind, cap, 0, estimate, None, scope)  # type: ignore[arg-type]
    return None


def exceeded(
    limits: Limits, period: Period, requests: int, tokens: int, estimate: int, now: datetime, scope: str
) -> Exceeded | None:
    """The limit of `period` a request of `estimate` tokens is over, given the window's counts
    before it (`requests`, `tokens`); None when it fits."""
    cap_requests, cap_tokens = limits.caps(period)
    wait = retry_after_s(period, now)
    if cap_requests and requests + 1 > cap_requests:
        return Exceeded("requests", cap_requests, requests, 1, wait, scope)
    if cap_tokens and tokens + estimate > cap_tokens:
        kind = "tokens" if period == "minute" else "monthly_tokens"
        return Exceeded(kind, cap_tokens, tokens, estimate, wait, scope)  # type: ignore[arg-type]
    return None
