"""The processors' micro-batcher: a window that opens with the first event (so an idle agent
sleeps instead of waking up every window), and without a window a batch that is whatever has
arrived (so a lone request does not wait)."""

from __future__ import annotations

import asyncio
import time

import pytest

from processors.streams import _next_batch


def queues(*events: int, max_batch: int = 8) -> tuple[asyncio.Queue[int], asyncio.Queue[int]]:
    pulled: asyncio.Queue[int] = asyncio.Queue(maxsize=max_batch)
    for e in events:
        pulled.put_nowait(e)
    return pulled, asyncio.Queue()  # the second: faust's channel, here with nothing on its way


async def test_without_a_window_a_lone_event_goes_at_once() -> None:
    pulled, channel = queues(1)
    puller = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    assert await _next_batch(pulled, puller, channel, 8, 0.0) == [1]
    assert time.monotonic() - started < 0.05


async def test_without_a_window_a_batch_is_what_has_arrived_up_to_the_maximum() -> None:
    pulled, channel = queues(1, 2, 3, 4, 5)
    puller = asyncio.get_running_loop().create_future()
    assert await _next_batch(pulled, puller, channel, 3, 0.0) == [1, 2, 3]
    assert await _next_batch(pulled, puller, channel, 3, 0.0) == [4, 5]


async def test_the_window_opens_with_the_first_event_and_takes_what_comes_in_it() -> None:
    pulled, channel = queues(max_batch=8)
    puller = asyncio.get_running_loop().create_future()

    async def feed() -> None:
        await asyncio.sleep(0.2)  # idle: no batch, no wake-ups
        for e in (1, 2):
            await pulled.put(e)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        await pulled.put(3)  # after the window: the next batch

    feeder = asyncio.create_task(feed())
    started = time.monotonic()
    assert await _next_batch(pulled, puller, channel, 8, 0.1) == [1, 2]
    took = time.monotonic() - started
    assert 0.28 <= took < 0.45, took  # 0.2 s idle, then the 0.1 s window from the first event
    assert await _next_batch(pulled, puller, channel, 8, 0.1) == [3]
    await feeder


async def test_a_stream_that_ended_gives_an_empty_batch_and_an_error_propagates() -> None:
    pulled, channel = queues()
    ended = asyncio.get_running_loop().create_future()
    ended.set_result(None)
    assert await _next_batch(pulled, ended, channel, 8, 0.0) == []
    failed = asyncio.get_running_loop().create_future()
    failed.set_exception(RuntimeError("the stream broke"))
    with pytest.raises(RuntimeError, match="the stream broke"):
        await _next_batch(pulled, failed, channel, 8, 0.0)
