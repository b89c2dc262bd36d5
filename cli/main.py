"""`ragbus`: run and inspect a ragbus deployment."""

from __future__ import annotations

from pathlib import Path

import typer

from cli import audit as audit_cmds
from cli import client as client_cmds
from cli import components as component_cmds
from cli import demo as demo_cmds
from cli import inference as inference_cmds
from cli import knowledge as knowledge_cmds
from cli import stack as stack_cmds
from cli import tenants as tenant_cmds
from cli.common import console, print_json, settings

app = typer.Typer(
    name="ragbus",
    help="Kafka-native retrieval-augmented chat: questions on topics, answers from your documents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("up")(stack_cmds.up)
app.command("down")(stack_cmds.down)
app.command("status")(stack_cmds.status)
app.command("smoke")(stack_cmds.smoke)
app.command("demo")(demo_cmds.demo)
app.command("start")(component_cmds.start)
app.command("stop")(component_cmds.stop)
app.command("ask")(client_cmds.ask)
app.add_typer(client_cmds.bulk_app, name="bulk")
app.command("gateway")(client_cmds.gateway)
app.add_typer(tenant_cmds.tenants_app, name="tenants")
audit_cmds.register(app)
inference_cmds.register(app)
knowledge_cmds.register(app)


@app.command("config")
def config(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON ({section: {setting: value}})."),
    section: str = typer.Option(
        None,
        "--section",
        help="Only this section: general, kafka, postgres, milvus, processors, "
        "inference, audit, telemetry, gateway.",
    ),
) -> None:
    """Print the effective configuration (environment, .env, ragbus.toml, defaults) by section,
    secrets masked. Every setting is RAGBUS_<NAME> in the environment or a flat key in ragbus.toml."""
    groups = settings().masked_sections()
    if section is not None:
        if section not in groups:
            raise typer.BadParameter(
                f"no section {section!r}; one of: {', '.join(groups)}", param_hint="--section"
            )
        groups = {section: groups[section]}
    if as_json:
        print_json(groups)
        return
    width = max(len(k) for values in groups.values() for k in values)
    for name, values in groups.items():
        console.print(f"[bold]\\[{name}][/bold]")
        for k, v in values.items():
            console.print(f"  {k.ljust(width)}  {v}", highlight=False)


schemas_app = typer.Typer(help="The event contract.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("export")
def schemas_export(
    directory: Path = typer.Argument(None, help="Where to write the files (default: schemas/json)."),
) -> None:
    """Write one JSON Schema file per event type, plus topics.json mapping topics to schemas."""
    from schemas.export import JSON_DIR, export

    for path in export(directory or JSON_DIR):
        console.print(str(path))


topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("declare")
def topics_declare(
    tenant: list[str] = typer.Option(
        [],
        "--tenant",
        "-t",
        help="Also declare this tenant's own topics (repeatable; default: RAGBUS_TENANT's). Topics "
        "only: `ragbus tenants add` also creates the tenant's credentials and ACLs.",
    ),
) -> None:
    """Create the declared topics that are missing and align the configs of existing ones
    (idempotent): the shared topics and the named tenants' own."""
    import asyncio

    from infra.kafka.topics import declare_topics

    s = settings()
    d = asyncio.run(declare_topics(s, tenants=tenant or [s.tenant]))
    console.print(f"created: {len(d.created)}; already present: {len(d.existing)}")
    for name, (have, want) in d.under_partitioned.items():
        console.print(f"[yellow]{name}: {have} partitions, {want} declared[/yellow]")


if __name__ == "__main__":  # pragma: no cover
    app()
