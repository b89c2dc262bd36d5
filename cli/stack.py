"""`ragbus up | down | status | smoke`: the local stack."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

import typer
from rich.table import Table

from cli.common import console, friendly_errors, print_json, settings, tenant_settings
from cli.components import component_states, components_table
from infra.kafka.inspect import ClusterView, cluster_view
from infra.stack import Stack


@friendly_errors
def up(
    as_json: bool = typer.Option(False, "--json", help="Print the services as JSON."),
    brokers: int | None = typer.Option(
        None,
        "--brokers",
        min=1,
        max=9,
        help="Local Kafka brokers to start: 3 is a KRaft quorum of three nodes (ports RAGBUS_KAFKA_PORT "
        "+ 0, 2, 4) with topics replicated 3 times, min.insync.replicas 2 (default: RAGBUS_KAFKA_BROKERS, "
        "1). Set RAGBUS_KAFKA_BROKERS too so that other commands bootstrap from every node.",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Start the local Kafka with an open PLAINTEXT listener and no authorizer (any local process "
        "may read and write every topic); for experiments only. Default (RAGBUS_INSECURE): SASL/SCRAM "
        "with ACLs, credentials generated under the home.",
    ),
) -> None:
    """Start the local stack in the background (Kafka, Postgres, Milvus Lite), declare the topics
    and apply migrations. Services named by RAGBUS_KAFKA_BOOTSTRAP / RAGBUS_PG_DSN /
    RAGBUS_MILVUS_URI are used as they are, not started. The local Kafka takes SASL/SCRAM
    logins and ACLs (unless --insecure); the `default` tenant is created so `ragbus chat` works."""
    s = settings()
    if insecure:
        s = s.model_copy(update={"insecure": True})
    started = time.monotonic()
    stack = Stack(s, brokers=brokers)
    declared = stack.up()
    states = stack.health()
    elapsed = time.monotonic() - started
    if as_json:
        print_json(
            {
                "services": [asdict(x) for x in states],
                "topics_created": declared.created,
                "replication_factor": declared.replication_factor,
                "security": stack.security(),
                "default_tenant_created": stack.default_tenant_created,
                "seconds": round(elapsed, 2),
            }
        )
        return
    _services_table(states)
    _security_line(stack.security())
    if stack.default_tenant_created:
        console.print(
            "tenant [bold]default[/bold] created (its password is kept 0600 under the home; "
            "`ragbus tenants add NAME` makes more)"
        )
    console.print(
        f"topics: {len(declared.created)} created, {len(declared.existing)} already there "
        f"(prefix [bold]{s.topic_prefix}[/bold], replication factor {declared.replication_factor}); "
        f"ready in {elapsed:.1f} s"
    )


@friendly_errors
def down() -> None:
    """Stop the components (`ragbus start`), then the local services (`ragbus up`); data is kept."""
    from cli.components import stop_all

    s = settings()
    stop_all(s)
    Stack(s).down()
    console.print("local stack stopped")


@friendly_errors
def status(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Health of each service, the topics with partitions and end offsets, and consumer-group lag."""
    stack = Stack(settings())
    s = stack.settings
    states = stack.health()
    kafka_ok = states[0].healthy
    view = asyncio.run(cluster_view(s, expected=stack.expected_brokers())) if kafka_ok else None
    components = component_states(s)
    # A broker down or a partition without a leader is a failed status even while Kafka serves.
    degraded = view is not None and (any(not b.up for b in view.broker_nodes) or bool(view.offline))
    healthy = all(x.healthy for x in states) and not degraded
    if as_json:
        print_json(
            {
                "services": [asdict(x) for x in states],
                "brokers": [asdict(b) for b in view.broker_nodes] if view else [],
                "controller": view.controller_id if view else None,
                "under_replicated": [asdict(r) for r in view.under_replicated] if view else [],
                "offline": [asdict(r) for r in view.offline] if view else [],
                "security": stack.security(),
                "components": [asdict(c) for c in components],
                "topics": [asdict(t) | {"messages": t.messages} for t in view.topics] if view else [],
                "groups": [asdict(g) | {"total_lag": g.total_lag, "exact": g.exact} for g in view.groups]
                if view
                else [],
            }
        )
        raise typer.Exit(0 if healthy else 1)
    _services_table(states)
    _security_line(stack.security())
    console.print(components_table(components))
    if view is not None:
        _brokers_table(view)
        topics = Table(title=f"topics ({view.brokers} broker{'s' if view.brokers != 1 else ''})")
        for col in ("topic", "partitions", "end offsets (sum)"):
            topics.add_column(col, justify="right" if col != "topic" else "left")
        for t in view.topics:
            topics.add_row(t.name, str(t.partitions), str(t.messages))
        console.print(topics)
        groups = Table(title="consumer groups")
        for col in ("group", "lag", "per topic"):
            groups.add_column(col)
        for g in view.groups:
            at_least = set(g.lag_at_least)
            groups.add_row(
                g.group_id,
                ("" if g.exact else "≥") + str(g.total_lag),
                ", ".join(f"{k}={'≥' if k in at_least else ''}{v}" for k, v in sorted(g.lag.items())),
            )
        if not view.groups:
            groups.add_row("(none yet)", "", "")
        console.print(groups)
    if not healthy:
        raise typer.Exit(1)


