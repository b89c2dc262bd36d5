"""The model's gate serves chat before bulk before ingestion, first come first served within a
priority, and survives waiters that give up."""

from __future__ import annotations

import asyncio

from processors.embedding import Priority, PriorityGate


async def test_waiters_are_served_by_priority_then_arrival() -> None:
    gate = PriorityGate()
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.hold(Priority.INGEST):
            await release.wait()

    async def waiter(name: str, priority: Priority) -> None:
        async with gate.hold(priority):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks = [
        asyncio.create_task(waiter(name, prio))
        for name, prio in [
            ("ingest-1", Priority.INGEST),
            ("bulk-1", Priority.BULK),
            ("chat-1", Priority.CHAT),
            ("bulk-2", Priority.BULK),
            ("chat-2", Priority.CHAT),
        ]
    ]
    await asyncio.sleep(0)
    assert order == []  # all wait for the holder
    release.set()
    await asyncio.gather(first, *tasks)
    assert order == ["chat-1", "chat-2", "bulk-1", "bulk-2", "ingest-1"]


async def test_a_cancelled_waiter_does_not_block_the_gate() -> None:
    gate = PriorityGate()
    release = asyncio.Event()
    served: list[str] = []

    async def holder() -> None:
        async with gate.hold(Priority.CHAT):
            await release.wait()

    async def waiter(name: str) -> None:
        async with gate.hold(Priority.CHAT):
            served.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    doomed = asyncio.create_task(waiter("doomed"))
    survivor = asyncio.create_task(waiter("survivor"))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, survivor)
    assert served == ["survivor"]
    async with asyncio.timeout(1):  # the gate is free again
        async with gate.hold(Priority.BULK):
            served.append("after")
    assert served == ["survivor", "after"]
