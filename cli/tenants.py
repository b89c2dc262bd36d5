"""`ragbus tenants add | list | remove | rotate | limits`: who may use the bus, and how much.

A tenant is its topics (`<prefix>.t.<tenant>.*`), a SCRAM principal (`<prefix>.t.<tenant>`) and
the ACLs that let it write only its own requests and read only its own replies
(`schemas.tenants`). Passwords are generated here, shown once, and kept only in 0600 files under
the home (for `--tenant` and the gateway on this machine). A tenant's quotas (`limits`) are a row
in Postgres that every gateway reads (producers/gateway/quotas.py).
"""

from __future__ import annotations

import asyncio

import typer
from rich.table import Table

from cli.common import console, friendly_errors, print_json, settings
from infra.kafka.security import (
    SecurityError,
    TenantCredentials,
    add_tenant,
    client_properties,
    list_tenants,
    remove_tenant,
    rotate_tenant,
)
from infra.procs import ServiceError
from infra.secrets import tenant_password_path
from infra.settings import Settings
from schemas.topics import check_tenant

tenants_app = typer.Typer(
    help="Tenants: their topics, SCRAM credentials and ACLs on the Kafka cluster.", no_args_is_help=True
)

NAME = typer.Argument(..., help="Tenant name: letters, digits, '_' or '-' (at most 64), e.g. acme.")


def _run(coro):  # type: ignore[no-untyped-def]
    try:
        return asyncio.run(coro)
    except (SecurityError, ValueError) as e:
        raise ServiceError(str(e)) from None


def _print_credentials(s: Settings, creds: TenantCredentials, verb: str) -> None:
    props = client_properties(s, creds)
    console.print(
        f"tenant [bold]{creds.tenant}[/bold] {verb}: principal [bold]{creds.principal}[/bold]. "
        "The password is shown only now; this machine keeps a copy (0600) in "
        f"{tenant_password_path(s, creds.tenant)} for `--tenant {creds.tenant}`.",
        highlight=False,
    )
    console.print("\n# client properties (Java clients, Kafka Connect, ...)", highlight=False)
    for key, value in props.items():
        console.print(f"{key}={value}", highlight=False, markup=False, soft_wrap=True)
    topic = s.topics.tenant(creds.tenant).requests("chat")
    kcat = (
        f"kcat -b {props['bootstrap.servers']} -X security.protocol={props['security.protocol']} "
        f"-X sasl.mechanisms={creds.mechanism} -X sasl.username={creds.principal} "
        f"-X sasl.password='{creds.password}'"
    )
    if "ssl.truststore.location" in props:
        kcat += f" -X ssl.ca.location={props['ssl.truststore.location']}"
    console.print(
        "\n# kcat: write a chat request as this tenant (SCRAM with Kafka 4 needs librdkafka 2.6.1+)",
        highlight=False,
    )
    console.print(f"{kcat} -P -t {topic}", highlight=False, markup=False, soft_wrap=True)


@tenants_app.command("add")
@friendly_errors
def add(name: str = NAME) -> None:
    """Declare the tenant's topics and create its SCRAM user and ACLs (a new password, printed
    once with the client properties and a kcat line). On an insecure broker only the topics."""
    s = settings()
    creds = _run(add_tenant(s, name))
    if creds is None:
        console.print(
            f"tenant [bold]{name}[/bold]: topics declared. The broker is INSECURE (open listener): "
            "there are no credentials, and any client may use any topic."
        )
        return
    _print_credentials(s, creds, "created")


@tenants_app.command("rotate")
@friendly_errors
def rotate(name: str = NAME) -> None:
    """Give the tenant a new password (printed once, stored 0600); the old one stops working
    for new connections at once."""
    s = settings()
    _print_credentials(s, _run(rotate_tenant(s, name)), "has a new password")


@tenants_app.command("remove")
@friendly_errors
def remove(
    name: str = NAME,
    delete_topics: bool = typer.Option(
        False, "--delete-topics", help="Also delete the tenant's topics and every record on them."
    ),
) -> None:
    """Delete the tenant's ACLs, SCRAM user and stored password; its topics stay unless
    --delete-topics."""
    s = settings()
    removed = _run(remove_tenant(s, name, delete_topics=delete_topics))
    kept = "" if delete_topics else " (topics kept; --delete-topics removes them)"
    console.print(
        f"tenant [bold]{name}[/bold]: {removed.acls} ACLs and "
        f"{'its' if removed.user else 'no'} SCRAM user removed, {len(removed.topics)} topics deleted{kept}"
    )


@tenants_app.command("list")
@friendly_errors
def list_(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """The tenants of this topic prefix: topics, SCRAM user, ACL count (never passwords)."""
    s = settings()
    found = _run(list_tenants(s))
    if as_json:
        print_json(
            [
                {
                    "tenant": t.tenant,
                    "principal": t.principal,
                    "topics": len(t.topics),
                    "user": t.has_user,
                    "acls": t.acls,
                    "password_stored": t.password_stored,
                }
                for t in found
            ]
        )
        return
    table = Table(title=f"tenants (prefix {s.topic_prefix})")
    for col in ("tenant", "principal", "topics", "SCRAM user", "ACLs", "password kept here"):
        table.add_column(col)
    for t in found:
        table.add_row(
            t.tenant,
            t.principal,
            str(len(t.topics)),
            "yes" if t.has_user else "no",
            str(t.acls),
            "yes" if t.password_stored else "no",
        )
    if not found:
        table.add_row("(none)", "", "", "", "", "")
    console.print(table)


@tenants_app.command("limits")
@friendly_errors
def limits(
    name: str = NAME,
    rpm: int = typer.Option(None, "--rpm", min=0, help="Requests per minute (0: unlimited)."),
    tpm: int = typer.Option(
        None, "--tpm", min=0, help="Tokens (prompt + completion) per minute (0: unlimited)."
    ),
    monthly_tokens: int = typer.Option(
        None, "--monthly-tokens", min=0, help="Tokens per calendar month, UTC (0: unlimited)."
    ),
    reset: bool = typer.Option(False, "--reset", help="Back to the gateway's defaults (gateway_quota_*)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Set the tenant's quotas, enforced by every gateway with RAGBUS_GATEWAY_QUOTAS=true within
    gateway_quota_refresh_s; a limit not given stays as it is, one never set is the default."""
    from cli.audit import _with_db
    from producers.gateway.quota_report import set_limits

    s = settings()
    try:
        check_tenant(name)
    except ValueError as e:
        raise ServiceError(str(e)) from None
    row = _with_db(
        s,
        lambda conn: set_limits(conn, name, rpm=rpm, tpm=tpm, monthly_tokens=monthly_tokens, reset=reset),
        role="owner",
    )
    if as_json:
        print_json({"tenant": name, **row})
        return
    shown = ", ".join(f"{k}={'default' if v is None else (v or 'unlimited')}" for k, v in row.items())
    console.print(f"tenant [bold]{name}[/bold] quotas: {shown}", highlight=False)
