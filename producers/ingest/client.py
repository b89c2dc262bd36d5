"""The producing side of ingestion: files and folders become DocumentIngest events on
`ragbus.docs.ingest`, and their IngestResults are collected from `ragbus.docs.ingested`.

A document's id is its path inside the folder given (or its file name when a file is given),
optionally prefixed, so ingesting the same folder again replaces each document in place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.kafka.clients import make_producer
from infra.kafka.codec import encode
from infra.settings import Settings
from producers.replies import ReplyReader
from schemas import DocumentIngest, IngestResult
from schemas.events import ContentType
from schemas.topics import max_event_bytes

CONTENT_TYPES: dict[str, ContentType] = {
    ".txt": "text/plain",
    ".text": "text/plain",
    ".log": "text/plain",
    ".rst": "text/plain",
    ".csv": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
}


@dataclass(frozen=True)
class FileJob:
    path: Path
    doc_id: str
    content_type: ContentType


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class FileOutcome:
    job: FileJob
    request_id: str | None = None
    result: IngestResult | None = None
    error: str | None = None  # why it was not sent, or the IngestResult's error

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.status == "ok"


@dataclass
class IngestReport:
    outcomes: list[FileOutcome] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def indexed(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.error is not None]

    @property
    def missing(self) -> list[FileOutcome]:
        """Sent, but no IngestResult arrived in time."""
        return [o for o in self.outcomes if o.request_id and o.result is None and o.error is None]

    @property
    def chunks(self) -> int:
        return sum(o.result.chunks for o in self.indexed if o.result is not None)


def discover(paths: Iterable[Path], *, doc_prefix: str = "") -> tuple[list[FileJob], list[Skipped]]:
    """The files to ingest under `paths` (folders recursively, hidden entries skipped)."""
    jobs: list[FileJob] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()
    for root in paths:
        if not root.exists():
            skipped.append(Skipped(root, "no such file or folder"))
            continue
        if root.is_file():
            candidates = [(root, root.name)]
        else:
            candidates = [
                (p, p.relative_to(root).as_posix())
                for p in sorted(root.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            ]
        for path, relative in candidates:
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            content_type = CONTENT_TYPES.get(path.suffix.lower())
            if content_type is None:
                if root.is_file():
                    content_type = "text/plain"  # named explicitly: try it as text
                else:
                    skipped.append(Skipped(path, f"unsupported file type {path.suffix or '(none)'}"))
                    continue
            doc_id = f"{doc_prefix}{relative}"
            if len(doc_id) > 256:
                skipped.append(Skipped(path, "document id (path) longer than 256 characters"))
                continue
            jobs.append(FileJob(path, doc_id, content_type))
    return jobs, skipped


def build_event(job: FileJob, *, tenant: str, user: str) -> DocumentIngest:
    """The DocumentIngest for one file (reads it)."""
    raw = job.path.read_bytes()
    stat = job.path.stat()
    common: dict[str, Any] = {
        "tenant_id": tenant,
        "user_id": user,
        "doc_id": job.doc_id,
        "content_type": job.content_type,
        "source": str(job.path),
        "metadata": {
            "bytes": len(raw),
            "modified": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(timespec="seconds"),
        },
    }
    if job.content_type == "application/pdf":
        return DocumentIngest(**common, data=raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None
    return DocumentIngest(**common, text=text)


def _results(settings: Settings) -> ReplyReader[IngestResult]:
    """The reader of `docs.ingested`, from its current end."""
    topics = {settings.topics.docs_ingested: IngestResult}
    return ReplyReader(settings, topics, client_id="ragbus-ingest", fetch_max_wait_ms=50)


async def ingest_files(
    settings: Settings,
    jobs: list[FileJob],
    *,
    tenant: str,
    user: str = "cli",
    idle_timeout: float = 120.0,
    on_event: Callable[[FileOutcome], None] | None = None,
) -> IngestReport:
    """Send every file as a DocumentIngest, then wait for the IngestResults. Files that cannot be
    read or are too large are reported, not sent; `on_event` sees each outcome as it settles.

    Gives up when no result has arrived for `idle_timeout` seconds.
    """
    started = time.monotonic()
    report = IngestReport(outcomes=[FileOutcome(job) for job in jobs])
    topic = settings.topics.docs_ingest
    limit = max_event_bytes(topic, settings.topic_prefix)
    by_request: dict[str, FileOutcome] = {}
    notify = on_event or (lambda _: None)

    results: asyncio.Queue[IngestResult] = asyncio.Queue()
    replies = _results(settings)
    await replies.start()
    producer = make_producer(settings, client_id="ragbus-ingest")
    await producer.start()
    try:
        for outcome in report.outcomes:
            try:
                event = await asyncio.to_thread(build_event, outcome.job, tenant=tenant, user=user)
            except (OSError, ValueError) as e:
                outcome.error = f"cannot read: {e}"
                notify(outcome)
                continue
            enc = encode(event)
            if len(enc.value) > limit:
                size, most = len(enc.value) / 2**20, limit / 2**20
                outcome.error = f"too large: {size:.1f} MiB as an event, the limit is {most:.0f} MiB"
                notify(outcome)
                continue
            outcome.request_id = event.request_id
            by_request[event.request_id] = outcome
            replies.expect(event.request_id, results.put_nowait, once=True)
            await producer.send(topic, enc.value, key=enc.key, headers=enc.headers)
        await producer.flush()
        pending = len(by_request)
        while pending:
            try:
                result = await asyncio.wait_for(results.get(), idle_timeout)
            except TimeoutError:
                break
            outcome = by_request[result.request_id]
            outcome.result = result
            if result.status != "ok":
                outcome.error = result.error.message if result.error else "ingestion failed"
            pending -= 1
            notify(outcome)
    finally:
        await producer.stop()
        await replies.stop()
    report.elapsed_s = time.monotonic() - started
    return report


async def delete_documents(
    settings: Settings, doc_ids: list[str], *, tenant: str, user: str = "cli", idle_timeout: float = 60.0
) -> list[IngestResult | None]:
    """Send a delete for each document and wait for the results (None where none came)."""
    events = [DocumentIngest(tenant_id=tenant, user_id=user, doc_id=d, op="delete") for d in doc_ids]
    results: asyncio.Queue[IngestResult] = asyncio.Queue()
    replies = _results(settings)
    await replies.start()
    producer = make_producer(settings, client_id="ragbus-ingest")
    await producer.start()
    got: dict[str, IngestResult] = {}
    try:
        for event in events:
            replies.expect(event.request_id, results.put_nowait, once=True)
            enc = encode(event)
            await producer.send(settings.topics.docs_ingest, enc.value, key=enc.key, headers=enc.headers)
        await producer.flush()
        while len(got) < len(events):
            try:
                result = await asyncio.wait_for(results.get(), idle_timeout)
            except TimeoutError:
                break
            got[result.request_id] = result
    finally:
        await producer.stop()
        await replies.stop()
    return [got.get(e.request_id) for e in events]
