"""`ragbus start | stop`: the pipeline's components as background processes of this machine."""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich.markup import escape
from rich.table import Table

from cli.background import BY_NAME, SCALABLE, backgrounds
from cli.common import console, friendly_errors, settings
from infra.procs import ServiceError
from infra.settings import Settings

_NAMES = ", ".join(BY_NAME)


@dataclass(frozen=True)
class ComponentState:
    name: str
    running: bool
    pid: int | None
    description: str
    log: str


def component_states(s: Settings) -> list[ComponentState]:
    out = []
    for bg in backgrounds(s):
        pid = bg.pid
        out.append(ComponentState(bg.name, pid is not None, pid, bg.component.description, str(bg.log_path)))
    return out


def components_table(states: list[ComponentState]) -> Table:
    table = Table(title="ragbus components (`ragbus start` / `ragbus stop`)")
    for col in ("component", "state", "pid", "what", "log"):
        table.add_column(col)
    for st in states:
        table.add_row(
            st.name,
            "[green]running[/green]" if st.running else "[dim]stopped[/dim]",
            str(st.pid or ""),
            st.description,
            escape(st.log),
        )
    return table


@friendly_errors
def start(
    names: list[str] = typer.Argument(None, help=f"Components to start (default: all of {_NAMES})."),
    instances: int = typer.Option(
        1,
        "--instances",
        "-n",
        min=1,
        max=64,
        help="Instances of each named component (worker, processors, sink), sharing its consumer group: "
        "the partitions of a topic are the unit of parallelism, so more instances than partitions idle.",
    ),
) -> None:
    """Start pipeline components in the background (each logs to <home>/logs/<name>[-<slot>].log).

    They connect to the services of `ragbus up`, or to the external ones your settings name. Each
    instance has a stable slot identity: restarting a crashed slot fences its open transaction.
    """
    s = settings()
    if instances > 1:
        chosen = names or list(SCALABLE)
        single = [n for n in chosen if n in BY_NAME and n not in SCALABLE]
        if single:
            raise ServiceError(
                f"--instances applies to {', '.join(sorted(SCALABLE))}, not {', '.join(single)} (one gateway "
                "per port: run more with their own RAGBUS_GATEWAY_PORT behind a load balancer)"
            )
        if "processors" in chosen and s.uses_milvus_lite:
            raise ServiceError(
                "several processors need a Milvus server: Milvus Lite allows one process per data file "
                "(set RAGBUS_MILVUS_URI=http://host:19530)"
            )
        names = chosen
    for bg in backgrounds(s, names or None, instances=instances):
        was = bg.pid
        pid = bg.start()
        verb = "already running" if was else "started"
        console.print(f"{bg.name:<13} {verb} (pid {pid}); log: {escape(str(bg.log_path))}", highlight=False)


@friendly_errors
def stop(
    names: list[str] = typer.Argument(None, help=f"Components to stop (default: all of {_NAMES})."),
) -> None:
    """Stop background components, every instance of each (SIGTERM: each finishes its batch and
    commits first)."""
    s = settings()
    for bg in reversed(backgrounds(s, names or None)):
        if bg.running:
            bg.stop()
            console.print(f"{bg.name:<13} stopped", highlight=False)


def stop_all(s: Settings) -> None:
    for bg in reversed(backgrounds(s)):
        bg.stop()
