"""Shared pieces of the CLI: settings, one-line errors, console output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from infra.logs import setup_logging
from infra.procs import ServiceError
from infra.settings import Settings

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def settings() -> Settings:
    try:
        s = Settings()
    except ValidationError as e:
        err_console.print(f"[red]error:[/red] invalid configuration: {e}")
        raise typer.Exit(2) from None
    setup_logging(s.log_level)
    return s


#: The help of every `--tenant` option that makes a command act as a tenant.
TENANT_HELP = (
    "The tenant to act as: the command writes to that tenant's request topics and reads only its "
    "reply topics, with its credentials when `ragbus tenants add` stored them on this machine "
    "(otherwise the configured ones). Default: RAGBUS_TENANT ('default')."
)


def tenant_settings(tenant: str | None) -> Settings:
    """Settings acting as `tenant` (default: the `tenant` setting), with its stored credentials."""
    from infra.secrets import as_tenant

    s = settings()
    try:
        return as_tenant(s, tenant or s.tenant)
    except ValueError as e:
        err_console.print(f"[red]error:[/red] --tenant: {e}")
        raise typer.Exit(2) from None


def friendly_errors(fn: F) -> F:
    """Turn expected failures into one red line (with the log path) and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ServiceError as e:
            err_console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except (ConnectionError, OSError) as e:
            if isinstance(e, FileNotFoundError | PermissionError):
                raise
            err_console.print(f"[red]error:[/red] {type(e).__name__}: {e}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
