"""`ragbus demo`: the main job on the embedded default, end to end through the bus.

Starts the local stack and the components, indexes the sample documents kept in the repository,
runs a small bulk job and asks one chat question, printing real answers with their sources. Each
step is the same `ragbus` command a user would type, run as a child process, so the demo shows
exactly what those commands print.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table

import producers
from cli.background import backgrounds
from cli.common import console, err_console, friendly_errors, settings, tenant_settings
from cli.components import stop_all
from infra.kafka.topics import declare_topics
from infra.stack import Stack

#: The sample documents and questions, packaged with `producers` (found the same from a checkout
#: and from an installed wheel).
SAMPLES = Path(producers.__file__).resolve().parent / "samples"
DEMO_QUESTION = "What is the phone extension of the IT helpdesk?"


def _ragbus(*args: str) -> None:
    """Run one `ragbus` command as a child, its output going straight to this terminal."""
    cmd = [sys.executable, "-m", "cli.main", *args]
    console.print(f"[bold cyan]$ ragbus {escape(' '.join(args))}[/bold cyan]", highlight=False)
    code = subprocess.call(cmd)
    if code != 0:
        err_console.print(f"[red]error:[/red] `ragbus {' '.join(args)}` exited with {code}")
        raise typer.Exit(code)


def _answers_table(out: Path, questions: Path) -> Table:
    asked = {}
    for line in questions.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            asked[item["custom_id"]] = item["body"]["messages"][-1]["content"]
    table = Table(title=f"bulk answers ({out})", show_lines=True)
    for col in ("custom_id", "question", "answer"):
        table.add_column(col, overflow="fold")
    for line in out.read_text().splitlines():
        row = json.loads(line)
        body = (row.get("response") or {}).get("body") or {}
        choices = body.get("choices") or []
        error = f"[red]{escape(str(row.get('error')))}[/red]"
        text = choices[0]["message"]["content"] if choices else error
        table.add_row(row["custom_id"], escape(asked.get(row["custom_id"], "")), text)
    return table


@friendly_errors
def demo(
    tenant: str = typer.Option(
        "demo",
        "--tenant",
        "-t",
        help="The tenant the samples are indexed for and the questions asked as (its topics are "
        "declared if missing; its stored credentials are used when `ragbus tenants add` made them).",
    ),
    docs: Path = typer.Option(SAMPLES / "docs", "--docs", exists=True, help="Documents to index."),
    questions: Path = typer.Option(
        SAMPLES / "questions.jsonl", "--questions", exists=True, dir_okay=False, help="Bulk job input."
    ),
    question: str = typer.Option(DEMO_QUESTION, "--question", "-q", help="The chat question."),
    stop_after: bool = typer.Option(
        False, "--stop-after", help="Stop the components and the local stack at the end."
    ),
) -> None:
    """Start everything, index the sample documents, run a bulk job and a chat question, all as
    one tenant."""
    s = settings()
    tenant = tenant_settings(tenant).tenant  # a valid name; each step acts as it (`--tenant`)
    started = time.monotonic()
    console.print(Rule("1. the local stack: Kafka (KRaft), Postgres, Milvus Lite"))
    _ragbus("up")
    console.print(Rule("2. the components: audit sink, inference worker, processors"))
    _ragbus("start", "sink", "worker", "processors")
    # `ragbus up` declares the shared topics; the tenant's own ones are declared here (idempotent),
    # with the components' credentials, as `ragbus tenants add` would.
    declared = asyncio.run(declare_topics(s, tenants=[tenant]))
    if declared.created:
        console.print(f"declared {len(declared.created)} topics of tenant {tenant!r}", highlight=False)
    try:
        console.print(Rule(f"3. index the sample documents for tenant {tenant!r}"))
        # The first run waits for the processors to load the embedding model.
        _ragbus("ingest", str(docs), "--tenant", tenant, "--timeout", "300")
        console.print(Rule("4. a bulk job (OpenAI Batch format in and out)"))
        out = s.home / "demo" / f"answers-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        _ragbus("bulk", "submit", str(questions), "--out", str(out), "--tenant", tenant)
        console.print(_answers_table(out, questions))
        console.print(Rule("5. one chat question over the bus"))
        _ragbus("ask", question, "--tenant", tenant)
        console.print(Rule("6. the audit trail in Postgres"))
        _ragbus("audit", "--tenant", tenant, "--limit", "5")
    finally:
        if stop_after:
            stop_all(s)
            Stack(s).down()
    console.print(
        f"\n[green]demo done in {time.monotonic() - started:.0f} s.[/green] "
        + (
            "Everything was stopped."
            if stop_after
            else f'The stack and components keep running: try `ragbus ask "..." --tenant {tenant}`, '
            "`ragbus status`; `ragbus stop` then `ragbus down` stop them."
        ),
        highlight=False,
    )
    if not stop_after:
        for bg in backgrounds(s, ["sink", "worker", "processors"]):
            console.print(f"  {bg.name:<11} log: {escape(str(bg.log_path))}", highlight=False)
