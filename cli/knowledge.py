"""`ragbus processors run` and `ragbus ingest`: the knowledge side (documents in, context out)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.markup import escape
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
from infra.settings import Settings

processors_app = typer.Typer(
    help="Ingestion and retrieval processors (one process: Milvus Lite allows one per data file).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(processors_app, name="processors")
    app.command("ingest")(ingest)


@processors_app.command("run")
@friendly_errors
def run() -> None:
    """Run document ingestion and the retrieval processor until SIGINT/SIGTERM.

    Consumes docs.ingest (chunks into Milvus, an IngestResult on docs.ingested) and
    chat/bulk.requests (an EnrichedRequest on chat/bulk.enriched); outputs are exactly-once
    for read_committed readers.
    """
    from infra.runtime import run_component
    from processors.service import Processors, ProcessorsError
    from processors.store import StoreError

    s = settings()
    try:
        run_component(
            "processors", s, Processors(s).run, quiet=("faiss", "milvus_lite", "transformers", "httpx")
        )
    except (ProcessorsError, StoreError) as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None


@friendly_errors
def ingest(
    paths: list[Path] = typer.Argument(
        None, help="Files and folders (folders recursively: .txt .md .html .pdf ...); with --delete, doc ids."
    ),
    tenant: str = typer.Option(
        None, "--tenant", "-t", help=TENANT_HELP + " The documents join (or leave) its knowledge base."
    ),
    user: str = typer.Option("cli", "--user", "-u"),
    doc_prefix: str = typer.Option("", "--doc-prefix", help="Prepended to every document id."),
    delete: bool = typer.Option(False, "--delete", help="Delete the documents whose ids are given."),
    timeout: float = typer.Option(
        120.0, "--timeout", help="Give up after this many seconds without a new result."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome of every file as JSON."),
) -> None:
    """Index documents for a tenant through the bus and wait for each IngestResult.

    A document's id is its path inside the folder given (or its file name), so ingesting the
    same files again replaces them. Needs the processors running (`ragbus processors run`).
    """
    s = tenant_settings(tenant)
    tenant = s.tenant
    if not paths:
        err_console.print("[red]error:[/red] give at least one file or folder (or doc ids with --delete)")
        raise typer.Exit(2)
    if delete:
        _delete(s, [str(p) for p in paths], user, timeout, as_json)
        return
    from tqdm import tqdm

    from producers.ingest.client import FileOutcome, discover, ingest_files

    jobs, skipped = discover(paths, doc_prefix=doc_prefix)
    for skip in skipped:
        err_console.print(f"[yellow]skipped[/yellow] {escape(str(skip.path))}: {skip.reason}")
    if not jobs:
        err_console.print("[red]error:[/red] nothing to ingest")
        raise typer.Exit(2)
    bar = tqdm(total=len(jobs), unit="doc", desc="ingesting", disable=as_json, dynamic_ncols=True)

    def on_event(outcome: FileOutcome) -> None:
        bar.update(1)
        if outcome.error is not None and not as_json:
            bar.write(f"error: {outcome.job.path}: {outcome.error}")

    try:
        report = asyncio.run(ingest_files(s, jobs, user=user, idle_timeout=timeout, on_event=on_event))
    finally:
        bar.close()
    report.skipped = skipped
    if as_json:
        print_json(
            {
                "tenant": tenant,
                "indexed": len(report.indexed),
                "failed": len(report.failed),
                "missing": len(report.missing),
                "skipped": len(skipped),
                "chunks": report.chunks,
                "elapsed_s": round(report.elapsed_s, 2),
                "files": [
                    {
                        "path": str(o.job.path),
                        "doc_id": o.job.doc_id,
                        "status": "ok" if o.ok else ("missing" if o in report.missing else "error"),
                        "chunks": o.result.chunks if o.result else 0,
                        "error": o.error,
                        "request_id": o.request_id,
                    }
                    for o in report.outcomes
                ],
            }
        )
    else:
        table = Table(title=f"ingested for tenant {escape(tenant)} in {report.elapsed_s:.1f} s")
        for col in ("indexed", "chunks", "failed", "no result", "skipped"):
            table.add_column(col, justify="right")
        table.add_row(
            str(len(report.indexed)),
            str(report.chunks),
            str(len(report.failed)),
            str(len(report.missing)),
            str(len(skipped)),
        )
        console.print(table)
    if report.missing:
        err_console.print(
            f"[red]timeout:[/red] no IngestResult for {len(report.missing)} document(s) after "
            f"{timeout:.0f} s without progress: are the processors running? "
            "(`ragbus processors run`, or `ragbus status`)"
        )
        raise typer.Exit(3)
    if report.failed:
        raise typer.Exit(1)


def _delete(s: Settings, doc_ids: list[str], user: str, timeout: float, as_json: bool) -> None:
    from producers.ingest.client import delete_documents

    results = asyncio.run(delete_documents(s, doc_ids, user=user, idle_timeout=timeout))
    rows = [
        {
            "doc_id": d,
            "status": r.status if r else "missing",
            "error": r.error.message if r and r.error else None,
        }
        for d, r in zip(doc_ids, results, strict=True)
    ]
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            mark = "[green]deleted[/green]" if row["status"] == "ok" else f"[red]{row['status']}[/red]"
            console.print(
                f"{mark} {escape(row['doc_id'])}" + (f": {escape(row['error'])}" if row["error"] else "")
            )
    if any(r is None for r in results):
        err_console.print("[red]timeout:[/red] some deletes got no result: are the processors running?")
        raise typer.Exit(3)
    if any(r.status != "ok" for r in results if r):
        raise typer.Exit(1)
