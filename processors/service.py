"""Ingestion and retrieval in one process: one embedding model, one Milvus client, one faust app
(consumer group `<prefix>.processors`) and one transactional publisher, on one event loop.

Milvus Lite lets one process open a data file, which is why both stages live here; with a Milvus
server several of these processes can share the work (the consumer group splits partitions).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from aiokafka import TopicPartition

from infra.kafka.directory import TopicDirectory
from infra.kafka.publisher import TransactionalPublisher
from infra.milvus import make_milvus_client
from infra.settings import Settings
from processors.embedding import Embedder, limit_threads, load_model
from processors.ingest.stage import IngestStage
from processors.retrieval.stage import RetrievalStage
from processors.stage import BatchStage
from processors.store import ChunkStore, release_lite
from processors.streams import ProcessorsApp, build_app
from schemas import LANES, Topics

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

#: How long a rebalance waits for the batches in flight (well inside faust's rebalance timeout).
REVOKE_WAIT_S = 20.0


class ProcessorsError(RuntimeError):
    """The processors cannot start or had to stop."""


def processors_group_id(settings: Settings) -> str:
    return f"{settings.topic_prefix}.processors"


def processors_transactional_id(settings: Settings) -> str:
    """Stable across restarts, so a restarted process fences its crashed predecessor at once.

    RAGBUS_INSTANCE_ID when set; with Milvus Lite (one process per data file) the data file
    names the deployment; otherwise host and pid (a crashed process's open transaction then ends
    by timeout, 15 s).
    """
    prefix = f"{settings.topic_prefix}.processors"
    if settings.instance_id:
        return f"{prefix}.{settings.instance_id}"
    if settings.uses_milvus_lite:
        path = str(Path(settings.milvus_target).expanduser().resolve())
        return f"{prefix}.lite-{hashlib.sha1(path.encode()).hexdigest()[:12]}"
    return f"{prefix}.{settings.process_id}"


#: Each agent of the processors and the tenant-topic suffix it reads (of every tenant).
AGENT_SUFFIXES: dict[str, str] = {
    "ingest": "docs.ingest",
    **{f"retrieval-{lane}": f"{lane}.requests" for lane in LANES},
}


def tenant_inputs(topics: Topics, present: set[str]) -> dict[str, list[str]]:
    """agent name → the tenant topics of its suffix among `present` (one per tenant), sorted."""
    out: dict[str, list[str]] = {}
    for agent, suffix in AGENT_SUFFIXES.items():
        pattern = re.compile(topics.tenant_pattern(suffix))
        out[agent] = sorted(t for t in present if pattern.match(t))
    return out


class Processors:
    def __init__(self, settings: Settings, *, model: SentenceTransformer | None = None) -> None:
        self.settings = settings
        self._model = model
        self.embedder: Embedder | None = None
        self.store: ChunkStore | None = None
        self.publisher = TransactionalPublisher(
            settings,
            group_id=processors_group_id(settings),
            transactional_id=processors_transactional_id(settings),
            client_id="ragbus-processors",
            generation=self._generation,
        )
        self.stages: dict[str, BatchStage[Any]] = {}
        self.app: ProcessorsApp | None = None
        #: Set once the consumer group has assigned partitions to this process.
        self.ready = asyncio.Event()
        self._lite_lock: TextIO | None = None
        #: agent name → the tenant topics it reads now (grows as tenants are added).
        self.inputs: dict[str, list[str]] = {}
        #: The broker's topic list (tenants' topics appear in it when tenants are added).
        self.directory = TopicDirectory(settings)

    @property
    def input_topics(self) -> list[str]:
        return sorted(t for names in self.inputs.values() for t in names)

    async def start(self) -> None:
        s = self.settings
        if s.uses_milvus_lite:
            self._lock_lite_file(s.milvus_target)
        try:
            await self.directory.start()
        except Exception as e:
            raise ProcessorsError(f"cannot reach Kafka at {s.bootstrap}: {e}") from e
        self.inputs = await self._discover()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        model = self._model
        limit_threads(s.embedding_threads)
        if model is None:
            model = await loop.run_in_executor(None, load_model, s.embedding_model, s.embedding_device)
        self.embedder = Embedder.from_settings(s, model)
        client = await loop.run_in_executor(None, make_milvus_client, s)
        self.store = ChunkStore(
            client, s.milvus_collection, dimension=self.embedder.dimension, ef=s.milvus_search_ef
        )
        await self.store.call(self.store.ensure_collection)
        await self.publisher.start()

        ingest = IngestStage(s, self.publisher, self.embedder, self.store)
        self.stages = {"ingest": ingest}
        agents = {
            "ingest": (
                self.inputs["ingest"],
                s.ingest_batch_size,
                s.ingest_max_wait_ms / 1000,
                ingest.process,
            )
        }
        for lane in LANES:
            stage = RetrievalStage(s, self.publisher, self.embedder, self.store, lane=lane)
            self.stages[stage.name] = stage
            agents[stage.name] = (
                self.inputs[stage.name],
                s.embedding_batch_size,
                s.embedding_max_wait_ms / 1000,
                stage.process,
            )
        self.app = build_app(
            s,
            group_id=processors_group_id(s),
            agents=agents,
            on_revoked=self._on_revoked,
            on_assigned=self._on_assigned,
        )
        await self.app.start()
        log.info(
            "processors started in %.1f s: %s → Milvus %s (collection %s)",
            time.monotonic() - started,
            ", ".join(self.input_topics),
            s.milvus_target,
            s.milvus_collection,
        )

    def _lock_lite_file(self, milvus_target: str) -> None:
        """Milvus Lite serves one process per data file: refuse to start next to another one."""
        target = Path(milvus_target).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        path = target.with_name(target.name + ".lock")
        handle = open(path, "a+")  # noqa: SIM115 - held open (locked) until stop()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ProcessorsError(
                f"the Milvus Lite file {target} is in use by {holder}: Milvus Lite allows one process "
                "per data file (stop the other processors, or give each its own RAGBUS_MILVUS_URI)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lite_lock = handle

    async def _list_topics(self) -> set[str]:
        """The broker's topics now, through the one admin client the processors keep."""
        if not await self.directory.refresh():
            raise ProcessorsError(
                f"cannot list the topics of Kafka at {self.settings.bootstrap} (see the warning above)"
            )
        return set(self.directory.known)

    async def _discover(self) -> dict[str, list[str]]:
        """The tenant topics each agent reads: every tenant's, as the broker lists them now."""
        present = await self._list_topics()
        topics = self.settings.topics
        missing = [t for t in topics.all() if t not in present]
        if missing:
            raise ProcessorsError(
                f"missing topics {', '.join(missing)}: run `ragbus up` or `ragbus topics declare`"
            )
        found = tenant_inputs(topics, present)
        empty = [AGENT_SUFFIXES[agent] for agent, names in found.items() if not names]
        if empty:
            raise ProcessorsError(
                f"no tenant has a {', '.join(empty)} topic under {topics.prefix}: add one with "
                "`ragbus tenants add NAME` (or `ragbus up`, which declares the default tenant's)"
            )
        return found

    async def refresh_tenants(self) -> bool:
        """Serve the tenants added since the last look (their topics join the agents' topics, and
        the consumer group rebalances); True when the set changed. A topic that went away is
        dropped as well."""
        assert self.app is not None
        try:
            present = await self._list_topics()
        except ProcessorsError as e:
            log.warning("tenant topics not refreshed: %s", e)
            return False
        changed = False
        for agent, names in tenant_inputs(self.settings.topics, present).items():
            if self.app.set_agent_topics(agent, names):
                added = sorted(set(names) - set(self.inputs.get(agent, ())))
                gone = sorted(set(self.inputs.get(agent, ())) - set(names))
                log.info(
                    "%s: now reading %d tenant topics (new: %s; gone: %s)",
                    agent,
                    len(names),
                    ", ".join(added) or "none",
                    ", ".join(gone) or "none",
                )
                self.inputs[agent] = names
                changed = True
            elif names and self.app.unsubscribed(names):
                self.app.resubscribe()  # a change flagged during a rebalance: faust dropped it
        return changed

    def _generation(self) -> int | None:
        return self.app.consumer_generation_id if self.app is not None else None

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Let the batches in flight finish and commit while these partitions are still ours;
        # whatever is later is dropped by the publisher and read again by the next owner.
        try:
            await asyncio.wait_for(
                asyncio.gather(*(stage.idle() for stage in self.stages.values())), REVOKE_WAIT_S
            )
        except TimeoutError:
            log.warning("rebalance: a batch is still running after %.0f s; it will be redone", REVOKE_WAIT_S)
        await self.publisher.on_partitions_revoked(revoked)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.publisher.on_partitions_assigned(assigned)
        if assigned and not self.ready.is_set():
            log.info("processors ready: %d partitions assigned", len(assigned))
        self.ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Start, process until `stop` is set, then stop. Raises ProcessorsError when processing
        had to stop (results could not be committed, or an agent crashed)."""
        try:
            await self.start()
            await self._watch(stop)
        finally:
            await self.stop()

    async def _watch(self, stop: asyncio.Event) -> None:
        assert self.app is not None and self.publisher.failed is not None
        stopping = asyncio.ensure_future(stop.wait())
        next_refresh = time.monotonic() + self.settings.tenant_refresh_s
        every = self.settings.processors_stats_s
        next_stats, logged = time.monotonic() + every, ""
        try:
            while not stop.is_set():
                if time.monotonic() >= next_refresh:
                    await self.refresh_tenants()
                    next_refresh = time.monotonic() + self.settings.tenant_refresh_s
                if every and time.monotonic() >= next_stats:
                    logged = self._log_counters(logged)
                    next_stats = time.monotonic() + every
                await asyncio.wait(
                    [stopping, self.publisher.failed], timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
                if self.publisher.failed.done():
                    raise ProcessorsError(f"stopping: {self.publisher.failed.exception()}")
                for stage in self.stages.values():
                    if (failure := stage.failure()) is not None:
                        raise ProcessorsError(f"stopping: {stage.name} failed: {failure!r}")
                if self.app.crashed:
                    raise ProcessorsError(f"stopping: a stream agent crashed: {self.app.crash_reason!r}")
        finally:
            stopping.cancel()

    def _log_counters(self, previous: str) -> str:
        """One line of each stage's counters since start, under this instance's id (so the work of
        several instances sharing the group can be told apart); only when it changed."""
        line = "; ".join(
            f"{name} {c.records} records in {c.batches} batches, {c.dead_letters} dead letters"
            for name, c in ((n, st.counters) for n, st in self.stages.items())
        )
        if line != previous:
            log.info("processors %s since start: %s", self.settings.process_id, line)
        return line

    async def stop(self) -> None:
        if self.app is not None:
            with contextlib.suppress(Exception):
                await self.app.stop()
        for stage in self.stages.values():
            try:
                await stage.flush()
            except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - the records are read again
                log.warning("%s: its last batch was not committed: %r", stage.name, e)
        ingest = self.stages.get("ingest")
        if isinstance(ingest, IngestStage):
            await ingest.close()  # its parser processes
        await self.publisher.stop()
        await self.directory.close()
        if self.embedder is not None:
            self.embedder.close()
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.store.close)
            if self.settings.uses_milvus_lite:
                await asyncio.get_running_loop().run_in_executor(
                    None, release_lite, self.settings.milvus_target
                )
        if self._lite_lock is not None:
            self._lite_lock.close()  # releases the lock
            self._lite_lock = None
        self._log_counters("")
        log.info("processors stopped")
