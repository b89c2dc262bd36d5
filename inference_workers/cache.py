"""Exact-match response cache: the same model, tenant, rendered prompt, context and sampling give the
same answer, so a repeat is served without the engine.

Only deterministic requests are cached (temperature 0, or a fixed seed): a sampled answer is not
"the" answer. Entries live in a bounded in-process LRU and, when `redis_url` is set, in Redis (shared
by every worker, with a TTL). The cache is an optimisation: a Redis failure is logged and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from schemas import RetrievedChunk, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def cacheable(sampling: SamplingParams) -> bool:
    """Deterministic, and one plain answer: an entry holds one text, so several choices (`n`) or
    logprobs are generated every time. The key covers every sampling field (response_format too)."""
    if sampling.n > 1 or sampling.logprobs:
        return False
    return sampling.temperature == 0.0 or sampling.seed is not None


def context_hash(chunks: list[RetrievedChunk]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(json.dumps([c.doc_id, c.chunk_id, c.text], ensure_ascii=False).encode())
    return h.hexdigest()


def cache_key(
    *, model: str, tenant_id: str, prompt: str, chunks: list[RetrievedChunk], sampling: SamplingParams
) -> str:
    payload = json.dumps(
        {
            "model": model,
            "tenant": tenant_id,
            "prompt": prompt,
            "context": context_hash(chunks),
            "sampling": sampling.model_dump(mode="json"),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class ResponseCache:
    def __init__(
        self,
        size: int,
        *,
        redis_url: str | None = None,
        ttl_s: int = 3600,
        namespace: str = "ragbus",
    ) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self.namespace = namespace
        self._lru: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._redis: Any = None
        self._redis_url = redis_url
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0 or self._redis_url is not None

    async def start(self) -> None:
        if self._redis_url:
            import redis.asyncio as redis

            # Short timeouts: an unreachable Redis must cost a lookup little, never stall a batch.
            self._redis = redis.from_url(self._redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                await self._redis.ping()
                log.info("response cache: Redis at %s", self._redis_url.rsplit("@", 1)[-1])
            except Exception as e:  # noqa: BLE001 - the cache is optional
                log.warning("response cache: Redis unreachable (%s); in-process cache until it answers", e)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _rkey(self, key: str) -> str:
        return f"{self.namespace}:answer:{key}"

    async def get(self, key: str) -> CachedAnswer | None:
        found = self._lru.get(key)
        if found is not None:
            self._lru.move_to_end(key)
            self.hits += 1
            return found
        if self._redis is not None:
            try:
                raw = await self._redis.get(self._rkey(key))
            except Exception as e:  # noqa: BLE001
                log.warning("response cache: Redis get failed: %s", e)
                raw = None
            if raw:
                try:
                    found = CachedAnswer(**json.loads(raw))
                except (ValueError, TypeError):
                    found = None
                if found is not None:
                    self._remember(key, found)
                    self.hits += 1
                    return found
        self.misses += 1
        return None

    async def put(self, key: str, answer: CachedAnswer) -> None:
        self._remember(key, answer)
        if self._redis is not None:
            try:
                await self._redis.set(self._rkey(key), json.dumps(asdict(answer)), ex=self.ttl_s)
            except Exception as e:  # noqa: BLE001
                log.warning("response cache: Redis set failed: %s", e)

    def _remember(self, key: str, answer: CachedAnswer) -> None:
        if self.size <= 0:
            return
        self._lru[key] = answer
        self._lru.move_to_end(key)
        while len(self._lru) > self.size:
            self._lru.popitem(last=False)

    def __len__(self) -> int:
        return len(self._lru)
