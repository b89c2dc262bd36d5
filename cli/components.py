"""`ragbus start | stop`: the pipeline's components as background processes of this machine."""

from __future__ import annotations

from dataclasses import dataclass

import typer
from rich.markup import escape
from rich.table import Table

from cli.background import BY_NAME, COMPONENTS, Background, backgrounds
from cli.common import console, friendly_errors, settings
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
    for c in COMPONENTS:
        bg = Background(s, c)
        pid = bg.pid
        out.append(ComponentState(c.name, pid is not None, pid, c.description, str(bg.log_path)))
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
) -> None:
    """Start pipeline components in the background (each logs to <home>/logs/<name>.log).

    They connect to the services of `ragbus up`, or to the external ones your settings name.
    """
    s = settings()
    for bg in backgrounds(s, names or None):
        was = bg.pid
        pid = bg.start()
        verb = "already running" if was else "started"
        console.print(
            f"{bg.component.name:<11} {verb} (pid {pid}); log: {escape(str(bg.log_path))}", highlight=False
        )


@friendly_errors
def stop(
    names: list[str] = typer.Argument(None, help=f"Components to stop (default: all of {_NAMES})."),
) -> None:
    """Stop background components (SIGTERM: each finishes its batch and commits first)."""
    s = settings()
    for bg in reversed(backgrounds(s, names or None)):
        if bg.running:
            bg.stop()
            console.print(f"{bg.component.name:<11} stopped", highlight=False)


def stop_all(s: Settings) -> None:
    for bg in reversed(backgrounds(s)):
        bg.stop()
