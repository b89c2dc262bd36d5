"""`ragbus start worker --instances 2` runs two workers with stable slot identities: a slot that
comes back after a crash fences the transaction its predecessor left open at once, so no
read_committed reader of the partitions it wrote waits for the transaction's timeout."""

from __future__ import annotations

from aiokafka import TopicPartition

from cli.background import backgrounds, instance_id_for
from cli.components import component_states
from infra.kafka.clients import make_consumer, make_producer, transactional_id
from infra.settings import Settings
from tests.helpers import run_ragbus, wait_for

#: Far beyond the test's patience: only fencing, never the timeout, can end the transaction.
ABANDONED_TIMEOUT_MS = 600_000


async def _offsets(settings: Settings, tp: TopicPartition) -> tuple[int, int]:
    """(last stable offset, high watermark) of `tp`."""
    offsets = []
    for isolation in ("read_committed", "read_uncommitted"):
        consumer = make_consumer(settings, group_id=None, isolation_level=isolation)
        await consumer.start()
        try:
            offsets.append((await consumer.end_offsets([tp]))[tp])
        finally:
            await consumer.stop()
    return offsets[0], offsets[1]


async def _abandon_transaction(settings: Settings, txn_id: str, tp: TopicPartition) -> None:
    """Begin a transaction as `txn_id`, write into it, and vanish without ending it (a crash)."""
    producer = make_producer(settings, transactional_id=txn_id, transaction_timeout_ms=ABANDONED_TIMEOUT_MS)
    await producer.start()
    await producer.begin_transaction()
    await producer.send_and_wait(tp.topic, b"left open by a crashed worker", partition=tp.partition)
    await producer.stop()  # aiokafka's stop flushes and disconnects; it never ends the transaction


async def test_a_restarted_slot_fences_its_predecessor_at_once(settings: Settings) -> None:
    slot = 1
    slot_settings = settings.model_copy(update={"instance_id": instance_id_for(settings, slot)})
    tp = TopicPartition(settings.topics.tenant("acme").responses("chat"), 0)
    await _abandon_transaction(settings, transactional_id(slot_settings, "worker"), tp)
    stable, high = await _offsets(settings, tp)
    assert stable < high, "the abandoned transaction must hold the partition's readers back"

    code, out, err = await run_ragbus(settings, "start", "worker", "--instances", "2")
    assert code == 0, out + err
    try:
        running = {s.name for s in component_states(settings) if s.running}
        assert {"worker", "worker-1"} <= running, running

        async def fenced() -> bool:
            stable, high = await _offsets(settings, tp)
            return stable == high

        # The worker in slot 1 takes over its transactional id when it starts: the coordinator
        # aborts the open transaction then, 10 minutes before its timeout would have.
        await wait_for(fenced, timeout=120, what="slot 1's worker to fence the abandoned transaction")
    finally:
        code, out, err = await run_ragbus(settings, "stop", "worker")
    assert code == 0, out + err
    assert "worker-1" in out and not any(bg.running for bg in backgrounds(settings, ["worker"]))
