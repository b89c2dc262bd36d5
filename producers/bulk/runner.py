"""Runs one bulk job: streams the input, keeps a bounded window of requests in flight on the bulk
lane, and writes each answer as it arrives (completion order), one line per custom_id.

Resumable: answers already in the output file are skipped; requests that were sent before an
interruption are not sent again — their answers are read from the responses topic, starting at
the offsets recorded when the job first started. Request ids are derived from (tenant, job,
custom_id), so even a request sent twice is the same request to the pipeline, the output keeps one
line per custom_id, and two tenants choosing the same job and custom ids never share a request id
(nor an answer, nor a response-cache entry keyed by it).

`ragbus bulk submit` and the gateway's Batch API (producers/gateway/batches.py) run jobs the same
way: `open_job` creates or resumes the job's state, `BulkRunner.run` runs it; a batch is a job
whose id is the batch id.

A job acts as its tenant (`settings.tenant`, which must be the job's): it writes to that tenant's
bulk requests topic and reads that tenant's bulk responses topic only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any, TextIO

from aiokafka import TopicPartition
from tqdm import tqdm

from infra.kafka.clients import make_producer
from infra.kafka.codec import Encoded, encode
from infra.settings import Settings
from producers.bulk.admission import Admission, LineRefused
from producers.bulk.formats import (
    BadLine,
    BulkItem,
    build_request,
    count_items,
    detect_format,
    output_line,
    read_items,
    scan_output,
)
from producers.bulk.state import JobState, JobStore
from producers.replies import ReplyReader
from schemas import ChatRequest, ChatResponse
from schemas.topics import max_event_bytes

log = logging.getLogger(__name__)

_NS = uuid.UUID("5d1f6c2e-8a57-4c1e-9a53-6f0c1f9b2a10")


def request_id_for(tenant: str, job_id: str, custom_id: str) -> str:
    """The request id of one item of a job: stable across resumes, distinct across tenants, jobs
    and custom ids (NUL cannot occur in a tenant or job name, so the fields cannot run together)."""
    return str(uuid.uuid5(_NS, f"{tenant}\x00{job_id}\x00{custom_id}"))


def open_job(
    store: JobStore, job_id: str, *, input: Path, output: Path, fmt: str, user: str
) -> tuple[JobState, bool]:
    """The job's state and whether it is a resume: a new job's state (counting its input), or the
    stored one of the same id (its cancel mark cleared when it had been cancelled, so submitting
    it again runs it on). Raises ValueError when a stored job writes to another output."""
    state = store.load(job_id)
    if state is None:
        state = JobState(
            job_id=job_id,
            input=str(input.resolve()),
            output=str(output.resolve()),
            input_format=detect_format(input) if fmt == "auto" else fmt,
            tenant_id=store.tenant,
            user_id=user,
            total=count_items(input),
        )
        return state, False
    if Path(state.output) != output.resolve():
        raise ValueError(f"job {job_id} writes to {state.output}, not {output}")
    if state.status == "cancelled":
        store.clear_cancel(job_id)
    return state, True


class BulkRunner:
    def __init__(
        self,
        settings: Settings,
        state: JobState,
        store: JobStore,
        *,
        window: int = 256,
        progress: bool = True,
        column: str | None = None,
        id_column: str | None = None,
        admission: Admission | None = None,
    ) -> None:
        """`admission`: asked before each line goes out (the Batch API's quotas); None: no limit
        but the window."""
        if state.tenant_id != settings.tenant:
            raise ValueError(
                f"job {state.job_id} belongs to tenant {state.tenant_id!r}; run it as that tenant "
                f"(settings act as {settings.tenant!r})"
            )
        self.settings = settings
        self.state = state
        self.store = store
        self.window = window
        self.progress = progress
        self.column = column
        self.id_column = id_column
        self.admission = admission
        #: Admission holds of the lines in flight, settled with their answers (by custom_id).
        self._holds: dict[str, Any] = {}
        self._settling: set[asyncio.Task[None]] = set()
        topics = settings.topics.tenant(state.tenant_id)
        self.topic = topics.responses("bulk")
        self.requests_topic = topics.requests("bulk")
        self._max_bytes = max_event_bytes(self.requests_topic, settings.topic_prefix)
        self._inflight: set[str] = set()
        self._done: set[str] = set()
        self._replies: ReplyReader[ChatResponse] = ReplyReader(
            settings,
            {self.topic: ChatResponse},
            client_id=f"ragbus-bulk-{state.job_id}",
            fetch_max_wait_ms=100,
        )
        self._slots = asyncio.Condition()
        self._cancel = False
        self._out: TextIO | None = None
        self._bar: tqdm | None = None  # type: ignore[type-arg]

    async def run(self) -> JobState:
        state, store = self.state, self.store
        output = Path(state.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        self._done, state.errors = scan_output(output)
        self._inflight = store.sent_ids(state.job_id) - self._done
        producer = make_producer(self.settings, client_id=f"ragbus-bulk-{state.job_id}")
        await producer.start()
        state.status, state.pid = "running", os.getpid()
        # Appending a line per answer is a page-cache write; the one fsync runs in a thread.
        self._out = output.open("a", encoding="utf-8")  # noqa: ASYNC230
        self._bar = tqdm(
            total=state.total or None,
            initial=len(self._done),
            unit="q",
            desc=state.job_id,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            for cid in self._inflight:  # sent before an interruption: their answers may be waiting
                self._expect(cid)
            await self._start_replies()
            store.save(state)
            sent_log = store.sent_log(state.job_id)
            try:
                cancelled = await self._send_all(producer, sent_log)
            finally:
                sent_log.close()
            if cancelled:
                state.status = "cancelled"
            else:
                await self._drain()
                state.status = "cancelled" if self._cancelled() else "completed"
        except (asyncio.CancelledError, KeyboardInterrupt):
            state.status = "interrupted"
            raise
        except Exception:
            state.status = "failed"
            raise
        finally:
            with contextlib.suppress(Exception):
                await self._replies.stop()
            if self._settling:  # the answers' quota settlements still on their way
                await asyncio.wait(set(self._settling), timeout=10)
            self._out.close()
            self._bar.close()
            state.answered = len(self._done)
            state.pid = None
            store.save(state)
            with contextlib.suppress(Exception):
                await producer.stop()
        return state

    @property
    def answered(self) -> int:
        """custom_ids answered so far (errors included): the job's progress, for whoever watches."""
        return len(self._done)

    def in_flight(self) -> list[str]:
        """The request ids sent and not answered yet (what a cancel of the job must also stop)."""
        return [request_id_for(self.state.tenant_id, self.state.job_id, cid) for cid in self._inflight]

    def cancel(self) -> None:
        """Stop sending further lines (as `JobStore.request_cancel` does, without the file): the
        lines answered so far stay, and `run` returns with status `cancelled`."""
        self._cancel = True
        with contextlib.suppress(RuntimeError):  # no running loop: nothing waits for a slot
            asyncio.get_running_loop().create_task(self._release())

    def _cancelled(self, check_store: bool = True) -> bool:
        return self._cancel or (check_store and self.store.cancel_requested(self.state.job_id))

    async def _start_replies(self) -> None:
        """Read the responses from where the job first started (so answers to requests sent
        before an interruption are found), recording that place on the first run."""
        recorded = self.state.start_offsets
        offsets = (
            {TopicPartition(self.topic, int(p)): off for p, off in recorded.items()} if recorded else None
        )
        await self._replies.start(offsets)
        if not recorded:
            self.state.start_offsets = {str(tp.partition): off for tp, off in self._replies.positions.items()}

    def _expect(self, custom_id: str) -> None:
        request_id = request_id_for(self.state.tenant_id, self.state.job_id, custom_id)
        self._replies.expect(request_id, lambda r: self._answered(custom_id, r), once=True)

    def _answered(self, custom_id: str, response: ChatResponse) -> None:
        if custom_id not in self._done:
            self._write(custom_id, response)
            self._out.flush()  # type: ignore[union-attr]
        hold = self._holds.pop(custom_id, None)
        if hold is not None and self.admission is not None:
            task = asyncio.get_running_loop().create_task(self.admission.settle(hold, response))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _send_all(self, producer: Any, sent_log: TextIO) -> bool:
        """Send every unanswered item; True when the job was cancelled."""
        state = self.state
        pending: list[asyncio.Future[Any]] = []
        items = read_items(
            Path(state.input), state.input_format, column=self.column, id_column=self.id_column
        )  # type: ignore[arg-type]
        for n, item in enumerate(items):
            if self._cancelled(check_store=n % 64 == 0):
                await asyncio.gather(*pending)
                return True
            if isinstance(item, BulkItem):
                if item.custom_id in self._done or item.custom_id in self._inflight:
                    continue
                try:
                    request, enc = self._encode(item)
                except BadLine as bad:
                    item = bad
            if isinstance(item, BadLine):
                # A line that cannot become a request is answered here, and the job goes on.
                if item.custom_id not in self._done:
                    self._write(item.custom_id, None, ("invalid_request", str(item)))
                continue
            cid = item.custom_id
            async with self._slots:
                await self._slots.wait_for(lambda: len(self._inflight) < self.window or self._cancel)
            if self._cancel:
                await asyncio.gather(*pending)
                return True
            if self.admission is not None:
                try:
                    hold = await self.admission.admit(request, lambda: self._cancel)
                except LineRefused as refused:
                    self._write(cid, None, (refused.code, str(refused)))
                    continue
                if hold is None:  # stopped while it waited
                    await asyncio.gather(*pending)
                    return True
                self._holds[cid] = hold
            self._inflight.add(cid)
            self._expect(cid)
            fut = await producer.send(self.requests_topic, enc.value, key=enc.key, headers=enc.headers)
            fut.add_done_callback(lambda f, cid=cid: f.exception() is None and sent_log.write(cid + "\n"))
            pending.append(fut)
            if len(pending) >= 256:
                await asyncio.gather(*pending)
                sent_log.flush()
                pending.clear()
        await asyncio.gather(*pending)
        sent_log.flush()
        return False

    def _encode(self, item: BulkItem) -> tuple[ChatRequest, Encoded]:
        """The item as a bulk-lane request and its encoding; raises BadLine when the contract refuses it
        (a field too long, bad sampling values) or it is larger than the requests topic accepts."""
        request = build_request(
            item,
            request_id=request_id_for(self.state.tenant_id, self.state.job_id, item.custom_id),
            tenant_id=self.state.tenant_id,
            user_id=self.state.user_id,
            job_id=self.state.job_id,
        )
        enc = encode(request)
        if len(enc.value) > self._max_bytes:
            raise BadLine(
                item.custom_id,
                f"the request is {len(enc.value)} bytes as an event; the bulk lane takes at most "
                f"{self._max_bytes} (shorten the messages)",
                "messages",
            )
        return request, enc

    def _write(
        self, custom_id: str, response: ChatResponse | None, error: tuple[str, str] | None = None
    ) -> None:
        assert self._out is not None and self._bar is not None
        self._out.write(output_line(custom_id, response, error) + "\n")
        self._done.add(custom_id)
        if error is not None or (response is not None and response.error is not None):
            self.state.errors += 1
        self._bar.update(1)
        if custom_id in self._inflight:
            self._inflight.discard(custom_id)
            asyncio.get_running_loop().create_task(self._release())

    async def _release(self) -> None:
        async with self._slots:
            self._slots.notify_all()

    async def _drain(self) -> None:
        while self._inflight:
            self._replies.raise_if_failed()  # writing an answer failed (a full disk)
            if self._cancelled():
                return
            await asyncio.sleep(0.2)
        self._out.flush()  # type: ignore[union-attr]
        await asyncio.to_thread(os.fsync, self._out.fileno())  # type: ignore[union-attr]
