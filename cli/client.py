"""`ragbus ask` and `ragbus bulk ...`: questions over the bus from the command line."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import typer
from rich.table import Table

from cli.common import (
    TENANT_HELP,
    console,
    err_console,
    friendly_errors,
    print_json,
    settings,
    tenant_settings,
)

bulk_app = typer.Typer(
    help="Bulk document Q&A jobs (OpenAI Batch format, or plain questions).", no_args_is_help=True
)


@friendly_errors
def ask(
    question: str = typer.Argument(..., help="The question."),
    tenant: str = typer.Option(
        None, "--tenant", "-t", help=TENANT_HELP + " Answers come from its documents."
    ),
    user: str = typer.Option("cli", "--user", "-u"),
    model: str = typer.Option(None, "--model", help="A served model name (default: the route table)."),
    max_tokens: int = typer.Option(None, "--max-tokens"),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the answer."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they are generated."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole ChatResponse as JSON."),
) -> None:
    """Ask one question over the bus as a tenant; print the answer, its numbered sources and stage
    timings."""
    from producers.client import ChatClient, ChatError, ChatTimeout

    s = tenant_settings(tenant)

    async def run():  # type: ignore[no-untyped-def]
        async with ChatClient(s) as client:
            kw = {"user": user, "model": model, "max_tokens": max_tokens, "timeout": timeout}
            if stream:
                chat = client.stream(question, **kw)
                async for text in chat:
                    if not as_json:
                        console.print(text, end="", highlight=False, markup=False)
                if not as_json:
                    console.print()
                return chat.response
            return await client.ask(question, **kw)

    try:
        response = asyncio.run(run())
    except ChatTimeout as e:
        err_console.print(
            f"[red]timeout:[/red] {e} (are the processors and the worker running? `ragbus status`)"
        )
        raise typer.Exit(3) from None
    except ChatError as e:
        if as_json:
            print_json(e.response.model_dump(mode="json"))
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(4) from None
    assert response is not None
    if as_json:
        print_json(response.model_dump(mode="json"))
        return
    if not stream:
        console.print(response.answer, highlight=False, markup=False)
    if response.citations:
        console.print("\n[bold]sources[/bold]")
        for c in response.citations:
            where = c.title or c.source or c.doc_id
            console.print(f"  [{c.index}] {where} (doc {c.doc_id}, score {c.score:.3f})", highlight=False)
    t = response.timings.model_dump(exclude_none=True)
    timing = ", ".join(f"{k.removesuffix('_ms')} {v:.0f} ms" for k, v in t.items())
    console.print(
        f"\n[dim]model {response.model} · "
        f"{response.usage.prompt_tokens}+{response.usage.completion_tokens} tokens"
        f"{' · cached' if response.cached else ''} · {timing}[/dim]"
    )


@bulk_app.command("submit")
@friendly_errors
def bulk_submit(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="OpenAI Batch JSONL, text or CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: OpenAI Batch output JSONL, appended to."),
    tenant: str = typer.Option(None, "--tenant", "-t", help=TENANT_HELP + " Jobs are kept per tenant."),
    user: str = typer.Option("bulk", "--user", "-u"),
    job: str = typer.Option(
        None, "--job", help="Job id; the same id (under the same tenant) resumes and skips answered ids."
    ),
    fmt: str = typer.Option("auto", "--format", help="auto | openai | text | csv"),
    column: str = typer.Option(None, "--column", help="CSV column holding the question."),
    id_column: str = typer.Option(None, "--id-column", help="CSV column used as custom_id."),
    window: int = typer.Option(256, "--window", min=1, help="Requests in flight at most."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Submit (or resume) a bulk job of a tenant and write its answers as they arrive."""
    from producers.bulk.runner import BulkRunner, open_job
    from producers.bulk.state import JobStore

    s = tenant_settings(tenant)
    tenant = s.tenant
    store = JobStore(s.home, tenant)
    job_id = job or f"job-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        state, resumed = open_job(store, job_id, input=file, output=out, fmt=fmt, user=user)
    except ValueError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if resumed:
        err_console.print(f"resuming job {job_id} ({state.status}, {state.answered} answered)")
    err_console.print(f"job [bold]{job_id}[/bold]: {state.total} questions → {state.output}")
    runner = BulkRunner(s, state, store, window=window, progress=progress, column=column, id_column=id_column)
    try:
        final = asyncio.run(runner.run())
    except KeyboardInterrupt:
        err_console.print(
            "interrupted; resume with: "
            f"ragbus bulk submit {file} --out {out} --tenant {tenant} --job {job_id}"
        )
        raise typer.Exit(130) from None
    err_console.print(f"job {job_id} {final.status}: {final.answered} answered, {final.errors} errors")
    if final.status != "completed":
        raise typer.Exit(1)


