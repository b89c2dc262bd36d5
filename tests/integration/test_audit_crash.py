"""The audit sink as a real process: SIGKILLed five times while producers keep producing, and
Postgres stopped for 10 s once under it. Afterwards the rows are exactly the readable records:
none lost, none twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import warnings
from pathlib import Path

from infra.kafka.clients import make_producer, transactional_id
from infra.settings import Settings
from tests.helpers import spawn, wait_for
from tests.integration.audit_support import audit_coords, mixed_event, readable_records, row_count, send
from tests.provision import PostgresService

KILLS = 5
OUTAGE_S = 10.0


async def _produce(settings: Settings, stop: asyncio.Event) -> int:
    """~400 events/s until `stop`: plain sends, garbage among them, and Kafka transactions of
    which every third is aborted (its records must never reach the audit trail)."""
    rng = random.Random(7)
    plain = make_producer(settings)
    tx = make_producer(settings, transactional_id=transactional_id(settings, "audit-crash-test"))
    await plain.start()
    await tx.start()
    n = rounds = 0
    try:
        while not stop.is_set():
            rounds += 1
            for _ in range(20):
                await send(plain, *mixed_event(settings, rng, n))
                n += 1
            if rounds % 5 == 0:
                await tx.begin_transaction()
                for _ in range(5):
                    await send(tx, *mixed_event(settings, rng, n))
                    n += 1
                await (tx.abort_transaction() if rounds % 15 == 0 else tx.commit_transaction())
            await asyncio.sleep(0.05)
        await plain.flush()
    finally:
        await plain.stop()
        await tx.stop()
    return n


async def _grows(dsn: str, beyond: int) -> bool:
    return await row_count(dsn) > beyond


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


async def test_sigkills_and_a_postgres_outage_lose_nothing_and_duplicate_nothing(
    settings: Settings, postgres: PostgresService, tmp_path: Path
) -> None:
    # A short session timeout and static membership (the instance id) make restarts quick.
    s = settings.model_copy(update={"kafka_session_timeout_ms": 6000, "audit_batch_size": 100})
    dsn = s.postgres_dsn
    log = tmp_path / "sink.log"
    stop = asyncio.Event()
    producing = asyncio.create_task(_produce(s, stop))
    proc: subprocess.Popen[bytes] | None = None
    rng = random.Random(3)
    try:
        for kill in range(KILLS):
            await asyncio.sleep(1.0)  # a backlog builds up while no sink runs
            proc = spawn(["sink", "run"], s, log)
            before = await row_count(dsn)
            # Killed mid-stream: only once this process has stored rows of its own.
            await wait_for(lambda b=before: _grows(dsn, max(b, 0) + 100), timeout=120, what="sink progress")
            if kill == 2:
                if postgres.local is None:
                    warnings.warn(
                        f"Postgres is external ({postgres.kind}): the outage part is skipped", stacklevel=1
                    )
                else:
                    await asyncio.to_thread(postgres.local.stop)
                    await asyncio.sleep(OUTAGE_S)  # producers keep producing meanwhile
                    assert proc.poll() is None, "the sink died while Postgres was down"
                    await asyncio.to_thread(postgres.local.start)
                    resumed_from = await row_count(dsn)
                    await wait_for(lambda r=resumed_from: _grows(dsn, r + 100), timeout=120, what="resume")
                    assert proc.poll() is None
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            _kill(proc)
        proc = spawn(["sink", "run"], s, log)
        await asyncio.sleep(2.0)  # this one, too, starts while producers are busy
        stop.set()
        produced = await producing
        expected, _ = await readable_records(s)
        assert len(expected) > produced * 0.8  # most of what was sent is readable (aborted: not)

        async def caught_up() -> bool:
            return await row_count(dsn) >= len(expected)

        await wait_for(caught_up, timeout=180, what="rows for every readable record")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0, "the sink did not stop cleanly on SIGTERM"
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            _kill(proc)
        if postgres.local is not None and not postgres.local.running:
            await asyncio.to_thread(postgres.local.start)
        if not producing.done():
            producing.cancel()

    coords, dups = await audit_coords(dsn)
    assert dups == 0 and len(coords) == len(set(coords))
    assert set(coords) == expected
    text = log.read_text(errors="replace")
    assert text.count("consuming ^") == KILLS + 1  # every start joined and consumed
    if postgres.local is not None:
        assert "pausing consumption" in text and "Postgres is back" in text
