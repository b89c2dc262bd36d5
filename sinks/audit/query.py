"""Reading the audit trail back: filtered rows (decrypted where the key is at hand) and token
usage sums. Used by `ragbus audit` and `ragbus usage`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from sinks.audit.crypto import ENC, Keyring, unseal
from sinks.audit.rows import ACTIONS

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """`7d`, `12h`, `30m`, `90s`, `2w` (that long ago) or an ISO date/time (UTC when no zone)."""
    now = now or datetime.now(UTC)
    m = _SPAN.match(text)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2).lower()])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a span like 7d/12h/30m nor an ISO date or time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class AuditFilter:
    user: str | None = None
    tenant: str | None = None
    request_id: str | None = None
    action: str | None = None
    topic: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50

    def where(self) -> tuple[str, list[Any]]:
        """A WHERE clause (possibly empty) and its parameters."""
        parts: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("user_id", self.user),
            ("tenant_id", self.tenant),
            ("request_id", self.request_id),
            ("action_type", self.action.upper() if self.action else None),
            ("topic", self.topic),
        ):
            if value is not None:
                args.append(value)
                parts.append(f"{column} = ${len(args)}")
        if self.action and self.action.upper() not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {', '.join(ACTIONS)}")
        if self.since is not None:
            args.append(self.since)
            parts.append(f"created_at >= ${len(args)}")
        if self.until is not None:
            args.append(self.until)
            parts.append(f"created_at < ${len(args)}")
        return (" WHERE " + " AND ".join(parts)) if parts else "", args


@dataclass
class AuditEntry:
    id: int
    created_at: datetime
    action_type: str
    topic: str
    partition: int
    offset: int
    event_type: str | None
    event_id: str | None
    request_id: str | None
    tenant_id: str | None
    user_id: str | None
    ip_address: str | None
    trace_id: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    key_id: str | None
    error: str | None
    payload: Any
    #: Fields left encrypted, and why (no key configured, wrong key).
    sealed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["created_at"] = self.created_at.isoformat()
        return out

    def summary(self, width: int = 80) -> str:
        """One line on what the event says (decrypted where possible)."""
        p = self.payload if isinstance(self.payload, dict) else {}
        if self.error:
            text = self.error
        elif self.event_type == "chat.request":
            text = _show(p.get("question"))
        elif self.event_type == "chat.enriched":
            chunks = p.get("chunks") or []
            question = _show((p.get("request") or {}).get("question"))
            text = f"{len(chunks)} chunks for: {question}"
        elif self.event_type == "chat.response":
            err = p.get("error")
            text = (
                f"{err.get('code')}: {err.get('message')}"
                if isinstance(err, dict)
                else _show(p.get("answer"))
            )
        elif self.event_type == "chat.token":
            text = _show(p.get("text"))
        elif self.event_type in ("docs.ingest", "docs.ingested"):
            text = f"{p.get('op', '')} {p.get('doc_id', '')} {p.get('status', '')}".strip()
        elif self.event_type == "dead_letter":
            text = f"{p.get('error_class')}: {p.get('error_message')} (from {p.get('source_topic')})"
        else:
            text = orjson.dumps(p).decode()
        text = " ".join(str(text).split())
        return text if len(text) <= width else text[: width - 1] + "…"


def _show(value: Any) -> str:
    if isinstance(value, dict) and ENC in value:
        return "[encrypted]"
    return "" if value is None else str(value)


SELECT = """SELECT id, created_at, action_type, topic, "partition", "offset", event_type, event_id,
    request_id, tenant_id, user_id, host(ip_address) AS ip_address, trace_id, model, prompt_tokens,
    completion_tokens, key_id, error, request_payload::text AS payload FROM audit_log"""


async def fetch_entries(
    conn: asyncpg.Connection, flt: AuditFilter, keyring: Keyring | None
) -> list[AuditEntry]:
    """Matching rows, newest first, with sealed fields decrypted where the key is at hand."""
    where, args = flt.where()
    args.append(flt.limit)
    rows = await conn.fetch(f"{SELECT}{where} ORDER BY created_at DESC, id DESC LIMIT ${len(args)}", *args)
    out = []
    for r in rows:
        payload = orjson.loads(r["payload"])
        sealed: list[str] = []
        if r["key_id"] is not None:
            payload, sealed = unseal(
                payload, r["key_id"], keyring, f"{r['topic']}/{r['partition']}/{r['offset']}"
            )
        values = dict(r)
        values.pop("payload")
        out.append(AuditEntry(**values, payload=payload, sealed=sealed))
    return out


USAGE_KEYS = {
    "tenant": "tenant_id",
    "user": "user_id",
    "model": "model",
    "day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "month": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM')",
}


@dataclass
class UsageRow:
    key: str | None
    responses: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


async def usage(
    conn: asyncpg.Connection,
    *,
    by: str,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
) -> list[UsageRow]:
    """Prompt and completion tokens of the responses, summed per `by` (tenant, user, model, day,
    month), most tokens first."""
    if by not in USAGE_KEYS:
        raise ValueError(f"--by is one of {', '.join(USAGE_KEYS)}")
    flt = AuditFilter(tenant=tenant, since=since, until=until)
    where, args = flt.where()
    where += (" AND " if where else " WHERE ") + "event_type = 'chat.response'"
    rows = await conn.fetch(
        f"""SELECT {USAGE_KEYS[by]} AS key, count(*) AS responses,
                   coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                   coalesce(sum(completion_tokens), 0) AS completion_tokens
            FROM audit_log{where} GROUP BY 1
            ORDER BY coalesce(sum(prompt_tokens), 0) + coalesce(sum(completion_tokens), 0) DESC, 1""",
        *args,
    )
    return [UsageRow(r["key"], r["responses"], r["prompt_tokens"], r["completion_tokens"]) for r in rows]