def _job_store(tenant: str | None):  # type: ignore[no-untyped-def]
    from producers.bulk.state import JobStore

    s = settings()
    try:
        return JobStore(s.home, tenant or s.tenant)
    except ValueError as e:
        err_console.print(f"[red]error:[/red] --tenant: {e}")
        raise typer.Exit(2) from None


@bulk_app.command("status")
def bulk_status(
    job: str = typer.Argument(None, help="Job id (default: list every job of the tenant)."),
    tenant: str = typer.Option(None, "--tenant", "-t", help="Whose jobs (default: RAGBUS_TENANT)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Progress of a tenant's job (or of all its jobs)."""
    from dataclasses import asdict

    from producers.bulk.formats import answered_ids

    store = _job_store(tenant)
    states = [store.load(job)] if job else store.list()
    if job and states[0] is None:
        err_console.print(f"[red]error:[/red] no job {job}")
        raise typer.Exit(2)
    rows = []
    for st in states:
        assert st is not None
        st.answered = len(answered_ids(Path(st.output)))
        rows.append(st)
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    table = Table(title=f"bulk jobs of tenant {store.tenant}")
    for col in ("job", "status", "answered", "total", "errors", "output"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.job_id, r.status, str(r.answered), str(r.total), str(r.errors), r.output)
    console.print(table)


@bulk_app.command("cancel")
def bulk_cancel(
    job: str = typer.Argument(..., help="Job id."),
    tenant: str = typer.Option(None, "--tenant", "-t", help="Whose job (default: RAGBUS_TENANT)."),
) -> None:
    """Stop a tenant's running job from sending more questions (answers so far stay in its output)."""
    store = _job_store(tenant)
    state = store.load(job)
    if state is None:
        err_console.print(f"[red]error:[/red] no job {job}")
        raise typer.Exit(2)
    store.request_cancel(job)
    if state.status != "running":
        state.status = "cancelled"
        store.save(state)
    console.print(f"job {job}: cancel requested")


@friendly_errors
def gateway(
    host: str = typer.Option(None, "--host", help="Default: RAGBUS_GATEWAY_HOST (127.0.0.1)."),
    port: int = typer.Option(None, "--port", help="Default: RAGBUS_GATEWAY_PORT (8000)."),
    keys: Path = typer.Option(
        None, "--keys", exists=True, dir_okay=False, help="API keys file (TOML or JSON)."
    ),
) -> None:
    """Serve the OpenAI-compatible HTTP API: /v1/chat/completions, /v1/embeddings, /v1/models,
    /v1/files and /v1/batches (with RAGBUS_GATEWAY_BATCHES=true), /healthz, /metrics."""
    import uvicorn

    from producers.gateway.app import create_app

    s = settings()
    if keys is not None:
        s = s.model_copy(update={"gateway_keys_file": keys})
    from inference_workers.config import model_names
    from processors.embedding import Embedder

    # The processors' embedding model, loaded by the gateway on its first /v1/embeddings request.
    app = create_app(s, served_models=lambda: model_names(s), embedder=lambda: Embedder.from_settings(s))
    uvicorn.run(app, host=host or s.gateway_host, port=port or s.gateway_port, log_level=s.log_level.lower())