def _security_line(line: str) -> None:
    style = "bold red" if line.startswith("INSECURE") else "green"
    console.print(f"[{style}]{line}[/{style}]", highlight=False)


def _brokers_table(view: ClusterView) -> None:
    table = Table(title="brokers")
    for col in ("id", "listens at", "state", "role"):
        table.add_column(col)
    for b in view.broker_nodes:
        table.add_row(
            str(b.node_id),
            b.address,
            "[green]up[/green]" if b.up else "[red]down[/red]",
            "active controller" if b.node_id == view.controller_id else "",
        )
    console.print(table)
    short = view.under_replicated
    if short:
        listed = ", ".join(f"{r.topic}/{r.partition} (isr {r.isr} of {r.replicas})" for r in short[:10])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        console.print(f"[yellow]under-replicated partitions: {len(short)}[/yellow]: {listed}{more}")
    else:
        console.print("under-replicated partitions: 0")
    if view.offline:
        listed = ", ".join(f"{r.topic}/{r.partition}" for r in view.offline[:10])
        console.print(f"[red]partitions without a leader: {len(view.offline)}[/red]: {listed}")


@friendly_errors
def smoke(
    tenant: str = typer.Option(
        None,
        "--tenant",
        "-t",
        help="Whose topics to check besides the shared ones (default: RAGBUS_TENANT). Runs with the "
        "components' credentials: it writes replies and reads requests, which no tenant may.",
    ),
) -> None:
    """Produce one event to every declared topic (the shared ones and a tenant's) and read it back
    (needs `ragbus up` and the tenant's topics)."""
    from infra.smoke import run

    s = settings()
    s = s.model_copy(update={"tenant": tenant_settings(tenant).tenant})
    results = run(s)
    table = Table(title="round trip through every declared topic")
    for col in ("topic", "result", "ms"):
        table.add_column(col)
    for r in results:
        table.add_row(r.topic, "[green]ok[/green]" if r.ok else f"[red]{r.detail}[/red]", f"{r.millis:.1f}")
    console.print(table)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def _services_table(states: list) -> None:  # type: ignore[type-arg]
    table = Table(title="ragbus services")
    for col in ("service", "health", "listens at", "detail", "log"):
        table.add_column(col)
    for x in states:
        table.add_row(
            x.name,
            "[green]healthy[/green]" if x.healthy else "[red]down[/red]",
            x.where,
            x.detail,
            str(x.log) if x.log else "",
        )
    console.print(table)
