"""The response cache shared through a real Redis server: an answer cached by one worker process is
a hit for another. Runs where `redis-server` is installed (Debian: apt-get install redis-server)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_workers.cache import CachedAnswer, ResponseCache
from infra.procs import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_an_answer_cached_by_one_worker_is_a_hit_for_another(redis_url: str) -> None:
    answer = CachedAnswer("Paris [1]", 120, 3, "stop")
    one = ResponseCache(16, redis_url=redis_url, ttl_s=60, namespace="t1")
    two = ResponseCache(16, redis_url=redis_url, ttl_s=60, namespace="t1")
    other = ResponseCache(16, redis_url=redis_url, ttl_s=60, namespace="t2")
    for c in (one, two, other):
        await c.start()
    try:
        assert await two.get("k") is None
        await one.put("k", answer)
        assert await two.get("k") == answer  # from Redis, then remembered in-process
        assert len(two) == 1
        assert await other.get("k") is None  # another topic prefix, another namespace
    finally:
        for c in (one, two, other):
            await c.close()


async def test_an_unreachable_redis_degrades_to_the_local_cache() -> None:
    cache = ResponseCache(4, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    await cache.start()
    try:
        await cache.put("k", CachedAnswer("x", 1, 1, "stop"))
        assert await cache.get("k") == CachedAnswer("x", 1, 1, "stop")
    finally:
        await cache.close()
