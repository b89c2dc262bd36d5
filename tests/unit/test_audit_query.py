"""Time spans and filters of `ragbus audit` / `ragbus usage`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sinks.audit.query import AuditFilter, parse_when

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("12h", NOW - timedelta(hours=12)),
        ("30m", NOW - timedelta(minutes=30)),
        ("90s", NOW - timedelta(seconds=90)),
        ("2W", NOW - timedelta(weeks=2)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T08:30:00+02:00", datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    assert parse_when(text, now=NOW) == expected


def test_parse_when_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="neither"):
        parse_when("last tuesday", now=NOW)


def test_filter_builds_parameters_not_sql_text() -> None:
    flt = AuditFilter(user="bob'; DROP TABLE audit_log;--", tenant="acme", action="query", since=NOW)
    where, args = flt.where()
    assert where == " WHERE user_id = $1 AND tenant_id = $2 AND action_type = $3 AND created_at >= $4"
    assert args == ["bob'; DROP TABLE audit_log;--", "acme", "QUERY", NOW]
    assert AuditFilter().where() == ("", [])
    with pytest.raises(ValueError, match="unknown action"):
        AuditFilter(action="delete").where()
