"""`ragbus up | down | status | smoke`: the local stack."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

import typer
from rich.table import Table

from cli.common import console, friendly_errors, print_json, settings
from cli.components import component_states, components_table
from infra.kafka.inspect import cluster_view
from infra.stack import Stack


@friendly_errors
def up(as_json: bool = typer.Option(False, "--json", help="Print the services as JSON.")) -> None:
    """Start the local stack in the background (Kafka, Postgres, Milvus Lite), declare the topics
    and apply migrations. Services named by RAGBUS_KAFKA_BOOTSTRAP / RAGBUS_PG_DSN /
    RAGBUS_MILVUS_URI are used as they are, not started."""
    s = settings()
    started = time.monotonic()
    stack = Stack(s)
    declared = stack.up()
    states = stack.health()
    if as_json:
        print_json({"services": [asdict(x) for x in states], "topics_created": declared.created})
        return
    _services_table(states)
    console.print(
        f"topics: {len(declared.created)} created, {len(declared.existing)} already there "
        f"(prefix [bold]{s.topic_prefix}[/bold]); ready in {time.monotonic() - started:.1f} s"
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
    s = settings()
    states = Stack(s).health()
    kafka_ok = states[0].healthy
    view = asyncio.run(cluster_view(s)) if kafka_ok else None
    components = component_states(s)
    if as_json:
        print_json(
            {
                "services": [asdict(x) for x in states],
                "components": [asdict(c) for c in components],
                "topics": [asdict(t) | {"messages": t.messages} for t in view.topics] if view else [],
                "groups": [asdict(g) | {"total_lag": g.total_lag, "exact": g.exact} for g in view.groups]
                if view
                else [],
            }
        )
        raise typer.Exit(0 if all(x.healthy for x in states) else 1)
    _services_table(states)
    console.print(components_table(components))
    if view is not None:
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
    if not all(x.healthy for x in states):
        raise typer.Exit(1)


@friendly_errors
def smoke() -> None:
    """Produce one event to every declared topic and read it back (needs `ragbus up`)."""
    from infra.smoke import run

    s = settings()
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
