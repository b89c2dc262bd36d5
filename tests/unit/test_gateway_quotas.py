"""The pure arithmetic of the gateway's quotas: fixed windows, Retry-After, estimates, which limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from producers.gateway.auth import ApiKeys
from producers.gateway.quota_windows import (
    Limits,
    check_fits,
    estimate_tokens,
    exceeded,
    retry_after_s,
    window_end,
    window_start,
)
from schemas import ChatRequest


def test_minute_window_and_retry_after() -> None:
    now = datetime(2025, 3, 7, 12, 34, 56, 250_000, tzinfo=UTC)
    assert window_start("minute", now) == datetime(2025, 3, 7, 12, 34, tzinfo=UTC)
    assert window_end("minute", window_start("minute", now)) == datetime(2025, 3, 7, 12, 35, tzinfo=UTC)
    assert retry_after_s("minute", now) == 4  # 3.75 s left, rounded up
    assert retry_after_s("minute", now.replace(second=0, microsecond=0)) == 60
    assert retry_after_s("minute", now.replace(second=59, microsecond=999_999)) == 1  # never 0


def test_month_window_crosses_the_year_and_is_utc() -> None:
    now = datetime(2025, 12, 31, 23, 59, 30, tzinfo=UTC)
    assert window_start("month", now) == datetime(2025, 12, 1, tzinfo=UTC)
    assert window_end("month", window_start("month", now)) == datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_s("month", now) == 30
    # 00:30 on Feb 1st in UTC+2 is still January in UTC.
    local = datetime(2025, 2, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert window_start("month", local) == datetime(2025, 1, 1, tzinfo=UTC)
    assert retry_after_s("month", local) == 90 * 60  # 22:30 UTC on Jan 31st


def test_estimate_is_text_over_four_plus_max_tokens() -> None:
    request = ChatRequest(tenant_id="acme", question="x" * 10, system_prompt="y" * 3)
    request.sampling.max_tokens = 16
    assert estimate_tokens(request) == 4 + 16  # ceil(13 / 4) + 16


def test_which_limit_and_when() -> None:
    now = datetime(2025, 3, 7, 12, 34, 30, tzinfo=UTC)
    limits = Limits(rpm=10, tpm=100, monthly_tokens=1000)
    assert exceeded(limits, "minute", 9, 50, 50, now, "tenant acme") is None
    over = exceeded(limits, "minute", 10, 0, 1, now, "tenant acme")
    assert over is not None and (over.kind, over.limit, over.retry_after_s) == ("requests", 10, 30)
    over = exceeded(limits, "minute", 1, 60, 41, now, "tenant acme")
    assert over is not None and (over.kind, over.used, over.requested) == ("tokens", 60, 41)
    assert "try again in 30 s" in over.message
    over = exceeded(limits, "month", 500, 990, 20, now, "tenant acme")
    assert over is not None and over.kind == "monthly_tokens"
    assert over.retry_after_s == int((datetime(2025, 4, 1, tzinfo=UTC) - now).total_seconds())
    assert exceeded(Limits(), "minute", 10**9, 10**9, 10**9, now, "x") is None  # 0: unlimited


def test_a_request_larger_than_the_limit_never_fits() -> None:
    over = check_fits(Limits(tpm=100), 101, "this API key")
    assert over is not None and over.retry_after_s is None and "lower max_tokens" in over.message
    assert check_fits(Limits(tpm=100), 100, "k") is None
    assert check_fits(Limits(), 10**9, "k") is None


def test_limits_merge_over_defaults() -> None:
    defaults = Limits(rpm=60, tpm=1000, monthly_tokens=0)
    assert Limits.merged({"rpm": None, "tpm": 0, "monthly_tokens": 5}, defaults) == Limits(60, 0, 5)
    assert Limits.merged({}, defaults) == defaults


def test_keys_file_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys.toml"
    path.write_text(
        '[[keys]]\nkey = "sk-a"\ntenant = "acme"\ntpm = 500\n\n[[keys]]\nkey = "sk-b"\ntenant = "acme"\n'
    )
    keys = ApiKeys.load(path)
    a, b = keys.resolve("sk-a"), keys.resolve("sk-b")
    assert a is not None and a.limits == Limits(tpm=500) and len(a.key_id) == 16
    assert "sk-a" not in a.key_id
    assert b is not None and b.limits is None and b.key_id != a.key_id
    path.write_text('[[keys]]\nkey = "sk-a"\ntenant = "acme"\nrpm = -1\n')
    with pytest.raises(ValueError, match="rpm"):
        ApiKeys.load(path)
