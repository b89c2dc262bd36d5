"""Running the Batch API's batches: each one is a bulk job (producers/bulk/runner.py, the same code
as `ragbus bulk submit`) whose job id is the batch id, run as a background task by the gateway
that holds the batch's lease (producers/gateway/batch_store.py).

A batch goes validating → in_progress → finalizing → completed (or failed at validation, or
cancelling → cancelled, or expired when its completion window, `gateway_batch_expiry_s` from its
creation, ends first: the answers so far go to the output file, every other line to the error file
as `batch_expired`, and the lines in flight are cancelled). Validating checks what would make the
batch meaningless as a whole (lines that are not JSON objects with a custom_id, a custom_id twice,
too many lines); a line whose body the contract refuses is the runner's business and is answered in
the error file. In progress, the runner sends the lines on the tenant's bulk lane and appends one
result line per custom_id to the batch's results file; the request counts are saved every
`gateway_batch_poll_s`, and a cancel (set by any gateway) is seen then. Finalizing splits the
results into the output file (answers) and the error file (errors) — idempotent, so a gateway that
dies while finalizing leaves it to the next.

Durability: the results file, the job's state and the ids it sent live under the home; the
batch's status and counts in Postgres. A gateway killed mid-batch loses only its lease; the next
gateway that sweeps (any gateway at start, every gateway periodically) takes the lease and
resumes the job: answered custom_ids are skipped, sent ones are read back from the responses
topic, never sent again, never written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka.errors import KafkaError

from infra.secrets import as_tenant
from infra.settings import Settings
from producers.bulk.formats import output_line, scan_output
from producers.bulk.runner import BulkRunner, open_job
from producers.bulk.state import JobStore
from producers.cancel import BATCH_CANCELLED, BATCH_EXPIRED
from producers.cancel import cancel as cancel_requests
from producers.gateway.batch_quotas import QuotaAdmission
from producers.gateway.batch_store import BatchLease, BatchStore
from producers.gateway.quotas import QuotaStore
from producers.openai.batches import BatchError, BatchErrors, BatchStatus
from schemas import limits

log = logging.getLogger(__name__)

_FILE_NS = uuid.UUID("0b4a8a3e-4f52-4d2b-9d0e-2f6a4e1c7b90")
#: Errors a failed validation reports (the first ones; OpenAI's list is short too).
VALIDATION_ERRORS_MAX = 10


def files_dir(home: Path, tenant: str) -> Path:
    return home / "files" / tenant


def file_path(home: Path, tenant: str, file_id: str) -> Path:
    """Where a file's bytes live; ids are the gateway's own (`file-<hex>`), never a client's text."""
    if not re.fullmatch(r"file-[A-Za-z0-9]{1,64}", file_id):
        raise ValueError(f"not a file id: {file_id!r}")
    return files_dir(home, tenant) / f"{file_id}.jsonl"


def results_path(home: Path, tenant: str, batch_id: str) -> Path:
    return home / "batches" / tenant / f"{batch_id}.results.jsonl"


