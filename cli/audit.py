"""`ragbus sink ...`, `ragbus audit`, `ragbus usage`: the audit sink and its trail in Postgres."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, err_console, friendly_errors, print_json, settings
from infra.settings import PgRole, Settings

T = TypeVar("T")

#: Terminal escape sequences, whole: CSI (`ESC [ ... final`, also the 8-bit CSI 0x9b), OSC
#: (`ESC ] ... BEL` or `ESC ] ... ESC \\`), DCS/SOS/PM/APC strings, and two-byte escapes.
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
)
#: What is left that a terminal acts on: C0 controls but newline and tab, DEL, C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` without anything a terminal would act on (escape sequences that move the cursor,
    recolor or retitle, and every other C0/C1 control but newline and tab).

    Audit rows hold whatever clients sent; printed raw, a question could rewrite the screen an
    operator reads. `--json` keeps the exact text, escaped by the JSON encoder."""
    return _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", text))


def _cell(text: str) -> str:
    """A table cell: printable, with Rich's markup brackets escaped."""
    return escape(printable(text))


sink_app = typer.Typer(
    help="The audit sink: every event on every ragbus topic, DLQs included, into Postgres.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(sink_app, name="sink")
    app.command("audit")(audit)
    app.command("usage")(usage)


def _keyring(s: Settings) -> Any:
    from sinks.audit.crypto import KeyConfigError, Keyring

    try:
        return Keyring.from_settings(s)
    except KeyConfigError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def _when(text: str | None, option: str) -> datetime | None:
    from sinks.audit.query import parse_when

    if text is None:
        return None
    try:
        return parse_when(text)
    except ValueError as e:
        err_console.print(f"[red]error:[/red] {option}: {e}")
        raise typer.Exit(2) from None


def _with_db(s: Settings, work: Callable[[Any], Awaitable[T]], *, role: PgRole = "reader") -> T:
    """Run `work(connection)` against the configured Postgres as `role` (the read-only role unless
    the work changes the schema), with one-line errors."""
    import asyncpg

    async def run() -> T:
        conn = await asyncpg.connect(s.postgres_dsn_for(role), timeout=10)
        try:
            return await work(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except asyncpg.UndefinedTableError as e:
        err_console.print(
            f"[red]error:[/red] Postgres: {e}: `ragbus up` (or `ragbus sink run`) creates the tables"
        )
        raise typer.Exit(1) from None
    except asyncpg.InsufficientPrivilegeError as e:
        err_console.print(
            f"[red]error:[/red] Postgres: {e}; `ragbus up` grants the {role} role what it needs "
            "(run it again after an upgrade)"
        )
        raise typer.Exit(1) from None
    except asyncpg.PostgresError as e:
        err_console.print(f"[red]error:[/red] Postgres: {e}")
        raise typer.Exit(1) from None


@sink_app.command("run")
@friendly_errors
def sink_run(
    batch_size: int = typer.Option(
        None, "--batch-size", help="Records per Postgres transaction (default: audit_batch_size)."
    ),
) -> None:
    """Run the audit sink in the foreground until Ctrl-C / SIGTERM.

    Consumes every `<prefix>.*` topic (DLQs and topics created later included) as consumer group
    `<prefix>.audit` and writes one audit_log row per record; offsets are committed after the
    rows' transaction. While Postgres is down it pauses and retries; its lag shows in
    `ragbus status`. Encrypts prompts, context and answers when RAGBUS_AUDIT_ENCRYPTION_KEYS or
    RAGBUS_AUDIT_KEY_FILE is set.
    """
    from infra.runtime import run_component
    from sinks.audit.sink import AuditSink

    s = settings()
    run_component("audit-sink", s, AuditSink(s, batch_size=batch_size, keyring=_keyring(s)).run)


@sink_app.command("keygen")
def sink_keygen(
    key_id: str = typer.Option(None, "--id", help="Key id stored with each row (default: k<YYYYMMDD>)."),
) -> None:
    """Print a new AES-256 key as `key_id:base64key`.

    Rotation: put the new pair first in RAGBUS_AUDIT_ENCRYPTION_KEYS (or the key file) and keep
    the old ones after it: new rows use the first key, every listed key still decrypts.
    """
    from sinks.audit.crypto import KeyConfigError, generate_key

    try:
        pair = generate_key(key_id or datetime.now(UTC).strftime("k%Y%m%d"))
    except KeyConfigError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    typer.echo(pair)


@sink_app.command("partitions")
@friendly_errors
def sink_partitions(
    exact: bool = typer.Option(False, "--exact", help="Count rows (slower) instead of estimating."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """The monthly partitions of audit_log with their rows and size."""
    from sinks.audit.partitions import list_partitions

    parts = _with_db(settings(), lambda conn: list_partitions(conn, exact=exact))
    if as_json:
        print_json([p.__dict__ for p in parts])
        return
    table = Table(title="audit_log partitions")
    for col in ("partition", "from", "to", "rows" if exact else "rows (estimate)", "size"):
        table.add_column(col)
    for p in parts:
        table.add_row(
            _cell(p.name),
            p.start.date().isoformat() if p.start else "(default)",
            p.end.date().isoformat() if p.end else "",
            str(p.rows),
            f"{p.bytes / 1e6:.1f} MB",
        )
    console.print(table)


@sink_app.command("prune")
@friendly_errors
def sink_prune(
    older_than: str = typer.Option(..., "--older-than", help="e.g. 180d, or an ISO date."),
    yes: bool = typer.Option(False, "--yes", help="Drop without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be dropped."),
) -> None:
    """Retention: drop the monthly partitions that end before the cutoff.

    Whole months go at once (a DROP, not a DELETE); the default partition is never dropped."""
    from sinks.audit.partitions import drop_before

    cutoff = _when(older_than, "--older-than")
    assert cutoff is not None
    s = settings()
    doomed = _with_db(s, lambda conn: drop_before(conn, cutoff, dry_run=True))
    if not doomed:
        console.print(f"no partition ends before {cutoff:%Y-%m-%d}")
        return
    for p in doomed:
        console.print(f"{p.name}: {p.start:%Y-%m-%d} … {p.end:%Y-%m-%d}, ~{p.rows} rows")
    if dry_run:
        return
    if not yes and not typer.confirm(f"drop {len(doomed)} partition(s)?"):
        raise typer.Exit(1)
    dropped = _with_db(s, lambda conn: drop_before(conn, cutoff), role="owner")
    console.print(f"dropped {len(dropped)} partition(s)")


@friendly_errors
def audit(
    user: str = typer.Option(None, "--user", "-u", help="Only this user_id."),
    tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant_id."),
    request_id: str = typer.Option(None, "--request-id", "-r", help="Every event of one request."),
    action: str = typer.Option(
        None, "--action", "-a", help="QUERY, RETRIEVAL, RESPONSE, TOKEN, INGEST, ERROR, ..."
    ),
    topic: str = typer.Option(None, "--topic", help="Only this topic (full name)."),
    since: str = typer.Option(None, "--since", help="e.g. 7d, 12h, 30m, or an ISO date/time."),
    until: str = typer.Option(None, "--until", help="Same forms as --since."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="At most this many rows, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Whole rows with their payloads, as JSON."),
) -> None:
    """Query the audit trail; encrypted fields are shown decrypted where the key is configured."""
    from sinks.audit.query import AuditFilter, fetch_entries

    s = settings()
    keyring = _keyring(s)
    flt = AuditFilter(
        user=user,
        tenant=tenant,
        request_id=request_id,
        action=action,
        topic=topic,
        since=_when(since, "--since"),
        until=_when(until, "--until"),
        limit=limit,
    )
    try:
        flt.where()
    except ValueError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    entries = _with_db(s, lambda conn: fetch_entries(conn, flt, keyring))
    if as_json:
        print_json([e.as_dict() for e in entries])
        return
    console.print(audit_table(entries, s.topic_prefix))
    sealed = sum(1 for e in entries if e.sealed)
    if sealed:
        reasons = sorted({msg.split(": ", 1)[-1] for e in entries for msg in e.sealed})
        err_console.print(f"[yellow]{sealed} row(s) stay encrypted:[/yellow] {_cell('; '.join(reasons))}")


def audit_table(entries: list[Any], prefix: str) -> Table:
    """The rows of `ragbus audit` as a table; every cell goes through `printable`."""
    head = prefix + "."
    table = Table(title=f"audit trail ({len(entries)} rows, newest first)")
    for col in ("time (UTC)", "action", "tenant", "user", "request", "topic@partition:offset", "what"):
        table.add_column(col, overflow="fold" if col == "what" else "ellipsis")
    for e in entries:
        where = e.topic[len(head) :] if e.topic.startswith(head) else e.topic
        table.add_row(
            e.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            *(
                _cell(text)
                for text in (
                    e.action_type or "",
                    e.tenant_id or "",
                    e.user_id or "",
                    (e.request_id or "")[:13],
                    f"{where}@{e.partition}:{e.offset}",
                    e.summary(),
                )
            ),
        )
    return table


@friendly_errors
def usage(
    by: str = typer.Option(
        None, "--by", help="tenant, user, model, day or month: token history from the audit trail instead."
    ),
    since: str = typer.Option(None, "--since", help="History from: e.g. 7d, or an ISO date (implies --by)."),
    until: str = typer.Option(None, "--until", help="History until (implies --by)."),
    tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Each tenant's use against its quotas: requests and tokens this minute, tokens this month
    (only successful generations count; errors and cache hits apart). With --by / --since /
    --until: prompt and completion tokens of the answered requests, summed from the audit trail."""
    if by is None and since is None and until is None:
        _quota_usage(tenant, as_json)
        return
    by = by or "tenant"
    from sinks.audit.query import USAGE_KEYS
    from sinks.audit.query import usage as usage_query

    if by not in USAGE_KEYS:
        err_console.print(f"[red]error:[/red] --by is one of {', '.join(USAGE_KEYS)}")
        raise typer.Exit(2)
    s = settings()
    lo, hi = _when(since, "--since"), _when(until, "--until")
    rows = _with_db(s, lambda conn: usage_query(conn, by=by, since=lo, until=hi, tenant=tenant))
    if as_json:
        print_json([r.__dict__ | {"total_tokens": r.total_tokens} for r in rows])
        return
    span = f" since {lo:%Y-%m-%d %H:%M}" if lo else ""
    table = Table(title=f"token usage by {by}{span}")
    for col in (by, "responses", "prompt tokens", "completion tokens", "total"):
        table.add_column(col, justify="left" if col == by else "right")
    for r in rows:
        table.add_row(
            _cell(str(r.key)) if r.key else "(none)",
            str(r.responses),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            str(r.total_tokens),
        )
    if not rows:
        table.add_row("(no responses)", "", "", "", "")
    console.print(table)


def _limit(used: int, cap: int) -> str:
    return f"{used} / {cap}" if cap else f"{used} / -"


def _quota_usage(tenant: str | None, as_json: bool) -> None:
    """`ragbus usage` without --by: the quota counters the gateways share, against the limits."""
    from producers.gateway.quota_report import quota_use
    from producers.gateway.quota_windows import Limits

    s = settings()
    defaults = Limits(s.gateway_quota_rpm, s.gateway_quota_tpm, s.gateway_quota_monthly_tokens)
    now = datetime.now(UTC)
    rows = _with_db(s, lambda conn: quota_use(conn, defaults, now, tenant=tenant))
    if as_json:
        print_json([r.as_dict() for r in rows])
        return
    table = Table(title=f"quota use ({now:%Y-%m} UTC; limit '-': unlimited)")
    columns = (
        "tenant",
        "key",
        "requests/min",
        "tokens/min",
        "tokens this month",
        "ok",
        "prompt",
        "completion",
        "errors",
        "cache hits",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("tenant", "key") else "right")
    for r in rows:
        table.add_row(
            _cell(r.tenant),
            _cell(r.key_id) if r.key_id else "(all)",
            _limit(r.requests_this_minute, r.rpm),
            _limit(r.tokens_this_minute, r.tpm),
            _limit(r.tokens_this_month, r.monthly_tokens),
            str(r.ok_requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            str(r.error_requests),
            str(r.cache_hits),
        )
    if not rows:
        table.add_row("(no use yet)", *[""] * (len(columns) - 1))
    console.print(table)
