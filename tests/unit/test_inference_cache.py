"""The response cache's keys and its bounded in-process LRU."""

from __future__ import annotations

from inference_workers.cache import CachedAnswer, ResponseCache, cache_key, cacheable
from schemas import RetrievedChunk, SamplingParams


def key(**kw: object) -> str:
    args: dict[str, object] = {
        "model": "m",
        "tenant_id": "t",
        "prompt": "p",
        "chunks": [RetrievedChunk(chunk_id="c", doc_id="d", text="x", score=1.0)],
        "sampling": SamplingParams(max_tokens=8),
    }
    args.update(kw)
    return cache_key(**args)  # type: ignore[arg-type]


def test_every_part_of_the_key_matters() -> None:
    base = key()
    assert base == key()
    assert base != key(model="m2")
    assert base != key(tenant_id="t2")
    assert base != key(prompt="p2")
    assert base != key(chunks=[RetrievedChunk(chunk_id="c", doc_id="d", text="y", score=1.0)])
    assert base != key(sampling=SamplingParams(max_tokens=9))


def test_only_deterministic_sampling_is_cached() -> None:
    assert cacheable(SamplingParams(temperature=0.0))
    assert cacheable(SamplingParams(temperature=0.7, seed=3))
    assert not cacheable(SamplingParams(temperature=0.7))


async def test_lru_is_bounded_and_keeps_the_recently_used() -> None:
    cache = ResponseCache(2)
    answer = CachedAnswer("a", 1, 1, "stop")
    await cache.put("k1", answer)
    await cache.put("k2", answer)
    assert await cache.get("k1") == answer  # k1 is now the most recent
    await cache.put("k3", answer)
    assert len(cache) == 2
    assert await cache.get("k2") is None and await cache.get("k3") == answer
    assert (cache.hits, cache.misses) == (2, 1)
    off = ResponseCache(0)
    await off.put("k", answer)
    assert not off.enabled and await off.get("k") is None