def clean_incoming(home: Path, older_than_s: float = 3600.0) -> None:
    """Remove upload spools a gateway left behind (it died mid-upload); a spool younger than
    `older_than_s` may be another gateway's upload in progress and is kept."""
    cutoff = time.time() - older_than_s
    for spool in (home / "files" / ".incoming").glob("*"):
        with contextlib.suppress(OSError):
            if spool.stat().st_mtime < cutoff:
                spool.unlink()


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def result_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file: the same on every try, so finalizing twice
    (a gateway died in it) registers the same file."""
    return f"file-{uuid.uuid5(_FILE_NS, f'{batch_id}/{kind}').hex}"


def validate_input(path: Path, max_requests: int = limits.BATCH_REQUESTS_MAX) -> tuple[int, list[BatchError]]:
    """(requests in the input, errors that fail the whole batch): a non-blank line that is not a
    JSON object with a non-empty string custom_id, a custom_id seen before, more than
    `max_requests` lines, or no line at all. Blocking: run it off the event loop."""
    errors: list[BatchError] = []
    seen: set[str] = set()
    total = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            total += 1
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                errors.append(BatchError(code="invalid_json_line", line=n, message=f"line {n} is not JSON"))
            else:
                cid = obj.get("custom_id") if isinstance(obj, dict) else None
                if not isinstance(cid, str) or not cid:
                    errors.append(
                        BatchError(
                            code="missing_required_parameter",
                            line=n,
                            param="custom_id",
                            message=f"line {n} is not a JSON object with a custom_id (a non-empty string)",
                        )
                    )
                elif cid in seen:
                    errors.append(
                        BatchError(
                            code="duplicate_custom_id",
                            line=n,
                            param="custom_id",
                            message=f"line {n}: custom_id {cid[:64]!r} is used twice; each must be unique",
                        )
                    )
                else:
                    seen.add(cid)
            if len(errors) >= VALIDATION_ERRORS_MAX:
                break
    if total > max_requests:
        errors.append(
            BatchError(
                code="too_many_requests",
                message=f"the file holds more than {max_requests} requests; split it into several batches",
            )
        )
    if total == 0 and not errors:
        errors.append(BatchError(code="empty_file", message="the input file holds no request"))
    return total, errors


def expire_unanswered(source: Path, results: Path) -> int:
    """Append a `batch_expired` error line to `results` for each custom_id of the input with no line
    there yet (fsynced); returns how many. Idempotent: a second run after a crash finds them all
    answered (a torn last line is cut first); an input file deleted since adds none. Blocking: run
    it off the event loop."""
    if not source.exists():
        return 0
    answered, _ = scan_output(results)
    missing: list[str] = []
    with source.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(raw)
                cid = obj.get("custom_id") if isinstance(obj, dict) else None
                if isinstance(cid, str) and cid and cid not in answered:
                    answered.add(cid)
                    missing.append(cid)
    if missing:
        results.parent.mkdir(parents=True, exist_ok=True)
        message = "the batch's completion window ended before this request was answered"
        with results.open("a", encoding="utf-8") as out:
            for cid in missing:
                out.write(output_line(cid, None, (BATCH_EXPIRED, message)) + "\n")
            out.flush()
            os.fsync(out.fileno())
    return len(missing)


def split_results(results: Path, output: Path, errors: Path) -> tuple[int, int]:
    """Write a results file's answers to `output` and its error lines to `errors` (each written
    whole and fsynced, then renamed, so a second run after a crash writes the same files);
    returns (answered, failed). A file that would be empty is not written (removed if there)."""
    counts = []
    tmp = {path: path.with_suffix(".tmp") for path in (output, errors)}
    outs = {path: tmp[path].open("wb") for path in (output, errors)}
    n = {output: 0, errors: 0}
    try:
        if results.exists():
            with results.open("rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break  # a torn last line (the runner cuts it on resume; never reached here)
                    dest = errors if orjson.loads(raw).get("error") is not None else output
                    outs[dest].write(raw)
                    n[dest] += 1
        for f in outs.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in outs.values():
            f.close()
    for path in (output, errors):
        if n[path]:
            tmp[path].replace(path)
        else:
            tmp[path].unlink()
            path.unlink(missing_ok=True)
        counts.append(n[path])
    return counts[0], counts[1]


class BatchRunner:
    """The gateway's batches: runs those it holds the lease of, sweeps for unfinished ones of its
    tenants (at start, then every few polls) and resumes them."""

    def __init__(
        self,
        settings: Settings,
        store: BatchStore,
        tenants: Sequence[str],
        quotas: QuotaStore | None = None,
    ) -> None:
        """`quotas`: charge each line to its tenant's quotas (producers/gateway/batch_quotas.py)."""
        self.settings = settings
        self.store = store
        self.quotas = quotas
        self.tenants = sorted(set(tenants))
        self.poll_s = settings.gateway_batch_poll_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(clean_incoming, self.settings.home)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="ragbus-batch-sweep")

    async def stop(self) -> None:
        """Stop running batches (each keeps its state and is resumed by the next gateway)."""
        tasks = [t for t in (self._sweeper, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def kick(self, batch_id: str) -> None:
        """Try to run `batch_id` now (a batch just created here)."""
        if batch_id not in self._running:
            self._running[batch_id] = asyncio.create_task(self._own(batch_id), name=f"ragbus-{batch_id}")

    async def _sweep_forever(self) -> None:
        while True:
            try:
                for batch_id in await self.store.unfinished(self.tenants):
                    self.kick(batch_id)
            except Exception as e:  # noqa: BLE001 - Postgres away: try again at the next sweep
                log.warning("batch sweep failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.poll_s * 3)

    async def _own(self, batch_id: str) -> None:
        lease = None
        try:
            lease = await BatchLease.take(self.store, batch_id)
            if lease is None:
                return  # another gateway runs it
            row = await lease.row()
            if row["status"] in ("validating", "in_progress", "finalizing", "cancelling"):
                log.info("batch %s (tenant %s): running it from %s", batch_id, row["tenant"], row["status"])
                await self._execute(
                    lease,
                    row["tenant"],
                    row["user_id"],
                    row["input_file_id"],
                    row["status"],
                    row["expires_at"],
                )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("batch %s failed: %s: %s", batch_id, type(e).__name__, e)
            if lease is not None:
                errors = BatchErrors(
                    data=[BatchError(code="internal_error", message=f"the batch stopped: {type(e).__name__}")]
                )
                with contextlib.suppress(Exception):
                    await lease.set_status("failed", errors=errors.model_dump())
        finally:
            if lease is not None:
                await lease.release()
            self._running.pop(batch_id, None)

    async def _execute(
        self,
        lease: BatchLease,
        tenant: str,
        user: str,
        input_file_id: str,
        status: BatchStatus,
        expires_at: datetime,
    ) -> None:
        home = self.settings.home
        source = file_path(home, tenant, input_file_id)
        if status in ("validating", "in_progress") and datetime.now(UTC) >= expires_at:
            # Past its window before it (again) ran: nobody ran it in time (every gateway down).
            await self._expire(lease, tenant, source)
            return
        if status == "validating":
            if not source.exists():
                await lease.set_status(
                    "failed",
                    errors=BatchErrors(
                        data=[
                            BatchError(code="file_not_found", message=f"input file {input_file_id} is gone")
                        ]
                    ).model_dump(),
                )
                return
            total, problems = await asyncio.to_thread(validate_input, source)
            if problems:
                await lease.set_status("failed", total=total, errors=BatchErrors(data=problems).model_dump())
                return
            status = await lease.set_status("in_progress", total=total)
        if status == "in_progress":
            status = await self._run_job(lease, tenant, user, source, expires_at)
        if status == "expired":
            await self._expire(lease, tenant, source)
            return
        await self._finalize(lease, tenant, cancelled=status == "cancelling")

    async def _run_job(
        self, lease: BatchLease, tenant: str, user: str, source: Path, expires_at: datetime
    ) -> BatchStatus:
        """Run (or resume) the batch's bulk job; the status it ends in (in_progress, cancelling, or
        expired when its window ended first)."""
        batch_id = lease.batch_id
        store = JobStore(self.settings.home, tenant)
        results = results_path(self.settings.home, tenant, batch_id)
        state, resumed = open_job(store, batch_id, input=source, output=results, fmt="openai", user=user)
        if resumed:
            log.info("batch %s: resuming its job (answered lines are kept, sent ones read back)", batch_id)
        runner = BulkRunner(
            as_tenant(self.settings, tenant),
            state,
            store,
            window=self.settings.gateway_batch_window,
            progress=False,
            admission=None
            if self.quotas is None
            else QuotaAdmission(self.quotas, tenant, user, retry_s=self.poll_s),
        )
        task = asyncio.create_task(runner.run(), name=f"ragbus-{batch_id}-job")
        status: BatchStatus = "in_progress"
        stopped: BatchStatus | None = None
        try:
            while not task.done():
                # Wake at the window's end too, unless already stopping (then only the job's end).
                left = (expires_at - datetime.now(UTC)).total_seconds()
                wait = self.poll_s if stopped else max(0.0, min(self.poll_s, left))
                await asyncio.wait({task}, timeout=wait)
                failed = state.errors
                status = await lease.progress(
                    total=state.total, completed=runner.answered - failed, failed=failed
                )
                if status != "cancelling" and datetime.now(UTC) >= expires_at:
                    status = "expired"
                if status in ("cancelling", "expired") and stopped is None:
                    # No more lines go out, and the requests on their way stop where they are: the
                    # worker answers each `cancelled` between decode steps (or when it arrives).
                    runner.cancel()
                    stopped = status
                    reason = BATCH_EXPIRED if status == "expired" else BATCH_CANCELLED
                    log.info("batch %s: %s, stopping its job", batch_id, status)
                    try:
                        await cancel_requests(
                            as_tenant(self.settings, tenant), runner.in_flight(), reason=reason
                        )
                    except KafkaError as e:  # the lines still in flight are then answered in full
                        log.warning("batch %s: could not cancel its requests in flight: %r", batch_id, e)
        finally:
            if not task.done():  # lost the lease (its connection) or stopping: leave it resumable
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        final = task.result()
        if final.status == "cancelled":
            return stopped or "cancelling"  # `cancelled` by the store's flag: a batch's is `cancelling`
        return status if status != "expired" else "in_progress"  # it finished as its window ended

    async def _expire(self, lease: BatchLease, tenant: str, source: Path) -> None:
        """End the batch `expired`: its unanswered lines become `batch_expired` errors, then the
        files are split as for a finished batch."""
        results = results_path(self.settings.home, tenant, lease.batch_id)
        expired = await asyncio.to_thread(expire_unanswered, source, results)
        log.info("batch %s: its completion window ended; %d lines not answered", lease.batch_id, expired)
        await self._finalize(lease, tenant, cancelled=False, ending="expired")

    async def _finalize(
        self, lease: BatchLease, tenant: str, *, cancelled: bool, ending: BatchStatus = "completed"
    ) -> None:
        batch_id = lease.batch_id
        if not cancelled and ending == "completed":
            cancelled = await lease.set_status("finalizing") == "cancelling"
        final: BatchStatus = "cancelled" if cancelled else ending
        home = self.settings.home
        files_dir(home, tenant).mkdir(parents=True, exist_ok=True)
        out_id, err_id = result_file_id(batch_id, "output"), result_file_id(batch_id, "error")
        out_path, err_path = file_path(home, tenant, out_id), file_path(home, tenant, err_id)
        answered, failed = await asyncio.to_thread(
            split_results, results_path(home, tenant, batch_id), out_path, err_path
        )
        if answered:
            size = out_path.stat().st_size
            await self.store.add_file(out_id, tenant, "batch_output", f"{batch_id}_output.jsonl", size)
        if failed:
            size = err_path.stat().st_size
            await self.store.add_file(err_id, tenant, "batch_output", f"{batch_id}_error.jsonl", size)
        row = await lease.row()
        await lease.set_status(
            final,
            total=row["total"] if cancelled else max(row["total"], answered + failed),
            completed=answered,
            failed=failed,
            output_file_id=out_id if answered else None,
            error_file_id=err_id if failed else None,
        )
        log.info(
            "batch %s %s: %d answered, %d failed",
            batch_id,
            final,
            answered,
            failed,
        )
